"""The client library against a scripted daemon: every scenario runs on both transports.

The peer is a real SEQPACKET listener (tests/integration/scripted.py) that
plays kmuxd's part of docs/protocol.md, so each scenario can make the
daemon's side do exactly what it needs: continue a message in pieces of a
chosen size, put a notice where none belongs, stop reading, crash mid-message,
answer ``up: false``. ``KMUX_WMEM_MAX=212992`` (the ``stock_wmem`` fixture)
makes the client size its socket as on a stock kernel, where the kernel
really refuses packets over about 416 KiB (checked in each such test, so a
test cannot pass by accident on a machine with larger buffers).
"""

from __future__ import annotations

import errno
import math
import os
import random
import socket
from pathlib import Path
from typing import Any, Callable

import pytest
import trio

import kmux
import kmux._driver
import kmux.trio
from kmux import sockbuf

from .helpers import unread_here
from .scripted import PeerSession, ScriptedDaemon
from .transports import WAIT, Transport, transport, until  # noqa: F401 -- the fixture

MAX = 1 << 20
STOCK = sockbuf.STOCK_WMEM_MAX
DATA, DATA_MORE, CONTROL, REQUEUE, REQUEUE_MORE = 0x00, 0x80, 0x01, 0x02, 0x82


def message(size: int, seed: int = 0) -> bytes:
    """A u32be message of exactly ``size`` bytes with content that differs per seed."""
    return (size - 4).to_bytes(4, "big") + random.Random(seed).randbytes(size - 4)


def pieces_of(size: int, max_packet: int) -> int:
    return math.ceil(size / (max_packet - 1))


def assert_stock_limit_is_real() -> int:
    """Under KMUX_WMEM_MAX=212992 the kernel refuses a 500 KB packet; returns the largest it takes."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        largest = sockbuf.size_send_buffer(a, MAX + 1)
        assert largest < 430_000, f"the send buffer was not capped: {largest}"
        with pytest.raises(OSError) as info:
            a.send(b"\0" * 500_000)
        assert info.value.errno == errno.EMSGSIZE
        return largest


@pytest.fixture
def peer_factory(short_dir: Path) -> Callable[..., ScriptedDaemon]:
    peers: list[ScriptedDaemon] = []

    def start(**kw: Any) -> ScriptedDaemon:
        peer = ScriptedDaemon(str(short_dir / f"peer{len(peers)}.sock"), **kw)
        peers.append(peer)
        return peer

    try:
        yield start
    finally:
        for p in peers:
            p.close()


@pytest.fixture
def stock_wmem(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv(sockbuf.WMEM_MAX_ENV, str(STOCK))
    return assert_stock_limit_is_real()


async def session_of(peer: ScriptedDaemon, n: int = 1) -> PeerSession:
    return await until(lambda: len(peer.sessions) >= n and peer.sessions[n - 1], f"client {n} at the peer")


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


# -- one packet per small message; pieces for large ones ----------------------------------


async def test_small_messages_take_one_packet_and_one_seq_each(transport: Transport, peer_factory) -> None:
    peer = peer_factory()
    c = await transport.connect("g", peer.path)
    sizes = [8, 64, 4096, 4097, 65536]  # both sides of CONCAT_MAX, and a larger one that still fits
    msgs = [message(n, seed=n) for n in sizes]
    for i, m in enumerate(msgs, 1):
        assert await c.send(m) == i
    for m in msgs:
        assert await c.recv() == m
    s = await session_of(peer)
    assert s.packets == [(DATA, n) for n in sizes]
    assert s.seq == len(msgs) and c.raw.seq == len(msgs)
    st = c.raw.statistics()
    assert (st.continued_sent, st.continued_received, st.received) == (0, 0, len(msgs))


async def test_a_1mib_message_travels_in_pieces_under_the_stock_limit(transport: Transport, peer_factory,
                                                                      stock_wmem: int) -> None:
    peer = peer_factory(max_message=MAX, sndbuf=STOCK)  # the peer's own buffer is capped too
    c = await transport.connect("g", peer.path)
    big, small = message(MAX, seed=1), message(100, seed=2)
    assert await c.send(big) == 1
    assert await c.send(small) == 2
    assert await c.recv() == big
    assert await c.recv() == small
    s = await session_of(peer)
    n = pieces_of(MAX, stock_wmem)
    assert n == 3
    assert s.kinds() == [DATA_MORE] * (n - 1) + [DATA, DATA]
    assert max(size for _, size in s.packets) + 1 <= stock_wmem
    assert s.messages == [big, small] and s.seq == 2  # one seq per message, however many pieces
    st = c.raw.statistics()
    assert (st.continued_sent, st.continued_received, st.received) == (1, 1, 2)


async def test_pieces_of_any_size_are_joined(transport: Transport, peer_factory) -> None:
    peer = peer_factory(max_message=MAX, echo=False)
    c = await transport.connect("g", peer.path)
    s = await session_of(peer)
    m = message(100_000, seed=3)
    assert await in_thread(lambda: s.send_message(m, piece=999)) == 101
    tail = message(50, seed=4)
    s.send_message(tail)
    assert await c.recv() == m
    assert await c.recv() == tail


async def test_a_message_over_max_message_is_a_bad_packet_and_its_pieces_are_skipped(transport: Transport,
                                                                                     peer_factory) -> None:
    peer = peer_factory(max_message=10_000, echo=False)
    c = await transport.connect("g", peer.path)
    s = await session_of(peer)
    for body in (b"a" * 6000, b"b" * 6000, b"c" * 10):  # past max_message at the second piece
        s.send_raw(bytes([DATA_MORE]) + body)
    s.send_raw(bytes([DATA]) + b"d" * 10)  # its last piece
    ok = message(100, seed=5)
    s.send_message(ok)
    with pytest.raises(kmux.BadPacket, match="over max_message"):
        await c.recv()
    assert await c.recv() == ok  # the rest of the oversized message never surfaces


async def test_a_notice_inside_a_continued_message_is_a_bad_packet(transport: Transport, peer_factory) -> None:
    peer = peer_factory(echo=False)
    c = await transport.connect("g", peer.path)
    s = await session_of(peer)
    s.send_raw(bytes([DATA_MORE]) + b"x" * 100)
    s.send_notice(code="bad_frame", error="x", seq=1)
    ok = message(64, seed=6)
    s.send_message(ok)
    with pytest.raises(kmux.BadPacket, match="inside a continued message"):
        await c.recv()
    assert await c.recv() == ok


async def test_a_large_hand_back_goes_back_in_requeue_pieces(transport: Transport, peer_factory,
                                                             stock_wmem: int) -> None:
    peer = peer_factory(max_message=MAX, sndbuf=STOCK, echo=False)
    c = await transport.connect("g", peer.path)
    s = await session_of(peer)
    big = message(MAX, seed=7)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_thread, s.send_message, big)  # queued for us before the marker
        await until(lambda: s.sending, "the peer to start sending")  # it finishes only once we read
        await c.set_receive(False)
    await until(lambda: s.requeued, "the hand-back")
    assert s.requeued == [big]
    n = pieces_of(MAX, stock_wmem)
    assert s.kinds() == [CONTROL] + [REQUEUE_MORE] * (n - 1) + [REQUEUE]
    assert c.raw.statistics().received == 0


async def test_a_send_buffer_shrunk_under_the_client_is_sized_again(transport: Transport, peer_factory,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if sockbuf.wmem_max() < MAX:
        pytest.skip("needs net.core.wmem_max of at least 1 MiB, to start with a packet that fits 1 MiB")
    peer = peer_factory(max_message=MAX)
    c = await transport.connect("g", peer.path)
    shadow = socket.socket(fileno=os.dup(c.raw.fileno()))
    with shadow:
        assert sockbuf.max_packet(shadow) > MAX  # the client planned 1 MiB as one packet
        shadow.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 50_000)
        monkeypatch.setenv(sockbuf.WMEM_MAX_ENV, str(STOCK))  # sizing it again cannot restore it
        big = message(MAX, seed=8)
        assert await c.send(big) == 1
        assert await c.recv() == big
        s = await session_of(peer)
        assert s.kinds()[-1] == DATA and s.kinds().count(DATA_MORE) == pieces_of(MAX, sockbuf.max_packet(shadow)) - 1


# -- large messages and concurrency ----------------------------------------------------------


async def test_concurrent_senders_never_interleave_pieces(transport: Transport, peer_factory,
                                                          stock_wmem: int) -> None:
    peer = peer_factory(max_message=MAX, sndbuf=STOCK, echo=False)
    c = await transport.connect("g", peer.path, receive=False)
    sizes = [MAX, 100, 700_000, 64, 4097, 450_000]
    sent: list[bytes] = []

    async def sender(k: int) -> None:
        for i, size in enumerate(sizes):
            m = message(size, seed=1000 * k + i)
            await c.send(m)
            sent.append(m)

    async with trio.open_nursery() as nursery:
        for k in range(4):
            nursery.start_soon(sender, k)
    s = await session_of(peer)
    await until(lambda: len(s.messages) == len(sent) or s.ended, "every message at the peer")
    assert s.ended is None, s.ended  # the peer ends the session on a piece out of place
    assert sorted(s.messages) == sorted(sent) and s.seq == len(sent) == c.raw.seq


async def test_a_daemon_gone_mid_message_ends_the_send(transport: Transport, peer_factory, stock_wmem: int) -> None:
    peer = peer_factory(max_message=MAX, sndbuf=STOCK, echo=False)
    c = await transport.connect("g", peer.path)
    s = await session_of(peer)
    s.pause()  # the socket fills after the first piece: the send blocks
    async with trio.open_nursery() as nursery:

        async def send_big() -> None:
            with pytest.raises(kmux.DaemonShutdown):
                await c.send(message(MAX, seed=9))

        nursery.start_soon(send_big)
        # Mid-message: its first piece waits in the paused peer's socket (the outcome
        # would be the same if the crash came first; this makes it the harder case).
        await until(lambda: unread_here(s.sock) > 0, "the first piece at the peer")
        s.close()
    with pytest.raises(kmux.DaemonShutdown):
        await c.send(message(64))
    assert s.messages == []


async def test_a_reconnecting_client_sends_a_message_cut_by_a_crash_again_whole(transport: Transport,
                                                                                 peer_factory,
                                                                                 stock_wmem: int) -> None:
    peer = peer_factory(max_message=MAX, sndbuf=STOCK, echo=False)
    policy = kmux.ReconnectPolicy(deadline=WAIT, initial_delay=0.01, max_delay=0.05)
    c = await transport.connect("g", peer.path, reconnect=policy)
    s1 = await session_of(peer)
    s1.pause()
    big = message(MAX, seed=10)
    async with trio.open_nursery() as nursery:

        async def send_big() -> None:
            assert await c.send(big) == 1

        nursery.start_soon(send_big)
        await until(lambda: unread_here(s1.sock) > 0, "the first piece at the peer")  # mid-message
        s1.close()
    s2 = await session_of(peer, 2)
    assert await in_thread(s2.wait_messages, 1) == [big]
    assert c.raw.reconnects == 1 and c.raw.unknown_fate == []  # nothing whole had gone out before


async def test_a_cancelled_multi_piece_send_closes_the_connection(peer_factory, stock_wmem: int) -> None:
    peer = peer_factory(max_message=MAX, sndbuf=STOCK, echo=False)
    c = await kmux.trio.connect("g", peer.path)
    async with c:
        s = await session_of(peer)
        s.pause()
        with trio.move_on_after(0.5) as scope:
            await c.send(message(MAX, seed=11))
        assert scope.cancelled_caught
        s.resume()
        assert await in_thread(s.wait_ended) == "eof"  # closed after its first piece
        assert s.messages == []  # the daemon drops a message it never got whole
        with pytest.raises(kmux.ClientClosed, match="cut short"):
            await c.send(message(64))


async def test_a_cancelled_multi_piece_send_makes_a_reconnecting_client_reconnect(peer_factory,
                                                                                  stock_wmem: int) -> None:
    peer = peer_factory(max_message=MAX, sndbuf=STOCK, echo=False)
    policy = kmux.ReconnectPolicy(deadline=WAIT, initial_delay=0.01, max_delay=0.05)
    c = await kmux.trio.connect("g", peer.path, reconnect=policy)
    async with c:
        small = [message(64, seed=i) for i in (12, 13)]
        for m in small:
            await c.send(m)
        s1 = await session_of(peer)
        await in_thread(s1.wait_messages, 2)
        s1.pause()
        with trio.move_on_after(0.5):
            await c.send(message(MAX, seed=14))
        s1.resume()
        last = message(64, seed=15)
        assert await c.send(last) == 3
        s2 = await session_of(peer, 2)
        # The two before it had an unknown fate (the daemon may have read them): re-sent, reported.
        assert await in_thread(s2.wait_messages, 3) == [*small, last]
        [fate] = c.unknown_fate
        assert (fate.first_seq, fate.last_seq, fate.resent) == (1, 2, True)


# -- receiving, set_receive, close ------------------------------------------------------------


async def test_set_receive_while_another_caller_reads(transport: Transport, peer_factory) -> None:
    peer = peer_factory(echo=False)
    c = await transport.connect("g", peer.path)
    s = await session_of(peer)
    got: list[bytes] = []
    stop = trio.Event()

    async def reader() -> None:
        while not stop.is_set():
            try:
                got.append(await c.recv(timeout=0.1))
            except TimeoutError:
                pass

    msgs = [message(100, seed=20 + i) for i in range(50)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        for m in msgs[:25]:
            s.send_message(m)
        await until(lambda: len(got) == 25, "the first messages")
        for m in msgs[25:]:
            s.send_message(m)
        await c.set_receive(False)  # the reader handles the marker; this returns once it is in
        stop.set()
    assert CONTROL in s.kinds()
    assert sorted(got + s.requeued) == sorted(msgs)  # each delivered or handed back, once


async def test_close_wakes_a_blocked_receiver(transport: Transport, peer_factory) -> None:
    peer = peer_factory(echo=False)
    c = await transport.connect("g", peer.path)
    async with trio.open_nursery() as nursery:

        async def reader() -> None:
            with pytest.raises(kmux.ClientClosed):
                await c.recv(timeout=WAIT)

        nursery.start_soon(reader)
        await until(lambda: c.raw._recv_lock.locked(), "the reader inside recv")
        await c.close()
    with pytest.raises(kmux.ClientClosed):
        await c.send(message(64))


async def test_require_up_refuses_a_group_that_is_down(transport: Transport, peer_factory) -> None:
    peer = peer_factory(up=False)
    with pytest.raises(kmux.GroupUnavailable, match="no TCP connection up"):
        await transport.connect("g", peer.path, require_up=True)
    c = await transport.connect("g", peer.path)
    assert c.raw.up is False
    policy = kmux.ReconnectPolicy(max_attempts=2, deadline=None, initial_delay=0.01)
    with pytest.raises(kmux.GroupUnavailable, match="gave up .* after 2 attempt"):
        await transport.connect("g", peer.path, require_up=True, reconnect=policy)
    up = peer_factory(up=True)
    assert (await transport.connect("g", up.path, require_up=True)).raw.up is True


# -- notices and the reconnect accounting -------------------------------------------------------


async def test_a_per_message_notice_keeps_the_session(transport: Transport, peer_factory) -> None:
    peer = peer_factory(echo=False)
    c = await transport.connect("g", peer.path)
    s = await session_of(peer)
    s.send_notice(code="group_unavailable", error="no connection up for 5 s", seq=7)
    with pytest.raises(kmux.GroupUnavailable) as info:
        await c.recv()
    assert info.value.seq == 7
    m = message(64, seed=30)
    await c.send(m)
    assert await in_thread(s.wait_messages, 1) == [m]


async def four_sent(transport: Transport, peer: ScriptedDaemon, seed: int) -> tuple[Any, PeerSession, list[bytes]]:
    """A reconnecting client that sent four messages, which the peer has."""
    policy = kmux.ReconnectPolicy(deadline=WAIT, initial_delay=0.01, max_delay=0.05)
    c = await transport.connect("g", peer.path, reconnect=policy)
    s1 = await session_of(peer)
    msgs = [message(50, seed=seed + i) for i in range(4)]
    for m in msgs:
        await c.send(m)
    await in_thread(s1.wait_messages, 4)
    return c, s1, msgs


async def test_a_settled_message_is_never_sent_again(transport: Transport, peer_factory) -> None:
    peer = peer_factory(echo=False)
    c, s1, msgs = await four_sent(transport, peer, seed=40)
    s1.send_notice(code="group_unavailable", error="never written", seq=2)
    with pytest.raises(kmux.GroupUnavailable) as info:
        await c.recv()
    assert info.value.seq == 2
    s1.close()  # a crash: no shutdown notice, so 1, 3 and 4 have an unknown fate
    last = message(50, seed=44)
    assert await c.send(last) == 5
    s2 = await session_of(peer, 2)
    assert await in_thread(s2.wait_messages, 4) == [msgs[0], msgs[2], msgs[3], last]
    [fate] = c.raw.unknown_fate
    assert (fate.first_seq, fate.last_seq, fate.held, fate.settled) == (1, 4, 3, 1)


async def test_a_session_the_daemon_ends_is_accounted_by_its_accepted(transport: Transport, peer_factory) -> None:
    peer = peer_factory(echo=False)
    c, s1, msgs = await four_sent(transport, peer, seed=50)
    s1.send_notice(code="slow_consumer", error="client_rx_limit reached", accepted=3)
    s1.close()
    with pytest.raises(kmux.SlowConsumer):
        await c.recv()
    last = message(50, seed=54)
    assert await c.send(last) == 5
    s2 = await session_of(peer, 2)
    assert await in_thread(s2.wait_messages, 2) == [msgs[3], last]  # 4 was never read: sent again, once
    assert c.raw.unknown_fate == [] and c.raw.accepted_seq >= 3


async def test_a_plain_client_keeps_raising_what_ended_its_session(transport: Transport, peer_factory) -> None:
    peer = peer_factory(echo=False)
    c = await transport.connect("g", peer.path)
    s = await session_of(peer)
    s.send_notice(code="idle_timeout", error="idle for 60 s")
    s.close()
    with pytest.raises(kmux.IdleTimeout, match="idle for 60 s"):
        await c.recv()
    with pytest.raises(kmux.IdleTimeout, match="ended the session"):
        await c.recv()
    with pytest.raises(kmux.IdleTimeout):
        await c.send(message(64))


async def test_errors_kept_from_a_lost_connection_are_bounded(transport: Transport, peer_factory,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kmux._driver, "STASHED_ERRORS_MAX", 3)
    peer = peer_factory(echo=False)
    c = await transport.connect("g", peer.path, receive=False)  # a sender that never reads
    s = await session_of(peer)
    for seq in range(1, 6):
        s.send_notice(code="bad_frame", error=f"refused {seq}", seq=seq)
    s.close()
    with pytest.raises(kmux.DaemonShutdown):
        await c.send(message(64))  # finds the loss, and the five notices in the socket
    assert c.raw.statistics().errors_dropped == 2
    for seq in (3, 4, 5):
        with pytest.raises(kmux.BadFrame) as info:
            await c.recv()
        assert info.value.seq == seq
    with pytest.raises(kmux.DaemonShutdown):
        await c.recv()
