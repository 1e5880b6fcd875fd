"""The statistics records of the shell: every figure ``kmux-cli`` shows, each field documented.

Theory of operation
-------------------
``statistics()`` on a group, a connection slot or a client returns one of
these frozen records; the control socket sends them as they are
(:func:`kmuxd.io.control.to_wire`) and ``kmux-cli`` shows and exports them
(``kmux-cli metrics`` maps each field to a Prometheus metric). Totals come
from the counters records (:mod:`kmuxd.core.counters`), one place each;
gauges (what is queued, who is connected, what is in flight) from the
objects that hold them at the moment of asking.
"""

from __future__ import annotations

from dataclasses import dataclass

from kmuxd.core.endpoints import EndpointStatistics

from .sockopts import SocketOptions, SocketPlanStatistics
from .tcpinfo import TcpInfo
from .tls import SecurityStatistics, TlsStatistics

__all__ = ["GroupStatistics", "ConnStatistics", "ClientStatistics"]


@dataclass(frozen=True, slots=True)
class GroupStatistics:
    name: str
    endpoints: tuple[str, ...]
    framing: str
    steering: str
    connections_up: int
    connections_total: int
    clients: int
    receivers_ready: int
    #: Messages/bytes written to TCP, and received from TCP and steered.
    tx_msgs: int
    tx_bytes: int
    rx_msgs: int
    rx_bytes: int
    #: Messages re-sent from byte 0 after their connection failed.
    tx_retries: int
    #: Clients that joined / left the group since start (not the TCP
    #: connections an app attaches: those are in ``connections``).
    clients_joined: int
    clients_left: int
    #: KCM's rx_ready_drops: always 0 here, parsing pauses instead.
    rx_ready_drops: int
    #: Times parsing paused because no receiver was ready.
    rx_paused: int
    #: Messages accepted and not yet written / bytes of them.
    queued_msgs: int
    queued_bytes: int
    #: Clients waiting for any connection to come free.
    waiting_clients: int
    #: id/fifo: clients held at their in-flight limit now (client_max_in_flight,
    #: client_max_in_flight_contended: not read until one of theirs is answered
    #: or told), and holds since start.
    clients_held: int
    holds: int
    #: balance: clients paced now (client_rate_contended: not read until their
    #: token bucket has refilled), and paces since start.
    clients_paced: int
    paces: int
    refused: int
    requeued: int
    #: Notices (per-message errors and events) sent to clients.
    notices_sent: int
    #: Request/response steering: requests awaiting a response, responses
    #: that matched none, and request latency from a bounded histogram (µs).
    requests_in_flight: int
    unmatched_responses: int
    #: Responses that came after their request timed out, and responses for
    #: clients that had left: both discarded.
    late_responses: int
    dropped_responses: int
    #: Requests answered with connection_lost / request_timeout notices.
    requests_failed: int
    requests_timed_out: int
    #: Requests written again after their connection went away, and
    #: requests whose retries ran out.
    requests_retried: int
    retries_exhausted: int
    #: Messages refused with group_unavailable (they waited queue_timeout).
    queue_timeouts: int
    #: Clients detached as slow consumers; responses dropped (rx_overflow = "drop").
    slow_consumers: int
    responses_dropped: int
    #: Bytes of responses waiting in the daemon for clients that do not read.
    rx_queued_bytes: int
    #: Packets clients sent that were never read (dropped when they left).
    dropped_unread: int
    #: Connections retired to be replaced (make-before-break) and server recycles.
    recycles: int
    #: Messages from TCP over max_message that went by unread (max_skip), and their bytes.
    skipped_msgs: int
    skipped_bytes: int
    #: Fewer connections up than min_connections; no connection up at all.
    connections_degraded: bool
    down: bool
    latency_p50_us: float | None
    latency_p99_us: float | None
    uptime: float
    #: Who may use the group (kmuxd.core.access.AccessPolicy.to_wire()).
    access: dict
    endpoint_health: tuple[EndpointStatistics, ...]
    #: [groups.NAME.socket] as configured, and the source-port walk (None: no option set).
    socket: SocketPlanStatistics | None
    #: TLS and handshake steps ([groups.NAME.tls], [[groups.NAME.handshake]]).
    security: SecurityStatistics | None = None


@dataclass(frozen=True, slots=True)
class ConnStatistics:
    """One connection slot: its live connection, and its totals over all its connections."""

    index: int
    state: str
    endpoint: str
    local: str | None
    remote: str | None
    #: Seconds since this TCP connection was established (0 if none).
    age: float
    tx_msgs: int
    tx_bytes: int
    rx_msgs: int
    rx_bytes: int
    #: Clients that pinned their backlog to this connection (KCM reserved/unreserved).
    reserved: int
    unreserved: int
    #: Streams that died with a write cut part-way.
    tx_aborts: int
    #: Bytes and messages queued for writing here now.
    queued_bytes: int
    queued_msgs: int
    #: id/fifo steering: requests written here and not yet answered.
    in_flight: int
    #: Requests accepted on the live connection (for max_requests_per_connection).
    requests: int
    need_more_hdr: int
    msg_too_big: int
    msg_timeouts: int
    bad_hdr_len: int
    #: TCP connections established by this slot after the first.
    reconnects: int
    dial_failures: int
    #: Connections of this slot closed by their server after answering, and
    #: replaced by this slot before a limit was reached (make-before-break).
    recycles: int
    retired: int
    #: Older connections of this slot still finishing their work.
    retiring: int
    #: Messages over max_message that went by unread, and their bytes (all its connections).
    skipped_msgs: int
    skipped_bytes: int
    last_error: str | None
    #: The kernel's TCP_INFO for the live connection (None when not connected).
    tcp: TcpInfo | None
    #: Its socket options as the kernel reports them (None when not connected).
    socket: SocketOptions | None
    #: The live connection's TLS (None: plaintext, or not connected).
    tls: TlsStatistics | None = None
    #: ``{"kind": "dialled"}``, or ``{"kind": "attached", "uid": U, "pid": P}``: an app
    #: made the connection and passed it in (op attach); it is never redialled.
    origin: dict | None = None


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    id: int
    name: str
    group: str
    pid: int
    uid: int
    gid: int
    comm: str
    state: str
    receiving: bool
    #: Messages/bytes from this client written to TCP.
    tx_msgs: int
    tx_bytes: int
    #: Messages/bytes accepted from this client and not yet written.
    queued_msgs: int
    queued_bytes: int
    #: Messages/bytes steered to this client.
    rx_msgs: int
    rx_bytes: int
    #: Responses (and their bytes) waiting in the daemon for this client to read.
    rx_queued_msgs: int
    rx_queued_bytes: int
    #: Messages refused (bad_frame, message_too_big, ...) and bad packets.
    refused: int
    #: Messages this client handed back after switching receiving off.
    requeued: int
    notices_sent: int
    notices_pending: int
    #: Seconds since the client attached.
    connected_for: float
    #: id/fifo: its requests unanswered now; times it was held at its in-flight
    #: limit, and seconds it has been held now (None: not held).
    in_flight: int = 0
    holds: int = 0
    held_for: float | None = None
    #: balance: times it was paced (client_rate_contended), and seconds it has
    #: been paced now (None: not paced).
    paces: int = 0
    paced_for: float | None = None
