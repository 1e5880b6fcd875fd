"""The SEQPACKET listener: accept apps, run the handshake, attach them to groups.

trio's listeners only speak SOCK_STREAM, so the accept loop is ours. It
follows trio's ``serve_listeners``: accept everything that is ready without
waiting in between, and when the process runs out of descriptors or memory
(the errnos below), log, sleep and try again instead of crashing: an
overloaded daemon recovers when load drops, a crashed one loses every group.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import trio

from kmux.errors import DaemonShutdown, HandshakeInvalid, KmuxError, TooManyClients, UnknownGroup
from kmux.protocol import HANDSHAKE_MAX, Accepted, Notice, Refused, decode_hello, encode_answer

from kmuxd.system.config import Config
from .group import Group
from .session import ClientSession, PeerCred

__all__ = ["AcceptingServer", "Server", "accept_loop", "bind_seqpacket"]

#: accept() errnos that mean "out of resources": back off, don't crash.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: Seconds to wait after such an error before accepting again.
ACCEPT_CAPACITY_SLEEP = 0.1
#: Extra socket buffer beyond max_message, for kernel overhead per packet.
SOCKET_BUFFER_HEADROOM = 65536


def bind_seqpacket(path: str, mode: int, backlog: int = 4096) -> socket.socket:
    """Bind the apps' socket, refusing to steal one a live daemon still serves."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists() or p.is_symlink():
        if not stat.S_ISSOCK(p.lstat().st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
        except OSError:
            p.unlink()  # stale socket from a daemon that died
        else:
            raise OSError(errno.EADDRINUSE, f"{path}: another daemon is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"{path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    return sock


async def accept_loop(listener: socket.socket, nursery: trio.Nursery, handler, log) -> None:
    """Accept everything that is ready, then wait; start ``handler(sock)`` for each."""
    while True:
        await trio.lowlevel.wait_readable(listener)
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    log.error("accept_out_of_capacity", error=os.strerror(exc.errno))
                    await trio.sleep(ACCEPT_CAPACITY_SLEEP)
                    break
                raise
            nursery.start_soon(handler, sock)


class AcceptingServer:
    """``serve(listener)`` runs the accept loop under a cancel scope and each
    connection's ``_handle(sock)`` in a nursery; ``stop_accepting()`` ends the
    loop and leaves running handlers to finish."""

    log = None
    _accept_scope: trio.CancelScope | None = None

    async def serve(self, listener: socket.socket, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as self._accept_scope:
                task_status.started()
                await accept_loop(listener, nursery, self._handle, self.log)
            # Accepting stopped; the nursery now waits for handlers to end.

    def stop_accepting(self) -> None:
        if self._accept_scope is not None:
            self._accept_scope.cancel()

    async def _handle(self, sock: socket.socket) -> None:
        raise NotImplementedError


class Server(AcceptingServer):
    def __init__(self, config: Config, groups: dict[str, Group], log) -> None:
        self.config = config
        self.groups = groups
        self.log = log
        self._next_id = 1
        self._sessions: dict[int, tuple[ClientSession, trio.CancelScope]] = {}
        #: Apps mid-handshake now; handshakes accepted and refused since start.
        self.handshaking = 0
        #: Set by stop_reading: late handshakes are refused.
        self.stopping = False
        self.accepted = 0
        self.refused = 0

    def stop_reading(self) -> None:
        """Graceful stop: take no more messages, tell each client how many were taken.

        The ``shutdown`` notice carries ``accepted``: the seq of the last DATA
        packet read from that client. Every message up to it is written
        within the grace period (or was refused with its own notice); those
        after it were never read and can be sent again after reconnecting.
        """
        self.stopping = True
        for session, _ in self._sessions.values():
            session.stop_reading(Notice(event="shutdown", details={"accepted": session.seq}))

    async def _handle(self, sock: socket.socket) -> None:
        """One app: handshake, then its session until either side ends it."""
        sock.setblocking(False)
        try:
            self.handshaking += 1
            try:
                group, hello, cred = await self._handshake(sock)
            finally:
                self.handshaking -= 1
            if group is None:
                return
            client_id = self._next_id
            self._next_id += 1
            session = ClientSession(group, sock, client_id, cred, hello.name)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, group.cfg.max_message + SOCKET_BUFFER_HEADROOM)
            except OSError:
                pass
            answer = Accepted(
                group=group.cfg.name,
                client_id=client_id,
                max_message=group.cfg.max_message,
                framing=group.cfg.framing,
                steering=group.cfg.steering,
            )
            try:
                sock.send(encode_answer(answer))
            except OSError:
                return
            scope = session.scope
            self._sessions[client_id] = (session, scope)
            self.accepted += 1
            group.attach(session, hello.receive)
            session.log.info("client_attached", pid=cred.pid, uid=cred.uid, comm=cred.comm, name=hello.name)
            try:
                with scope:
                    await session.run(hello.receive)
            finally:
                del self._sessions[client_id]
                group.detach(session)
                session.discard_unread()
                session.log.info("client_detached", tx_msgs=session.tx_msgs, rx_msgs=session.rx_msgs)
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _handshake(self, sock: socket.socket):
        daemon = self.config.daemon
        cred = PeerCred.of(sock)
        try:
            packet = None
            with trio.move_on_after(daemon.handshake_timeout):
                while packet is None:
                    await trio.lowlevel.wait_readable(sock)
                    try:
                        packet, _, flags, _ = sock.recvmsg(HANDSHAKE_MAX + 1)
                    except BlockingIOError:
                        continue
            if packet is None:
                raise HandshakeInvalid(f"no hello within handshake_timeout={daemon.handshake_timeout}s")
            if not packet:
                return None, None, cred  # closed before saying anything
            if flags & socket.MSG_TRUNC:
                raise HandshakeInvalid(f"hello is over {HANDSHAKE_MAX} bytes")
            hello = decode_hello(packet)
            if self.stopping:
                raise DaemonShutdown("the daemon is stopping; connect again in a moment")
            # Checked after reading the hello, so the refusal is an answer to
            # it: closing before the hello arrives would give the client
            # EPIPE instead of the reason.
            if len(self._sessions) >= daemon.max_clients:
                raise TooManyClients(f"the daemon serves at most {daemon.max_clients} clients")
            group = self.groups.get(hello.group)
            if group is None:
                raise UnknownGroup(f"no group {hello.group!r} (groups: {', '.join(sorted(self.groups))})")
            return group, hello, cred
        except KmuxError as exc:
            self.refused += 1
            self.log.info("client_refused", error_code=exc.code, error=exc.message, pid=cred.pid, uid=cred.uid)
            try:
                sock.send(encode_answer(Refused(exc.code, exc.message)))
            except OSError:
                pass
            return None, None, cred
