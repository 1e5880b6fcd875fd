"""The Debian package in a real systemd (sdbox): install, start, a member's message, reload, upgrade, purge.

``packaging/build.sh`` builds the .deb once per run (the ``artefacts``
fixture); one container for the module installs it with ``dpkg -i`` as an
administrator would, from a directory bound read-only into the container.
The container's root is an overlay of this machine's, so dpkg sees this
machine's package database and Depends: (python3.X, libsystemd0) are met
without a network; nothing is written back.

Each test stands alone: the ``deb`` fixture installs the package if a test
before it purged it, and puts back the test configuration.

This machine's image ships ``/usr/sbin/policy-rc.d`` exiting 101 (a Docker
convention that forbids maintainer scripts to start or stop services); the
fixture removes it inside the container so the package's scripts run as on
a real Debian system.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kmuxd.system import install

from .conftest import MEMBER, Artefacts, Box, Service, add_users, boot_box, start_backends, wait_until

CONFIG = "/etc/kmuxd/kmuxd.toml"
#: The package's own interpreter: the agent imports the kmux library the package ships.
PACKAGED_PYTHON = "/usr/lib/kmuxd/bin/python3"
UNITS = ("kmuxd.service", "kmuxd.socket", "kmuxd-control.socket")


def config(ports: dict[str, int], *, extra: bool = False) -> str:
    text = f"""version = 1
[daemon]
socket = "/run/kmuxd/kmuxd.sock"
control_socket = "/run/kmuxd/control.sock"

[groups.echo]
endpoints = ["127.0.0.1:{ports['echo']}"]
connections = 2
"""
    if extra:
        text += f'\n[groups.again]\nendpoints = ["127.0.0.1:{ports["echo"]}"]\nconnections = 1\n'
    return text


class Package(Service):
    """The installed .deb, its kmuxd.service, and the echo backend."""

    def __init__(self, box: Box, ports: dict[str, int], deb: str) -> None:
        super().__init__(box, ports)
        self.deb = deb

    def installed(self) -> bool:
        status = self.box.run("dpkg-query", "-W", "-f=${Status}", "kmuxd", check=False).stdout
        return status == "install ok installed"

    def install(self) -> str:
        """``dpkg -i`` (keeping a changed conffile, as an upgrade must); its output."""
        proc = self.box.run("env", "DEBIAN_FRONTEND=noninteractive", "dpkg", "--force-confold", "-i", self.deb)
        return proc.stdout + proc.stderr

    def purge(self) -> str:
        proc = self.box.run("dpkg", "--purge", "kmuxd")
        return proc.stdout + proc.stderr

    def configure(self, **kw) -> None:
        self.box.write(CONFIG, config(self.ports, **kw))


@pytest.fixture(scope="module")
def pkg_box(artefacts: Artefacts):
    with boot_box((str(artefacts.dir),)) as b:
        b.run("rm", "-f", "/usr/sbin/policy-rc.d")
        yield b


@pytest.fixture(scope="module")
def package(pkg_box: Box, artefacts: Artefacts) -> Package:
    ports = start_backends(pkg_box, {"echo": True})
    pkg = Package(pkg_box, ports, str(artefacts.deb))
    pkg.install()  # creates group kmux, which the member user needs
    add_users(pkg_box)
    return pkg


@pytest.fixture
def deb(package: Package) -> Package:
    """The package installed, configured for the echo backend, and its service running that configuration."""
    if not package.installed():
        package.install()
    if package.box.read(CONFIG) != config(package.ports):
        package.configure()
        if package.props("ActiveState")["ActiveState"] == "active":
            package.box.run("systemctl", "restart", "kmuxd.service")
    return package


def test_install_enables_the_units_without_starting_them(deb: Package) -> None:
    box = deb.box
    deb.purge()
    out = deb.install()
    # postinst: systemd-sysusers (group kmux), deb-systemd-helper enable (sockets.target, multi-user.target).
    assert "Setting up kmuxd" in out, out
    assert box.run("getent", "group", "kmux").stdout.startswith("kmux:")
    assert box.run("systemctl", "is-enabled", *UNITS).stdout.split() == ["enabled"] * 3
    # Not started: the example configuration names a placeholder service.
    assert box.run("systemctl", "is-active", *UNITS, check=False).stdout.split() == ["inactive"] * 3
    unit = box.read("/lib/systemd/system/kmuxd.service")
    assert "ExecStart=/usr/sbin/kmuxd --config /etc/kmuxd/kmuxd.toml\n" in unit
    assert "install-units" not in unit.splitlines()[0]  # dpkg's file, not install-units'
    assert box.run("dpkg-query", "-W", "-f=${Conffiles}", "kmuxd").stdout.split()[0] == CONFIG
    assert box.run("/usr/sbin/kmuxd", "--config", CONFIG, "--check").returncode == 0
    assert box.run("kmux-cli", "--version").stdout.startswith("kmux-cli ")
    pages = box.run("man", "-w", "kmuxd", "kmux-cli", "kmuxd.toml").stdout.split()
    assert pages == ["/usr/share/man/man8/kmuxd.8.gz", "/usr/share/man/man8/kmux-cli.8.gz",
                     "/usr/share/man/man5/kmuxd.toml.5.gz"]
    # A wheel's install-units would shadow the package's units in /etc: it refuses.
    proc = box.run("/usr/sbin/kmuxd", "install-units", check=False)
    assert proc.returncode == 1 and "installed by a package" in proc.stderr


def test_the_package_runs_on_and_depends_on_the_distributions_python(deb: Package, artefacts: Artefacts) -> None:
    """Built on /usr/bin/python3 (whatever minor version this release ships), the venv links to
    that interpreter by its versioned name, the package Depends on exactly it, and the data path
    is compiled for it."""
    version = deb.box.run("/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])").stdout.strip()
    depends = deb.box.run("dpkg-query", "-W", "-f=${Depends}", "kmuxd").stdout
    assert f"python{version}" in [d.strip().split()[0] for d in depends.split(",")], depends
    assert deb.box.run("readlink", "-f", PACKAGED_PYTHON).stdout.strip() == f"/usr/bin/python{version}"
    assert "(data path compiled by mypyc)" in deb.box.run("/usr/sbin/kmuxd", "--version").stdout


def test_the_package_units_are_packaging_systemd_rendered(artefacts: Artefacts, tmp_path: Path) -> None:
    """What dpkg installs is packaging/systemd/ as `install-units --packaged` renders it, nothing else."""
    subprocess.run(["dpkg-deb", "-x", str(artefacts.deb), str(tmp_path / "deb")], check=True)
    expected = install.render_units("/usr/sbin/kmuxd", install.DEFAULT_CONFIG_DIR, tmp_path / "deb",
                                    layout=install.PACKAGE_LAYOUT, docs_url=install.SHIPPED_DOCS)
    units = [f for f in expected if f.path.name in install.UNITS]
    assert len(units) == len(install.UNITS)
    for f in units:
        assert f.path.read_text() == f.text, f.path.name
    # Besides the units dpkg installs, only the package data install-units reads, the same files.
    source = {p.name: p.read_bytes() for p in (install.CHECKOUT_UNITS).iterdir()}
    shipped = [p for p in (tmp_path / "deb").rglob("*") if p.suffix in (".service", ".socket")]
    assert sorted(p.name for p in shipped if p.parent.name == "system") == sorted(install.UNITS)
    data = {p.name: p.read_bytes() for p in shipped if p.parent.name != "system"}
    assert data == source and all("site-packages/kmuxd/share/systemd" in str(p) for p in shipped
                                  if p.parent.name != "system")


def test_start_and_a_member_sends_through_the_echo_backend(deb: Package) -> None:
    deb.box.run("systemctl", "stop", *UNITS)
    deb.box.run("systemctl", "start", "kmuxd")
    deb.wait_running()
    status = deb.box.run("systemctl", "status", "--no-pager", "kmuxd.service").stdout
    assert "Loaded: loaded (/lib/systemd/system/kmuxd.service; enabled" in status, status
    assert 'Status: "1 group(s), 2/2 connections up' in status, status
    assert deb.box.run("systemctl", "is-active", "kmuxd.socket", "kmuxd-control.socket").stdout.split() == ["active"] * 2
    result = deb.box.agent("ping", "--group=echo", "--tag=21", "--count=50", user=MEMBER, python=PACKAGED_PYTHON)
    assert result["uid"] != 0 and result["received"] == 50 and result["same"], result
    assert result["kmux"].startswith("/usr/lib/kmuxd/"), result  # the package's client library
    assert deb.records("echo")[(21, 50)] == 1


def test_reload_applies_a_new_group(deb: Package) -> None:
    deb.ensure_running()
    pid = deb.main_pid()
    since = deb.mark()
    deb.configure(extra=True)
    deb.box.run("systemctl", "reload", "kmuxd")
    applied = deb.wait_event(since, "reload_applied")
    assert "added=['again']" in applied["MESSAGE"], applied["MESSAGE"]
    assert deb.main_pid() == pid
    assert "again" in deb.box.run("kmux-cli", "groups").stdout
    result = deb.box.agent("ping", "--group=again", "--tag=22", "--count=20", user=MEMBER, python=PACKAGED_PYTHON)
    assert result["received"] == 20 and result["same"], result


def test_upgrade_restarts_a_running_kmuxd(deb: Package) -> None:
    deb.ensure_running()
    pid = deb.main_pid()
    deb.install()  # the same version again: postinst configure with the old version, as an upgrade
    wait_until(lambda: deb.main_pid() not in (0, pid), 20, "a new kmuxd main process")
    deb.wait_running()
    assert deb.box.read(CONFIG) == config(deb.ports), "dpkg replaced the administrator's configuration"
    result = deb.box.agent("ping", "--group=echo", "--tag=23", "--count=10", user=MEMBER, python=PACKAGED_PYTHON)
    assert result["received"] == 10


def test_purge_leaves_nothing(deb: Package) -> None:
    box = deb.box
    deb.ensure_running()
    deb.purge()
    assert not deb.installed()
    for unit in UNITS:
        p = box.show(unit, "LoadState", "ActiveState")
        assert (p["LoadState"], p["ActiveState"]) == ("not-found", "inactive"), (unit, p)
    gone = ["/lib/systemd/system/kmuxd.service", "/lib/systemd/system/kmuxd.socket",
            "/lib/systemd/system/kmuxd-control.socket", "/usr/lib/sysusers.d/kmuxd.conf", CONFIG, "/etc/kmuxd",
            "/usr/lib/kmuxd", "/usr/sbin/kmuxd", "/usr/bin/kmux-cli", "/usr/share/man/man8/kmuxd.8.gz",
            "/run/kmuxd"]
    left = box.run("sh", "-c", 'for p; do [ -e "$p" ] && echo "$p"; done; true', "sh", *gone).stdout.split()
    assert not left, f"left after purge: {left}"
    links = box.run("sh", "-c", "find /etc/systemd/system /var/lib/systemd/deb-systemd-helper-enabled "
                    "-name '*kmuxd*' 2>/dev/null; true").stdout.split()
    assert not links, f"enablement left after purge: {links}"
    # Debian keeps system groups (files may still belong to them): documented in docs/systemd.md.
    assert box.run("getent", "group", "kmux").returncode == 0
