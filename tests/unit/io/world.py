"""A group of the I/O shell without a daemon: real sockets (socket pairs), a fake clock.

:class:`World` builds a reactor, a :class:`~kmuxd.io.group.Group` and its
slots from a configuration, and hands connections to the slots with
:meth:`World.connect` (one end of a ``socketpair``: the other end is the
"server"). Apps attach with :meth:`World.attach` (a ``SOCK_SEQPACKET``
pair: the test holds the app's end). :meth:`World.run` serves passes until
nothing is ready; :meth:`World.tick` steps the clock and applies the
group's deadlines, as its housekeeping task would. No trio run, no daemon,
no sleeping: what a daemon test waits seconds for takes microseconds here.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from kmux.protocol import KIND_DATA, KIND_DATA_MORE, KIND_NOTICE, decode_notice
from kmuxd.core.states import SlotEvent, SlotState
from kmuxd.io.group import Group
from kmuxd.io.peercred import PeerCred
from kmuxd.io.reactor import EPOLLIN, EPOLLRDHUP, Reactor
from kmuxd.io.session import AppSession
from kmuxd.io.sockopts import SocketPlan
from kmuxd.system.config import parse_config
from kmuxd.system.log import LineBudget

__all__ = ["World", "FakeClock", "RecordingLog", "App", "frame", "body_of", "read_all", "split"]


class FakeClock:
    """The shell's clock, stepped by the test (trio's MockClock is the model)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingLog:
    """A structlog-like logger that keeps its lines: ``(level, event, fields)``."""

    def __init__(self, lines: list | None = None, **context: Any) -> None:
        self.lines: list[tuple[str, str, dict]] = [] if lines is None else lines
        self.context = context

    def bind(self, **kw: Any) -> "RecordingLog":
        return RecordingLog(self.lines, **{**self.context, **kw})

    def _line(self, level: str, event: str, kw: dict) -> None:
        self.lines.append((level, event, {**self.context, **kw}))

    def debug(self, event: str, **kw: Any) -> None:
        self._line("debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._line("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._line("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._line("error", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        self._line("exception", event, kw)

    def events(self, name: str) -> list[dict]:
        return [fields for _, event, fields in self.lines if event == name]


def frame(body: bytes) -> bytes:
    """A u32be-framed message."""
    return struct.pack(">I", len(body)) + body


def body_of(message: bytes) -> bytes:
    return message[4:]


class App:
    """An attached app: the test's end of its SEQPACKET socket, and the daemon's session."""

    def __init__(self, sock: socket.socket, session: AppSession) -> None:
        self.sock = sock
        self.session = session

    def send(self, message: bytes, kind: int = KIND_DATA) -> None:
        self.sock.send(bytes([kind]) + message)

    def send_pieces(self, message: bytes, size: int) -> None:
        """One message in pieces of ``size`` bytes (DATA_MORE ..., then DATA)."""
        pieces = [message[i : i + size] for i in range(0, len(message), size)]
        for piece in pieces[:-1]:
            self.send(piece, KIND_DATA_MORE)
        self.send(pieces[-1])

    def packets(self) -> list[tuple[str, Any]]:
        """What the daemon sent it: ``("data", message)`` or ``("notice", Notice)``."""
        out = []
        while True:
            try:
                packet = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            if not packet:
                return out  # the daemon closed its end
            kind = packet[0]
            if kind == KIND_DATA:
                out.append(("data", packet[1:]))
            elif kind == KIND_DATA_MORE:
                out.append(("more", packet[1:]))
            else:
                assert kind == KIND_NOTICE, f"unexpected packet kind {kind:#x}"
                out.append(("notice", decode_notice(packet[1:])))

    def messages(self) -> list[bytes]:
        return [bytes(v) for k, v in self.packets() if k == "data"]

    def notices(self) -> list[Any]:
        return [v for k, v in self.packets() if k == "notice"]


class _Registry:
    """The daemon's Server, as far as a session needs one."""

    def __init__(self) -> None:
        self.client_lines = LineBudget(0)
        self.closed: list[AppSession] = []

    def session_closed(self, session: AppSession) -> None:
        self.closed.append(session)


class World:
    """One group of the shell, its reactor and clock (see the module docstring)."""

    def __init__(self, **group: Any) -> None:
        settings = {"endpoints": ["127.0.0.1:9"], "connections": 1, **group}
        daemon = settings.pop("daemon", {})
        cfg = parse_config({"version": 1, "daemon": {"socket": "/tmp/kmux-unit.sock", **daemon}, "groups": {"g": settings}})
        self.clock = FakeClock()
        self.log = RecordingLog()
        self.reactor = Reactor(self.log, self.clock)
        self.group = Group(cfg.groups["g"], cfg.daemon, self.log, self.reactor)
        self.registry = _Registry()
        self._ids = 0
        self._open: list[socket.socket] = []
        #: the connection each slot carried last (its dial task's ``conn``)
        self._carried: dict[int, Any] = {}

    # -- the group's connections -----------------------------------------------------------

    def connect(self, slot: int = 0, *, sndbuf: int | None = None, tcp: bool = False) -> socket.socket:
        """Give slot ``slot`` a connection (``tcp``: a loopback TCP one with the group's
        ``[socket]`` options, for what only TCP has; else a socketpair); returns the
        server's end (non-blocking)."""
        if tcp:
            with socket.create_server(("127.0.0.1", 0)) as listener:
                ours = socket.create_connection(listener.getsockname())
                server, _ = listener.accept()
            # The group's [socket] options, as the dial (or an attach) sets them.
            SocketPlan("g", self.group.cfg.socket).apply_connected(ours)
        else:
            ours, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if sndbuf is not None:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
        ours.setblocking(False)
        server.setblocking(False)
        self._open.append(server)
        s = self.group.slots[slot]
        # What the slot's dial task does before it carries a socket it dialled.
        if s.sm.state is SlotState.IDLE:
            s.sm.fire(SlotEvent.DIAL)
        if s.sm.state is SlotState.UP:
            s.sm.fire(SlotEvent.LOST if self._carried[slot].sm.closed else SlotEvent.RECYCLE)
        if s.sm.state is SlotState.BACKOFF:
            s.sm.fire(SlotEvent.RETRY)
        self._carried[slot] = self.reactor.call(s.carry, ours, s.endpoint)
        return server

    def conn(self, slot: int = 0) -> Any:
        live = self.group.slots[slot].live
        assert live is not None, f"slot {slot} has no live connection"
        return live

    # -- apps -------------------------------------------------------------------------------

    def attach(self, *, receive: bool = True, name: str = "app", sndbuf: int | None = None) -> App:
        ours, app = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if sndbuf is not None:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        ours.setblocking(False)
        app.setblocking(False)
        self._open.append(app)
        self._ids += 1
        session = AppSession(self.group, ours, self._ids, PeerCred.basic(ours), name, 1 << 16, self.registry)
        self.reactor.register(session.fd, session, EPOLLIN | EPOLLRDHUP)

        def start() -> None:
            session.start(receive)
            self.group.attach(session, receive)

        self.reactor.call(start)
        return App(app, session)

    # -- time and passes ----------------------------------------------------------------------

    def run(self, max_passes: int = 100) -> int:
        """Serve passes until nothing is ready; returns how many ran."""
        for n in range(max_passes):
            if not self.reactor.serve_ready():
                return n
        raise AssertionError(f"still busy after {max_passes} passes")

    def tick(self, seconds: float) -> None:
        """Step the clock, then apply the group's deadlines (its housekeeping), then serve."""
        self.clock.advance(seconds)
        self.reactor.call(self.group.apply_deadlines, self.clock())
        self.run()

    def stats(self) -> Any:
        return self.group.statistics()

    def close(self) -> None:
        for sock in self._open:
            sock.close()
        self.reactor.close()


def read_all(sock: socket.socket) -> bytes:
    """Everything the server's end can read now."""
    out = bytearray()
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not data:
            return bytes(out)
        out += data


def split(stream: bytes) -> list[bytes]:
    """u32be frames in a byte stream (whole ones only)."""
    out = []
    pos = 0
    while pos + 4 <= len(stream):
        (n,) = struct.unpack_from(">I", stream, pos)
        if pos + 4 + n > len(stream):
            break
        out.append(stream[pos : pos + 4 + n])
        pos += 4 + n
    return out

