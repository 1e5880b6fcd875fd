"""One client's packets out: its responses and notices, and what waits for its socket.

Theory of operation
-------------------
A response is sent to its client from the connection's receive buffer with
one ``send``, in the pass it arrived in (:meth:`Replies.deliver`), its kind
byte written in front of it in place (:func:`kmuxd.core.steering.data_packet`).
What the client's socket does not take waits here, in order, as whole
packets: a response too large for one packet is cut into DATA_MORE pieces
and a last DATA piece, and nothing else may come between them. Notices
share the queue, so a ``receive_off`` marker never falls behind data.

The queue is bounded twice: response bytes by ``client_rx_limit`` (past it
``rx_overflow`` decides: the response is dropped with ``response_dropped``,
or the client is detached as a slow consumer), notices by
``client_notice_limit`` (past it, its session stops reading the client).
So a client that stops reading holds back nobody else's responses, and
costs the daemon a bounded amount of memory.

:class:`Replies` belongs to one :class:`~kmuxd.io.session.AppSession`: it
sends and counts; whether the client may be read, stays attached or is
closed is the session's to decide (:meth:`AppSession.blocked_out`,
:meth:`AppSession.slow_consumer`).
"""

from __future__ import annotations

import socket
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from kmux.errors import ResponseDropped
from kmux.protocol import DATA_MORE_PREFIX, DATA_PREFIX, Notice, encode_notice

from kmuxd.core.steering import BLOCKED, FAILED, TAKEN, TAKEN_LAST, data_packet

if TYPE_CHECKING:
    from .session import AppSession

__all__ = ["Replies", "EMPTIED", "STILL_FULL", "SEND_FAILED"]

#: Marks a notice in the queue (the other entries complete a response of that many bytes, or 0).
_NOTICE: Final = -1
#: What :meth:`Replies.flush` did: everything went out, the socket is full again, or it failed.
EMPTIED: Final = 0
STILL_FULL: Final = 1
SEND_FAILED: Final = 2


class Replies:
    """Packets out to one client (see the module docstring)."""

    __slots__ = ("session", "sock", "max_packet", "queue", "data_bytes", "data_msgs", "notices", "rx_msgs",
                 "rx_bytes", "notices_sent", "error")

    def __init__(self, session: "AppSession", sock: socket.socket, max_packet: int) -> None:
        self.session = session
        self.sock = sock
        self.max_packet = max_packet
        #: Packets in order, each with what it completes: a response's size
        #: (its last piece), 0 (an earlier piece) or _NOTICE.
        self.queue: deque[tuple[bytes, int]] = deque()
        #: Responses queued (whole) and their bytes (client_rx_limit).
        self.data_bytes = 0
        self.data_msgs = 0
        #: Notices queued (client_notice_limit).
        self.notices = 0
        #: Messages/bytes steered to this client (sent, or queued for it).
        self.rx_msgs = self.rx_bytes = 0
        self.notices_sent = 0
        #: Why the last send failed (a failed flush ends the session).
        self.error: OSError | None = None

    def __bool__(self) -> bool:
        """Something waits for the client's socket."""
        return bool(self.queue)

    # -- notices ---------------------------------------------------------------------

    def notify(self, notice: Notice) -> None:
        """Send a notice, or queue it; it goes out before any further data to this client."""
        packet = encode_notice(notice)
        if self.session.awaiting_answers:
            self.session.outcome_sent()
        if not self.queue:
            try:
                self.sock.send(packet)
            except BlockingIOError:
                pass
            except OSError as exc:
                self.session.socket_error("send_notice", exc)  # lost; if the app is gone, its hang-up ends it
                return
            else:
                self._count_notices(1)
                return
        self.queue.append((packet, _NOTICE))
        self.notices += 1
        self.session.blocked_out()

    def _count_notices(self, n: int) -> None:
        self.notices_sent += n
        self.session.counters.notices_sent += n

    # -- responses ---------------------------------------------------------------------

    def deliver(self, buf: bytearray, view: memoryview, pos: int, end: int, seq: int) -> bool:
        """The response to request ``seq``, at ``buf[pos:end]`` (the byte before it is free).

        True if it was sent or queued for this client, False if it was dropped
        (queue full with ``rx_overflow = "drop"``, or its socket failed).
        """
        size = end - pos
        if self.session.awaiting_answers:
            self.session.outcome_sent()
        if not self.queue and size < self.max_packet:
            try:
                self.sock.send(data_packet(buf, view, pos, end))
            except BlockingIOError:
                pass
            except OSError as exc:
                self.session.socket_error("send", exc)
                return False
            else:
                self.rx_msgs += 1
                self.rx_bytes += size
                return True
        if self.data_bytes + size > self.session.group.cfg.client_rx_limit:
            self._overflow(seq)
            return False
        try:
            self._send_message(view[pos:end])
        except OSError as exc:
            self.session.socket_error("send", exc)
            return False
        return True

    def offer(self, buf: bytearray, view: memoryview, pos: int, end: int, keep: bool = False) -> int:
        """Balance steering: the message at ``buf[pos:end]`` (the byte before it is free).
        TAKEN, TAKEN_LAST, BLOCKED or FAILED (kmuxd.core.steering)."""
        if keep or end - pos >= self.max_packet:
            # Too large for one packet (or it has nowhere else to go): sent in pieces through the queue.
            try:
                self._send_message(view[pos:end])
            except OSError as exc:
                self.session.socket_error("send", exc)
                return FAILED  # not taken: it goes to another receiver
            return TAKEN_LAST
        try:
            self.sock.send(data_packet(buf, view, pos, end))
        except BlockingIOError:
            self.session.blocked_out()
            return BLOCKED
        except OSError as exc:
            self.session.socket_error("send", exc)
            return FAILED
        self.rx_msgs += 1
        self.rx_bytes += end - pos
        return TAKEN

    def _send_message(self, message: memoryview) -> None:
        """Send what the socket takes now, queue the rest; raises OSError (not EAGAIN) if
        the socket failed before any of it was queued."""
        size = len(message)
        packets = self._packets(message)
        if not self.queue:
            # Nothing else may come between the pieces of one message.
            while packets:
                try:
                    self.sock.send(packets[0])
                except BlockingIOError:
                    break
                packets.pop(0)
        self.rx_msgs += 1  # counted when handed to the daemon's queue for it
        self.rx_bytes += size
        if not packets:
            return
        last = len(packets) - 1
        self.queue.extend((packet, size if i == last else 0) for i, packet in enumerate(packets))
        self.data_bytes += size
        self.data_msgs += 1
        self.session.blocked_out()

    def _packets(self, message: Any) -> list[bytes]:
        """One DATA packet, or DATA_MORE pieces and a last DATA when it does not fit."""
        piece = self.max_packet - 1
        if len(message) <= piece:
            return [DATA_PREFIX + message]
        out = []
        for i in range(0, len(message), piece):
            chunk = message[i : i + piece]
            last = i + piece >= len(message)
            out.append((DATA_PREFIX if last else DATA_MORE_PREFIX) + chunk)
        return out

    def _overflow(self, seq: int) -> None:
        session = self.session
        cfg = session.group.cfg
        if cfg.rx_overflow != "drop":
            session.slow_consumer()
            return
        session.counters.responses_dropped += 1
        err = ResponseDropped(
            f"a response was dropped: {self.data_bytes} bytes already wait for this client "
            f"(client_rx_limit={cfg.client_rx_limit})"
        )
        err.details["seq"] = seq
        session.notify(Notice.for_error(err))

    # -- the queue ---------------------------------------------------------------------

    def flush(self) -> int:
        """Send what waits, in order, until the socket is full. EMPTIED, STILL_FULL or
        SEND_FAILED (its packets are then dropped, their counts kept for the end)."""
        queue = self.queue
        send = self.sock.send
        sent_notices = 0
        result = EMPTIED
        while queue:
            packet, completes = queue[0]
            try:
                send(packet)
            except BlockingIOError:
                result = STILL_FULL
                break
            except OSError as exc:
                self.error = exc
                queue.clear()
                result = SEND_FAILED
                break
            queue.popleft()
            if completes == _NOTICE:
                self.notices -= 1
                sent_notices += 1
            elif completes:
                self.data_msgs -= 1
                self.data_bytes -= completes
        if sent_notices:
            self._count_notices(sent_notices)
        return result

    def clear(self) -> None:
        """Drop everything queued (a slow consumer's responses: its last notice goes next)."""
        self.queue.clear()
        self.data_bytes = self.data_msgs = self.notices = 0
