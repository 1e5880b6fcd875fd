"""Who may do what on the control socket: a real kmuxd, real processes with their own ids.

kmuxd runs with ``control_group = "daemon"`` (an existing system group), so
its control socket is 0660 owned by that group. The unprivileged peer is a
real process with uid 4242 and primary gid 4242 (no passwd entries) that
holds ``daemon`` only as a *supplementary* group: the kernel lets it
connect through that group alone, it may ``ping`` and ``stats``, and
``reload``, ``drain`` and ``reconnect`` are refused with
``permission_denied`` by kmuxd's ``SO_PEERCRED`` check. That nothing
happened is checked where it would show: the daemon's counters, its
configuration (a pending change the refused reload did not apply), the
backend's TCP connections. Then root does each of them, and they do
happen.
"""

from __future__ import annotations

import grp
import json

import pytest

import kmux.errors
from kmux.control import ControlClient

from .as_user import OTHER_UID, json_as, need_root
from .helpers import group_config, wait_until, write_config

CONTROL_GROUP = "daemon"

#: The peer: one control connection, each request's outcome as JSON.
ASK = """
import json, os, sys
from kmux.control import ControlClient
from kmux.errors import KmuxError
with open("/proc/self/comm", "w") as f:
    f.write("kmx-operator")
out = []
try:
    with ControlClient(sys.argv[1]) as c:
        for op, args in json.loads(sys.argv[2]):
            try:
                answer = c.request(op, **args)
                out.append({"ok": True, "keys": sorted(answer)})
            except KmuxError as e:
                out.append({"ok": False, "code": e.code, "message": e.message, "details": e.details})
except KmuxError as e:
    out.append({"ok": False, "code": e.code, "message": e.message, "details": e.details})
print(json.dumps({"pid": os.getpid(), "results": out}))
"""

ACTIONS = [("reload", {}), ("drain", {"group": "echo", "conn": 0, "timeout": 1.0}), ("reconnect", {"group": "echo"})]


def ask_as(control: str, requests: list, groups: list[int]) -> dict:
    return json_as(ASK, groups=groups, args=[control, json.dumps(requests)])


def stats(control: str) -> dict:
    with ControlClient(control) as c:
        return c.request("stats")


@pytest.fixture
def guarded(backend_factory, daemon_factory, short_dir):
    """A daemon whose control socket admits the group ``daemon``; its settings for rewriting the file."""
    need_root()
    short_dir.chmod(0o755)  # only the socket's own mode decides who connects
    backend = backend_factory()
    settings = {"control_group": CONTROL_GROUP, "control_socket": str(short_dir / "control.sock")}
    daemon = daemon_factory({"echo": group_config(backend, connections=2)}, **settings)
    backend.wait_open(2)
    return daemon, backend


def test_a_control_group_member_reads_but_cannot_act(guarded):
    daemon, backend = guarded
    ctl = daemon.control_socket
    gid = grp.getgrnam(CONTROL_GROUP).gr_gid
    # A pending change: the refused reload must not apply it.
    settings = {"socket": daemon.socket_path, "log_format": "json", "log_level": "info",
                "control_group": CONTROL_GROUP, "control_socket": ctl}
    write_config(daemon.config_path, settings, {"echo": group_config(backend, connections=3)})

    peer = ask_as(ctl, [("ping", {}), ("stats", {}), *ACTIONS, ("stats", {"group": "echo"})], [gid])
    ping, full, *refused, one = peer["results"]
    assert ping == {"ok": True, "keys": ["ok", "pid", "version"]}
    assert full["ok"] and {"daemon", "groups", "clients", "control"} <= set(full["keys"]) and one["ok"]
    for (op, _), answer in zip(ACTIONS, refused):
        assert (answer["ok"], answer["code"], answer["details"]["op"]) == (False, "permission_denied", op)
        assert answer["message"] == (
            f"{op} needs uid 0 (root), whatever the socket's file mode; you are uid {OTHER_UID}"
        )
        assert answer["details"]["rule"] == "uid 0 (root), whatever the socket's file mode"

    # Nothing happened: no reload, no drain, no reconnect.
    after = stats(ctl)
    d, (echo,) = after["daemon"], after["groups"]
    assert (d["reloads"], d["reload_failures"], d["last_reload_error"]) == (0, 0, None)
    assert echo["connections_total"] == 2
    assert [(c["state"], c["reconnects"]) for c in echo["connections"]] == [("ready", 0), ("ready", 0)]
    assert len(backend.conns()) == 2 and all(c.open for c in backend.conns())
    # Counted per op, and logged once for the three (rate-limited per uid).
    control = after["control"]
    assert control["refused"] == {"reload": 1, "drain": 1, "reconnect": 1}
    assert control["requests"]["ping"] == 1 and control["requests"]["reload"] == 1
    (line,) = daemon.wait_log("control_refused")
    assert (line["uid"], line["pid"], line["comm"], line["op"]) == (OTHER_UID, peer["pid"], "kmx-operator", "reload")
    assert line["suppressed"] == 0 and line["level"] == "warning"

    # Root may do each of them, and they do happen.
    with ControlClient(ctl, timeout=10) as c:
        assert c.request("reconnect", group="echo", conn=1)["reconnected"] == [1]
        wait_until(lambda: echo_conns(c)[1]["state"] == "ready", 10, "conn 1 back")
        assert c.request("drain", group="echo", conn=0, timeout=5.0)["drained_msgs"] == 0
        assert c.request("reload")["resized"] == ["echo"]
        final = c.request("stats")
    assert final["daemon"]["reloads"] == 1
    assert final["groups"][0]["connections_total"] == 3
    assert final["control"]["refused"] == {"reload": 1, "drain": 1, "reconnect": 1}  # root was never refused
    wait_until(lambda: stats(ctl)["groups"][0]["connections_up"] == 3, 10, "the third connection")
    assert [c["reconnects"] for c in stats(ctl)["groups"][0]["connections"]][:2] == [1, 1]


def echo_conns(client: ControlClient) -> list[dict]:
    return client.request("stats", group="echo")["groups"][0]["connections"]


def test_without_the_group_the_kernel_refuses_the_connection(guarded):
    daemon, _ = guarded
    peer = ask_as(daemon.control_socket, [("ping", {})], [])
    (answer,) = peer["results"]
    assert (answer["code"], answer["details"]["errno"]) == ("daemon_unavailable", "EACCES")
    # The kernel refused it: kmuxd never saw a request.
    assert stats(daemon.control_socket)["control"]["requests"] == {"stats": 1}
