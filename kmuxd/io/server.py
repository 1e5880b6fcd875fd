"""The SEQPACKET listeners: accept apps, check their hello, attach them to groups.

trio's listeners only speak SOCK_STREAM, so the accept loops are ours. The
apps' listener and every app mid-handshake live in the event core
(:mod:`kmuxd.io.reactor`): accepting, reading a hello and attaching cost no
task and no trio wake-up, so thousands of apps reconnecting after a restart
are served in passes. :class:`AcceptingServer` (a trio accept loop with a
task per connection) serves the low-rate control socket.

Both follow trio's ``serve_listeners``: accept everything that is ready
without waiting in between, and when the process runs out of descriptors or
memory (the errnos below), log, pause accepting and try again instead of
crashing: an overloaded daemon recovers when load drops, a crashed one loses
every group.
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio

from kmux.errors import (
    AncillaryRefused,
    DaemonShutdown,
    HandshakeInvalid,
    KmuxError,
    PermissionDenied,
    TooManyClients,
    TooManyClientsForUser,
    UnknownGroup,
)
from kmux.protocol import HANDSHAKE_MAX, Accepted, Notice, Refused, decode_hello, encode_answer
from kmux.sockbuf import size_send_buffer

from kmuxd.core.states import CloseReason
from kmuxd.system.config import Config
from kmuxd.system.log import LineBudget, RateLimit

from .group import Group
from .listen import ACCEPT_CAPACITY_ERRNOS, ACCEPT_CAPACITY_SLEEP
from .reactor import EPOLLIN, EPOLLRDHUP, Clock, Reactor
from .peercred import PeerCred
from .session import AppSession
from .sockerr import SocketErrors

__all__ = ["Server", "ServerStatistics", "AppListener", "PendingHello"]

#: Most connections accepted per readiness event (then others get their turn).
ACCEPT_BATCH = 256
#: Bounds of the hello-deadline tick, seconds.
HELLO_TICK_MIN = 0.01
HELLO_TICK_MAX = 0.5
#: Seconds between "client_refused" log lines (all refusals are counted by code).
REFUSAL_LOG_INTERVAL = 10.0
#: Seconds between "accept_out_of_capacity" log lines (accepting pauses each time).
CAPACITY_LOG_INTERVAL = 10.0

_MSG_TRUNC = int(socket.MSG_TRUNC)  # plain ints: an IntFlag & costs more than the test
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


class AppListener:
    """The apps' listening socket in the event core: accept what is ready, start hellos."""

    __slots__ = ("server", "sock")

    def __init__(self, server: "Server", sock: socket.socket) -> None:
        self.server = server
        self.sock = sock

    def handle(self, events: int) -> None:
        server = self.server
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    server.accept_out_of_capacity(exc)
                    return
                raise
            server.hello_pending(sock)

    def crash(self, exc: BaseException) -> None:
        self.server.log.error("accept_failed", error=repr(exc))
        self.server.accept_out_of_capacity(exc)


class PendingHello:
    """An app between accept and its hello."""

    __slots__ = ("server", "sock", "fd", "since")

    def __init__(self, server: "Server", sock: socket.socket, now: float) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.since = now

    def handle(self, events: int) -> None:
        try:
            packet, _, flags, _ = self.sock.recvmsg(HANDSHAKE_MAX + 1)
        except BlockingIOError:
            return
        except OSError as exc:
            self.server.hello_errors.note("receive_hello", exc, self.sock)
            self.server.drop_pending(self)
            return
        self.server.hello(self, packet, flags)

    def crash(self, exc: BaseException) -> None:
        self.server.drop_pending(self)


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    #: Apps attached now, and apps between accept and hello.
    clients: int
    handshaking: int
    #: Hellos accepted and refused since start, and refusals by code.
    accepted: int
    refused: int
    refused_by_code: dict


class Server:
    """The apps' side: accepting, hellos, and the registry of attached sessions.

    The hello is checked in this order, each failure answered with its code
    and the socket closed: a valid hello (``handshake_invalid``,
    ``version_unsupported``; ``ancillary_refused`` if it carried descriptors), the daemon not stopping (``daemon_shutdown``),
    ``max_clients`` (``too_many_clients``), ``max_clients_per_uid``
    (``too_many_clients_for_user``), the group (``unknown_group``), its access
    policy (``permission_denied``). No refusal names any group but the one
    asked for. Refusals are counted by code and logged (uid, pid, comm,
    group), at most one line per ``REFUSAL_LOG_INTERVAL`` with a count of the
    rest.
    """

    def __init__(self, config: Config, groups: dict[str, Group], log, reactor: Reactor) -> None:
        self.config = config
        self.groups = groups
        self.log = log
        self.reactor = reactor
        #: The shell's clock (the reactor's): hello deadlines and log budgets.
        self.clock: Clock = reactor.clock
        self._next_id = 1
        self.sessions: dict[int, AppSession] = {}
        self._per_uid: Counter[int] = Counter()
        self._pending: dict[int, PendingHello] = {}
        self._listener: AppListener | None = None
        self._accept_paused_until: float | None = None
        self._refusal_log = RateLimit(REFUSAL_LOG_INTERVAL)
        self._capacity_log = RateLimit(CAPACITY_LOG_INTERVAL)
        #: Shared by every client's client_attached and client_detached lines.
        self.client_lines = LineBudget(config.daemon.client_log_rate)
        #: Apps whose socket failed between accept and attach (counted, logged rate-limited).
        self.hello_errors = SocketErrors(log, "hello_socket_error")
        #: Set by stop_reading: late handshakes are refused.
        self.stopping = False
        #: Hellos accepted (clients attached) and refused since start.
        self.hellos_accepted = 0
        self.refused = 0
        self.refused_by_code: Counter[str] = Counter()

    def reconfigure(self, config: Config) -> None:
        """A reload: limits and groups of the new configuration apply to the next hellos."""
        self.config = config

    @property
    def handshaking(self) -> int:
        return len(self._pending)

    # -- accepting ---------------------------------------------------------------------

    async def serve(self, listener: socket.socket, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept apps through the event core; this task only keeps time (hello deadlines)."""
        listener.setblocking(False)
        self._listener = AppListener(self, listener)
        self.reactor.register(listener.fileno(), self._listener, EPOLLIN)
        task_status.started()
        while True:
            timeout = self.config.daemon.handshake_timeout
            await trio.sleep(max(HELLO_TICK_MIN, min(HELLO_TICK_MAX, timeout / 4)))
            self.reactor.call(self._tick, self.clock(), timeout)

    def _tick(self, now: float, timeout: float) -> None:
        """Hello deadlines, and accepting again after a pause for capacity."""
        self._report_suppressed_client_lines(now)
        for pending in [p for p in self._pending.values() if now - p.since >= timeout]:
            self._refuse(pending, HandshakeInvalid(f"no hello within handshake_timeout={timeout}s"), None)
        if self._accept_paused_until is not None and now >= self._accept_paused_until and self._listener:
            self._accept_paused_until = None
            self.reactor.modify(self._listener.sock.fileno(), EPOLLIN)

    def _report_suppressed_client_lines(self, now: float) -> None:
        # After a storm, no client line may come to carry the count: say it here.
        lines = self.client_lines
        lines.rate = self.config.daemon.client_log_rate  # a reload may change it
        if lines.suppressed and lines.allow(now):
            self.log.info("client_lines_suppressed", suppressed=lines.take_suppressed(), client_log_rate=lines.rate)

    def accept_out_of_capacity(self, exc: BaseException) -> None:
        # Out of descriptors or memory: stop accepting for a moment instead of
        # spinning on a listener that stays readable (trio's serve_listeners).
        if self._capacity_log.allow():
            self.log.error("accept_out_of_capacity", error=str(exc), suppressed=self._capacity_log.take_suppressed())
        self._accept_paused_until = self.clock() + ACCEPT_CAPACITY_SLEEP
        if self._listener is not None:
            self.reactor.modify(self._listener.sock.fileno(), 0)

    def stop_accepting(self) -> None:
        if self._listener is not None:
            self.reactor.unregister(self._listener.sock.fileno())
            self._listener = None

    def hello_pending(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        pending = PendingHello(self, sock, self.clock())
        self._pending[pending.fd] = pending
        self.reactor.register(pending.fd, pending, EPOLLIN | EPOLLRDHUP)

    def drop_pending(self, pending: PendingHello) -> None:
        if self._pending.pop(pending.fd, None) is not None:
            self.reactor.unregister(pending.fd)
            pending.sock.close()

    # -- the hello ---------------------------------------------------------------------

    def hello(self, pending: PendingHello, packet: bytes, flags: int) -> None:
        sock = pending.sock
        if not packet:
            self.drop_pending(pending)  # closed before saying anything
            return
        cred = PeerCred.basic(sock)
        hello = None
        try:
            if flags & _MSG_TRUNC:
                raise HandshakeInvalid(f"hello is over {HANDSHAKE_MAX} bytes")
            if flags & _MSG_CTRUNC:
                # recvmsg got no control buffer, so the kernel closed them already.
                raise AncillaryRefused("the hello may not carry file descriptors or credentials; it was dropped")
            hello = decode_hello(packet)
            daemon = self.config.daemon
            if self.stopping:
                raise DaemonShutdown("the daemon is stopping; connect again in a moment")
            # Checked after reading the hello, so the refusal is an answer to
            # it: closing before the hello arrives would give the client
            # EPIPE instead of the reason.
            if len(self.sessions) >= daemon.max_clients:
                raise TooManyClients(f"the daemon serves at most {daemon.max_clients} clients")
            if daemon.max_clients_per_uid and self._per_uid[cred.uid] >= daemon.max_clients_per_uid:
                raise TooManyClientsForUser(
                    f"uid {cred.uid} already has {self._per_uid[cred.uid]} clients "
                    f"(max_clients_per_uid={daemon.max_clients_per_uid})"
                )
            group = self.groups.get(hello.group)
            if group is None:
                raise UnknownGroup(f"no group {hello.group!r}")
            access = group.cfg.access
            if not access.open:
                if access.groups is not None:
                    cred = cred.with_groups(sock)
                if not access.admits(cred.uid, cred.gid, cred.groups):
                    raise PermissionDenied(
                        f"this group does not admit uid {cred.uid} (its allow_users/allow_groups)"
                    )
        except KmuxError as exc:
            self._refuse(pending, exc, hello, cred)
            return
        self._attach(pending, group, hello, cred)

    def _attach(self, pending: PendingHello, group: Group, hello: Any, cred: PeerCred) -> None:
        sock = pending.sock
        del self._pending[pending.fd]
        cfg = group.cfg
        max_packet = size_send_buffer(sock, cfg.max_message + 1)
        client_id = self._next_id
        self._next_id += 1
        session = AppSession(group, sock, client_id, cred, hello.name, max_packet, self)
        answer = Accepted(
            group=cfg.name, client_id=client_id, max_message=cfg.max_message, framing=cfg.framing,
            steering=cfg.steering, up=group.connections_up > 0,
        )
        try:
            sock.send(encode_answer(answer))
        except OSError as exc:  # gone before its answer (nothing it sent was read)
            self.hello_errors.note("send_answer", exc, sock)
            self.reactor.unregister(pending.fd)
            sock.close()
            return
        self.sessions[client_id] = session
        self._per_uid[cred.uid] += 1
        self.hellos_accepted += 1
        session.start(hello.receive)
        group.attach(session, hello.receive)
        lines = self.client_lines
        if lines.allow(self.clock()):
            session.log.info("client_attached", pid=cred.pid, uid=cred.uid, comm=cred.comm, name=hello.name,
                             suppressed=lines.take_suppressed())

    def _refuse(self, pending: PendingHello, exc: KmuxError, hello: Any, cred: PeerCred | None = None) -> None:
        self.refused += 1
        self.refused_by_code[exc.code] += 1
        if self._refusal_log.allow():
            if cred is None:
                try:
                    cred = PeerCred.basic(pending.sock)
                except OSError:
                    cred = None  # it left already; the line below still says what was refused
            self.log.info(
                "client_refused", error_code=exc.code, error=exc.message,
                uid=cred.uid if cred else None, pid=cred.pid if cred else None, comm=cred.comm if cred else None,
                group=getattr(hello, "group", None), suppressed=self._refusal_log.take_suppressed(),
            )
        try:
            pending.sock.send(encode_answer(Refused(exc.code, exc.message)))
        except OSError as err:  # the refusal itself is counted and logged above
            self.hello_errors.note("send_refusal", err, pending.sock)
        self.drop_pending(pending)

    # -- sessions ----------------------------------------------------------------------

    def session_closed(self, session: AppSession) -> None:
        if self.sessions.pop(session.id, None) is not None:
            uid = session.cred.uid
            self._per_uid[uid] -= 1
            if self._per_uid[uid] <= 0:
                del self._per_uid[uid]

    def stop_reading(self) -> None:
        """Graceful stop: take no more messages, tell each client how many were taken.

        The ``shutdown`` notice carries ``accepted``: the seq of the last DATA
        packet read from that client. Every message up to it is written
        within the grace period (or was refused with its own notice); those
        after it were never read and can be sent again after reconnecting.
        """
        self.stopping = True
        self.reactor.call(self._stop_reading)

    def _stop_reading(self) -> None:
        for session in list(self.sessions.values()):
            session.stop_reading(Notice(event="shutdown", details={"accepted": session.seq}))

    def close_all(self) -> None:
        """The daemon is stopping: end every session and every pending hello."""
        self.reactor.call(self._close_all)

    def _close_all(self) -> None:
        for session in list(self.sessions.values()):
            session.close(CloseReason.DAEMON_STOPPING)
        for pending in list(self._pending.values()):
            self.drop_pending(pending)

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            clients=len(self.sessions),
            handshaking=len(self._pending),
            accepted=self.hellos_accepted,
            refused=self.refused,
            refused_by_code=dict(self.refused_by_code),
        )
