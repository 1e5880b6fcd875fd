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
* The shipped unit's exposure score is what ``systemd-analyze`` gives the
  repository's file offline, and at most 2.0; the drop-in's cost is
  measured and printed.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from kmuxd.system.privileges import DROP_IN_PATH, drop_in

from .conftest import KMUXD, MEASURED, MEMBER, REPO, Box, Service, add_users, start_backends, wait_until

CONFIG = "/etc/kmuxd/kmuxd.toml"
KMUX_CLI = str(Path(KMUXD).with_name("kmux-cli"))
LOW_PORTS = (700, 710)


def config(echo_port: int) -> str:
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
"""


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
                              str(REPO / "kmuxd/share/systemd/kmuxd.service")], capture_output=True, text=True,
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
