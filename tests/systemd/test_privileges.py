"""Privileges only when configured, under a real systemd (sdbox): issue 18, section 4.

One container for the module. The units are installed with ``kmuxd
install-units`` as shipped (``CapabilityBoundingSet=`` empty), with an
echo backend inside the container. The container has its own network
namespace, so ports 700-710 are ours alone.

* Without a drop-in, a group with ``source_ports = [700, 710]`` fails its
  dials with ``permission_denied`` naming ``CAP_NET_BIND_SERVICE`` and the
  drop-in; the daemon stays up, a group that needs nothing carries a
  member's messages; ``kmuxd --check`` (ExecStartPre=, which runs with the
  service's capabilities) says the capability is MISSING and the daemon
  logs ``capability_missing``.
* With the drop-in docs/systemd.md gives (written here from
  :func:`kmuxd.system.privileges.drop_in`, which docs/systemd.md quotes),
  the same group connects from ports in the range and carries messages.
* A handshake file passed with ``LoadCredential=`` authenticates against
  memcached with SASL (``-S``, a sasldb made by ``saslpasswd2``), written
  the way docs/systemd.md says (``kmuxd handshake memcached-sasl-plain``
  with the password in a file): two members of ``kmux`` who can read
  neither the file nor the credential set and get their values with
  colliding opaques, also after ``kmux-cli reconnect``. Without the
  drop-in, the relative ``send_file`` is a configuration error and the
  start fails saying why. A changed credential: ``systemctl reload``
  passes (its check reads the main process's credential, which systemd
  hides from ``ExecReload=``), a restart takes it (a wrong password: dials
  fail naming the step and the bytes).
* The shipped unit's exposure score is what ``systemd-analyze`` gives the
  repository's file offline, and at most 2.0; the drop-in's cost is
  measured and printed.

Credentials in sdbox: systemd mounts a unit's credentials in a child mount
namespace and moves the mount into place, which reaches the rest of the
system only through shared mount propagation. systemd makes ``/`` shared
at boot, but not when it detects a container (sdbox says ``container=``),
and sdbox's own mounts are private; so the fixture runs ``mount
--make-rshared /`` in the container first, as a host's systemd would have.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from kmuxd.system.privileges import DROP_IN_PATH, drop_in

from .conftest import (KMUXD, MEASURED, MEMBER, PYTHON, REPO, Box, Service, add_users, collect, start_backends,
                       wait_until)

CONFIG = "/etc/kmuxd/kmuxd.toml"
#: memcached with SASL in the container (its own network namespace: a fixed port is ours alone).
MC_PORT = 11211
SASL_CONF = "/etc/kmuxtest-sasl"
MC_USER, MC_PASSWORD = "kmuxapp", "sdbox-s3cret-pw"
#: Where the operator keeps the handshake file, and the drop-in that passes it (docs/systemd.md, "Credentials").
CREDENTIAL = "/etc/kmuxd/credentials/mc-sasl"
CREDENTIALS_DROP_IN = "/etc/systemd/system/kmuxd.service.d/credentials.conf"
MC_GROUP = f"""
[groups.mc]
endpoints = ["127.0.0.1:{MC_PORT}"]
connections = 2
framing = "memcached-binary"
steering = "id"
reconnect_initial = 0.05
reconnect_max = 0.5

[groups.mc.id]
request_offset = 12
response_offset = 12
size = 4

[[groups.mc.handshake]]
send_file = "mc-sasl"
expect_offset = 6
expect_hex = "0000"
"""
KMUX_CLI = str(Path(KMUXD).with_name("kmux-cli"))
LOW_PORTS = (700, 710)


def config(echo_port: int, *, mc: bool = False) -> str:
    return f"""version = 1
[daemon]
socket = "/run/kmuxd/kmuxd.sock"
control_socket = "/run/kmuxd/control.sock"

[groups.echo]
endpoints = ["127.0.0.1:{echo_port}"]
connections = 1

[groups.low]
endpoints = ["127.0.0.1:{echo_port}"]
connections = 2
reconnect_initial = 0.05
reconnect_max = 0.5

[groups.low.socket]
source_ports = [{LOW_PORTS[0]}, {LOW_PORTS[1]}]
""" + (MC_GROUP if mc else "")


@pytest.fixture(scope="module")
def svc(box: Box) -> Service:
    proc = box.run(KMUXD, "install-units")
    assert "systemctl daemon-reload" in proc.stdout, proc.stdout
    ports = start_backends(box, {"echo": True})
    box.write(CONFIG, config(ports["echo"]))
    box.run("systemctl", "daemon-reload")
    add_users(box)
    return Service(box, ports)


def group(svc: Service, name: str) -> dict:
    return json.loads(svc.box.run(KMUX_CLI, "group", name, "-j").stdout)


def restart(svc: Service) -> None:
    svc.box.run("systemctl", "reset-failed", "kmuxd.service", check=False)
    svc.box.run("systemctl", "restart", "kmuxd.service")
    svc.wait_running()


def reload(svc: Service) -> None:
    """systemctl reload, and wait until the daemon has applied it."""
    since = svc.mark()
    proc = svc.box.run("systemctl", "reload", "kmuxd.service", check=False)
    assert proc.returncode == 0, "\n".join(e.get("MESSAGE", "") for e in svc.box.journal("-u", "kmuxd.service", since))
    svc.wait_event(since, "reload_applied")


def set_drop_in(svc: Service, text: str | None) -> None:
    if text is None:
        svc.box.run("rm", "-f", DROP_IN_PATH)
    else:
        svc.box.write(DROP_IN_PATH, text)
    svc.box.run("systemctl", "daemon-reload")


def test_without_the_drop_in_the_group_is_refused_clearly_and_the_others_go_on(svc: Service) -> None:
    set_drop_in(svc, None)
    since = svc.mark()
    restart(svc)
    assert svc.props("CapabilityBoundingSet")["CapabilityBoundingSet"] == ""
    pid = svc.main_pid()
    assert re.search(r"^CapEff:\s*0+$", svc.box.read(f"/proc/{pid}/status"), re.M)

    def refused():
        conns = group(svc, "low")["connections"]
        return all((c["last_error"] or "").startswith("permission_denied: binding source port 7") for c in conns) \
            and conns
    conns = wait_until(refused, 15, "low's dials refused with permission_denied")
    error = conns[0]["last_error"]
    assert "(groups.low.socket.source_ports) needs CAP_NET_BIND_SERVICE" in error
    assert f"grant it in {DROP_IN_PATH} with CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in error
    # ExecStartPre's kmuxd --check ran with the service's capabilities, and said so.
    check = [e["MESSAGE"] for e in svc.box.journal("-u", "kmuxd.service", since)
             if "for groups.low.socket.source_ports" in e.get("MESSAGE", "")]
    assert any(m.endswith(": MISSING") for m in check), check
    (logged,) = svc.events("capability_missing", since)
    assert "capability=CAP_NET_BIND_SERVICE" in logged["MESSAGE"] and "groups.low.socket.source_ports" in logged[
        "MESSAGE"], logged["MESSAGE"]
    # The daemon is up and another group carries a member's messages.
    assert svc.props("ActiveState")["ActiveState"] == "active" and svc.main_pid() == pid
    result = svc.box.agent("ping", "--group", "echo", "--count", "50", user=MEMBER)
    assert (result["sent"], result["received"], result["same"]) == (50, 50, True), result


def test_with_the_drop_in_the_group_connects_from_ports_in_the_range(svc: Service) -> None:
    set_drop_in(svc, drop_in(["CAP_NET_BIND_SERVICE"]))
    try:
        restart(svc)
        assert svc.props("CapabilityBoundingSet")["CapabilityBoundingSet"] == "cap_net_bind_service"

        def up():
            conns = group(svc, "low")["connections"]
            return all(c["local"] for c in conns) and conns
        conns = wait_until(up, 15, "low's connections up")
        ports = sorted(int(c["local"].rsplit(":", 1)[1]) for c in conns)
        assert all(LOW_PORTS[0] <= p <= LOW_PORTS[1] for p in ports) and len(set(ports)) == 2, ports
        result = svc.box.agent("ping", "--group", "low", "--count", "50", user=MEMBER)
        assert (result["sent"], result["received"], result["same"]) == (50, 50, True), result
        # ExecStartPre's check now finds it held.
        check = svc.box.run("systemctl", "status", "--no-pager", "-n", "0", "kmuxd.service", check=False)
        assert check.returncode == 0
    finally:
        set_drop_in(svc, None)


def test_the_shipped_units_exposure_score_is_unchanged(svc: Service) -> None:
    offline = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                              str(REPO / "packaging/systemd/kmuxd.service")], capture_output=True, text=True,
                             timeout=60).stdout
    shipped = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", offline).group(1))

    def score() -> float:
        out = svc.box.run("systemd-analyze", "security", "--no-pager", "kmuxd.service").stdout
        return float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out).group(1))
    set_drop_in(svc, None)
    installed = score()
    set_drop_in(svc, drop_in(["CAP_NET_BIND_SERVICE"]))
    try:
        with_drop_in = score()
    finally:
        set_drop_in(svc, None)
    MEASURED["systemd-analyze security kmuxd.service (shipped / + CAP_NET_BIND_SERVICE drop-in)"] = (
        f"{installed} / {with_drop_in} (repository file offline: {shipped})")
    assert installed == shipped <= 2.0
    assert with_drop_in >= installed


# -- credentials -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sasl_memcached(svc: Service) -> None:
    """memcached -S in the container, one user in its sasldb; credentials able to reach the service."""
    box = svc.box
    box.run("mount", "--make-rshared", "/")  # see the module docstring
    box.run("mkdir", "-p", SASL_CONF)
    box.write(f"{SASL_CONF}/memcached.conf", f"mech_list: plain\nsasldb_path: {SASL_CONF}/sasldb2\n")
    # memcached looks users up as user@<gethostname()>; the password goes on stdin, never on a command line.
    box.run("sh", "-c", f'saslpasswd2 -p -c -a memcached -f {SASL_CONF}/sasldb2 -u "$(hostname)" {MC_USER}',
            input=MC_PASSWORD)
    box.run("chmod", "-R", "a+rX", SASL_CONF)  # memcached runs as nobody
    box.run("systemd-run", "--unit=kmuxtest-mc", "--property=Type=exec", f"--setenv=SASL_CONF_PATH={SASL_CONF}",
            "memcached", "-S", "-U", "0", "-l", "127.0.0.1", "-p", str(MC_PORT), "-u", "nobody")
    probe = f"import socket; socket.create_connection(('127.0.0.1', {MC_PORT}), 1).close()"
    wait_until(lambda: box.run(PYTHON, "-c", probe, check=False).returncode == 0, 15, "memcached listening")


def write_handshake_file(box: Box, password: str = MC_PASSWORD) -> None:
    """As docs/systemd.md tells an operator: a private directory, the password in a file, kmuxd handshake."""
    box.run("install", "-d", "-m", "0700", "/etc/kmuxd/credentials")
    box.write("/etc/kmuxd/credentials/mc-password", password + "\n")
    box.run("chmod", "600", "/etc/kmuxd/credentials/mc-password")
    box.run("rm", "-f", CREDENTIAL)
    box.run(KMUXD, "handshake", "memcached-sasl-plain", "--user", MC_USER,
            "--password-file", "/etc/kmuxd/credentials/mc-password", "--output", CREDENTIAL)


def test_a_handshake_file_passed_with_loadcredential_authenticates(svc: Service, sasl_memcached: None) -> None:
    box = svc.box
    write_handshake_file(box)
    box.write(CONFIG, config(svc.ports["echo"], mc=True))
    box.run("rm", "-f", CREDENTIALS_DROP_IN)
    box.run("systemctl", "daemon-reload")
    try:
        # Without LoadCredential=, "mc-sasl" names nothing: ExecStartPre's check refuses the file.
        since = svc.mark()
        box.run("systemctl", "reset-failed", "kmuxd.service", check=False)
        assert box.run("systemctl", "restart", "kmuxd.service", check=False).returncode != 0
        refused = [e["MESSAGE"] for e in box.journal("-u", "kmuxd.service", since) if "send_file" in e.get("MESSAGE", "")]
        assert any("groups.mc.handshake[0].send_file: 'mc-sasl' is a credential name, but $CREDENTIALS_DIRECTORY is "
                   "not set" in m for m in refused), refused

        box.write(CREDENTIALS_DROP_IN, f"[Service]\nLoadCredential=mc-sasl:{CREDENTIAL}\n")
        box.run("systemctl", "daemon-reload")
        since = svc.mark()
        restart(svc)

        def authenticated():  # a connection is live (has a local address) only once its steps passed
            conns = group(svc, "mc")["connections"]
            return all(c["local"] for c in conns)
        wait_until(authenticated, 20, "mc's connections through their handshake")
        in_service = "/run/credentials/kmuxd.service/mc-sasl"
        agents = [box.agent_popen("mc", "--group", "mc", "--tag", str(tag), "--count", "100", "--secret", CREDENTIAL,
                                  user=MEMBER) for tag in (1, 2)]
        for result in (collect(a, 60) for a in agents):
            assert (result["set_ok"], result["get_ok"], result["errors"]) == (100, 100, []), result
            assert result["secret_readable"] == "EACCES", result
        denied = box.agent("mc", "--group", "mc", "--tag", "3", "--count", "1", "--secret", in_service, user=MEMBER)
        assert denied["secret_readable"] == "EACCES" and denied["get_ok"] == 1, denied
        # The steps run again on every new connection.
        box.run(KMUX_CLI, "reconnect", "mc")
        wait_until(authenticated, 20, "mc's connections through their handshake again")
        again = box.agent("mc", "--group", "mc", "--tag", "4", "--count", "50", user=MEMBER)
        assert (again["set_ok"], again["get_ok"]) == (50, 50), again
        # The credential systemd made is private, so --check has nothing to warn about.
        checks = [e["MESSAGE"] for e in box.journal("-u", "kmuxd.service", since)]
        assert not [m for m in checks if "readable by" in m], checks
        # A reload with credentials passes its check: systemd hides them from ExecReload= (systemd#35227), so
        # kmuxd --check reads the main process's own. Whether a running service sees a changed credential
        # depends on the systemd version; a restart always takes it.
        write_handshake_file(box, password="not-the-password")
        reload(svc)
        # A restart takes the changed file: here a wrong password, a failed dial naming the step and bytes.
        restart(svc)
        wait_until(lambda: all("handshake step 1: bytes 6..7 are 0020, expected 0000" in (c["last_error"] or "")
                               and not c["local"] for c in group(svc, "mc")["connections"]),
                   20, "mc's dials failing with the wrong password")
        write_handshake_file(box)
        restart(svc)
        wait_until(authenticated, 20, "mc's connections logged in with the right password again")
    finally:
        box.run("rm", "-f", CREDENTIALS_DROP_IN)
        box.write(CONFIG, config(svc.ports["echo"]))
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "reset-failed", "kmuxd.service", check=False)
        restart(svc)
