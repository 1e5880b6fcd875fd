"""The wheel path in a real systemd (sdbox): a venv at /opt/kmuxd, pip install offline, install-units --now.

What docs/systemd.md tells an administrator without the Debian package:
Debian's python3 makes a venv at /opt/kmuxd, pip installs the kmuxd wheel
from the wheelhouse packaging/build.sh made (``--no-index``: the container
has no network), the configuration is edited, then ``kmuxd install-units
--now``. Nothing comes from a checkout: the units, the sysusers entry, the
example configuration and the man pages are the wheel's package data.

Both wheels go the whole way: the one pip picks from the wheelhouse (the
compiled one, on this machine's Python), and the pure-Python
``py3-none-any`` one, for a Python or a machine the compiled one does not
fit (docs/systemd.md, "Which wheel").
"""

from __future__ import annotations

import zipfile

import pytest

from .conftest import MEMBER, REPO, Artefacts, Box, Service, add_users, boot_box, start_backends

VENV = "/opt/kmuxd"
KMUXD = f"{VENV}/bin/kmuxd"
CONFIG = "/etc/kmuxd/kmuxd.toml"
UNITS = ("kmuxd.service", "kmuxd.socket", "kmuxd-control.socket")


def config(ports: dict[str, int]) -> str:
    return f'version = 1\n[groups.echo]\nendpoints = ["127.0.0.1:{ports["echo"]}"]\nconnections = 2\n'


@pytest.fixture(scope="module")
def wheel_box(artefacts: Artefacts):
    with boot_box((str(artefacts.dir),)) as b:
        yield b


@pytest.fixture(scope="module")
def ports(wheel_box: Box) -> dict[str, int]:
    return start_backends(wheel_box, {"echo": True})


@pytest.fixture(scope="module", params=["from the wheelhouse", "pure Python"])
def venv(request, wheel_box: Box, ports: dict[str, int], artefacts: Artefacts) -> Service:
    """kmuxd pip-installed into /opt/kmuxd (one wheel, then the other); an echo backend; no units yet."""
    box = wheel_box
    box.run(KMUXD, "uninstall-units", check=False)  # the other wheel's, if it ran first
    box.run("rm", "-rf", VENV)
    box.run("/usr/bin/python3", "-m", "venv", VENV)
    # The wheelhouse has both kmuxd wheels: pip takes the compiled one where it fits.
    which = "kmuxd" if request.param == "from the wheelhouse" else str(artefacts.pure_wheel)
    # PIP_CONFIG_FILE: this machine's pip.conf names local indexes; an administrator's pip has none.
    box.run("env", "PIP_CONFIG_FILE=/dev/null", f"{VENV}/bin/pip", "install", "--no-index",
            f"--find-links={artefacts.wheelhouse}", which, timeout=180)
    version = box.run(KMUXD, "--version").stdout
    if request.param == "pure Python":
        assert "(pure Python: not built (pure-Python install))" in version, version
    else:
        assert artefacts.wheel.name.endswith("-py3-none-any.whl") or "(data path compiled by mypyc)" in version, version
    box.write(CONFIG, config(ports))  # edited before install-units --now, as the README says
    service = Service(box, ports)
    service.param = request.param
    return service


def test_both_wheels_carry_the_units_of_packaging_systemd_byte_for_byte(artefacts: Artefacts) -> None:
    """packaging/systemd/ is the units' one source; the build copies it into the package."""
    source = {p.name: p.read_bytes() for p in (REPO / "packaging" / "systemd").iterdir()}
    for wheel in (artefacts.wheel, artefacts.pure_wheel):
        with zipfile.ZipFile(wheel) as z:
            units = {n.rsplit("/", 1)[1]: z.read(n) for n in z.namelist() if n.endswith((".service", ".socket"))}
            assert all(n.startswith("kmuxd/share/systemd/") for n in z.namelist() if n.endswith((".service", ".socket")))
        assert units == source, wheel.name


def _install_units(svc: Service) -> str:
    if svc.box.run("test", "-f", "/etc/systemd/system/kmuxd.service", check=False).returncode == 0:
        return ""
    proc = svc.box.run(KMUXD, "install-units", "--now")
    if svc.box.run("id", MEMBER, check=False).returncode != 0:
        add_users(svc.box)  # group kmux exists from here on
    return proc.stdout


def test_install_units_now_from_the_wheel_serves_a_member(venv: Service) -> None:
    box = venv.box
    box.run(KMUXD, "uninstall-units", check=False)
    out = _install_units(venv)
    assert f"ExecStart={KMUXD} --config {CONFIG}" in out and f"kept {CONFIG}" in out, out
    assert "note:" not in out, out  # /opt needs no ProtectHome=/PrivateTmp= exceptions
    venv.wait_running()
    unit = box.read("/etc/systemd/system/kmuxd.service")
    assert "ProtectHome=yes\n" in unit and "BindReadOnlyPaths" not in unit
    # No checkout behind a wheel: Documentation= keeps the man pages only.
    assert "Documentation=man:kmuxd(8) man:kmuxd.toml(5)\n" in unit
    assert box.run("systemctl", "is-enabled", *UNITS).stdout.split() == ["enabled"] * 3
    assert "/usr/local/share/man/man8/kmuxd.8" in box.run("man", "-w", "kmuxd").stdout.replace("/usr/local/man/",
                                                                                               "/usr/local/share/man/")
    # A tag of this wheel's own: both wheels' runs share the box and its echo backend's records.
    tag = 31 if venv.param == "from the wheelhouse" else 32
    result = box.agent("ping", "--group=echo", f"--tag={tag}", "--count=50", user=MEMBER, python=f"{VENV}/bin/python")
    assert result["uid"] != 0 and result["received"] == 50 and result["same"], result
    assert result["kmux"].startswith(f"{VENV}/"), result  # the wheel's client library
    assert venv.records("echo")[(tag, 50)] == 1


def test_uninstall_units_removes_what_it_wrote(venv: Service) -> None:
    box = venv.box
    _install_units(venv)
    out = box.run(KMUXD, "uninstall-units", "--purge").stdout
    assert "removed /etc/systemd/system/kmuxd.service" in out and "removed /usr/local/share/man/man8/kmuxd.8" in out
    assert venv.props("LoadState")["LoadState"] == "not-found"
    left = box.run("sh", "-c", "ls /etc/systemd/system/kmuxd* /etc/sysusers.d/kmuxd.conf "
                   "/usr/local/share/man/man*/kmux* /etc/kmuxd 2>/dev/null; true").stdout.split()
    assert not left, left
    # Put the configuration back for a test that runs after this one.
    box.write(CONFIG, config(venv.ports))
