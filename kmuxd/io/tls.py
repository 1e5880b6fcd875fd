"""TLS to a group's service, sans-IO: ``ssl.SSLObject`` between two ``MemoryBIO``s.

Theory of operation
-------------------
The data path keeps its shape with TLS (docs/config.md, "TLS"). A
:class:`TlsTransport` stands where the socket's ``send`` and ``recv_into``
stood in :class:`~kmuxd.io.conn.Conn`, with the same contract
(``BlockingIOError`` for "not now", 0 for end of stream, ``OSError`` for a
broken stream), and *plaintext* counts:

* :meth:`TlsTransport.send` encrypts a whole outbox batch with **one**
  ``SSLObject.write`` (OpenSSL cuts it into records of up to 16 KiB) and
  writes the ciphertext with one ``send``. What the kernel refused stays
  here as the **backlog** and goes first next time; while it is there a
  new batch is refused (``BlockingIOError``), so it never exceeds one batch.
  The batch's plaintext is reported written at once: like bytes in the
  kernel's send buffer, its fate is the connection's (salvage, retries and
  ``connection_lost`` see the plaintext stream, unchanged).
* :meth:`TlsTransport.recv_into` makes at most **one** ``recv`` of
  ciphertext per call and decrypts everything it can into the receive
  buffer, record after record, until the buffer is full or a record is
  incomplete.

Level-triggered epoll sees only the socket, and TLS breaks that twice; the
connection handles both (:mod:`kmuxd.io.conn`):

1. **ciphertext refused with the outbox already empty**: the plaintext is
   accounted as written, so nothing in the outbox asks for ``EPOLLOUT``;
   :attr:`TlsTransport.backlog` does (``EPOLLOUT`` stays on until it is
   gone, and a retiring connection does not close before it is);
2. **plaintext left inside the SSLObject** once the receive buffer's space
   was filled: the socket may have nothing more, so epoll will not report
   it again. :attr:`TlsTransport.buffered` says so, and the connection asks
   the event core to serve it again in the next pass without a readiness
   event (one read per pass: bounded like any other read).

:class:`TlsClient` is a group's TLS: its ``SSLContext`` (built from
``[groups.NAME.tls]``), the session of the last connection to each endpoint
(offered by the next dial: **session resumption**), and our own
certificate's expiry. A reload with changed files builds a new one.

The handshake itself is driven by the dial path (:mod:`kmuxd.io.dial`),
which owns the waiting; :func:`tls_failure` turns OpenSSL's errors into the
reason operators read in ``last_error``.
"""

from __future__ import annotations

import errno
import ssl
import time
from dataclasses import dataclass
from typing import Any

from kmuxd.system.config import Endpoint, TlsConfig, client_context

__all__ = ["TlsClient", "TlsTransport", "TlsStatistics", "SecurityStatistics", "security_statistics", "tls_failure",
           "tls_error_text"]

#: What kmux-cli group and the start-up log say about a group with tls.verify = false.
VERIFY_OFF_WARNING = ("TLS verify is OFF: the service's certificate is not checked, anyone on the path "
                      "can read and change this group's traffic")


@dataclass(frozen=True, slots=True)
class TlsStatistics:
    #: Negotiated protocol ("TLSv1.3") and cipher suite.
    version: str | None
    cipher: str | None
    #: This connection resumed an earlier session (no full handshake).
    resumed: bool
    #: The server's certificate was verified (tls.verify); if not, its
    #: subject and expiry are unknown.
    verified: bool
    #: The server certificate's subject ("CN=mc.example,O=Example"), and
    #: seconds until it expires (negative: expired).
    server_subject: str | None
    server_cert_expiry_seconds: float | None
    #: Seconds until our own client certificate expires (None: no tls.cert).
    client_cert_expiry_seconds: float | None


@dataclass(frozen=True, slots=True)
class SecurityStatistics:
    """A group's TLS and handshake settings, and how its handshakes went."""

    tls: bool
    #: tls.verify (None without TLS), and the loud warning when it is off.
    verify: bool | None
    warning: str | None
    server_name: str | None
    min_version: str | None
    #: tls.cert is set (mutual TLS).
    client_cert: bool
    #: TLS handshakes completed, and how many of them resumed a session.
    tls_handshakes: int
    tls_resumed: int
    #: Steps of [[groups.NAME.handshake]] each new connection runs.
    handshake_steps: int


def security_statistics(cfg: Any, client: "TlsClient | None") -> SecurityStatistics:
    tls = cfg.tls
    return SecurityStatistics(
        tls=tls is not None,
        verify=tls.verify if tls is not None else None,
        warning=VERIFY_OFF_WARNING if tls is not None and not tls.verify else None,
        server_name=tls.server_name if tls is not None else None,
        min_version=tls.min_version if tls is not None else None,
        client_cert=tls is not None and tls.cert is not None,
        tls_handshakes=client.handshakes if client is not None else 0,
        tls_resumed=client.resumed if client is not None else 0,
        handshake_steps=len(cfg.handshake),
    )


def _not_after(cert: dict) -> float | None:
    text = cert.get("notAfter")
    return ssl.cert_time_to_seconds(text) if text else None


def _cert_file_not_after(path: str) -> float | None:
    """When a PEM certificate file expires (its first certificate); None if unreadable."""
    try:
        return _not_after(ssl._ssl._test_decode_cert(path))  # type: ignore[attr-defined]
    except (AttributeError, OSError, ssl.SSLError, ValueError):
        return None  # shown as unknown; loading the context already proved the file


def _subject(cert: dict) -> str | None:
    names = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C"}
    parts = [f"{names.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    return ",".join(parts) or None


class TlsClient:
    """One group's TLS: context, resumable sessions, our certificate's expiry."""

    def __init__(self, cfg: TlsConfig) -> None:
        self.cfg = cfg
        self.context = client_context(cfg)
        self.client_not_after = _cert_file_not_after(cfg.cert) if cfg.cert else None
        #: The last established connection's SSLObject per endpoint: its
        #: session (with the tickets it received since) is offered next time.
        self._last: dict[Endpoint, ssl.SSLObject] = {}
        self.handshakes = 0
        self.resumed = 0

    def wrap(self, sock: Any, endpoint: Endpoint, read_size: int) -> "TlsTransport":
        """A transport over a connected socket, its handshake not yet done."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        prev = self._last.get(endpoint)
        session = prev.session if prev is not None else None
        obj = self.context.wrap_bio(incoming, outgoing, server_hostname=self.cfg.server_name or endpoint.host,
                                    session=session)
        return TlsTransport(self, sock, obj, incoming, outgoing, read_size)

    def established(self, endpoint: Endpoint, transport: "TlsTransport") -> None:
        self._last[endpoint] = transport.obj
        self.handshakes += 1
        if transport.obj.session_reused:
            self.resumed += 1


class TlsTransport:
    """A connection's TLS: the socket's ``send``/``recv_into``, for plaintext (module docstring)."""

    __slots__ = ("client", "sock", "obj", "incoming", "outgoing", "backlog", "buffered", "eof", "carry",
                 "cbuf", "cview", "fed", "server_subject", "server_not_after", "verified")

    def __init__(self, client: TlsClient, sock: Any, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO, read_size: int) -> None:
        self.client = client
        self.sock = sock
        self.obj = obj
        self.incoming = incoming
        self.outgoing = outgoing
        #: Ciphertext the kernel refused: it goes before anything else.
        self.backlog: memoryview | bytes = b""
        #: Plaintext may wait inside: serve the connection again without a readiness event.
        self.buffered = False
        #: The server's TCP stream ended (its ciphertext may still be decrypted).
        self.eof = False
        #: Plaintext read during the handshake's settling, before the connection had a buffer.
        self.carry = b""
        self.cbuf = bytearray(read_size)
        self.cview = memoryview(self.cbuf)
        #: Ciphertext bytes read during the handshake (a time-out says how far it got).
        self.fed = 0
        self.server_subject: str | None = None
        self.server_not_after: float | None = None
        self.verified = False

    # -- the handshake (driven by kmuxd.io.dial) -----------------------------------------

    def handshake(self) -> bool:
        """One step of the handshake; True once done. Its output joins the backlog."""
        try:
            self.obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        self._take_output()
        if done:
            cert = self.obj.getpeercert() or {}
            self.verified = bool(cert)
            self.server_subject = _subject(cert)
            self.server_not_after = _not_after(cert)
        return done

    def feed(self) -> int:
        """One ``recv`` of ciphertext into the SSLObject (0: the server closed). Raises BlockingIOError."""
        n = self.sock.recv_into(self.cbuf)
        self.fed += n
        if n:
            self.incoming.write(self.cview[:n])
        else:
            self.eof = True
            self.incoming.write_eof()
        return n

    def settle(self) -> bool:
        """After a TLS 1.3 handshake: process what the server sent since. True once something
        came: a session ticket, or plaintext (a server that speaks first: the connection's
        first read gets it). A server that refused our certificate sent an alert instead:
        that raises its SSLError; a close raises SSLZeroReturnError or SSLEOFError."""
        one = bytearray(1)
        read: Any = self.obj.read  # a count with a buffer (see recv_into)
        try:
            n: int = read(1, one)
        except ssl.SSLWantReadError:
            session = self.obj.session
            return session is not None and session.has_ticket
        if n:
            self.carry += bytes(one)
        return True

    # -- writing ---------------------------------------------------------------------------

    def send(self, data: Any) -> int:
        """Encrypt ``data`` (one write, whole) and send it; returns ``len(data)``.

        Raises BlockingIOError, taking nothing, while an earlier batch's
        ciphertext still waits for the kernel.
        """
        if self.backlog and not self.push():
            raise BlockingIOError(errno.EAGAIN, "TLS ciphertext still waits for the kernel")
        n = self.obj.write(data)
        self._take_output()
        self.push()
        return n

    def push(self) -> bool:
        """Send the backlog; True once none is left. Raises the socket's OSError."""
        backlog = self.backlog
        send = self.sock.send
        while backlog:
            try:
                k = send(backlog)
            except BlockingIOError:
                self.backlog = backlog
                return False
            backlog = memoryview(backlog)[k:] if k < len(backlog) else b""
        self.backlog = b""
        return True

    def _take_output(self) -> None:
        if self.outgoing.pending:
            out = self.outgoing.read()
            self.backlog = bytes(self.backlog) + out if self.backlog else out

    # -- reading ----------------------------------------------------------------------------

    def recv_into(self, space: memoryview) -> int:
        """Plaintext into ``space``: at most one ``recv``, then every whole record that fits.

        Returns the bytes decrypted (0: the stream ended). Raises
        BlockingIOError when no whole record is here yet, SSLError (an
        OSError) when the stream is broken.
        """
        obj = self.obj
        incoming = self.incoming
        want = len(space)
        got = 0
        if self.carry:
            got = len(self.carry)
            space[:got] = self.carry
            self.carry = b""
        if not obj.pending() and not self.eof:
            # Nothing decrypted waits inside: take what the kernel has. (Plaintext
            # that waits is served first, without a system call: the space fills.)
            try:
                k = self.sock.recv_into(self.cbuf)
            except BlockingIOError:
                if not incoming.pending and not got:
                    self.buffered = False
                    raise
                k = -1  # records from an earlier read may still be whole inside
            if k > 0:
                incoming.write(self.cview[:k])
            elif k == 0:
                self.eof = True
                incoming.write_eof()
        # With a buffer, read() returns a count; typeshed knows only its bytes form,
        # and mypyc would check for bytes: call it untyped.
        read: Any = obj.read
        while got < want:
            try:
                n: int = read(want - got, space[got:] if got else space)
            except ssl.SSLWantReadError:
                break  # a record is incomplete: the kernel reports the rest
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.eof = True  # close_notify, or TCP's FIN without one: the end of the stream
                break
            if n == 0:
                break
            got += n
            if not incoming.pending and not obj.pending():
                break  # all taken (spares the exception a read of nothing costs)
        if self.outgoing.pending:  # a key update to answer: the connection flushes it
            self._take_output()
        # Space filled: more may wait inside, where epoll cannot see it (rule 2).
        self.buffered = got == want and (obj.pending() > 0 or incoming.pending > 0)
        if not got and not self.eof:
            raise BlockingIOError(errno.EAGAIN, "no whole TLS record yet")
        return got

    # -- statistics ---------------------------------------------------------------------------

    def statistics(self) -> TlsStatistics:
        now = time.time()
        obj = self.obj
        cipher = obj.cipher()
        client_not_after = self.client.client_not_after
        return TlsStatistics(
            version=obj.version(),
            cipher=cipher[0] if cipher else None,
            resumed=obj.session_reused,
            verified=self.verified,
            server_subject=self.server_subject,
            server_cert_expiry_seconds=None if self.server_not_after is None else round(self.server_not_after - now, 1),
            client_cert_expiry_seconds=None if client_not_after is None else round(client_not_after - now, 1),
        )


#: OpenSSL reasons (upper case, as in SSLError.reason) and what they mean to an operator.
_REASONS = {
    "WRONG_VERSION_NUMBER": "the server's answer is not TLS (a plaintext port?)",
    "UNSUPPORTED_PROTOCOL": "no TLS version in common (tls.min_version)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version in common (tls.min_version)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server wants a client certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused our client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust our client certificate's CA",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server says our client certificate has expired",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the server refused the handshake",
}


#: X509 verify codes and where to look.
_VERIFY_HINTS = {
    18: " (tls.ca does not trust it)",  # self-signed certificate
    19: " (tls.ca does not trust it)",  # self-signed certificate in certificate chain
    20: " (tls.ca does not trust it)",  # unable to get local issuer certificate
    21: " (tls.ca does not trust it)",  # unable to verify the first certificate
    62: " (tls.server_name, or the endpoint's host, is the name checked)",  # hostname mismatch
    64: " (tls.server_name, or the endpoint's host, is the name checked)",  # IP address mismatch
}


def tls_error_text(exc: ssl.SSLError) -> str:
    """What an OpenSSL error means, in words, with OpenSSL's own reason code."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = _VERIFY_HINTS.get(exc.verify_code, "")
        return f"certificate verify failed: {exc.verify_message or exc.reason}{hint}"
    if isinstance(exc, (ssl.SSLZeroReturnError, ssl.SSLEOFError)):
        return "the server closed the connection"
    reason = str(exc.reason or "")
    if not reason:
        return str(exc)
    return f"{_REASONS.get(reason, reason.lower().replace('_', ' '))} [{reason}]"


def tls_failure(exc: BaseException, endpoint: Endpoint, has_cert: bool) -> str:
    """The reason a TLS handshake failed, for ``last_error`` and the log."""
    head = f"TLS handshake with {endpoint} failed"
    if isinstance(exc, ssl.SSLError):
        text = tls_error_text(exc)
        if not has_cert and exc.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
            text += " (tls.cert and tls.key are not set)"
        elif not has_cert and exc.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE":
            text += " (tls.cert and tls.key are not set: does it want a client certificate?)"
        return f"{head}: {text}"
    if isinstance(exc, OSError) and exc.errno:
        return f"{head}: {errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return f"{head}: {exc!r}"
