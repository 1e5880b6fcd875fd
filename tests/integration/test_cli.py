"""kmux-cli as a subprocess against a real kmuxd: output, exit codes, actions.

Every command runs the installed ``kmux-cli`` script in its own process
with ``--control PATH`` (no environment), against a kmuxd subprocess with
real TCP backends on loopback. What a command prints is checked against
what the control socket itself answers (:class:`ControlClient`), and
what an action does is checked at the backend (which TCP connections
exist, which frames arrived on which).
"""

from __future__ import annotations

import fcntl
import grp
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import kmux

from .as_user import OTHER_UID, as_user, need_root
from .helpers import (
    conn_of,
    group_of,
    local_port,
    stats,
    MIN_FRAME,
    Receiver,
    SenderThreads,
    SubprocessSender,
    check_order_per_connection,
    group_config,
    make_frame,
    summarize_frame,
    wait_flat,
    wait_until,
    write_config,
)

MAX = 65536
_SCRIPT = Path(sys.executable).with_name("kmux-cli")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "kmuxd.cli.main"]
#: Fields that change between two looks at an idle daemon.
VOLATILE = {"uptime", "age", "tcp", "connected_for", "control"}  # control: counts the looks themselves
CLEAR = "\x1b[H\x1b[2J"


# -- helpers -----------------------------------------------------------------------


def cli(control: str, *args: str, timeout: float = 20.0, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*(prefix or []), *CLI, "--control", control, *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def ok(control: str, *args: str, **kw: Any) -> str:
    r = cli(control, *args, **kw)
    assert r.returncode == 0 and r.stderr == "", r
    return r.stdout


def stable(value: Any) -> Any:
    """A record without the fields that move on their own (uptime, ages, TCP_INFO)."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def cells(line: str) -> list[str]:
    """Table cells: columns are separated by two or more spaces, cells hold at most single ones."""
    return re.split(r"\s{2,}", line.strip())


def daemon_settings(daemon) -> dict[str, Any]:
    """The ``[daemon]`` table the daemon was started with."""
    return tomllib.loads(daemon.config_path.read_text())["daemon"]


def rewrite_config(daemon, settings: dict[str, Any], groups: dict[str, dict[str, Any]], **changes: Any) -> None:
    """Write the daemon's TOML file again: ``settings`` (with ``changes``) and these groups."""
    write_config(daemon.config_path, {**settings, **changes}, groups)


@pytest.fixture
def close_all():
    things = []
    try:
        yield things.append
    finally:
        for t in reversed(things):
            t.close()


@pytest.fixture
def two_groups(backend_factory, daemon_factory):
    """Groups ``echo`` (echo server, 2 connections) and ``web`` (plain server, 1 connection)."""
    echo = backend_factory(echo=True, summarize=summarize_frame, max_frame=MAX)
    web = backend_factory(summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory(
        {"echo": group_config(echo, connections=2), "web": group_config(web, connections=1)}
    )
    echo.wait_open(2)
    web.wait_open(1)
    return daemon, echo, web


# -- read-only views ------------------------------------------------------------------


def test_groups_json_and_table_match_the_control_answer(two_groups, close_all):
    daemon, echo, web = two_groups
    ctl = daemon.control_socket
    rx = Receiver(daemon.connect(group="echo", name="rx"))
    close_all(rx)
    tx = daemon.connect(group="echo", receive=False, name="tx")
    close_all(tx)
    for seq in range(1, 11):
        tx.send(make_frame(1, seq, 100))
    wait_until(lambda: rx.count() == 10, 10, "the echoes")
    wait_flat(lambda: stable(stats(daemon)), quiet=0.2, timeout=5, what="the stats")

    listed = json.loads(ok(ctl, "groups", "-j"))
    answer = stats(daemon)
    assert stable(listed) == stable(answer["groups"])
    assert [g["name"] for g in listed] == ["echo", "web"]
    e = listed[0]
    assert (e["tx_msgs"], e["tx_bytes"], e["rx_msgs"], e["rx_bytes"], e["clients"]) == (10, 1000, 10, 1000, 2)
    assert [len(g["connections"]) for g in listed] == [2, 1]
    assert stable(json.loads(ok(ctl, "-j", "groups"))) == stable(listed)  # -j before the command works too

    table = ok(ctl, "groups").splitlines()
    assert len(table) == 3, table
    assert cells(table[0]) == [
        "GROUP", "CONNS", "CLIENTS", "TX_MSGS", "TX_BYTES", "RX_MSGS", "RX_BYTES", "QUEUED", "RETRIES", "REFUSED",
        "POLICY",
    ]
    # Neither group limits who may use it: "open" from a daemon that sends its policy, "-" from one that does not.
    policy = ["-" if "access" not in g else "open" for g in answer["groups"]]
    assert cells(table[1]) == ["echo", "2/2", "2", "10", "1000 B", "10", "1000 B", "0 B", "0", "0", policy[0]]
    assert cells(table[2]) == ["web", "1/1", "0", "0", "0 B", "0", "0 B", "0 B", "0", "0", policy[1]]
    bare = ok(ctl, "groups", "-H").splitlines()
    assert [cells(line) for line in bare] == [cells(line) for line in table[1:]]


def test_group_and_clients_views(two_groups, close_all):
    daemon, echo, web = two_groups
    ctl = daemon.control_socket
    rx = Receiver(daemon.connect(group="echo", name="rx"))
    close_all(rx)
    tx = daemon.connect(group="web", receive=False, name="tx")
    close_all(tx)
    sub = SubprocessSender(daemon, 5, [100, 200, 300], group="web")
    close_all(sub)
    sub.wait_sent()
    web.wait_count(3, timeout=10)
    wait_until(lambda: len(stats(daemon)["clients"]) == 3, 5, "three clients")
    answer = stats(daemon)

    out = ok(ctl, "group", "echo").splitlines()
    assert out[0] == "group echo: 2/2 connections up, 1 clients (1 ready to receive, 0 waiting to send)"
    assert out[1].split()[:2] == ["endpoints", echo.address]
    assert "framing u32be" in out[1] and "steering balance" in out[1]
    assert out[2].split() == ["access", "open"]
    assert out[3].split()[:5] == ["tx", "0", "msgs", "0", "B"]
    header_at = next(i for i, line in enumerate(out) if line.startswith("CONN "))
    assert out[header_at - 1] == ""
    assert cells(out[header_at])[:5] == ["CONN", "STATE", "ENDPOINT", "LOCAL", "AGE"]
    assert cells(out[header_at])[-3:] == ["RECONNECTS", "SKIPPED", "LAST_ERROR"]
    rows = [cells(line) for line in out[header_at + 1 :]]
    expected_locals = [c["local"] for c in group_of(answer, "echo")["connections"]]
    assert [r[:4] for r in rows] == [[str(i), "ready", echo.address, loc] for i, loc in enumerate(expected_locals)]
    assert all(r[-2:] == ["0", "-"] for r in rows)
    bare = ok(ctl, "group", "echo", "-H").splitlines()
    assert [cells(line)[:4] for line in bare[len(bare) - len(rows) :]] == [r[:4] for r in rows]
    assert json.loads(ok(ctl, "group", "web", "-j"))["name"] == "web"

    table = ok(ctl, "clients").splitlines()
    assert cells(table[0]) == [
        "ID", "NAME", "PID", "UID", "COMM", "GROUP", "RX_ON", "TX_MSGS", "TX_BYTES", "RX_MSGS", "RX_BYTES", "QUEUED",
        "RX_QUEUED", "IN_FLIGHT", "HELD", "HOLDS", "SINCE",
    ]
    rows = [cells(line) for line in table[1:]]
    by_id = {c["id"]: c for c in answer["clients"]}
    assert len(rows) == 3
    # By group, then id: echo's receiver, then web's two senders.
    assert [r[5] for r in rows] == ["echo", "web", "web"]
    assert [int(r[0]) for r in rows] == [c["id"] for c in sorted(answer["clients"], key=lambda c: (c["group"], c["id"]))]
    for r in rows:
        c = by_id[int(r[0])]
        receiving = "yes" if c["receiving"] else "no"
        assert r[1:7] == [c["name"] or "-", str(c["pid"]), "0", c["comm"], c["group"], receiving]
        assert r[-4:-1] == ["0", "-", "0"]  # balance: nothing in flight, never held
    assert sorted(r[1] for r in rows) == ["rx", "subproc", "tx"]  # the names the clients gave in their hellos
    pids = {r[2] for r in rows}
    assert pids == {str(os.getpid()), str(sub.proc.pid)}
    sub_row = [r for r in rows if r[2] == str(sub.proc.pid)]
    assert len(sub_row) == 1 and sub_row[0][7:9] == ["3", "600 B"]

    web_only = ok(ctl, "clients", "--group", "web").splitlines()
    assert [cells(line)[5] for line in web_only[1:]] == ["web", "web"]
    listed = json.loads(ok(ctl, "clients", "--group", "echo", "-j"))
    assert [stable(c) for c in listed] == [stable(c) for c in answer["clients"] if c["group"] == "echo"]

    status = ok(ctl, "status").splitlines()
    assert status[0].split()[:4] == ["kmuxd", answer["daemon"]["version"], "pid", str(daemon.proc.pid)]
    assert status[3].split() == ["clients", "3", "groups", "2"]
    assert status[4].split()[:5] == ["hellos", "accepted", "3", "refused", "0"]
    # The control socket's own counters, as of the status request (one before the next look).
    n = stats(daemon)["control"]["requests"]["stats"] - 1
    assert status[6] == f"    control requests {n} (stats {n})  refused 0  errors 0"


def test_metrics_parse_and_equal_the_json(two_groups, close_all, short_dir):
    daemon, echo, web = two_groups
    ctl = daemon.control_socket
    rx = Receiver(daemon.connect(group="echo", name="rx"))
    close_all(rx)
    tx = daemon.connect(group="echo", receive=False, name="tx")
    close_all(tx)
    for seq in range(1, 26):
        tx.send(make_frame(1, seq, 40 + seq))
    wait_until(lambda: rx.count() == 25, 10, "the echoes")
    wait_flat(lambda: stable(stats(daemon)), quiet=0.2, timeout=5, what="the stats")

    text = ok(ctl, "metrics")
    answer = stats(daemon)
    samples: dict[tuple[str, frozenset], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert value("kmux_up") == 1
    assert value("kmux_daemon_info", version=answer["daemon"]["version"], pid=str(daemon.proc.pid)) == 1
    assert value("kmux_daemon_clients") == 2
    assert value("kmux_daemon_reloads_total") == 0
    for g in answer["groups"]:
        name = g["name"]
        for field in ("tx_msgs", "tx_bytes", "rx_msgs", "rx_bytes", "tx_retries", "clients_joined", "refused"):
            assert value(f"kmux_group_{field}_total", group=name) == g[field], (name, field)
        assert value("kmux_group_connections_up", group=name) == g["connections_up"]
        assert value("kmux_group_connections", group=name) == g["connections_total"]
        assert value("kmux_group_queued_bytes", group=name) == 0
        for c in g["connections"]:
            labels = {"group": name, "conn": str(c["index"]), "endpoint": c["endpoint"]}
            for field in ("tx_msgs", "tx_bytes", "rx_msgs", "rx_bytes", "reconnects"):
                assert value(f"kmux_conn_{field}_total", **labels) == c[field]
            assert value("kmux_conn_up", **labels) == 1
            assert value("kmux_conn_state", state="ready", **labels) == 1
            assert value("kmux_conn_state", state="backoff", **labels) == 0
            assert value("kmux_conn_rtt_seconds", **labels) > 0
            assert value("kmux_conn_snd_cwnd_segments", **labels) > 0
    assert value("kmux_group_tx_msgs_total", group="echo") == 25
    assert value("kmux_group_tx_bytes_total", group="echo") == sum(40 + s for s in range(1, 26))
    for c in answer["clients"]:
        labels = {"group": c["group"], "client": str(c["id"]), "pid": str(os.getpid()), "comm": c["comm"]}
        assert value("kmux_client_tx_msgs_total", **labels) == c["tx_msgs"]
        assert value("kmux_client_rx_msgs_total", **labels) == c["rx_msgs"]
        assert value("kmux_client_receiving", **labels) == (1 if c["receiving"] else 0)
    assert types["kmux_group_tx_msgs"] == "counter" and types["kmux_group_queued_bytes"] == "gauge"
    # The control socket counts its own requests; the look after the metrics' one is one more.
    assert value("kmux_control_requests_total", op="stats") == answer["control"]["requests"]["stats"] - 1
    assert types["kmux_control_refused"] == "counter"

    # --textfile writes the same exposition; with the daemon gone it says kmux_up 0 and exits 3.
    path = short_dir / "kmux.prom"
    assert ok(ctl, "metrics", "--textfile", str(path)) == ""
    written = {s.name for f in text_string_to_metric_families(path.read_text()) for s in f.samples}
    assert "kmux_group_tx_msgs_total" in written and "kmux_conn_rtt_seconds" in written
    r = cli(str(short_dir / "nowhere.sock"), "metrics", "--textfile", str(path))
    assert r.returncode == 3 and "kmuxd is not running" in r.stderr
    assert [(s.name, s.value) for f in text_string_to_metric_families(path.read_text()) for s in f.samples] == [
        ("kmux_up", 0.0)
    ]


# -- --watch ---------------------------------------------------------------------------


def _read_until(fd: int, buf: bytearray, pred, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred(buf):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting on the terminal; got {bytes(buf)!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the other side of the pty is closed
                return
            if not chunk:
                return
            buf += chunk


@pytest.mark.parametrize("sigint", ["default", "inherited_ignored"])
def test_watch_redraws_on_a_terminal_and_ctrl_c_exits_0(two_groups, sigint):
    """``inherited_ignored``: started the way a shell without job control starts a background
    command (SIGINT ignored, which Python keeps), then given the terminal: ^C still ends it."""
    daemon, _, _ = two_groups
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    # setsid --ctty: the CLI leads its own session with the pty as controlling
    # terminal, so a ^C typed there is the real thing (the line discipline's SIGINT).
    command = ["setsid", "--ctty", *CLI, "--control", daemon.control_socket, "groups", "--watch=0.2"]
    if sigint == "inherited_ignored":
        command = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *command]
    proc = subprocess.Popen(
        command,
        stdin=slave, stdout=slave, stderr=slave, close_fds=True,
        env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},  # the pty's size rules
    )
    os.close(slave)
    out = bytearray()
    try:
        # Three redraws begun: the first two are complete.
        _read_until(master, out, lambda b: b.count(CLEAR.encode()) >= 3, 10)
        t0 = time.monotonic()
        os.write(master, b"\x03")
        assert proc.wait(5) == 0
        assert time.monotonic() - t0 < 5
        _read_until(master, out, lambda b: False, 2)  # the rest, until EIO
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)
    text = out.decode()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert text.startswith("\x1b[?25l")  # cursor hidden ...
    assert text.rstrip("\r\n").endswith("\x1b[?25h")  # ... and shown again on exit
    frames = text.split(CLEAR)[1:]
    assert len(frames) >= 3
    for frame in frames[:2]:
        lines = frame.replace("\r\n", "\n").split("\n")
        assert lines[0].startswith("Every 0.2s: kmux-cli groups")
        assert cells(lines[2])[:3] == ["GROUP", "CONNS", "CLIENTS"]
        assert cells(lines[2])[-5:] == ["TX/s", "TX_B/s", "RX/s", "RX_B/s", "POLICY"]  # the text column stays last
        assert [cells(line)[0] for line in lines[3:5]] == ["echo", "web"]
    # The first refresh has no rate yet; the second has one.
    assert cells(frames[0].replace("\r\n", "\n").split("\n")[3])[-2] == "-"
    assert cells(frames[1].replace("\r\n", "\n").split("\n")[3])[-2] != "-"


def test_watch_without_a_terminal_prints_tables_or_json_lines(two_groups):
    daemon, _, _ = two_groups
    ctl = daemon.control_socket
    out = ok(ctl, "groups", "--watch", "0.1", "--count", "2")
    assert "\x1b" not in out
    first, second = out.split("\n\n")
    assert cells(first.splitlines()[0])[0] == "GROUP" and cells(second.splitlines()[0])[0] == "GROUP"
    assert len(first.splitlines()) == len(second.splitlines()) == 3
    lines = ok(ctl, "-j", "group", "web", "--watch=0.1", "--count=2").splitlines()
    assert len(lines) == 2 and [json.loads(line)["name"] for line in lines] == ["web", "web"]


# -- exit codes ----------------------------------------------------------------------------


def test_exit_codes(two_groups, short_dir):
    daemon, _, _ = two_groups
    ctl = daemon.control_socket

    missing = str(short_dir / "missing.sock")
    r = cli(missing, "groups")
    assert (r.returncode, r.stdout, r.stderr) == (3, "", f"kmux-cli: kmuxd is not running (no control socket at {missing})\n")

    stale = str(short_dir / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(stale)
    s.close()  # the file stays, nobody listens
    r = cli(stale, "status")
    assert (r.returncode, r.stderr) == (3, f"kmux-cli: kmuxd is not running (nothing listens on {stale})\n")

    r = cli(ctl, "group", "nope")
    assert (r.returncode, r.stdout, r.stderr) == (5, "", "kmux-cli: no such group 'nope' (groups: echo, web)\n")
    r = cli(ctl, "clients", "--group", "nope")
    assert (r.returncode, r.stderr) == (5, "kmux-cli: no such group 'nope' (groups: echo, web)\n")
    r = cli(ctl, "reconnect", "echo", "7")
    assert (r.returncode, r.stderr) == (5, "kmux-cli: no such connection 7 in group 'echo' (connections: 0-1)\n")
    r = cli(ctl, "drain", "nope", "0")
    assert (r.returncode, r.stderr) == (5, "kmux-cli: no such group 'nope' (groups: echo, web)\n")

    # A daemon that exits under a --watch: exit 3, it closed the connection.
    watcher = subprocess.Popen(
        [*CLI, "--control", ctl, "groups", "--watch=0.2"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        ready, _, _ = select.select([watcher.stdout], [], [], 10)
        assert ready and watcher.stdout.readline().startswith("GROUP")
        assert daemon.stop() == 0
        assert watcher.wait(10) == 3
        err = watcher.stderr.read()
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(5)
        watcher.stdout.close()
        watcher.stderr.close()
    assert err == f"kmux-cli: kmuxd closed the control connection on {ctl} (did it exit?)\n"
    # It removed its socket on the way out.
    r = cli(ctl, "groups")
    assert (r.returncode, r.stderr) == (3, f"kmux-cli: kmuxd is not running (no control socket at {ctl})\n")


def test_the_apps_socket_is_named_as_such(two_groups):
    daemon, _, _ = two_groups
    app = daemon.socket_path
    r = cli(app, "groups")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f"kmux-cli: {app} is kmuxd's app socket, not its control socket (see daemon.control_socket)\n"


def test_a_group_with_no_connection_up_shows_down(backend_factory, daemon_factory):
    live = backend_factory()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{probe.getsockname()[1]}"
    probe.close()  # nothing listens there: every dial is refused
    daemon = daemon_factory({
        "live": group_config(live, connections=1),
        "dead": {"endpoints": [dead], "connections": 2, "reconnect_initial": 0.05, "reconnect_max": 0.2},
    })
    ctl = daemon.control_socket
    live.wait_open(1)
    rows = {cells(line)[0]: cells(line) for line in ok(ctl, "groups", "-H").splitlines()}
    assert (rows["live"][1], rows["dead"][1]) == ("1/1", "0/2 DOWN")
    out = ok(ctl, "group", "dead").splitlines()
    assert out[0] == "group dead: 0/2 connections up (DOWN), 0 clients (0 ready to receive, 0 waiting to send)"
    assert all(" DOWN" not in line for line in ok(ctl, "group", "live").splitlines())


def test_a_control_group_member_looks_but_cannot_act(backend_factory, daemon_factory, short_dir):
    need_root()
    backend = backend_factory()
    short_dir.chmod(0o755)  # only the socket's own mode decides who connects
    daemon = daemon_factory({"echo": group_config(backend, connections=1)},
                            control_group="daemon", control_socket=str(short_dir / "control.sock"))
    ctl = daemon.control_socket
    backend.wait_open(1)
    member = as_user(groups=[grp.getgrnam("daemon").gr_gid])  # the group only as a supplementary one
    assert json.loads(cli(ctl, "groups", "-j", prefix=member).stdout)[0]["name"] == "echo"
    for args in (["reload"], ["reconnect", "echo"], ["drain", "echo", "0"]):
        r = cli(ctl, *args, prefix=member)
        assert (r.returncode, r.stdout) == (4, ""), r
        assert r.stderr == (
            f"kmux-cli: permission denied: {args[0]} needs uid 0 (root), whatever the socket's file mode; "
            f"you are uid {OTHER_UID}\n"
        )
    answer = stats(daemon)
    assert answer["daemon"]["reloads"] == 0 and answer["groups"][0]["connections"][0]["reconnects"] == 0
    status = ok(ctl, "status").splitlines()
    assert status[-1].endswith("refused 3 (drain 1, reconnect 1, reload 1)  errors 0")


def test_usage_errors_change_nothing(two_groups):
    daemon, _, _ = two_groups
    ctl = daemon.control_socket
    r = cli(ctl, "frobnicate")
    assert r.returncode == 2 and "usage: kmux-cli" in r.stderr
    r = cli(ctl, "reload", "--watch")
    assert r.returncode == 2 and "--watch does not apply to reload" in r.stderr
    r = cli(ctl, "reconnect", "echo", "x")
    assert r.returncode == 2 and "usage: kmux-cli" in r.stderr
    r = cli(ctl, "drain", "echo", "0", "--drain-timeout", "-1")
    assert r.returncode == 2
    r = cli(ctl, "groups", "--count", "2")
    assert r.returncode == 2 and "--count needs --watch" in r.stderr
    # None of that changed anything.
    assert [g["connections_total"] for g in stats(daemon)["groups"]] == [2, 1]
    assert all(c["reconnects"] == 0 for g in stats(daemon)["groups"] for c in g["connections"])


def test_permission_denied_for_an_unprivileged_user(backend_factory, daemon_factory, short_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to run kmux-cli as another user")
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*as_nobody, *CLI, "--version"], capture_output=True, text=True, timeout=20)
    if probe.returncode != 0:
        pytest.skip(f"kmux-cli is not runnable as uid 65534 (venv not readable?): {probe.stderr.strip()[:200]}")
    backend = backend_factory()
    short_dir.chmod(0o755)  # the directory lets anyone in: only the socket's own mode decides
    daemon = daemon_factory({"echo": group_config(backend, connections=1)})
    ctl = daemon.control_socket
    assert os.stat(ctl).st_mode & 0o777 == 0o600
    r = cli(ctl, "groups", prefix=as_nobody)
    assert (r.returncode, r.stdout) == (4, "")
    assert r.stderr == (
        f"kmux-cli: permission denied on {ctl} (only root and the socket's group may connect: "
        "daemon.control_group, or SocketGroup= under systemd)\n"
    )
    # The same user gets in where control_group admits it: the refusal was the socket mode.
    import grp

    nogroup = grp.getgrgid(65534).gr_name
    shared = daemon_factory(
        {"echo": group_config(backend, connections=1)},
        name="shared", control_group=nogroup, control_socket=str(short_dir / "shared-control.sock"),
    )
    assert os.stat(shared.control_socket).st_mode & 0o777 == 0o660
    r = cli(shared.control_socket, "groups", "-j", prefix=as_nobody)
    assert r.returncode == 0, r
    assert [g["name"] for g in json.loads(r.stdout)] == ["echo"]


# -- actions ------------------------------------------------------------------------------


def test_reconnect_one_then_all(two_groups, close_all):
    daemon, echo, _ = two_groups
    ctl = daemon.control_socket
    before = stats(daemon)
    ports = [local_port(conn_of(before, "echo", i)) for i in (0, 1)]
    ids = echo.open_by_port()

    assert ok(ctl, "reconnect", "echo", "1") == "group echo: reconnected connection(s) 1\n"
    wait_until(lambda: conn_of(stats(daemon), "echo", 1)["state"] == "ready", 10, "conn 1 back")
    after = stats(daemon)
    c0, c1 = conn_of(after, "echo", 0), conn_of(after, "echo", 1)
    assert local_port(c0) == ports[0] and local_port(c1) != ports[1]
    assert (c0["reconnects"], c1["reconnects"]) == (0, 1)
    assert c1["last_error"] is None  # an operator's reconnect is not an error
    wait_until(lambda: not echo.conn(ids[ports[1]]).open, 5, "the old connection closed")
    wait_until(lambda: local_port(c1) in echo.open_by_port(), 5, "the backend to accept the new connection")
    assert echo.open_by_port() == {ports[0]: ids[ports[0]], local_port(c1): 3}  # the backend's third connection
    assert len(echo.conns()) == 3

    assert json.loads(ok(ctl, "reconnect", "echo", "-j")) == {"reconnected": [0, 1]}
    wait_until(lambda: all(c["state"] == "ready" for c in group_of(stats(daemon), "echo")["connections"]), 10, "both back")
    final = stats(daemon)
    new_ports = {local_port(c) for c in group_of(final, "echo")["connections"]}
    assert not new_ports & {ports[0], local_port(c1)}
    assert [c["reconnects"] for c in group_of(final, "echo")["connections"]] == [1, 2]
    wait_until(lambda: set(echo.open_by_port()) == new_ports, 5, "the backend to see just the two new connections")
    assert len(echo.conns()) == 5
    # The group still works both ways.
    rx = Receiver(daemon.connect(group="echo", name="rx"))
    close_all(rx)
    tx = daemon.connect(group="echo", receive=False)
    close_all(tx)
    for seq in range(1, 6):
        tx.send(make_frame(1, seq, 64))
    wait_until(lambda: rx.count() == 5, 10, "echoes after the reconnects")


def test_drain_under_traffic_loses_nothing_and_replaces_the_connection(backend_factory, daemon_factory, close_all):
    backend = backend_factory(summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=3, max_message=8192)})
    backend.wait_open(3)
    senders = SenderThreads(daemon, 4, size=lambda rng: rng.randint(MIN_FRAME, 8192))
    close_all(senders)
    # Every connection carries traffic (the first ones to come free take the most at first).
    wait_until(lambda: all(c.frames >= 100 for c in backend.conns()), 20, "traffic on all three connections")
    before = stats(daemon)
    by_port = backend.open_by_port()
    old = {i: by_port[local_port(conn_of(before, "echo", i))] for i in range(3)}
    assert backend.conn(old[1]).frames > 0  # the connection to drain is carrying traffic

    r = cli(daemon.control_socket, "drain", "echo", "1", "-j", "--drain-timeout", "10")
    assert r.returncode == 0, r
    drained = json.loads(r.stdout)
    assert set(drained) == {"drained_msgs", "drained_bytes", "seconds"}
    assert drained["drained_msgs"] >= 0 and drained["seconds"] < 10
    # The old connection was half-closed after its queue was written: it ended whole.
    wait_until(lambda: not backend.conn(old[1]).open, 5, "the drained connection closed")
    info = backend.conn(old[1])
    assert (info.close_reason, info.buffered, info.parse_error) == ("eof", 0, None)
    wait_until(lambda: conn_of(stats(daemon), "echo", 1)["state"] == "ready", 10, "the replacement")
    mid = stats(daemon)
    port1 = local_port(conn_of(mid, "echo", 1))
    new1 = wait_until(lambda: backend.open_by_port().get(port1), 5, "the backend to accept the replacement")
    assert new1 not in old.values()
    assert conn_of(mid, "echo", 1)["reconnects"] == 1 and conn_of(mid, "echo", 1)["last_error"] is None
    # Traffic goes on, over the replacement too.
    wait_until(lambda: backend.conn(new1).frames >= 20, 20, "traffic on the replacement")
    senders.stop()
    senders.join(20)
    expected = senders.expected()
    backend.wait_count(len(expected), timeout=20)
    assert wait_flat(backend.count, quiet=0.2, timeout=10, what="frames") == len(expected)

    records = backend.records()
    assert all(rec[0] != "bad" for _, rec in records)
    got = Counter((rec[0], rec[1]) for _, rec in records)
    assert max(got.values()) == 1 and set(got) == expected  # every message exactly once
    check_order_per_connection(records)
    assert all(c.buffered == 0 and c.parse_error is None for c in backend.conns())
    final = stats(daemon)
    g = group_of(final, "echo")
    assert g["tx_msgs"] == len(records) and g["tx_retries"] == 0 and g["queued_msgs"] == 0
    frames = {i: backend.conn(old[i]).frames for i in (0, 2)}
    assert conn_of(final, "echo", 0)["tx_msgs"] == frames[0]
    assert conn_of(final, "echo", 2)["tx_msgs"] == frames[2]
    assert conn_of(final, "echo", 1)["tx_msgs"] == backend.conn(old[1]).frames + backend.conn(new1).frames
    assert conn_of(final, "echo", 1)["tx_bytes"] == sum(
        rec[2] for c, rec in records if c in (old[1], new1)
    )
    assert [c["reconnects"] for c in g["connections"]] == [0, 1, 0]
    assert len(backend.conns()) == 4


def test_drain_timeout_keeps_the_connection_in_service(backend_factory, daemon_factory, close_all):
    backend = backend_factory(summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=1, max_message=8192, write_buffer=16384)})
    (conn,) = backend.wait_open(1)
    backend.pause()
    senders = SenderThreads(daemon, 1, size=lambda rng: 4096)
    close_all(senders)
    wait_until(lambda: conn_of(stats(daemon), "echo", 0)["queued_msgs"] > 0, 20, "a stuck queue")
    port = local_port(conn_of(stats(daemon), "echo", 0))
    t0 = time.monotonic()
    r = cli(daemon.control_socket, "drain", "echo", "0", "--drain-timeout", "0.5")
    assert r.returncode == 1, r
    assert r.stderr.startswith("kmux-cli: drain failed: [drain_timeout] conn 0 still had ")
    assert r.stderr.endswith("bytes queued after 0.5s; it stays in service\n")
    assert 0.5 <= time.monotonic() - t0 < 5
    c = conn_of(stats(daemon), "echo", 0)
    assert c["state"] in ("ready", "busy") and local_port(c) == port and c["reconnects"] == 0
    backend.resume()
    wait_until(lambda: backend.conn(conn).frames >= 50, 20, "traffic after the resume")
    senders.stop()
    senders.join(20)
    backend.wait_count(len(senders.expected()), timeout=20)
    assert wait_flat(backend.count, quiet=0.2, timeout=10) == len(senders.expected())
    assert [rec[1] for _, rec in backend.records()] == list(range(1, senders.sent[0] + 1))
    assert backend.open_ids() == [conn] and len(backend.conns()) == 1


# -- reload ----------------------------------------------------------------------------------


def test_a_refused_reload_names_each_problem_once_and_status_lists_them(backend_factory, daemon_factory):
    """The issue's typo: `stering = "id"` beside its [id] table. reload prints each problem once,
    one per line (no Python repr of the details), with the key the typo resembles, and no
    follow-on errors; status lists them one per line, not on one "last error" line."""
    backend = backend_factory()
    group = group_config(backend, connections=1)
    daemon = daemon_factory({"mc": group})
    settings = daemon_settings(daemon)
    ctl = daemon.control_socket
    bad = {**group, "stering": "id", "connections": 0, "request_timeout": 2.0,
           "id": {"request_offset": 4, "response_offset": 4}}
    rewrite_config(daemon, settings, {"mc": bad})
    r = cli(ctl, "reload")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.splitlines() == [
        "kmux-cli: reload failed: [config_invalid] 2 problems:",
        "  groups.mc.stering: unknown key; did you mean 'steering'?",
        "  groups.mc.connections: must be between 1 and 1024, not 0",
    ]
    lines = ok(ctl, "status").splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("    reloads"))
    assert lines[at:at + 3] == [
        "    reloads 0  failed 1  last error config_invalid, 2 problems:",
        "        groups.mc.stering: unknown key; did you mean 'steering'?",
        "        groups.mc.connections: must be between 1 and 1024, not 0",
    ]
    status = json.loads(ok(ctl, "status", "-j"))
    assert status["last_reload_problems"] == [["groups.mc.stering", "unknown key; did you mean 'steering'?"],
                                              ["groups.mc.connections", "must be between 1 and 1024, not 0"]]
    # Fixed, the next reload is applied and clears both.
    fixed = {k: v for k, v in bad.items() if k != "stering"} | {"steering": "id", "connections": 1}
    rewrite_config(daemon, settings, {"mc": fixed})
    assert ok(ctl, "reload").startswith("kmuxd: configuration reloaded\n")
    status = json.loads(ok(ctl, "status", "-j"))
    assert (status["reloads"], status["last_reload_error"], status["last_reload_problems"]) == (1, None, None)


def test_reload_applies_changes_and_spares_unchanged_groups(backend_factory, daemon_factory, close_all):
    keep_b, grow_b, gone_b, swap_b, new_b = (backend_factory(summarize=summarize_frame, max_frame=MAX) for _ in range(5))
    groups = {
        "keep": group_config(keep_b, connections=2),
        "grow": group_config(grow_b, connections=2),
        "gone": group_config(gone_b, connections=1),
        "swap": group_config(swap_b, connections=1),
    }
    daemon = daemon_factory(groups)
    settings = daemon_settings(daemon)
    ctl = daemon.control_socket
    for b, n in ((keep_b, 2), (grow_b, 2), (gone_b, 1), (swap_b, 1)):
        b.wait_open(n)
    keep_conns, grow_conns, swap_conns = set(keep_b.open_ids()), set(grow_b.open_ids()), set(swap_b.open_ids())
    senders = SenderThreads(daemon, 3, size=lambda rng: rng.randint(MIN_FRAME, 2000), group="keep", pace=0.0005)
    close_all(senders)
    leaver = daemon.connect(group="gone", name="leaver")
    close_all(leaver)
    keep_b.wait_count(300, timeout=10)
    before = stats(daemon)
    keep_ports = [c["local"] for c in group_of(before, "keep")["connections"]]
    grow_ports = [c["local"] for c in group_of(before, "grow")["connections"]]
    keep_clients = sorted(c["id"] for c in before["clients"] if c["group"] == "keep")
    assert len(keep_clients) == 3

    rewrite_config(
        daemon,
        settings,
        {
            "keep": groups["keep"],
            "grow": {**groups["grow"], "connections": 3},
            "swap": {**groups["swap"], "max_message": 32768},
            "fresh": group_config(new_b, connections=1),
        },
    )
    sent_at_reload = sum(senders.sent)
    plan = json.loads(ok(ctl, "reload", "-j"))
    assert plan == {"added": ["fresh"], "removed": ["gone"], "resized": ["grow"], "replaced": ["swap"], "unchanged": ["keep"],
                    "reconfigured": []}
    wait_until(lambda: len(grow_b.open_ids()) == 3, 10, "the third connection of grow")
    new_b.wait_open(1)
    wait_until(lambda: not gone_b.conns()[0].open, 10, "the removed group's connection closed")
    wait_until(lambda: len(swap_b.conns()) == 2 and len(swap_b.open_ids()) == 1, 10, "the replaced group's connection")
    with pytest.raises(kmux.DaemonShutdown):
        leaver.recv(timeout=5)  # the removed group released its client

    after = json.loads(ok(ctl, "groups", "-j"))
    assert [(g["name"], g["connections_total"]) for g in after] == [("keep", 2), ("grow", 3), ("swap", 1), ("fresh", 1)]
    by_name = {g["name"]: g for g in after}
    assert by_name["fresh"]["connections_up"] == 1
    # The unchanged group kept its TCP connections and its clients, and kept working.
    assert [c["local"] for c in by_name["keep"]["connections"]] == keep_ports
    assert set(keep_b.open_ids()) == keep_conns and len(keep_b.conns()) == 2
    assert [c["reconnects"] for c in by_name["keep"]["connections"]] == [0, 0]
    # The resized one kept its first two connections.
    assert [c["local"] for c in by_name["grow"]["connections"]][:2] == grow_ports
    assert grow_conns <= set(grow_b.open_ids())
    assert set(swap_b.open_ids()).isdisjoint(swap_conns)
    wait_until(lambda: sum(senders.sent) > sent_at_reload + 100, 10, "the keep senders going on after the reload")
    assert sorted(c["id"] for c in stats(daemon)["clients"] if c["group"] == "keep") == keep_clients

    # An invalid file is refused with the key path; the old configuration keeps running.
    rewrite_config(daemon, settings, {"keep": groups["keep"], "grow": {**groups["grow"], "connections": 0}})
    r = cli(ctl, "reload")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.startswith("kmux-cli: reload failed: [config_invalid] groups.grow.connections: "), r.stderr
    # A restart-only change is refused too.
    rewrite_config(daemon, settings, {"keep": groups["keep"]}, socket=str(Path(daemon.socket_path).with_name("other.sock")))
    r = cli(ctl, "reload")
    assert r.returncode == 1 and r.stderr.startswith("kmux-cli: reload failed: [reload_refused] daemon.socket"), r
    status = json.loads(ok(ctl, "status", "-j"))
    assert (status["reloads"], status["reload_failures"]) == (1, 2)
    assert "daemon.socket" in status["last_reload_error"]
    unchanged = json.loads(ok(ctl, "groups", "-j"))
    assert [(g["name"], g["connections_total"], g["connections_up"]) for g in unchanged] == [
        ("keep", 2, 2), ("grow", 3, 3), ("swap", 1, 1), ("fresh", 1, 1),
    ]
    assert daemon.proc.poll() is None

    # SIGHUP applies a reload just like the control socket.
    late_b = backend_factory()
    rewrite_config(
        daemon,
        settings,
        {
            "keep": groups["keep"],
            "grow": {**groups["grow"], "connections": 3},
            "swap": {**groups["swap"], "max_message": 32768},
            "fresh": group_config(new_b, connections=1),
            "late": group_config(late_b, connections=1),
        },
    )
    daemon.proc.send_signal(signal.SIGHUP)
    (applied,) = daemon.wait_log("reload_applied", count=2, timeout=10)[1:]
    assert (applied["added"], applied["removed"], applied["resized"], applied["replaced"]) == (["late"], [], [], [])
    assert sorted(applied["unchanged"]) == ["fresh", "grow", "keep", "swap"]
    late_b.wait_open(1)
    assert [g["name"] for g in json.loads(ok(ctl, "groups", "-j"))] == ["keep", "grow", "swap", "fresh", "late"]
    assert json.loads(ok(ctl, "status", "-j"))["reloads"] == 2
    assert ok(ctl, "reload") == "kmuxd: configuration reloaded\n    unchanged  keep, grow, swap, fresh, late\n"

    # Through all of it, the unchanged group lost nothing.
    senders.stop()
    senders.join(20)
    expected = senders.expected()
    keep_b.wait_count(len(expected), timeout=20)
    assert wait_flat(keep_b.count, quiet=0.2, timeout=10) == len(expected)
    records = keep_b.records()
    got = Counter((rec[0], rec[1]) for _, rec in records)
    assert max(got.values()) == 1 and set(got) == expected
    check_order_per_connection(records)
    assert set(keep_b.open_ids()) == keep_conns
