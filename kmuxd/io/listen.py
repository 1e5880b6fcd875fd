"""Listening sockets: binding a SEQPACKET socket safely, and a trio accept loop for low-rate servers.

The apps' socket is served by the event core (:mod:`kmuxd.io.server`); the
control socket, a few requests a minute, by :class:`AcceptingServer`: a trio
accept loop with a task per connection. Both follow trio's
``serve_listeners``: accept everything that is ready without waiting in
between, and when the process runs out of descriptors or memory
(:data:`ACCEPT_CAPACITY_ERRNOS`), log, pause and try again instead of
crashing: an overloaded daemon recovers when load drops, a crashed one loses
every group.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path
from typing import Any

import trio

from kmuxd.system.log import RateLimit

__all__ = ["AcceptingServer", "accept_loop", "bind_seqpacket", "ACCEPT_CAPACITY_ERRNOS", "ACCEPT_CAPACITY_SLEEP"]

#: accept() errnos that mean "out of resources": back off, don't crash.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: Seconds to wait after such an error before accepting again.
ACCEPT_CAPACITY_SLEEP = 0.1
#: Seconds between "accept_out_of_capacity" log lines of one accept loop (each pause is counted).
ACCEPT_CAPACITY_LOG_INTERVAL = 10.0


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
            # ECONNREFUSED: nobody listens, a stale socket from a daemon that died.
            # Any other failure to connect means the same for us: nobody we could steal it from.
            p.unlink()
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
    capacity_log = RateLimit(ACCEPT_CAPACITY_LOG_INTERVAL)
    while True:
        await trio.lowlevel.wait_readable(listener)
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    if capacity_log.allow():
                        log.error("accept_out_of_capacity", error=os.strerror(exc.errno),
                                  suppressed=capacity_log.take_suppressed())
                    await trio.sleep(ACCEPT_CAPACITY_SLEEP)
                    break
                raise
            nursery.start_soon(handler, sock)


class AcceptingServer:
    """``serve(listener)`` runs the accept loop under a cancel scope and each
    connection's ``_handle(sock)`` in a nursery; ``stop_accepting()`` ends the
    loop and leaves running handlers to finish."""

    log: Any = None
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


