"""The running totals behind every figure ``kmux-cli`` shows: one record per group, one per slot.

Theory of operation
-------------------
A figure that is a sum over objects that come and go (connections that
close, clients that leave, slots a resize removed) is easy to get wrong:
each departure must fold its counts into someone's totals, and a reader
must add the living to the departed. Here each total is counted once, when
the event happens, into a record that outlives everything it counts:

* :class:`GroupCounters`, one per group, lives as long as the group;
* :class:`SlotCounters`, one per connection slot, as long as the slot
  (a slot removed by a resize keeps its record in the group's).

Each field has one writer, named below: the object where the event
happens increments it (in the group's record and, for connection traffic,
in its slot's too). Nothing else writes a record, and statistics only read
them. Gauges (what is queued now, who is connected now) are not totals and
are read from the objects that hold them.

No I/O.
"""

from __future__ import annotations

__all__ = ["GroupCounters", "SlotCounters"]


class GroupCounters:
    """A group's totals since it started (GroupStatistics shows them as they are)."""

    __slots__ = (
        "tx_msgs", "tx_bytes", "tx_retries", "rx_msgs", "rx_bytes", "rx_paused", "clients_joined", "clients_left",
        "refused", "requeued", "notices_sent", "dropped_unread", "queue_timeouts", "slow_consumers",
        "responses_dropped", "recycles", "skipped_msgs", "skipped_bytes",
    )

    def __init__(self) -> None:
        #: Messages/bytes written to TCP (the connection that wrote them).
        self.tx_msgs = 0
        self.tx_bytes = 0
        #: Messages re-sent from byte 0 after their connection failed (the failed connection).
        self.tx_retries = 0
        #: Messages/bytes received from TCP and delivered to clients (receive steering).
        self.rx_msgs = 0
        self.rx_bytes = 0
        #: Times parsing paused because no receiver was ready (balance steering).
        self.rx_paused = 0
        #: Clients that joined / left the group (named apart from the TCP
        #: connections an app attaches, KCM's attach/unattach).
        self.clients_joined = 0
        self.clients_left = 0
        #: Messages refused and bad packets; messages handed back (REQUEUE);
        #: notices sent; packets never read, dropped when their client left (the client).
        self.refused = 0
        self.requeued = 0
        self.notices_sent = 0
        self.dropped_unread = 0
        #: Messages refused with group_unavailable after waiting queue_timeout (the group's deadlines).
        self.queue_timeouts = 0
        #: Clients detached as slow consumers; responses dropped for one (the client).
        self.slow_consumers = 0
        self.responses_dropped = 0
        #: Connections retired to be replaced (make-before-break), and
        #: connections recycled by their server (the connection).
        self.recycles = 0
        #: Messages from TCP over max_message, skipped unread, and their bytes (receive steering).
        self.skipped_msgs = 0
        self.skipped_bytes = 0


class SlotCounters:
    """One connection slot's totals over all its TCP connections (ConnStatistics shows them)."""

    __slots__ = (
        "tx_msgs", "tx_bytes", "rx_msgs", "rx_bytes", "tx_aborts", "msg_timeouts", "connections_made",
        "dial_failures", "recycles", "retired", "skipped_msgs", "skipped_bytes",
    )

    def __init__(self) -> None:
        #: Messages/bytes written; messages cut from the stream and bytes read (the connection).
        self.tx_msgs = 0
        self.tx_bytes = 0
        self.rx_msgs = 0
        self.rx_bytes = 0
        #: Streams that died with a write cut part-way (the connection).
        self.tx_aborts = 0
        #: Partial messages from the server that did not complete within assembly_timeout (the connection).
        self.msg_timeouts = 0
        #: TCP connections established; dials that failed (the slot).
        self.connections_made = 0
        self.dial_failures = 0
        #: Connections closed by their server after answering, and replaced (the slot).
        self.recycles = 0
        #: Connections retired make-before-break (the slot).
        self.retired = 0
        #: Messages over max_message skipped unread, and their bytes (the connection).
        self.skipped_msgs = 0
        self.skipped_bytes = 0

    def count_skipped(self, size: int) -> None:
        """A message of ``size`` bytes over max_message went by unread (it counts as received)."""
        self.rx_msgs += 1
        self.skipped_msgs += 1
        self.skipped_bytes += size
