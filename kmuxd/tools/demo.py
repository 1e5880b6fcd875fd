"""``python -m kmuxd.tools.demo``: kmuxd end to end, unprivileged, in about ten seconds.

What it shows
-------------
Several separate app processes share one group of TCP connections. Each app
sends whole messages of varied sizes with the real client library
(:func:`kmux.connect`); kmuxd writes them onto the group's 4 connections to
a bundled echo server (:mod:`kmuxd.tools.backend`), and hands the echoes back.
With ``balance`` steering an echo goes to *any* ready receiver, not to the
app that sent it (that is KCM's model: the group is the unit, not the app),
so the summary shows each app receiving a mix of its own and others'
messages, while the totals match exactly: nothing lost, nothing duplicated,
every message intact.

How it runs
-----------
Everything lives in a run directory (``./run`` or ``--run-dir``): the
config, the socket, the logs and the backend's report. The backend and kmuxd
are real subprocesses, each in its own session so a Ctrl-C reaches only this
process, which then stops them in order (kmuxd first, so its queues drain
into the backend; then the backend, which writes its report). Every wait has
a timeout; every child is killed if it does not stop in time.

The apps are ``python -m kmuxd.tools.demo --app N``. They talk to this process
over stdin/stdout, one JSON line per step, so all of them start sending at
once and stop receiving only when the echoes received by all of them add up
to the messages sent by all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .backend import BackendProcess, LineReader, stop_children
from .lifeline import preexec

__all__ = ["DaemonProcess", "main"]

GROUP = "echo"
CONNECTIONS = 4
DEFAULT_APPS = 6
DEFAULT_MESSAGES = 2000
#: Message sizes (header included) the apps cycle through.
SIZES = (12, 40, 64, 100, 256, 512, 1024, 2048, 4096, 8192)
#: u32be length, app number, sequence number: the start of every demo message.
HEADER = struct.Struct(">IHI")

#: Seconds kmuxd may take to log "ready".
DAEMON_READY_TIMEOUT = 10.0
#: Seconds a stopping kmuxd may take (its shutdown_grace is 5 s).
DAEMON_STOP_TIMEOUT = 10.0
#: Seconds an app may take to connect / to send everything / to answer.
APP_START_TIMEOUT = 10.0
APP_SEND_TIMEOUT = 30.0
APP_ANSWER_TIMEOUT = 5.0
#: Seconds the apps have, after all sent, until every echo is received.
ECHO_TIMEOUT = 15.0
#: How often the coordinator asks the apps how many echoes they have.
COUNT_POLL = 0.05
#: The app's receive timeout: how quickly its receiver thread sees "stop".
APP_RECV_POLL = 0.1
#: Longest Unix socket path (sun_path is 108 bytes with the NUL).
MAX_SOCKET_PATH = 107
LOG_POLL = 0.02


# -- messages ----------------------------------------------------------------------


def message_size(app: int, seq: int) -> int:
    """Deterministic, so a receiver can check any app's message without being told."""
    return SIZES[(seq * 7 + app * 3) % len(SIZES)]


def fill_byte(app: int, seq: int) -> int:
    return (app * 31 + seq) % 251


def make_message(app: int, seq: int) -> bytes:
    size = message_size(app, seq)
    return HEADER.pack(size - 4, app, seq) + bytes([fill_byte(app, seq)]) * (size - HEADER.size)


def check_message(msg: bytes) -> int | None:
    """The sending app's number if ``msg`` is intact, else None."""
    if len(msg) < HEADER.size:
        return None
    length, app, seq = HEADER.unpack_from(msg)
    if length + 4 != len(msg) or len(msg) != message_size(app, seq):
        return None
    fill = fill_byte(app, seq)
    if len(msg) > HEADER.size and (msg[HEADER.size] != fill or msg[-1] != fill):
        return None
    return app


# -- the app (a separate process) ---------------------------------------------------


def run_app(app: int, socket_path: str, messages: int) -> int:
    """One demo app: connect, wait for "go", send while a thread receives, report."""
    import kmux

    def say(**fields: Any) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    commands = LineReader(sys.stdin.fileno())
    client = kmux.connect(GROUP, socket_path, name=f"demo-app-{app}")
    counts = {"received": 0, "received_bytes": 0, "own": 0, "corrupt": 0}
    by_sender: dict[int, int] = {}
    stop = threading.Event()
    failure: list[str] = []

    def receiver() -> None:
        # Bounded by `stop`: each recv waits at most APP_RECV_POLL seconds.
        while not stop.is_set():
            try:
                msg = client.recv(timeout=APP_RECV_POLL)
            except TimeoutError:
                continue
            except kmux.KmuxError as exc:
                failure.append(str(exc))
                return
            sender = check_message(msg)
            counts["received"] += 1
            counts["received_bytes"] += len(msg)
            if sender is None:
                counts["corrupt"] += 1
            else:
                by_sender[sender] = by_sender.get(sender, 0) + 1
                if sender == app:
                    counts["own"] += 1

    say(event="ready", client_id=client.client_id)
    if commands.readline(APP_START_TIMEOUT) != "go":
        return 2
    thread = threading.Thread(target=receiver, name="receiver", daemon=True)
    thread.start()
    sent_bytes = 0
    t0 = time.monotonic()
    for seq in range(1, messages + 1):
        msg = make_message(app, seq)
        client.send(msg)
        sent_bytes += len(msg)
    say(event="sent", msgs=messages, bytes=sent_bytes, seconds=round(time.monotonic() - t0, 3))
    while True:  # bounded: the coordinator says "stop" or closes stdin, each answer is timed
        try:
            cmd = commands.readline(ECHO_TIMEOUT + APP_ANSWER_TIMEOUT)
        except TimeoutError:
            cmd = None
        if cmd == "count":
            say(event="count", received=counts["received"])
            continue
        break
    stop.set()
    thread.join(APP_RECV_POLL * 10)
    client.close()
    say(event="final", app=app, client_id=client.client_id, sent=messages, sent_bytes=sent_bytes,
        by_sender={str(k): v for k, v in sorted(by_sender.items())}, failure=failure, **counts)
    return 0


# -- kmuxd as a child process ---------------------------------------------------------


class DaemonProcess:
    """``python -m kmuxd --config PATH`` with JSON logs going to a file we read."""

    def __init__(self, config_path: Path, log_path: Path, *, cpu: int | None = None) -> None:
        self.log_path = log_path
        self._log_file = open(log_path, "wb")
        self._log_pos = 0
        self.events: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kmuxd", "--config", str(config_path), "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=self._log_file, start_new_session=True,
            preexec_fn=preexec(cpu),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_log(self) -> None:
        with open(self.log_path, "rb") as f:
            f.seek(self._log_pos)
            data = f.read()
        cut = data.rfind(b"\n") + 1  # only whole lines
        self._log_pos += cut
        for line in data[:cut].splitlines():
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"event": "raw", "text": line.decode(errors="replace")})

    def find(self, event: str) -> list[dict[str, Any]]:
        self._read_log()
        return [e for e in self.events if e.get("event") == event]

    def wait_ready(self, timeout: float = DAEMON_READY_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = self.find("ready")
            if ready:
                return ready[0]
            if self.proc.poll() is not None:
                raise RuntimeError(f"kmuxd exited with status {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(LOG_POLL)
        raise RuntimeError(f"kmuxd did not log 'ready' within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = DAEMON_STOP_TIMEOUT) -> list[dict[str, Any]]:
        """Graceful stop (SIGTERM); returns the group_final log events."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError(f"kmuxd did not stop within {timeout} s; killed") from None
        self._log_file.close()
        return self.find("group_final")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DAEMON_STOP_TIMEOUT)
        self._log_file.close()


def write_config(path: Path, socket_path: str, group: str, port: int, connections: int, **extra: Any) -> None:
    """A minimal kmuxd config with one group on 127.0.0.1:port (u32be, balance)."""
    lines = [
        "# Written by kmuxd's demo/benchmark; safe to delete.",
        "version = 1",
        "",
        "[daemon]",
        f"socket = {json.dumps(socket_path)}",
        'socket_mode = "0600"',
        'log_format = "json"',
        "",
        f"[groups.{group}]",
        f'endpoints = ["127.0.0.1:{port}"]',
        f"connections = {connections}",
        'framing = "u32be"',
        'steering = "balance"',
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    path.write_text("\n".join(lines) + "\n")


def socket_path_for(run_dir: Path) -> str:
    """The socket's path, relative to the cwd if the absolute one is too long."""
    path = str(run_dir / "kmuxd.sock")
    if len(path.encode()) > MAX_SOCKET_PATH:
        path = os.path.relpath(path)
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise SystemExit(f"demo: socket path {path} is over {MAX_SOCKET_PATH} bytes; use a shorter --run-dir")
    return path


def clear_stale_socket(path: str) -> None:
    """Remove a socket left by a crashed run; refuse if a daemon still serves it."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise SystemExit(f"demo: a kmuxd is already listening on {path} (another demo with --keep-running?)")
    finally:
        probe.close()


# -- the coordinator ---------------------------------------------------------------------


class App:
    """The coordinator's handle on one app process."""

    def __init__(self, number: int, socket_path: str, messages: int) -> None:
        self.number = number
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kmuxd.tools.demo", "--app", str(number), "--socket", socket_path,
             "--messages", str(messages)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True, preexec_fn=preexec(),
        )
        self.lines = LineReader(self.proc.stdout.fileno())
        self.info: dict[str, Any] = {}

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        line = self.lines.readline(timeout)
        if line is None:
            raise RuntimeError(f"app {self.number} exited (status {self.proc.wait(APP_ANSWER_TIMEOUT)})")
        msg = json.loads(line)
        if msg.get("event") != event:
            raise RuntimeError(f"app {self.number}: expected {event!r}, got {msg}")
        self.info.update(msg)
        return msg

    def tell(self, command: str) -> None:
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(APP_ANSWER_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(APP_ANSWER_TIMEOUT)


def run_apps(apps: list[App], messages: int) -> None:
    """Start all apps at once, then wait until every echo is received somewhere."""
    for app in apps:
        app.expect("ready", APP_START_TIMEOUT)
    for app in apps:
        app.tell("go")
    for app in apps:
        app.expect("sent", APP_SEND_TIMEOUT)
    expected = messages * len(apps)
    deadline = time.monotonic() + ECHO_TIMEOUT
    while True:
        received = 0
        for app in apps:
            app.tell("count")
            received += app.expect("count", APP_ANSWER_TIMEOUT)["received"]
        if received >= expected or time.monotonic() > deadline:
            break
        time.sleep(COUNT_POLL)
    for app in apps:
        app.tell("stop")
    for app in apps:
        app.expect("final", APP_ANSWER_TIMEOUT)
        app.proc.wait(APP_ANSWER_TIMEOUT)


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def print_apps(apps: list[App]) -> tuple[int, int, int, int, int]:
    print("Apps (each sends its own messages; balance steering hands echoes to any ready receiver)")
    print(f"  {'app':>3}  {'client':>6}  {'sent':>6}  {'sent bytes':>11}  {'received':>8}  {'own':>5}  "
          f"{'others':>6}  {'corrupt':>7}")
    sent = sent_bytes = received = received_bytes = corrupt = 0
    for app in apps:
        f = app.info
        print(f"  {f['app']:>3}  {f['client_id']:>6}  {_fmt_int(f['sent']):>6}  {_fmt_int(f['sent_bytes']):>11}  "
              f"{_fmt_int(f['received']):>8}  {_fmt_int(f['own']):>5}  {_fmt_int(f['received'] - f['own']):>6}  "
              f"{f['corrupt']:>7}")
        for failure in f["failure"]:
            print(f"       app {f['app']} receive failed: {failure}")
        sent += f["sent"]
        sent_bytes += f["sent_bytes"]
        received += f["received"]
        received_bytes += f["received_bytes"]
        corrupt += f["corrupt"]
    print(f"  {'all':>3}  {'':>6}  {_fmt_int(sent):>6}  {_fmt_int(sent_bytes):>11}  {_fmt_int(received):>8}")
    return sent, sent_bytes, received, received_bytes, corrupt


def print_connections(report: dict[str, Any], daemon: DaemonProcess) -> None:
    # kmuxd logs each connection's local address; the backend saw it as the peer.
    slot_of = {}
    for e in daemon.find("connected"):
        local = e.get("local") or ""
        if local.rpartition(":")[2].isdigit():
            slot_of[int(local.rpartition(":")[2])] = e.get("conn")
    print("TCP connections of the group (counted by the backend, echoed back on the same connection)")
    print(f"  {'conn':>4}  {'kmuxd port':>10}  {'msgs':>8}  {'bytes':>11}")
    rows = sorted(report["connections"], key=lambda c: (slot_of.get(c["peer_port"], 1 << 30), c["peer_port"]))
    for c in rows:
        slot = slot_of.get(c["peer_port"], "?")
        print(f"  {slot:>4}  {c['peer_port']:>10}  {_fmt_int(c['msgs']):>8}  {_fmt_int(c['bytes']):>11}"
              + (f"  error: {c['error']}" if c.get("error") else ""))
    print(f"  {'all':>4}  {'':>10}  {_fmt_int(report['total_msgs']):>8}  {_fmt_int(report['total_bytes']):>11}")


def print_daemon(finals: list[dict[str, Any]]) -> None:
    print("kmuxd's own count (log event group_final)")
    for g in finals:
        print(f"  group {g['group']}: written to TCP {_fmt_int(g['tx_msgs'])} msgs / {_fmt_int(g['tx_bytes'])} B, "
              f"steered to apps {_fmt_int(g['rx_msgs'])} msgs / {_fmt_int(g['rx_bytes'])} B, "
              f"re-sent after a failure {g.get('tx_retries', 0)}")


def keep_running(socket_path: str, daemon: DaemonProcess) -> None:
    """Leave kmuxd and the backend up until Ctrl-C (or SIGTERM)."""
    example = (
        f"KMUX_SOCKET={socket_path} {sys.executable} -c 'import kmux; c = kmux.connect(\"{GROUP}\"); "
        f"c.send(b\"\\x00\\x00\\x00\\x05hello\"); print(c.recv(timeout=2))'"
    )
    print()
    print(f"kmuxd is still running (pid {daemon.pid}), listening on {socket_path}")
    print(f"group {GROUP!r}: {CONNECTIONS} connections to the echo backend, u32be framing. Try:")
    print(f"  {example}")
    cli = Path(sys.executable).with_name("kmux-cli")
    control = Path(socket_path).with_name("control.sock")
    print(f"  {cli} --control {control} group {GROUP}      (also: groups, clients, metrics, --watch)")
    print("Press Ctrl-C to stop it (the connection and daemon counts are printed then).")
    sys.stdout.flush()
    while daemon.proc.poll() is None:  # ends on Ctrl-C, SIGTERM or a daemon that dies
        time.sleep(0.5)
    print(f"kmuxd exited by itself with status {daemon.proc.returncode}:\n{daemon.log_tail()}")


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def coordinate(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    socket_path = socket_path_for(run_dir)
    clear_stale_socket(socket_path)
    signal.signal(signal.SIGTERM, _terminate)
    # Also when started with SIGINT ignored (e.g. `cmd &` from a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    backend = daemon = None
    apps: list[App] = []
    try:
        backend = BackendProcess("echo", "u32be", report=run_dir / "backend-report.json",
                                 stderr=open(run_dir / "backend.log", "wb"))
        config = run_dir / "kmuxd.toml"
        write_config(config, socket_path, GROUP, backend.port, CONNECTIONS)
        daemon = DaemonProcess(config, run_dir / "kmuxd.log")
        ready = daemon.wait_ready()
        print(f"kmuxd demo: {args.apps} apps x {args.messages} messages through group {GROUP!r} "
              f"({CONNECTIONS} TCP connections, balance steering, u32be framing)")
        print(f"  run dir {_shown(run_dir)}   socket {_shown(Path(socket_path))}")
        print(f"  echo backend 127.0.0.1:{backend.port} (pid {backend.pid}), kmuxd pid {daemon.pid}: "
              f"ready in {ready.get('startup_ms')} ms with {ready.get('connections_up')}/{CONNECTIONS} connections up")
        print()
        apps = [App(n, socket_path, args.messages) for n in range(1, args.apps + 1)]
        t_apps = time.monotonic()
        run_apps(apps, args.messages)
        sent, sent_bytes, received, received_bytes, corrupt = print_apps(apps)
        print(f"  (apps ran {time.monotonic() - t_apps:.2f} s)")
        print()
        if args.keep_running:
            try:
                keep_running(socket_path, daemon)
            except KeyboardInterrupt:
                print("\nstopping")
        finals = daemon.stop()
        report = backend.stop()
        print_connections(report, daemon)
        print()
        print_daemon(finals)
        print()
        problems = []
        if received != sent or received_bytes != sent_bytes:
            problems.append(f"apps received {received} msgs / {received_bytes} B, sent {sent} / {sent_bytes} B")
        if corrupt:
            problems.append(f"{corrupt} echoed messages were corrupt")
        if not args.keep_running:  # with --keep-running the user may have sent more
            if (report["total_msgs"], report["total_bytes"]) != (sent, sent_bytes):
                problems.append(f"backend counted {report['total_msgs']} msgs / {report['total_bytes']} B")
            for g in finals:
                if (g["tx_msgs"], g["tx_bytes"], g["rx_msgs"], g["rx_bytes"]) != (sent, sent_bytes, sent, sent_bytes):
                    problems.append(f"kmuxd's group_final disagrees: {g}")
            if not finals:
                problems.append("kmuxd logged no group_final")
        if problems:
            print("MISMATCH:\n  " + "\n  ".join(problems))
            print(f"logs: {run_dir / 'kmuxd.log'}, {run_dir / 'backend.log'}")
            return 1
        print(f"OK: {_fmt_int(sent)} messages ({_fmt_int(sent_bytes)} bytes) sent by {len(apps)} apps, "
              f"written by kmuxd, echoed, and received intact; every count agrees. "
              f"({time.monotonic() - t0:.1f} s)")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, TimeoutError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        if daemon is not None:
            print(f"kmuxd log tail:\n{daemon.log_tail()}", file=sys.stderr)
        return 1
    finally:
        # Whatever happened: nothing we started outlives us.
        for app in apps:
            app.stop()
        stop_children(daemon, backend)


def _shown(path: Path) -> str:
    """A path as the user typed it: relative to the working directory when it is below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kmuxd.tools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="run", help="where the config, socket and logs go (default ./run)")
    parser.add_argument("--apps", type=int, default=DEFAULT_APPS, help=f"app processes (default {DEFAULT_APPS})")
    parser.add_argument("--messages", type=int, default=DEFAULT_MESSAGES,
                        help=f"messages each app sends (default {DEFAULT_MESSAGES})")
    parser.add_argument("--keep-running", action="store_true",
                        help="leave kmuxd and the backend running until Ctrl-C")
    parser.add_argument("--app", type=int, help=argparse.SUPPRESS)  # internal: be app N
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.app is not None:
        return run_app(args.app, args.socket, args.messages)
    if not 1 <= args.apps <= 64 or not 1 <= args.messages <= 1_000_000:
        parser.error("--apps must be 1..64 and --messages 1..1000000")
    return coordinate(args)


if __name__ == "__main__":
    sys.exit(main())
