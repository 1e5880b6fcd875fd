"""The unit files and ``kmuxd install-units``, without a running systemd.

Renders the units into a temporary prefix (a DESTDIR), then checks them with
``systemd-analyze``: the hardening score (``security --offline=true``, the
issue's target is 2.0 or lower) and ``verify``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kmuxd.system import install

from .conftest import KMUXD, MEASURED, REPO

SECURITY_TARGET = 2.0
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def run_kmuxd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([KMUXD, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    proc = run_kmuxd("install-units", "--prefix", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "not running systemd-sysusers or systemctl" in proc.stdout
    return tmp_path


def unit(prefix: Path, name: str) -> Path:
    return prefix / "etc/systemd/system" / name


def directives(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def security_score(path: Path) -> float:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(path)],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, f"no score in systemd-analyze output:\n{proc.stdout}\n{proc.stderr}"
    return float(m.group(1))


def test_install_writes_every_file_with_this_kmuxd(prefix: Path) -> None:
    service = directives(unit(prefix, "kmuxd.service"))
    config = "/etc/kmuxd/kmuxd.toml"
    assert service["ExecStart"] == [f"{KMUXD} --config {config}"]
    assert service["ExecStartPre"] == [f"{KMUXD} --config {config} --check"]
    assert service["ExecReload"] == [f"{KMUXD} --config {config} --check", "/bin/kill -HUP $MAINPID"]
    for key, value in {"Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "RuntimeDirectory": "kmuxd",
                       "RuntimeDirectoryPreserve": "yes", "ConfigurationDirectory": "kmuxd",
                       "CapabilityBoundingSet": "", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "PrivateTmp": "yes", "PrivateDevices": "yes",
                       "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6"}.items():
        assert service[key] == [value], key
    assert service["ProtectHome"][0] in ("yes", "tmpfs")
    assert "PrivateNetwork" not in service and "IPAddressDeny" not in service  # it dials any endpoint
    assert service["WatchdogSec"]
    apps = directives(unit(prefix, "kmuxd.socket"))
    assert apps["ListenSequentialPacket"] == ["/run/kmuxd/kmuxd.sock"]
    assert (apps["FileDescriptorName"], apps["SocketGroup"], apps["SocketMode"]) == (["kmuxd"], ["kmux"], ["0660"])
    control = directives(unit(prefix, "kmuxd-control.socket"))
    assert control["ListenSequentialPacket"] == ["/run/kmuxd/control.sock"]
    assert (control["FileDescriptorName"], control["SocketUser"], control["SocketMode"]) == (["control"], ["root"], ["0600"])
    assert "g kmux - -" in (prefix / "etc/sysusers.d/kmuxd.conf").read_text()
    # The example configuration is valid and names the sockets the units listen on.
    example = prefix / "etc/kmuxd/kmuxd.toml"
    check = run_kmuxd("--config", str(example), "--check")
    assert check.returncode == 0, check.stderr
    text = example.read_text()
    assert 'socket = "/run/kmuxd/kmuxd.sock"' in text and 'control_socket = "/run/kmuxd/control.sock"' in text


@needs_analyze
def test_security_score_is_at_most_2(prefix: Path) -> None:
    rendered = security_score(unit(prefix, "kmuxd.service"))
    shipped = security_score(REPO / "packaging/systemd/kmuxd.service")
    MEASURED["systemd-analyze security --offline=true kmuxd.service"] = f"{rendered} (shipped file: {shipped})"
    assert rendered <= SECURITY_TARGET
    assert shipped <= SECURITY_TARGET


@needs_analyze
def test_units_verify(prefix: Path) -> None:
    units = [str(unit(prefix, name)) for name in install.UNITS]
    # verify runs `man` for each Documentation=man:...: point it at the pages install-units wrote.
    env = dict(os.environ, MANPATH=str(prefix / install.DEFAULT_MAN_DIR.lstrip("/")))
    proc = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60,
                          cwd=unit(prefix, ""), env=env)
    assert proc.returncode == 0, proc.stderr
    problems = [ln for ln in proc.stderr.splitlines() if "kmuxd" in ln and "Failed to parse system call" not in ln]
    assert not problems, "\n".join(problems)


def test_uninstall_removes_exactly_what_install_wrote(prefix: Path) -> None:
    foreign = prefix / "etc/systemd/system/other.service"
    foreign.write_text("[Service]\nExecStart=/bin/true\n")
    config = prefix / "etc/kmuxd/kmuxd.toml"
    config.write_text(config.read_text() + "# edited\n")
    again = run_kmuxd("install-units", "--prefix", str(prefix))  # an upgrade overwrites units, keeps the config
    assert again.returncode == 0 and f"kept {config}" in again.stdout
    assert config.read_text().endswith("# edited\n")
    proc = run_kmuxd("uninstall-units", "--prefix", str(prefix))
    assert proc.returncode == 0, proc.stderr
    left = sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*") if p.is_file())
    assert left == ["etc/kmuxd/kmuxd.toml", "etc/systemd/system/other.service"]
    proc = run_kmuxd("uninstall-units", "--prefix", str(prefix), "--purge")
    assert proc.returncode == 0, proc.stderr
    assert not config.exists() and not config.parent.exists() and foreign.exists()


def test_install_refuses_to_overwrite_a_unit_it_did_not_write(tmp_path: Path) -> None:
    theirs = unit(tmp_path, "kmuxd.service")
    theirs.parent.mkdir(parents=True)
    theirs.write_text("[Service]\nExecStart=/opt/vendor/kmuxd\n")
    proc = run_kmuxd("install-units", "--prefix", str(tmp_path))
    assert proc.returncode == 1 and "not written by install-units" in proc.stderr
    assert theirs.read_text().startswith("[Service]")
    assert not unit(tmp_path, "kmuxd.socket").exists()  # nothing half-installed
    proc = run_kmuxd("install-units", "--prefix", str(tmp_path), "--force")
    assert proc.returncode == 0 and theirs.read_text().startswith(install.MARKER)
    # uninstall leaves a foreign unit alone
    theirs.write_text("[Service]\nExecStart=/opt/vendor/kmuxd\n")
    proc = run_kmuxd("uninstall-units", "--prefix", str(tmp_path))
    assert proc.returncode == 0 and f"kept {theirs}" in proc.stdout and theirs.exists()


def test_kmuxd_under_home_gets_a_read_only_view(tmp_path: Path) -> None:
    notes: list[str] = []
    files = install.render_units("/home/ann/venv/bin/kmuxd", "/etc/kmuxd", tmp_path,
                                 code_paths=["/home/ann/venv/bin/kmuxd", "/home/ann/venv", "/home/ann/src/kmuxd",
                                             "/usr/lib/python3.11"], notes=notes)
    service = next(f for f in files if f.path.name == "kmuxd.service").text
    assert "ProtectHome=tmpfs\nBindReadOnlyPaths=/home/ann/src/kmuxd /home/ann/venv\n" in service
    assert notes and "ProtectHome=tmpfs" in notes[0]
    # Under /tmp (CI may clone there): PrivateTmp= stays, the tree is bound in read-only.
    notes = []
    files = install.render_units("/tmp/venv/bin/kmuxd", "/etc/kmuxd", tmp_path,
                                 code_paths=["/tmp/venv/bin/kmuxd", "/tmp/venv", "/usr/lib/python3.11"], notes=notes)
    service = next(f for f in files if f.path.name == "kmuxd.service").text
    assert "PrivateTmp=yes\nBindReadOnlyPaths=/tmp/venv\n" in service
    assert notes and "private /tmp" in notes[0]
    with pytest.raises(install.InstallError, match="absolute"):
        install.render_units("kmuxd", "/etc/kmuxd", tmp_path)


def test_other_config_dir(tmp_path: Path) -> None:
    proc = run_kmuxd("install-units", "--prefix", str(tmp_path), "--config-dir", "/etc/kmuxd-b")
    assert proc.returncode == 0, proc.stderr
    service = directives(unit(tmp_path, "kmuxd.service"))
    assert service["ExecStart"] == [f"{KMUXD} --config /etc/kmuxd-b/kmuxd.toml"]
    assert service["ConfigurationDirectory"] == ["kmuxd-b"]
    assert (tmp_path / "etc/kmuxd-b/kmuxd.toml").is_file()


def test_daemon_command_line_is_unchanged(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("version = 1\n[groups.a]\nendpoints = ['127.0.0.1:1']\nconnections = 0\n")
    proc = run_kmuxd("--config", str(bad), "--check")
    assert proc.returncode == 1 and "groups.a.connections" in proc.stderr
    proc = run_kmuxd("--help")
    assert proc.returncode == 0 and "--check" in proc.stdout and "install-units" in proc.stdout


def test_man_pages_are_installed_and_marked(prefix: Path) -> None:
    for page in install.MAN_PAGES:
        path = prefix / "usr/local/share/man" / f"man{page.rsplit('.', 1)[1]}" / page
        first, rest = path.read_text().split("\n", 1)
        assert first == f'.\\" {install.MARKER}'  # a roff comment
        assert rest == (REPO / "kmuxd/share/man" / page).read_text()


def test_packaged_layout_for_a_distribution_package(tmp_path: Path) -> None:
    proc = run_kmuxd("install-units", "--packaged", "--prefix", str(tmp_path), "--kmuxd", "/usr/sbin/kmuxd")
    assert proc.returncode == 0, proc.stderr
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["etc/kmuxd/kmuxd.toml", "lib/systemd/system/kmuxd-control.socket",
                     "lib/systemd/system/kmuxd.service", "lib/systemd/system/kmuxd.socket",
                     "usr/lib/sysusers.d/kmuxd.conf", "usr/share/man/man5/kmuxd.toml.5",
                     "usr/share/man/man8/kmux-cli.8", "usr/share/man/man8/kmuxd.8"]
    service = tmp_path / "lib/systemd/system/kmuxd.service"
    assert install.MARKER not in service.read_text()  # dpkg owns it; uninstall-units must never remove it
    assert directives(service)["ExecStart"] == ["/usr/sbin/kmuxd --config /etc/kmuxd/kmuxd.toml"]
    assert directives(service)["Documentation"] == [
        "man:kmuxd(8) man:kmuxd.toml(5) file:///usr/share/doc/kmuxd/systemd.md"]
    # Not a live install: it needs a DESTDIR and the packaged path of kmuxd.
    proc = run_kmuxd("install-units", "--packaged", "--prefix", str(tmp_path))
    assert proc.returncode == 1 and "--kmuxd" in proc.stderr


def test_install_refuses_to_shadow_a_package(tmp_path: Path) -> None:
    packaged = tmp_path / "lib/systemd/system/kmuxd.service"
    packaged.parent.mkdir(parents=True)
    packaged.write_text("[Service]\nExecStart=/usr/sbin/kmuxd\n")
    proc = run_kmuxd("install-units", "--prefix", str(tmp_path))
    assert proc.returncode == 1 and "installed by a package" in proc.stderr
    assert not unit(tmp_path, "kmuxd.service").exists()
    proc = run_kmuxd("install-units", "--prefix", str(tmp_path), "--force")
    assert proc.returncode == 0 and unit(tmp_path, "kmuxd.service").exists()
