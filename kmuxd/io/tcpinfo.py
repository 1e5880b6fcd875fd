"""The kernel's own view of a TCP connection, from ``getsockopt(TCP_INFO)``.

KCM's documentation leaves watching for retransmits to the application; the
daemon owns the sockets, so it reads them for everyone. Only the stable head
of ``struct tcp_info`` (linux/tcp.h, unchanged since 2.6) is decoded.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

__all__ = ["TcpInfo", "read_tcp_info"]

# 8 u8 fields, then u32: rto ato snd_mss rcv_mss unacked sacked lost retrans
# fackets last_data_sent last_ack_sent last_data_recv last_ack_recv pmtu
# rcv_ssthresh rtt rttvar snd_ssthresh snd_cwnd advmss reordering rcv_rtt
# rcv_space total_retrans
_LAYOUT = struct.Struct("=8B24I")


@dataclass(frozen=True, slots=True)
class TcpInfo:
    #: Smoothed round-trip time and its variance, microseconds.
    rtt_us: int
    rttvar_us: int
    #: Retransmits of the current unacknowledged segment (tcpi_retransmits).
    retransmits: int
    #: Retransmitted segments over the connection's life.
    total_retrans: int
    #: Congestion window, segments.
    snd_cwnd: int
    #: Segments sent and not yet acknowledged.
    unacked: int


def read_tcp_info(sock: socket.socket) -> TcpInfo | None:
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _LAYOUT.size)
    except OSError:
        return None  # closed or reset meanwhile: statistics show "-" (read per stats request, never logged)
    if len(raw) < _LAYOUT.size:
        return None
    f = _LAYOUT.unpack(raw)
    u8, u32 = f[:8], f[8:]
    return TcpInfo(
        rtt_us=u32[15], rttvar_us=u32[16], retransmits=u8[2], total_retrans=u32[23], snd_cwnd=u32[18], unacked=u32[4]
    )
