"""The dial path: from an endpoint to a connection that a :class:`~kmuxd.io.conn.Conn` can carry.

Theory of operation
-------------------
A slot (:class:`kmuxd.io.slot.Slot`) calls :func:`establish` once per
attempt: the TCP connect (:func:`dial`), then the TLS handshake when the
group has ``[groups.NAME.tls]``, then the steps of
``[[groups.NAME.handshake]]``. Each phase is a state of the slot's table
(``connecting``, ``tls_handshake``, ``authenticating``; kmuxd.core.states)
and a failure in any of them is a failed dial: the socket is closed, the
reason goes to ``last_error``, the log and kmux-cli, and the endpoint's
health and back-off count it. Only a connection through all of them takes
apps' traffic, so nothing a server says during them reaches an app.

:func:`dial` resolves the endpoint, and for each address it:

1. has the group's :class:`~kmuxd.io.sockopts.SocketPlan` make a
   non-blocking socket with every option that must precede ``connect``
   (``[groups.NAME.socket]``: source address and port, mark, device, TOS,
   congestion; then :func:`tune`: per-connection TCP settings) and begin the
   connect (``connect_ex``);
2. waits for the connect without blocking the event loop (a trio wait for
   writability, then ``SO_ERROR``);
3. hands the socket over: trio forgets it, the event core owns it from then.

The TCP connect is bounded by the group's ``connect_timeout``, and so is
the TLS handshake after it; the handshake steps, all together, by
``auth_timeout``. A failure raises ``OSError``,
:class:`~kmux.errors.ConnectFailed`, or ``permission_denied`` (a socket
option the process lacks the capability for); :func:`describe` turns each
into the one-line reason that ``last_error``, the log and kmux-cli show.

Nothing here is on the data path: these phases run once per connection, so
they simply await readiness per step (trio's own waits) rather than sit in
the event core; the event core gets the socket once it is ready.

Error handling: whatever ends an attempt (failure, time-out, cancellation),
the socket is closed before the exception leaves :func:`establish`.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from typing import Any

import trio

from kmux.errors import ConnectFailed, KmuxError, RemoteError

from kmuxd.core.backend_handshake import BackendHandshake, StepState
from kmuxd.core.states import SlotEvent, StateMachine
from kmuxd.system.config import Endpoint

from .sockopts import SocketPlan
from .tls import TlsClient, TlsTransport, tls_error_text, tls_failure

__all__ = ["establish", "dial", "tune", "describe", "TLS13_SETTLE"]

#: Seconds a TLS 1.3 dial waits, after its handshake, for the server's first
#: record when no handshake steps follow: a session ticket (to resume next
#: time) or the alert of a server that refused our certificate, which TLS 1.3
#: sends only after the client's handshake is done. A server that sends
#: neither costs this much once per dial (make-before-break hides it).
TLS13_SETTLE = 0.2
#: Bytes read per receive while the handshake steps run.
STEP_READ = 4096


async def establish(endpoint: Endpoint, cfg: Any, sockets: SocketPlan, tls: TlsClient | None,
                    sm: StateMachine) -> tuple[socket.socket, TlsTransport | None]:
    """A connection ready for apps' traffic: TCP, then TLS, then the handshake steps.

    Fires the slot's ``secure`` and ``authenticate`` events on ``sm`` as the
    phases begin; raises OSError or ConnectFailed (a failed dial).
    """
    sock = await dial(endpoint, cfg, sockets)
    try:
        transport = None
        if tls is not None:
            sm.fire(SlotEvent.SECURE)
            transport = await _secure(sock, tls, endpoint, cfg, settle=not cfg.handshake)
        if cfg.handshake:
            sm.fire(SlotEvent.AUTHENTICATE)
            await _authenticate(sock, transport, cfg)
    except BaseException:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        raise
    trio.lowlevel.notify_closing(sock)  # trio forgets it again; the reactor owns it now
    return sock, transport


async def _secure(sock: socket.socket, client: TlsClient, endpoint: Endpoint, cfg: Any,
                  settle: bool) -> TlsTransport:
    transport = client.wrap(sock, endpoint, cfg.read_buffer)
    timeout = cfg.connect_timeout
    with trio.move_on_after(timeout):
        try:
            while not transport.handshake():
                await _push(transport)
                await _feed(transport)
            await _push(transport)
            if settle and transport.obj.version() == "TLSv1.3":
                with trio.move_on_after(TLS13_SETTLE):
                    while not transport.settle():
                        await _feed(transport)
        except (ssl.SSLError, OSError) as exc:
            raise ConnectFailed(tls_failure(exc, endpoint, client.cfg.cert is not None)) from None
        client.established(endpoint, transport)
        return transport
    raise ConnectFailed(f"TLS handshake with {endpoint} timed out after {timeout}s "
                        f"(the server sent {transport.fed} bytes)")


async def _push(transport: TlsTransport) -> None:
    while not transport.push():
        await trio.lowlevel.wait_writable(transport.sock)


async def _feed(transport: TlsTransport) -> None:
    while True:
        await trio.lowlevel.wait_readable(transport.sock)
        try:
            transport.feed()
            return
        except BlockingIOError:
            continue


async def _authenticate(sock: socket.socket, transport: TlsTransport | None, cfg: Any) -> None:
    steps = BackendHandshake(cfg.handshake, cfg.framing, cfg.max_message)
    buf = bytearray(STEP_READ)
    view = memoryview(buf)
    with trio.move_on_after(cfg.auth_timeout):
        try:
            while not steps.done:
                await _send_all(sock, transport, steps.message_to_send())
                while steps.state is StepState.AWAIT:
                    n = await _receive(sock, transport, view)
                    if n == 0:
                        raise steps.closed()
                    steps.receive_data(view[:n])
        except OSError as exc:
            raise ConnectFailed(f"handshake step {steps.step}: {describe(exc)}") from None
        return
    raise steps.timed_out(cfg.auth_timeout)


async def _send_all(sock: socket.socket, transport: TlsTransport | None, data: bytes) -> None:
    if transport is not None:
        while True:
            try:
                transport.send(data)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
        await _push(transport)
        return
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def _receive(sock: socket.socket, transport: TlsTransport | None, view: memoryview) -> int:
    """Bytes into ``view`` (plaintext with TLS), waiting for them; 0 at the end of the stream."""
    recv_into = sock.recv_into if transport is None else transport.recv_into
    while True:
        try:
            return recv_into(view)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def dial(endpoint: Endpoint, cfg: Any, sockets: SocketPlan) -> socket.socket:
    """A connected, non-blocking TCP socket to ``endpoint``, within ``cfg.connect_timeout``."""
    host, port = endpoint.host, endpoint.port
    with trio.move_on_after(cfg.connect_timeout) as scope:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last: BaseException | None = None
        for family, type_, proto, _, addr in sockets.addresses(infos):
            sock, err = sockets.connect(family, type_, proto, addr, lambda s: tune(s, cfg))
            try:
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
        # The far side's failure reads as it is; a local one names its code
        # (permission_denied: a capability the group needs and lacks).
        return exc.message if isinstance(exc, RemoteError) else f"{exc.code}: {exc.message}"
    if isinstance(exc, ssl.SSLError):  # its errno is OpenSSL's error kind, not an errno
        return f"TLS: {tls_error_text(exc)}"
    if isinstance(exc, OSError) and exc.errno:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return repr(exc)
