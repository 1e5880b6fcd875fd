"""Integration test support: a real TCP backend, a real kmuxd subprocess, message builders.

Everything here uses real sockets and real processes, bounded by timeouts:

* :class:`Backend` is a TCP server on 127.0.0.1:0, run by one background
  thread (:class:`kmuxd.tools.backend.RecordingBackend`, the project's one
  TCP test backend). It cuts each connection's byte stream into u32be
  frames, records every frame with the connection it arrived on,
  optionally echoes it, can pause reading, push raw bytes and kill
  connections (FIN or RST).
* :class:`Daemon` runs ``kmuxd --config`` as a subprocess and collects its
  JSON log lines.
* :func:`make_frame` / :func:`parse_frame` build and check test messages
  that carry ``(client_id, seq)`` and a CRC of the whole body, so a torn or
  interleaved frame cannot go unnoticed.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import kmux
from kmux.control import ControlClient
from kmux.framing import PRESETS
from kmux.protocol import Accepted, Hello, decode_answer, encode_hello

from kmuxd.tools.backend import Conn, ConnInfo, Loop, Recording, RecordingBackend  # noqa: F401 - ConnInfo: what Backend.conns() returns
from kmuxd.tools.backend.recording import wait_until

U32BE = PRESETS["u32be"]

# -- bounded waiting -----------------------------------------------------------


def unread_by_peer(sock: socket.socket | int) -> int:
    """Bytes (the kernel's accounting, headers included) ``sock`` sent that its peer has not read yet.

    ``SIOCOUTQ`` on a Unix socket: 0 once the peer has read everything, which
    is how a test knows the daemon took a packet without sleeping.
    """
    return struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]


def unread_here(sock: socket.socket | int) -> int:
    """Bytes waiting in ``sock``'s own receive queue (``FIONREAD``)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]


def wait_flat(read: Callable[[], Any], quiet: float, timeout: float, what: str = "value") -> Any:
    """Wait until ``read()`` has not changed for ``quiet`` seconds; returns the value."""
    deadline = time.monotonic() + timeout
    last = read()
    since = time.monotonic()
    while True:
        time.sleep(0.05)
        now = time.monotonic()
        value = read()
        if value != last:
            last, since = value, now
        elif now - since >= quiet:
            return value
        if now >= deadline:
            raise AssertionError(f"{what} kept changing for {timeout}s (last {last!r})")


# -- test messages ---------------------------------------------------------------

#: u32be length, u16 client id, u32 seq, u32 crc32 of (client id, seq, body)
HEADER = struct.Struct(">IHII")
MIN_FRAME = HEADER.size  # 14 bytes: the smallest frame that can carry an identity
_BLOB = random.Random(1234).randbytes(1 << 18)


def make_frame(client: int, seq: int, size: int, rng: random.Random | None = None) -> bytes:
    """A u32be frame of exactly ``size`` bytes (header included) naming ``(client, seq)``."""
    if size < MIN_FRAME:
        raise ValueError(f"a test frame needs at least {MIN_FRAME} bytes")
    n = size - MIN_FRAME
    rng = rng or random
    off = rng.randrange(0, len(_BLOB) - n + 1)
    body = _BLOB[off : off + n]
    ident = struct.pack(">HI", client, seq)
    crc = zlib.crc32(body, zlib.crc32(ident))
    return HEADER.pack(size - 4, client, seq, crc) + body


class BadTestFrame(AssertionError):
    pass


def parse_frame(frame: bytes) -> tuple[int, int]:
    """``(client, seq)`` of a frame built by :func:`make_frame`; BadTestFrame if torn/garbled."""
    if len(frame) < MIN_FRAME:
        raise BadTestFrame(f"{len(frame)}-byte frame is too short to be a test frame")
    length, client, seq, crc = HEADER.unpack_from(frame)
    if length + 4 != len(frame):
        raise BadTestFrame(f"header says {length + 4} bytes, frame has {len(frame)}")
    body = memoryview(frame)[MIN_FRAME:]
    if zlib.crc32(body, zlib.crc32(frame[4:10])) != crc:
        raise BadTestFrame(f"checksum mismatch in frame of client {client} seq {seq} ({len(frame)} bytes)")
    return client, seq


def summarize_frame(frame: bytes) -> tuple[int, int, int] | tuple[str, str]:
    """Backend record for a test frame: ``(client, seq, size)`` or ``("bad", reason)``."""
    try:
        client, seq = parse_frame(frame)
    except BadTestFrame as exc:
        return ("bad", str(exc))
    return (client, seq, len(frame))


def u32be(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def random_size(rng: random.Random, max_message: int) -> int:
    """Mostly small, some medium, a few large: every size class, bounded total bytes."""
    r = rng.random()
    if r < 0.6:
        return rng.randint(MIN_FRAME, 512)
    if r < 0.9:
        return rng.randint(513, 8192)
    return rng.randint(8193, max_message)


def check_order_per_connection(records: list[tuple[int, Any]]) -> None:
    """Per client, seqs strictly increase within each connection (records are in arrival order)."""
    last: dict[tuple[int, int], int] = {}
    for conn, rec in records:
        client, seq = rec[0], rec[1]
        key = (conn, client)
        prev = last.get(key, 0)
        assert seq > prev, f"conn {conn}: client {client} seq {seq} arrived after seq {prev}"
        last[key] = seq


# -- the backend -------------------------------------------------------------------

#: The TCP server of these tests: kmuxd.tools.backend's recording server (the one backend the
#: demo, the benchmark, the soak and the tests share). ``Backend(echo=..., summarize=..., ...)``.
Backend = RecordingBackend


# -- the daemon ----------------------------------------------------------------------


class AcceptingServer:
    """A loopback server that only accepts: records each accept's time and peer address, and
    keeps the connection open (``keep=True``) or closes it at once.

    The project's one TCP backend (:mod:`kmuxd.tools.backend`), with a protocol that ignores
    whatever arrives."""

    def __init__(self, *, keep: bool) -> None:
        self.keep = keep
        self.accepts: list[float] = []
        self.peers: list[tuple[str, int]] = []
        self._loop = Loop()
        listener = self._loop.listen(self._accepted)
        self.address = f"127.0.0.1:{listener.port}"
        self._loop.start(name="accepting-server")

    def _accepted(self, conn: Conn) -> Recording:
        self.accepts.append(time.monotonic())
        self.peers.append(conn.peer)
        if not self.keep:
            conn.close()
        return Recording(conn, lambda c, frame: None)

    def close(self) -> None:
        self._loop.close()


def kmuxd_command() -> list[str]:
    script = Path(sys.executable).with_name("kmuxd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kmuxd"]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_config(path: Path, daemon: dict[str, Any], groups: dict[str, dict[str, Any]], version: Any = 1) -> Path:
    lines = [] if version is None else [f"version = {toml_value(version)}"]
    lines.append("[daemon]")
    lines += [f"{k} = {toml_value(v)}" for k, v in daemon.items()]
    for name, g in groups.items():
        lines.append(f"[groups.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in g.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """A running ``kmuxd --config`` subprocess and the log lines it wrote."""

    def __init__(self, config_path: Path, socket_path: str, group: str, prefix: list[str] | None = None) -> None:
        self.config_path = config_path
        self.socket_path = socket_path
        self.group = group
        #: Run kmuxd under this command (e.g. ``ip netns exec NAME``, which execs: the pid is kmuxd's).
        self.prefix = list(prefix or [])
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._lines: list[dict[str, Any]] = []
        self._raw: list[str] = []
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> "Daemon":
        self.proc = subprocess.Popen(
            [*self.prefix, *kmuxd_command(), "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read_logs, name="kmuxd-logs", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"kmuxd did not become ready (rc={self.proc.returncode}):\n" + self.stderr_text())
        return self

    def _read_logs(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            with self._lock:
                self._raw.append(line)
                if isinstance(entry, dict):
                    self._lines.append(entry)
            if isinstance(entry, dict) and entry.get("event") == "ready":
                self._ready.set()

    def logs(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        with self._lock:
            lines = list(self._lines)
        return [
            e for e in lines if (event is None or e.get("event") == event) and all(e.get(k) == v for k, v in match.items())
        ]

    def wait_log(self, event: str, count: int = 1, timeout: float = 10.0, **match: Any) -> list[dict[str, Any]]:
        return wait_until(
            lambda: len(found := self.logs(event, **match)) >= count and found,
            timeout,
            f"{count} log line(s) {event} {match}",
        )

    @property
    def control_socket(self) -> str:
        """The control socket's path, as the daemon announced it in its ``ready`` line."""
        return self.logs("ready")[0]["control_socket"]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def fd_count(self) -> int:
        """Descriptors kmuxd holds open now (``/proc/PID/fd``)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stderr_text(self) -> str:
        with self._lock:
            return "\n".join(self._raw)

    def connect(self, **kw: Any) -> kmux.Client:
        kw.setdefault("timeout", 5.0)
        return kmux.connect(kw.pop("group", self.group), self.socket_path, **kw)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait ``timeout`` s, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode


def group_config(backend: Backend, **kw: Any) -> dict[str, Any]:
    """A group on ``backend`` with fast reconnects; ``kw`` overrides any setting."""
    cfg: dict[str, Any] = {
        "endpoints": [backend.address],
        "connections": 4,
        "max_message": 65536,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.2,
        "connect_timeout": 2.0,
    }
    cfg.update(kw)
    return cfg


# -- clients in threads ------------------------------------------------------------


class Receiver:
    """A sync kmux client whose thread receives into a list; commands run in that thread."""

    def __init__(self, client: kmux.Client, name: str = "") -> None:
        self.client = client
        self.name = name or f"rx{client.client_id}"
        self._lock = threading.Lock()
        self._msgs: list[bytes] = []
        self._cmds: queue.Queue = queue.Queue()
        self._reading = True
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def messages(self) -> list[bytes]:
        if self.error is not None:
            raise AssertionError(f"receiver {self.name} failed: {self.error!r}") from self.error
        with self._lock:
            return list(self._msgs)

    def count(self) -> int:
        return len(self.messages())

    def _run(self) -> None:
        try:
            while not self._stop:
                try:
                    fn = self._cmds.get_nowait() if self._reading else self._cmds.get(timeout=0.02)
                except queue.Empty:
                    fn = None
                if fn is not None:
                    fn()
                    continue
                if not self._reading:
                    continue
                try:
                    msg = self.client.recv(timeout=0.02)
                except TimeoutError:
                    continue
                with self._lock:
                    self._msgs.append(msg)
        except BaseException as exc:
            self.error = exc

    def _call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append((True, fn()))
            except BaseException as exc:
                box.append((False, exc))
            done.set()

        self._cmds.put(run)
        if not done.wait(timeout):
            raise AssertionError(f"receiver {self.name} did not run a command within {timeout}s")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def set_receive(self, on: bool) -> None:
        self._call(lambda: self.client.set_receive(on, timeout=5.0))

    def pause_reading(self) -> None:
        self._call(lambda: setattr(self, "_reading", False))

    def resume_reading(self) -> None:
        self._call(lambda: setattr(self, "_reading", True))

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.client.close()


class SenderThreads:
    """Sync sender clients (``receive=False``), one thread each, sending test frames.

    Client ``i`` sends frames naming ``(first_id + i, seq)``, seq from 1, of
    ``size(rng)`` bytes, until ``count`` frames are sent or :meth:`stop`.
    ``sent[i]`` counts completed ``send()`` calls. The clients are named
    ``{prefix}{i}`` in their hello, so their daemon records can be found.
    ``pace`` slows each sender down (a sleep after each send).
    """

    def __init__(self, daemon: Daemon, n: int, *, size: Callable[[random.Random], int],
                 count: int | None = None, first_id: int = 1, prefix: str = "sender", group: str | None = None,
                 seed: int = 0, pace: float = 0.0) -> None:
        kw = {"group": group} if group is not None else {}
        self.names = [f"{prefix}{i}" for i in range(n)]
        self.clients = [daemon.connect(receive=False, name=name, **kw) for name in self.names]
        self.ids = list(range(first_id, first_id + n))
        self.sent = [0] * n
        self.size = size
        self.count = count
        self.seed = seed
        self.pace = pace  # seconds to sleep after each send (0: as fast as the daemon takes them)
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        client, cid = self.clients[i], self.ids[i]
        rng = random.Random(self.seed * 1000 + cid)
        try:
            seq = 0
            while not self._stop.is_set() and (self.count is None or seq < self.count):
                seq += 1
                client.send(make_frame(cid, seq, self.size(rng), rng))
                self.sent[i] = seq
                if self.pace:
                    time.sleep(self.pace)
        except BaseException as exc:
            self.errors.append(exc)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 20.0) -> None:
        """Wait for every thread to finish (after :meth:`stop` or ``count`` frames); no errors allowed."""
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
            assert not t.is_alive(), "a sender thread is stuck"
        assert not self.errors, f"senders failed: {self.errors!r}"

    def close(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(5)
        for c in self.clients:
            c.close()

    def expected(self) -> set[tuple[int, int]]:
        return {(cid, s) for cid, n in zip(self.ids, self.sent) for s in range(1, n + 1)}


#: A sender in its own process: joins ``group`` as a pure sender named ``subproc``,
#: sends the planned frames, says "sent", and stays attached until stdin closes.
_SUBPROCESS_SENDER = """
import json, random, sys
import kmux
from tests.integration.helpers import make_frame
path, group, cid, sizes = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
client = kmux.connect(group, path, receive=False, name="subproc", timeout=5.0)
rng = random.Random(cid)
for seq, size in enumerate(sizes, 1):
    client.send(make_frame(cid, seq, size, rng))
print("sent", flush=True)
sys.stdin.read()
client.close()
"""


class SubprocessSender:
    """A client in another process (so its pid differs from the test's), see _SUBPROCESS_SENDER."""

    def __init__(self, daemon: Daemon, cid: int, sizes: list[int], group: str | None = None) -> None:
        group = group or daemon.group
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SUBPROCESS_SENDER, daemon.socket_path, group, str(cid), json.dumps(sizes)],
            cwd=Path(__file__).resolve().parents[2],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_sent(self, timeout: float = 10.0) -> None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the subprocess sender did not finish sending in time"
        line = self.proc.stdout.readline()
        assert line == "sent\n", (line, self.proc.stderr.read() if self.proc.poll() is not None else "")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()


# -- looking inside a running daemon ------------------------------------------------------


def control_stats(daemon: Daemon) -> dict[str, Any]:
    """The daemon's ``stats`` answer, asked on its control socket as kmux-cli asks."""
    with ControlClient(daemon.control_socket, timeout=5.0) as c:
        return c.request("stats")


def group_record(daemon: Daemon, name: str | None = None) -> dict[str, Any]:
    """One group's record (``name``, default the daemon's first group) from ``stats``."""
    name = name or daemon.group
    (g,) = [g for g in control_stats(daemon)["groups"] if g["name"] == name]
    return g


def kmux_cli(daemon: Daemon, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    """Run the real ``kmux-cli --control SOCKET ARGS...`` against ``daemon``."""
    script = Path(sys.executable).with_name("kmux-cli")
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from kmuxd.cli.main import main; sys.exit(main())"]
    return subprocess.run([*cmd, "--control", daemon.control_socket, *args], capture_output=True, text=True,
                          timeout=timeout)


def log_time(entry: dict[str, Any]) -> float:
    """A daemon log line's ``timestamp`` (ISO, UTC) as a ``time.time()`` value."""
    from datetime import datetime

    return datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()


# -- an app that speaks the wire protocol itself ----------------------------------------------

#: Most packets a :class:`RawApp` pushes in one go (each loop is bounded).
MAX_PACKETS = 20_000


class RawApp:
    """An app that speaks the wire protocol itself: non-blocking sends, and it reads
    nothing unless asked (the library would read notices for it)."""

    def __init__(self, path: str, group: str, name: str = "raw") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(5.0)
        self.sock.connect(path)
        self.sock.send(encode_hello(Hello(group=group, receive=True, name=name)))
        answer = decode_answer(self.sock.recv(65536))
        assert isinstance(answer, Accepted), answer
        self.answer = answer
        self.client_id = answer.client_id
        self.sock.setblocking(False)
        self.sent = 0  # DATA packets the kernel took (their seqs are 1..sent)
        self.closed_at: float | None = None

    def push(self, packet: Callable[[int], bytes], limit: int = MAX_PACKETS) -> int:
        """Send ``packet(seq)`` until the kernel refuses more (EAGAIN) or ``limit``; returns how many."""
        n = 0
        while n < limit:
            try:
                self.sock.send(packet(self.sent + 1))
            except BlockingIOError:
                break
            self.sent += 1
            n += 1
        return n

    def close(self) -> None:
        self.closed_at = time.time()
        self.sock.close()

    def read_packets(self, timeout: float,
                     until: Callable[[list[tuple[int, bytes]]], bool]) -> list[tuple[int, bytes]]:
        """Read ``(kind, body)`` packets until ``until(packets)`` or ``timeout`` s of waiting in all."""
        out: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + timeout
        while not until(out):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                break
            try:
                packet = self.sock.recv(1 << 20)
            except BlockingIOError:
                continue
            if not packet:
                break
            out.append((packet[0], packet[1:]))
        return out


def frame_packet(client: int, size: int = 1024) -> Callable[[int], bytes]:
    """``seq -> DATA packet`` of a test frame of ``size`` bytes naming ``(client, seq)``."""
    return lambda seq: b"\x00" + make_frame(client, seq, size)


def client_record(daemon: Daemon, client_id: int) -> dict[str, Any] | None:
    """The client's record from ``stats`` (None once it is gone)."""
    for c in control_stats(daemon)["clients"]:
        if c["id"] == client_id:
            return c
    return None


# -- the control socket's stats answer -------------------------------------------------


def stats(daemon, **args) -> dict:
    """The daemon's ``stats`` answer, asked on its control socket."""
    with ControlClient(daemon.control_socket, timeout=5.0) as c:
        return c.request("stats", **args)


def group_of(answer: dict, name: str) -> dict:
    (g,) = [g for g in answer["groups"] if g["name"] == name]
    return g


def conn_of(answer: dict, group: str, index: int) -> dict:
    (c,) = [c for c in group_of(answer, group)["connections"] if c["index"] == index]
    return c


def local_port(conn: dict) -> int:
    """The local port of a connection in a ``stats`` answer (the tests dial IPv4 loopback)."""
    host, port = conn["local"].rsplit(":", 1)
    assert host == "127.0.0.1", conn["local"]
    return int(port)
