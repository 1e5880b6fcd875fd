"""The dial path: from an endpoint to a connected socket that a :class:`~kmuxd.io.conn.Conn` can carry.

Theory of operation
-------------------
A slot (:class:`kmuxd.io.conn.Slot`) calls :func:`dial` once per attempt.
It resolves the endpoint, and for each address it returns:

1. makes a non-blocking socket and applies the group's options *before*
   ``connect`` (:func:`apply_socket_options`: options that must precede the
   connect, such as a source address; :func:`tune`: per-connection TCP
   settings);
2. connects without blocking the event loop (``connect_ex``, then a trio
   wait for writability and ``SO_ERROR``);
3. hands the socket over: trio forgets it, the event core owns it from then.

Everything is bounded by the group's ``connect_timeout``. A failure raises
``OSError`` or :class:`~kmux.errors.ConnectFailed`; :func:`describe` turns
either into the one-line reason that ``last_error``, the log and kmux-cli
show. Nothing here touches the data path: a dial is once per connection.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

import trio

from kmux.errors import ConnectFailed, KmuxError

from kmuxd.system.config import Endpoint

__all__ = ["dial", "tune", "apply_socket_options", "describe"]


async def dial(endpoint: Endpoint, cfg: Any) -> socket.socket:
    """A connected, non-blocking TCP socket to ``endpoint``, within ``cfg.connect_timeout``."""
    host, port = endpoint.host, endpoint.port
    with trio.move_on_after(cfg.connect_timeout) as scope:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last: BaseException | None = None
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_ | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, proto)
            try:
                apply_socket_options(sock, cfg)
                tune(sock, cfg)
                err = sock.connect_ex(addr)
                if err == errno.EINPROGRESS:
                    await trio.lowlevel.wait_writable(sock)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    # describe() puts the errno's name first: the text says what failed, in words.
                    raise OSError(err, f"connect to {endpoint}: {os.strerror(err)}")
                trio.lowlevel.notify_closing(sock)  # trio forgets it; the reactor owns it now
                return sock
            except BaseException as exc:
                trio.lowlevel.notify_closing(sock)
                sock.close()
                last = exc
                if not isinstance(exc, OSError):
                    raise
        raise last or ConnectFailed(f"{endpoint}: no address")
    assert scope.cancelled_caught
    raise ConnectFailed(f"connect to {endpoint} timed out after {cfg.connect_timeout}s")


def apply_socket_options(sock: socket.socket, cfg: Any) -> None:
    """The group's ``[groups.NAME.socket]`` options, applied before ``connect``.

    (Issue 18 section 3 fills this in: source address and ports, SO_MARK,
    SO_BINDTODEVICE, TOS, TCP_CONGESTION, TCP_NOTSENT_LOWAT.)
    """


def tune(sock: socket.socket, cfg: Any) -> None:
    """Per-connection socket options: no Nagle, keepalive, user timeout (docs/config.md)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if cfg.keepalive_idle:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, cfg.keepalive_idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, cfg.keepalive_interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cfg.keepalive_count)
    if cfg.tcp_user_timeout:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(cfg.tcp_user_timeout * 1000))


def describe(exc: BaseException) -> str:
    """One line for ``last_error``, the log and kmux-cli: the errno's name, then what failed."""
    if isinstance(exc, KmuxError):
        return exc.message
    if isinstance(exc, OSError) and exc.errno:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return repr(exc)
