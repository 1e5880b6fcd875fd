"""The backend's connections and listeners: every socket call, none of the scheduling.

Theory of operation
-------------------
A :class:`Conn` is one accepted TCP connection and does all of its own
socket work when its :class:`~.loop.Loop` finds it ready: it drains the
socket with non-blocking ``recv_into`` into a buffer allocated once (grown
only for a frame larger than it), until ``BlockingIOError`` or
:data:`MAX_READS_PER_WAKE` reads, so one busy connection cannot starve the
others; never one system call per message. After each read its *protocol*
(:mod:`.protocols`) takes whole frames (:meth:`Conn.frames`) or counts
bytes in place, answers (:meth:`Conn.send`), pauses reading, trickles, or
closes:

* **Writes** are queued and written as the kernel takes them; a connection
  with more than :data:`WRITE_BACKLOG_LIMIT` queued stops being read until
  its peer reads (TCP pushes back on the sender, memory stays bounded).
  Bytes sent "trickled" go out a few at a time with a pause between
  writes, the rest at once.
* **Reads** can be paused (for a while, or until resumed) and limited to a
  few bytes per read (a slow server).
* **Closes**: ``close`` (close(2)), ``rst`` (SO_LINGER 0: a reset) and
  ``fin`` (write what is queued, shut down the write side, read on until
  the peer closes too or :data:`DRAIN_TIMEOUT`), optionally after the
  queued bytes are written. A connection remembers when and why it closed
  and what it left unread, for the tests' reports.

A :class:`Listener` is one port on 127.0.0.1; it can go down (dials are
refused, its connections closed one of the three ways: an outage) and come
back on the same port.

Invariant: only the loop's thread calls these (others go through
:meth:`~.loop.Loop.call`).
"""

from __future__ import annotations

import selectors
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol

from kmux.errors import KmuxError
from kmux.framing import NEED_MORE, FrameDecoder, Framing

if TYPE_CHECKING:
    from .loop import Loop, Timer

__all__ = ["Conn", "ConnProtocol", "Listener", "U32BE"]

U32BE = Framing.from_spec("u32be")
#: Bytes a connection's receive buffer keeps free for each read (beyond a partial frame).
READ_BUFFER = 256 * 1024
#: recv_into calls on one connection per wake-up.
MAX_READS_PER_WAKE = 64
#: Bytes queued for a peer that is not reading before its connection stops being read.
WRITE_BACKLOG_LIMIT = 4 * 1024 * 1024
#: Most bytes handed to one send().
WRITE_CHUNK = 1 << 20
#: Seconds a graceful close (fin), or a close after the queued bytes, waits for the peer.
DRAIN_TIMEOUT = 5.0
LISTEN_BACKLOG = 1024
_LINGER_RESET = struct.pack("ii", 1, 0)


class ConnProtocol(Protocol):
    """What a connection's protocol does when the loop has news for it."""

    def data_received(self) -> None:
        """Bytes arrived: take them from ``conn`` (frames, or counted in place)."""

    def eof_received(self) -> None:
        """The peer closed its side; the loop closes ours after this returns."""

    def connection_lost(self, reason: str) -> None:
        """The connection is closed (``reason`` says why); no more calls follow."""


class Conn:
    """One accepted TCP connection: its buffers, its protocol, and how it ended."""

    def __init__(self, loop: "Loop", listener: "Listener", sock: socket.socket, peer: Any, number: int,
                 index: int) -> None:
        self.loop = loop
        self.listener = listener
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        #: Unique in the loop, from 1; and the listener's count of accepts before this one.
        self.number = number
        self.index = index
        self.buf = bytearray(2 * READ_BUFFER)
        self.view = memoryview(self.buf)
        self.head = 0  # first byte not yet taken
        self.tail = 0  # end of the bytes received
        self.decoder = FrameDecoder(listener.framing, listener.max_message)
        self.pending = NEED_MORE  # length of the partial frame at head, once known
        self.bytes_in = 0
        #: Set when the stream broke the framing: nothing more is cut into frames.
        self.parse_error: str | None = None
        self.reading = True
        self.read_limit = 0  # bytes per recv (0: as many as fit)
        self.read_pause = 0.0  # seconds without reading after each read
        self._resume_at: Timer | None = None
        self.out = bytearray()
        self.out_total = 0  # bytes ever queued
        self.sent_total = 0  # bytes the kernel took
        self._trickle_end = 0  # out_total up to which bytes go out trickled
        self._trickle: tuple[int, float] = (1, 0.0)
        self._trickle_timer: Timer | None = None
        self._close_after_flush: tuple[str, str | None] | None = None
        #: A graceful close is under way: our FIN is sent, reading goes on until the peer's.
        self.fin_sent = False
        self._fin_reason: str | None = None
        self._events = 0
        self.opened_at = time.monotonic()
        self.closed_at: float | None = None
        self.close_reason: str | None = None
        #: Bytes of an incomplete frame left when it closed.
        self.tail_bytes = 0
        self.protocol: ConnProtocol | None = None  # set by the listener right after

    @property
    def open(self) -> bool:
        return self.closed_at is None

    @property
    def closing(self) -> bool:
        """Closed, or closing: a close waits for its queued bytes, or our FIN is sent. Nothing more is sent."""
        return self.closed_at is not None or self.fin_sent or self._close_after_flush is not None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken (an incomplete frame), or left at close."""
        return self.tail_bytes if self.closed_at is not None else self.tail - self.head

    # -- taking what arrived ----------------------------------------------------------------

    def frames(self) -> list[bytes]:
        """The whole frames received so far (taken); [] once the stream broke the framing."""
        if self.parse_error is not None:
            self.head = self.tail  # desynchronised: drained, never cut into frames
            return []
        try:
            ends, consumed, self.pending = self.decoder.split(self.buf, self.head, self.tail)
        except KmuxError as exc:
            self.parse_error = str(exc)
            self.head = self.tail
            return []
        start, out = self.head, []
        for end in ends:
            out.append(bytes(self.view[start:end]))
            start = end
        self.head = consumed
        return out

    def take_all(self) -> memoryview:
        """Every byte received and not yet taken, as it is (a sink that only counts)."""
        data = self.view[self.head:self.tail]
        self.head = self.tail
        return data

    # -- answering --------------------------------------------------------------------------

    def send(self, data: bytes, *, trickle: tuple[int, float] | None = None) -> int:
        """Queue ``data``; returns the stream offset where it ends (see :attr:`sent_total`).

        ``trickle=(chunk, pause)``: these bytes go out at most ``chunk`` at a
        time, ``pause`` seconds apart (a server that writes slowly).
        """
        if self.closing:
            return self.out_total  # nowhere to go: it is never sent (sent_total never reaches past it)
        self.out += data
        self.out_total += len(data)
        if trickle is not None:
            self._trickle_end = self.out_total
            self._trickle = trickle
        if self._trickle_timer is None:
            self._write()
        return self.out_total

    # -- reading on and off -----------------------------------------------------------------

    def pause_reading(self, seconds: float | None = None) -> None:
        """Stop reading for ``seconds``, or until :meth:`resume_reading` (which a pause for a
        while then cannot cut short: the explicit pause wins)."""
        if seconds is not None and not self.reading and self._resume_at is None:
            return  # paused until resumed: stays so
        self.reading = False
        self._cancel_resume()
        if seconds is not None:
            self._resume_at = self.loop.call_later(seconds, self.resume_reading)
        self._interest()

    def resume_reading(self) -> None:
        self._cancel_resume()
        if self.closed_at is None:
            self.reading = True
            self._interest()

    def _cancel_resume(self) -> None:
        if self._resume_at is not None:
            self._resume_at.cancel()
            self._resume_at = None

    # -- the end ----------------------------------------------------------------------------

    def close(self, how: str = "close", *, after_flush: bool = False, reason: str | None = None) -> None:
        """``close``, ``rst`` (a reset) or ``fin`` (a graceful close: read on until the peer closes).

        ``after_flush``: once what is queued is written (a reset after half an
        answer); a ``fin`` always writes what is queued first. Either waits
        at most :data:`DRAIN_TIMEOUT` for a peer that does not read.
        ``reason`` is what :attr:`close_reason` will say (default: ``how``).
        """
        if self.closed_at is not None or self.fin_sent:
            return
        if self._close_after_flush is not None and how != "rst":
            return  # already closing once its bytes are written (a reset may still cut it short)
        if how not in ("close", "rst", "fin"):
            raise ValueError(f"how must be close, rst or fin, not {how!r}")
        if (after_flush or how == "fin") and self.out:
            if self._close_after_flush is None:
                self.loop.call_later(DRAIN_TIMEOUT, self._flush_timed_out)
            self._close_after_flush = (how, reason)
            return
        if how == "fin":
            self._fin(reason or "fin")
            return
        if how == "rst":
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        self._close(reason or how)

    def _flush_timed_out(self) -> None:
        if self.closed_at is None and self._close_after_flush is not None:
            self._close(f"{self._close_after_flush[0]}_flush_timeout")

    # -- the socket work (the loop calls these when the socket is ready) -------------------------

    def _interest(self) -> None:
        """Register what it waits for: reading unless paused or backed up, writing while bytes wait."""
        if self.closed_at is not None:
            return
        read = self.reading and len(self.out) <= WRITE_BACKLOG_LIMIT
        write = bool(self.out) and self._trickle_timer is None
        events = (selectors.EVENT_READ if read else 0) | (selectors.EVENT_WRITE if write else 0)
        # An unregistered socket, not mask 0: a peer's hang-up would otherwise spin the loop.
        if events == self._events:
            return
        if not events:
            self.loop._sel.unregister(self.sock)
        elif not self._events:
            self.loop._sel.register(self.sock, events, self)
        else:
            self.loop._sel.modify(self.sock, events, self)
        self._events = events

    def _read(self) -> None:
        for _ in range(MAX_READS_PER_WAKE):
            if not self.reading or self.closed_at is not None or len(self.out) > WRITE_BACKLOG_LIMIT:
                break
            room = len(self.buf) - self.tail
            want = min(room, self.read_limit) if self.read_limit else room
            try:
                n = self.sock.recv_into(self.view[self.tail:self.tail + want])
            except BlockingIOError:
                break
            except ConnectionResetError:
                self._close("fin_then_reset" if self.fin_sent else "reset")
                return
            except OSError as exc:
                self._close(f"error: {exc}")
                return
            if n == 0:
                self._eof()
                return
            self.tail += n
            self.bytes_in += n
            self.protocol.data_received()
            if self.closed_at is not None:
                return
            self._compact()
            if self.read_pause:
                self.pause_reading(self.read_pause)
                break
        self._interest()

    def _compact(self) -> None:
        """Room for the next read: taken bytes dropped, a partial frame moved to the front.

        The buffer keeps :data:`READ_BUFFER` free for each read; it grows only
        for a partial frame longer than the rest (at most ``max_message``).
        """
        if self.head == self.tail:
            self.head = self.tail = 0
            return
        if len(self.buf) - self.tail >= READ_BUFFER and self.pending <= len(self.buf) - self.head:
            return
        keep = self.tail - self.head
        self.buf[0:keep] = self.view[self.head:self.tail]
        self.head, self.tail = 0, keep
        if max(self.pending, keep) > len(self.buf) - READ_BUFFER:
            self.view.release()
            self.buf.extend(bytes(max(self.pending, keep) + READ_BUFFER - len(self.buf)))
            self.view = memoryview(self.buf)

    def _eof(self) -> None:
        if self.fin_sent:
            self._close(self._fin_reason or "fin")
            return
        if self.protocol is not None:
            self.protocol.eof_received()
        if self.closed_at is None:
            self._flush_nowait()
            self._close("eof")

    def _write(self) -> None:
        while self.out and self.closed_at is None:
            trickling = self.sent_total < self._trickle_end
            limit = min(self._trickle[0], self._trickle_end - self.sent_total) if trickling else WRITE_CHUNK
            try:
                # The whole queue when it fits one send: no copy (a slice of a bytearray is one).
                n = self.sock.send(self.out if len(self.out) <= limit else self.out[:limit])
            except BlockingIOError:
                break
            except OSError as exc:
                self._close(f"error: {exc}")
                return
            del self.out[:n]
            self.sent_total += n
            if trickling and self._trickle[1] > 0:
                self._trickle_timer = self.loop.call_later(self._trickle[1], self._trickled)
                break
        if not self.out and self._close_after_flush is not None and self.closed_at is None:
            (how, reason), self._close_after_flush = self._close_after_flush, None
            self.close(how, reason=reason)
            return
        if self.closed_at is None:
            self._interest()

    def _trickled(self) -> None:
        self._trickle_timer = None
        if self.closed_at is None:
            self._write()

    def _flush_nowait(self) -> None:
        """One last non-blocking attempt to write what is queued (the peer may be gone)."""
        while self.out:
            try:
                n = self.sock.send(self.out[:WRITE_CHUNK])
            except OSError:
                return
            del self.out[:n]
            self.sent_total += n

    def _fin(self, reason: str) -> None:
        """Shut down the write side, read on (the protocol still sees what arrives) until the peer closes."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close("fin_failed")
            return
        self.fin_sent = True
        self._fin_reason = reason
        self._cancel_resume()
        self.reading = True
        self.loop.call_later(DRAIN_TIMEOUT, self._drain_timed_out)
        self._interest()

    def _drain_timed_out(self) -> None:
        if self.closed_at is None:
            self._close("fin_drain_timeout")

    def _close(self, reason: str) -> None:
        if self.closed_at is not None:
            return
        self.closed_at = time.monotonic()
        self.close_reason = reason
        self.tail_bytes = self.tail - self.head
        self._cancel_resume()
        if self._trickle_timer is not None:
            self._trickle_timer.cancel()
        if self._events:
            self.loop._sel.unregister(self.sock)  # before close: the number may be reused by the next accept
            self._events = 0
        self.sock.close()
        self.listener.conns.pop(self.number, None)
        self.view.release()
        self.buf = bytearray()  # a closed connection stays for the reports, its buffer need not
        self.view = memoryview(self.buf)
        if self.protocol is not None:
            self.protocol.connection_lost(reason)


class Listener:
    """One endpoint: a port on 127.0.0.1, its connections' protocol, and whether it is up."""

    def __init__(self, loop: "Loop", protocol_factory: Callable[[Conn], ConnProtocol], *, port: int = 0,
                 host: str = "127.0.0.1", framing: Framing = U32BE, max_message: int = 1 << 24,
                 rcvbuf: int | None = None, sndbuf: int | None = None) -> None:
        self.loop = loop
        self.protocol_factory = protocol_factory
        self.host = host
        self.framing = framing
        self.max_message = max_message
        self.rcvbuf = rcvbuf
        self.sndbuf = sndbuf
        #: Connections accepted so far (the next one's index).
        self.accepted = 0
        self.conns: dict[int, Conn] = {}  # open ones, by number
        self.sock: socket.socket | None = None
        self.port = self._open(port)

    def _open(self, port: int) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.rcvbuf is not None:  # inherited by accepted sockets; also turns off autotuning
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.bind((self.host, port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.loop._sel.register(sock, selectors.EVENT_READ, self)
        return sock.getsockname()[1]

    @property
    def up(self) -> bool:
        return self.sock is not None

    def down(self, how: str = "close", reason: str | None = None) -> list[Conn]:
        """Stop listening (dials are refused) and close every open connection ``how`` (an outage)."""
        if self.sock is not None:
            self.loop._sel.unregister(self.sock)
            self.sock.close()
            self.sock = None
        conns = list(self.conns.values())
        for c in conns:
            c.close(how, reason=reason)
        return conns

    def reopen(self) -> None:
        """Listen again on the same port (OSError while it is not free yet)."""
        if self.sock is None:
            self._open(self.port)

    def _accept(self) -> None:
        loop = self.loop
        while self.sock is not None:
            try:
                sock, peer = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                print(f"backend: accept on port {self.port}: {exc}", file=sys.stderr)  # EMFILE & co: try later
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.sndbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
            conn = Conn(loop, self, sock, peer, next(loop._numbers), self.accepted)
            self.accepted += 1
            self.conns[conn.number] = conn
            loop.conns[conn.number] = conn
            conn.protocol = self.protocol_factory(conn)
            if conn.closed_at is None:  # its protocol may have closed it at once
                conn._interest()
