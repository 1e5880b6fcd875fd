"""kmuxd under a real systemd (sdbox): install, start, socket permissions, reload, restart, journal, watchdog, stop.

One container for the module. The fixture installs the units with
``kmuxd install-units`` (as an administrator would), two loopback backends
as transient services inside the container (``echo`` answers every frame,
``sink`` only records), a configuration pointing at them, a drop-in that
shortens WatchdogSec= to 3 s, and two users: ``kmuxtest`` in group kmux and
``kmuxout`` outside it.

Each test stands alone, in any order: :meth:`InstalledService.restore` puts back
what an earlier test may have changed (the units after uninstall, the
drop-in, the configuration after a reload, a stopped service), so the
tests share the container's boot but not its state. Check it with the
order reversed (docs/systemd.md, "Tests").

Every message a test sends names ``(tag, idx)``; the backends record each
arrival, so a test can show that every message arrived exactly once.
"""

from __future__ import annotations

import collections
import re
import time
from pathlib import Path

import pytest

from .conftest import (KMUXD, MEASURED, MEMBER, OUTSIDER, PYTHON, Box, Service, add_users, collect, start_backends,
                       wait_until)

CONFIG = "/etc/kmuxd/kmuxd.toml"
DROP_IN = "/etc/systemd/system/kmuxd.service.d/50-test.conf"
WATCHDOG_SEC = 3
LOG_ID = {"ready": "5f0c3e2a9b4d4a0f8e51d6c7b2a91e01", "reload_refused": "5f0c3e2a9b4d4a0f8e51d6c7b2a91e08"}


def config(ports: dict[str, int], *, sink_connections: int | str = 2, extra: bool = False) -> str:
    text = f"""version = 1
[daemon]
socket = "/run/kmuxd/kmuxd.sock"
control_socket = "/run/kmuxd/control.sock"
shutdown_grace = 5.0

[groups.echo]
endpoints = ["127.0.0.1:{ports['echo']}"]
connections = 2

[groups.sink]
endpoints = ["127.0.0.1:{ports['sink']}"]
connections = {sink_connections}
"""
    if extra:
        text += f'\n[groups.extra]\nendpoints = ["127.0.0.1:{ports["sink"]}"]\nconnections = 1\n'
    return text


class InstalledService(Service):
    """kmuxd installed by ``kmuxd install-units`` from this checkout's venv."""

    def restore(self) -> None:
        """Units installed, the test drop-in, the baseline configuration, and the daemon running it if it runs."""
        box, changed = self.box, False
        if box.run("test", "-f", "/etc/systemd/system/kmuxd.service", check=False).returncode != 0:
            proc = box.run(KMUXD, "install-units")
            assert "systemctl daemon-reload" in proc.stdout, proc.stdout
            changed = True
        drop_in = f"[Service]\nWatchdogSec={WATCHDOG_SEC}s\n"
        if box.run("cat", DROP_IN, check=False).stdout != drop_in:
            box.write(DROP_IN, drop_in)
            changed = True
        if changed:
            box.run("systemctl", "daemon-reload")
        if box.run("cat", CONFIG, check=False).stdout != config(self.ports):
            box.write(CONFIG, config(self.ports))
            if self.props("ActiveState")["ActiveState"] == "active":
                box.run("systemctl", "restart", "kmuxd.service")

    def ensure_running(self) -> None:
        self.restore()
        super().ensure_running()


@pytest.fixture(scope="module")
def installed(box: Box) -> InstalledService:
    """install-units, as an administrator would; the users and the backends."""
    svc = InstalledService(box, start_backends(box, {"echo": True, "sink": False}))
    svc.restore()
    add_users(box, outsider=True)
    return svc


@pytest.fixture
def svc(installed: InstalledService) -> InstalledService:
    installed.restore()
    return installed


#: Messages of each client that must have reached the backend before a test disturbs the daemon.
FLOWING = 200


def _wait_flowing(svc: Service, backend: str, tags: set[int]) -> None:
    """Until every client tagged ``tags`` is mid-stream (a fixed sleep is too short on a loaded machine)."""
    def flowing():
        counts = collections.Counter(tag for tag, _ in svc.records(backend).elements())
        return all(counts[t] >= FLOWING for t in tags)
    wait_until(flowing, 20, f"clients {sorted(tags)} sending through kmuxd", interval=0.1)


# -- 1, 2: install and start ----------------------------------------------------------


def test_start_reaches_running_with_status_line(svc: Service) -> None:
    box = svc.box
    box.run("systemctl", "stop", "kmuxd.service")
    t0 = time.monotonic()
    box.run("systemctl", "start", "kmuxd.service")
    wall = time.monotonic() - t0
    svc.wait_running()
    p = svc.props("InactiveExitTimestampMonotonic", "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic",
                  "Type", "WatchdogUSec", "StatusText")
    begin, main, ready = (int(p[k]) for k in ("InactiveExitTimestampMonotonic", "ExecMainStartTimestampMonotonic",
                                             "ActiveEnterTimestampMonotonic"))
    MEASURED["systemctl start -> READY=1"] = (
        f"{(ready - begin) / 1e3:.0f} ms (ExecStartPre --check included; main process start -> READY=1: "
        f"{(ready - main) / 1e3:.0f} ms; systemctl start wall time {wall * 1e3:.0f} ms)")
    assert p["Type"] == "notify" and p["WatchdogUSec"] == f"{WATCHDOG_SEC}s"
    assert re.match(r"2 group\(s\), 4/4 connections up, 0 client\(s\)", p["StatusText"]), p["StatusText"]
    status = box.run("systemctl", "status", "--no-pager", "kmuxd.service").stdout
    assert "Active: active (running)" in status
    assert 'Status: "2 group(s), 4/4 connections up' in status
    assert "TriggeredBy:" in status and "kmuxd.socket" in status
    ready_events = svc.events("ready")
    assert ready_events and ready_events[-1]["MESSAGE"].find("socket_activated=True") > 0
    # The sockets are systemd's, with the units' owners and modes.
    stat = box.run("stat", "-c", "%n %a %U %G %F", "/run/kmuxd/kmuxd.sock", "/run/kmuxd/control.sock").stdout
    assert "/run/kmuxd/kmuxd.sock 660 root kmux socket" in stat
    assert "/run/kmuxd/control.sock 600 root root socket" in stat


# -- 3: who may use the socket ----------------------------------------------------------


def test_group_member_sends_and_receives(svc: Service) -> None:
    svc.ensure_running()
    result = svc.box.agent("ping", "--group=echo", "--tag=3", "--count=200", user=MEMBER)
    assert result["uid"] != 0 and result == {**result, "sent": 200, "received": 200, "same": True}
    assert collections.Counter(idx for tag, idx in svc.records("echo") if tag == 3) == {i: 1 for i in range(1, 201)}


def test_user_outside_the_group_is_refused(svc: Service) -> None:
    svc.ensure_running()
    result = svc.box.agent("refused", "--group=echo", user=OUTSIDER)
    assert result["uid"] != 0
    assert result["raw_errno"] == "EACCES"
    assert result["library"].startswith("daemon_unavailable:") and "permission denied" in result["library"]


# -- 4: reload ------------------------------------------------------------------------------


def test_reload_applies_changed_config_while_traffic_flows(svc: Service) -> None:
    svc.ensure_running()
    box, pid = svc.box, svc.main_pid()
    flow = box.agent_popen("flow", "--group=sink", "--tag=4", "--count=2000", "--rate=1000", user=MEMBER)
    try:
        _wait_flowing(svc, "sink", {4})
        since = svc.mark()
        box.write(CONFIG, config(svc.ports, sink_connections=3, extra=True))
        box.run("systemctl", "reload", "kmuxd.service")
        applied = svc.wait_event(since, "reload_applied")
        result = collect(flow, 30)
    finally:
        flow.kill()
    assert "added=['extra']" in applied["MESSAGE"] and "resized=['sink']" in applied["MESSAGE"], applied["MESSAGE"]
    assert svc.main_pid() == pid
    status = svc.props("StatusText")["StatusText"]
    assert status.startswith("3 group(s)"), status
    assert result["connects"] == 1 and not result["notices"] and not result["errors"], result
    arrived = wait_until(lambda: (c := svc.records("sink")) and sum(v for (t, _), v in c.items() if t == 4) >= 2000 and c,
                         10, "all 2000 messages at the backend")
    mine = {idx: n for (tag, idx), n in arrived.items() if tag == 4}
    assert mine == {i: 1 for i in range(1, 2001)}, "lost or duplicated messages across the reload"


def test_reload_with_broken_config_is_refused_and_daemon_keeps_running(svc: Service) -> None:
    svc.ensure_running()
    box, pid = svc.box, svc.main_pid()
    good = box.read(CONFIG)
    try:
        box.write(CONFIG, config(svc.ports, sink_connections='"many"'))
        # systemctl reload validates first (ExecReload=kmuxd --check): the daemon is never told.
        proc = box.run("systemctl", "reload", "kmuxd.service", check=False)
        assert proc.returncode != 0
        journal = box.run("journalctl", "--no-pager", "-u", "kmuxd.service", "-n", "30").stdout
        assert "groups.sink.connections: must be an integer" in journal
        # A bare SIGHUP reaches the daemon, which refuses the file itself and keeps the old one.
        since = svc.mark()
        box.run("systemctl", "kill", "--kill-who=main", "--signal=SIGHUP", "kmuxd.service")
        refused = svc.wait_event(since, "reload_refused")
        assert refused["ERROR_CODE"] == "config_invalid" and refused["PRIORITY"] == "3"
        assert refused["MESSAGE_ID"] == LOG_ID["reload_refused"]
        assert svc.main_pid() == pid and svc.props("ActiveState")["ActiveState"] == "active"
        # (STATUS= says "reload refused" only until the next 5 s status refresh; the control socket keeps it.)
        status = box.run(str(Path(KMUXD).parent / "kmux-cli"), "status").stdout
        assert "must be an integer" in status, status
        result = box.agent("ping", "--group=echo", "--tag=44", "--count=20", user=MEMBER)
        assert result["received"] == 20 and result["same"]
    finally:
        box.write(CONFIG, good)


# -- 5: restart with clients running ---------------------------------------------------------


def _library_has_reconnect(box: Box) -> bool:
    return box.run(PYTHON, "-c", "import kmux; kmux.ReconnectPolicy", check=False).returncode == 0


def test_restart_with_clients_running_loses_nothing(svc: Service) -> None:
    """Clients mid-stream through ``systemctl restart``: each message arrives, and exactly once.

    Two kinds of client: ``flow`` follows docs/protocol.md by hand (the
    shutdown notice's ``accepted``, re-send the rest), ``libflow`` uses the
    library's reconnect helper (when this checkout has it).
    """
    svc.ensure_running()
    box, pid = svc.box, svc.main_pid()
    count = 2500
    clients = [("flow", 51), ("flow", 52)]
    if _library_has_reconnect(box):
        clients += [("libflow", 53), ("libflow", 54)]
    tags = {tag for _, tag in clients}
    procs = [box.agent_popen(kind, "--group=sink", f"--tag={tag}", f"--count={count}", "--rate=1000",
                             "--deadline=45", user=MEMBER) for kind, tag in clients]
    try:
        _wait_flowing(svc, "sink", tags)
        box.run("systemctl", "restart", "kmuxd.service")
        svc.wait_running()
        results = [collect(p, 50) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert svc.main_pid() != pid
    resent: dict[int, set[int]] = {}
    for (kind, tag), r in zip(clients, results):
        if kind == "flow":
            # It was mid-stream: it got the shutdown notice, reconnected and re-sent the unread tail.
            assert r["notices"] and r["connects"] >= 2 and r["eof_without_notice"] == 0 and not r["errors"], r
            resent[tag] = set(r["resent"])
        else:
            st = r["stats"]
            assert st["reconnects"] >= 1 and st["unknown"] == 0 and st["dropped"] == 0 and st["guaranteed"], r
            resent[tag] = set()  # the library does not say which; all must arrive exactly once anyway
    total = len(tags) * count

    def arrived():
        c = svc.records("sink")
        return c if sum(v for (t, _), v in c.items() if t in tags) >= total else None

    counts = wait_until(arrived, 15, f"{total} messages at the backend")
    for (kind, tag), r in zip(clients, results):
        mine = {idx: n for (t, idx), n in counts.items() if t == tag}
        missing = [i for i in range(1, count + 1) if i not in mine]
        assert not missing, f"tag {tag}: {len(missing)} messages never arrived, e.g. {missing[:5]}\n{r}"
        dup = {i: n for i, n in mine.items() if n != 1}
        # By docs/protocol.md messages after `accepted` were never read, so a
        # re-send never duplicates: exactly once, for both kinds of client.
        assert not dup, f"tag {tag} ({kind}): messages arrived more than once: {dup}\n{r}"
    n_resent = sum(len(v) for v in resent.values()) + sum(r["stats"]["resent"] for r in results if "stats" in r)
    MEASURED[f"restart with {len(clients)} clients at 1000 msg/s each"] = (
        f"{n_resent} of {total} messages re-sent after the shutdown notice, "
        "every one arrived exactly once "
        f"({sum(k == 'libflow' for k, _ in clients)} of the clients used kmux.connect(reconnect=...))")


# -- 6: the journal --------------------------------------------------------------------------


def test_journal_has_structured_fields(svc: Service) -> None:
    svc.ensure_running()
    svc.box.agent("ping", "--group=echo", "--tag=6", "--count=5", user=MEMBER)
    entries = svc.box.journal("-u", "kmuxd.service")
    ours = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "kmuxd" and "KMUX_EVENT" in e]
    by_event = collections.defaultdict(list)
    for e in ours:
        by_event[e["KMUX_EVENT"]].append(e)
    ready = by_event["ready"][-1]
    assert ready["MESSAGE_ID"] == LOG_ID["ready"] and ready["PRIORITY"] == "6"
    assert ready["_SYSTEMD_UNIT"] == "kmuxd.service"
    group_up = by_event["group_up"][-1]
    assert group_up["GROUP"] in ("echo", "sink", "extra")
    connected = by_event["connected"][-1]
    assert {"GROUP", "CONN", "ENDPOINT"} <= connected.keys()
    attached = [e for e in ours if "CLIENT_PID" in e]
    assert attached and all(e["CLIENT_PID"].isdigit() for e in attached) and "CLIENT_ID" in attached[-1]
    # No stray unstructured lines from the daemon itself (the --check lines come from ExecStartPre/ExecReload).
    main_pids = {e["_PID"] for e in by_event["ready"]}
    stray = [e["MESSAGE"] for e in entries if e.get("_PID") in main_pids and "KMUX_EVENT" not in e
             and e.get("SYSLOG_IDENTIFIER") != "systemd"]
    assert not stray, stray


# -- 7: watchdog -------------------------------------------------------------------------------


def test_watchdog_restarts_a_stopped_main_loop(svc: Service) -> None:
    svc.ensure_running()
    box = svc.box
    before = svc.props("MainPID", "NRestarts")
    pid, restarts = int(before["MainPID"]), int(before["NRestarts"])
    since = svc.mark()
    t0 = time.monotonic()
    box.run("kill", "-STOP", str(pid))

    def restarted():
        p = svc.props("MainPID", "NRestarts", "ActiveState", "SubState")
        return (int(p["NRestarts"]) == restarts + 1 and p["MainPID"] not in ("0", str(pid))
                and (p["ActiveState"], p["SubState"]) == ("active", "running"))

    wait_until(restarted, WATCHDOG_SEC + 15, "the watchdog to kill and systemd to restart kmuxd")
    MEASURED["watchdog: SIGSTOP -> restarted and READY"] = f"{time.monotonic() - t0:.1f} s (WatchdogSec={WATCHDOG_SEC}s)"
    log = box.run("journalctl", "--no-pager", "-u", "kmuxd.service", since).stdout
    assert "Watchdog timeout" in log, log
    assert "SIGABRT" in log or "status=6/ABRT" in log, log
    assert box.run("kill", "-0", str(pid), check=False).returncode != 0, "the stopped process is still there"
    result = box.agent("ping", "--group=echo", "--tag=7", "--count=20", user=MEMBER)
    assert result["received"] == 20


# -- 8: stop --------------------------------------------------------------------------------------


def test_stop_is_clean_and_the_socket_starts_it_again(svc: Service) -> None:
    svc.ensure_running()
    box = svc.box
    since = svc.mark()
    box.run("systemctl", "stop", "kmuxd.service")
    p = svc.props("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert (p["ActiveState"], p["Result"], p["ExecMainStatus"]) == ("inactive", "success", "0"), p
    assert svc.events("stopping", since) and svc.events("group_final", since)
    log = box.run("journalctl", "--no-pager", "-u", "kmuxd.service", since, "-p", "warning").stdout
    assert "kmuxd[" not in log, f"warnings while stopping:\n{log}"
    # systemd still holds the socket: the next app that connects starts kmuxd again.
    assert box.run("systemctl", "is-active", "kmuxd.socket", "kmuxd-control.socket").stdout.split() == ["active"] * 2
    result = box.agent("ping", "--group=echo", "--tag=8", "--count=10", user=MEMBER)
    assert result["received"] == 10
    svc.wait_running()
    box.run("systemctl", "stop", "kmuxd.service", "kmuxd.socket", "kmuxd-control.socket")
    assert box.run("test", "-e", "/run/kmuxd/kmuxd.sock", check=False).returncode != 0


def test_uninstall_units(svc: Service) -> None:
    box = svc.box
    svc.ensure_running()
    proc = box.run(KMUXD, "uninstall-units")
    assert "removed /etc/systemd/system/kmuxd.service" in proc.stdout and f"kept {CONFIG}" in proc.stdout
    assert box.run("test", "-e", "/etc/systemd/system/kmuxd.service", check=False).returncode != 0
    assert box.show("kmuxd.service", "LoadState")["LoadState"] == "not-found"
    assert box.run("test", "-f", CONFIG, check=False).returncode == 0
    box.run(KMUXD, "uninstall-units", "--purge")
    assert box.run("test", "-e", CONFIG, check=False).returncode != 0
