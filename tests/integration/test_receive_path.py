"""Receive path, end to end: a real server -> kmuxd -> steered to receiving apps (balance mode).

The properties: every message the service sends is delivered to exactly one
receiver; ready receivers take turns in batches of ``rx_batch``; switching
receiving off moves messages on (queued ones too, via REQUEUE); with nobody
ready the daemon stops reading TCP instead of dropping; a hostile or stalled
stream costs only its own connection.
"""

from __future__ import annotations

import select
import time
from collections import Counter

import pytest

from .helpers import (
    Receiver,
    group_config,
    make_frame,
    parse_frame,
    summarize_frame,
    u32be,
    wait_flat,
    wait_until,
)

MAX = 65536
SENDER = 7


def _ids(receiver: Receiver) -> list[tuple[int, int]]:
    return [parse_frame(m) for m in receiver.messages()]


def _total(receivers) -> int:
    return sum(r.count() for r in receivers)


def _rounds(sender, receivers, seq: int, rounds: int, batch: int) -> tuple[list[int], int]:
    """Send ``rounds`` rounds of ``batch`` messages, each after the previous one was delivered.

    Returns which receiver got each round (asserting each round went whole to one
    receiver) and the last seq sent.
    """
    owners = []
    for _ in range(rounds):
        before = [r.count() for r in receivers]
        for _ in range(batch):
            seq += 1
            sender.send(make_frame(SENDER, seq, 100))
        wait_until(lambda: _total(receivers) >= sum(before) + batch, 10, "a round of echoes")
        delta = [r.count() - b for r, b in zip(receivers, before)]
        assert sorted(delta) == [0] * (len(receivers) - 1) + [batch], f"a round was split: {delta}"
        owners.append(delta.index(batch))
    return owners, seq


@pytest.fixture
def close_all():
    things = []
    try:
        yield things.append
    finally:
        for t in reversed(things):
            t.close()


def test_echoes_go_round_robin_in_batches(backend_factory, daemon_factory, close_all):
    batch, n = 4, 3
    backend = backend_factory(echo=True, summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=1, rx_batch=batch)})
    backend.wait_open(1)
    receivers = [Receiver(daemon.connect(name=f"rx{i}")) for i in range(n)]
    for r in receivers:
        close_all(r)
    sender = daemon.connect(receive=False)
    close_all(sender)
    owners, last = _rounds(sender, receivers, 0, 30, batch)
    # The ring turns: n distinct receivers in a fixed cycle.
    assert len(set(owners[:n])) == n
    assert owners == [owners[i % n] for i in range(len(owners))]
    got = Counter(k for r in receivers for k in _ids(r))
    assert got == Counter({(SENDER, s): 1 for s in range(1, last + 1)})
    assert all(r.count() == 10 * batch for r in receivers)
    # Echoes came back over the one TCP connection, in order.
    assert [rec[1] for _, rec in backend.records()] == list(range(1, last + 1))


def test_bulk_echoes_over_four_connections_reach_every_receiver_once(backend_factory, daemon_factory, close_all):
    backend = backend_factory(echo=True, summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=4)})
    backend.wait_open(4)
    receivers = [Receiver(daemon.connect(name=f"rx{i}")) for i in range(4)]
    for r in receivers:
        close_all(r)
    senders = [daemon.connect(receive=False) for _ in range(2)]
    for s in senders:
        close_all(s)
    total = 4000
    for seq in range(1, total // 2 + 1):
        for cid, s in enumerate(senders, 1):
            s.send(make_frame(cid, seq, 32 + (seq * 37) % 2000))
    wait_until(lambda: _total(receivers) >= total, 20, "all echoes")
    assert wait_flat(lambda: _total(receivers), quiet=0.3, timeout=10) == total
    got = Counter(k for r in receivers for k in _ids(r))
    assert got == Counter({(cid, s): 1 for cid in (1, 2) for s in range(1, total // 2 + 1)})
    assert all(r.count() > 0 for r in receivers), [r.count() for r in receivers]
    assert len({conn for conn, _ in backend.records()}) > 1


def test_receive_off_then_on(backend_factory, daemon_factory, close_all):
    batch = 4
    backend = backend_factory(echo=True, summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=1, rx_batch=batch)})
    backend.wait_open(1)
    a, b, c = receivers = [Receiver(daemon.connect(name=n)) for n in "abc"]
    for r in receivers:
        close_all(r)
    sender = daemon.connect(receive=False)
    close_all(sender)

    owners, seq = _rounds(sender, receivers, 0, 6, batch)
    assert sorted(Counter(owners).values()) == [2, 2, 2]

    a.set_receive(False)
    a_before = a.count()
    owners, seq = _rounds(sender, receivers, seq, 6, batch)
    assert 0 not in owners, f"receiver a got messages while receiving was off: {owners}"
    assert Counter(owners) == {1: 3, 2: 3}
    assert a.count() == a_before

    a.set_receive(True)
    owners, seq = _rounds(sender, receivers, seq, 6, batch)
    assert Counter(owners) == {0: 2, 1: 2, 2: 2}
    got = Counter(k for r in receivers for k in _ids(r))
    assert got == Counter({(SENDER, s): 1 for s in range(1, seq + 1)})


def test_messages_queued_for_a_receiver_that_turns_off_move_on(backend_factory, daemon_factory, close_all):
    backend = backend_factory(max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=1, rx_batch=8)})
    (conn,) = backend.wait_open(1)
    a, b, c = receivers = [Receiver(daemon.connect(name=n)) for n in "abc"]
    for r in receivers:
        close_all(r)
    a.pause_reading()  # a's socket fills up; the daemon must not lose what it queued there
    total = 3000
    frames = [make_frame(SENDER, s, 1000) for s in range(1, total + 1)]
    backend.send(conn, b"".join(frames))
    wait_until(lambda: backend.conn(conn).pending_out == 0, 20, "the server's sends")
    # Messages are waiting in a's socket.
    readable, _, _ = select.select([a.client.fileno()], [], [], 5)
    assert readable, "nothing was steered to the paused receiver"
    a.set_receive(False)  # hands back everything queued before the receive_off marker
    a.resume_reading()
    wait_until(lambda: _total(receivers) >= total, 20, "every message at some receiver")
    assert wait_flat(lambda: _total(receivers), quiet=0.3, timeout=10) == total
    assert a.count() == 0
    got = Counter(k for r in receivers for k in _ids(r))
    assert got == Counter({(SENDER, s): 1 for s in range(1, total + 1)})
    assert b.count() > 0 and c.count() > 0


@pytest.mark.parametrize("how", ["receive_off", "no_clients"])
def test_no_ready_receiver_pauses_tcp_reads_and_drops_nothing(backend_factory, daemon_factory, close_all, how):
    # A small send buffer at the server makes "its sends block" quick to reach.
    backend = backend_factory(max_frame=MAX, sndbuf=65536)
    daemon = daemon_factory({"echo": group_config(backend, connections=1, read_buffer=4096)})
    (conn,) = backend.wait_open(1)
    idle = None
    if how == "receive_off":
        idle = Receiver(daemon.connect(receive=False, name="idle"))
        close_all(idle)
    total = 2000
    frames = [make_frame(SENDER, s, 4096) for s in range(1, total + 1)]
    backend.send(conn, b"".join(frames))
    # The daemon stops reading: the server's unsent bytes stay put.
    stuck = wait_flat(lambda: backend.conn(conn).pending_out, quiet=1.0, timeout=20, what="server's unsent bytes")
    assert stuck > 0, "the daemon read everything although no receiver was ready"
    assert stuck < total * 4096
    if idle is not None:
        assert idle.count() == 0
        idle.set_receive(True)
        rx = idle
    else:
        rx = Receiver(daemon.connect(name="late"))
        close_all(rx)
    wait_until(lambda: rx.count() >= total, 20, "every message once a receiver is ready")
    assert wait_flat(rx.count, quiet=0.3, timeout=10) == total
    # One connection, one receiver: exactly the server's order.
    assert rx.messages() == frames
    assert backend.conn(conn).open and len(backend.conns()) == 1


def test_hostile_frame_length_closes_only_that_connection(backend_factory, daemon_factory, close_all):
    backend = backend_factory(summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=3)})
    original = backend.wait_open(3)
    rx = Receiver(daemon.connect(name="rx"))
    close_all(rx)
    victim, others = original[0], original[1:]
    # A header announcing 4 GiB, past max_skip (64 MiB): a stream out of step, not a message to skip.
    backend.send(victim, (0xFFFFFFF0).to_bytes(4, "big") + b"x" * 100)
    failed = daemon.wait_log("connection_failed", error_code="remote_frame_too_big", timeout=10)
    assert len(failed) == 1
    wait_until(lambda: not backend.conn(victim).open, 10, "the daemon to close the hostile connection")
    now_open = backend.wait_open(3, timeout=10)
    new = set(now_open) - set(original)
    assert len(new) == 1 and set(others) <= set(now_open)
    assert backend.conn(victim).close_reason in ("eof", "reset")
    # The other streams were untouched and still carry messages both ways.
    for i, other in enumerate(others, 1):
        backend.send(other, make_frame(SENDER, i, 500))
    (fresh,) = new
    backend.send(fresh, make_frame(SENDER, 3, 500))
    wait_until(lambda: rx.count() >= 3, 10, "messages on the surviving and new connections")
    assert sorted(_ids(rx)) == [(SENDER, 1), (SENDER, 2), (SENDER, 3)]
    sender = daemon.connect(receive=False)
    close_all(sender)
    for s in range(1, 101):
        sender.send(make_frame(1, s, 200))
    backend.wait_count(100, timeout=10)
    assert sorted(rec[1] for _, rec in backend.records()) == list(range(1, 101))
    assert all(backend.conn(o).open for o in others)
    assert len(daemon.logs("connection_failed")) == 1


def test_assembly_timeout_replaces_a_stalled_connection(backend_factory, daemon_factory, close_all):
    backend = backend_factory(max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=2, assembly_timeout=0.3)})
    original = backend.wait_open(2)
    rx = Receiver(daemon.connect(name="rx"))
    close_all(rx)
    victim, other = original
    t0 = time.monotonic()
    backend.send(victim, u32be(b"p" * 100)[:14])  # 14 of 104 bytes, then nothing
    failed = daemon.wait_log("connection_failed", error_code="remote_assembly_timeout", timeout=5)
    assert len(failed) == 1
    wait_until(lambda: not backend.conn(victim).open, 5, "the stalled connection to close")
    assert backend.conn(victim).closed_at - t0 >= 0.3
    now_open = backend.wait_open(2, timeout=10)
    assert other in now_open and len(set(now_open) - set(original)) == 1
    assert rx.count() == 0
    backend.send(other, make_frame(SENDER, 1, 300))
    wait_until(lambda: rx.count() >= 1, 5, "a message on the other connection")
    assert _ids(rx) == [(SENDER, 1)]
    assert backend.conn(other).open
    assert len(daemon.logs("connection_failed")) == 1


def test_a_partial_frame_completed_in_time_is_delivered(backend_factory, daemon_factory, close_all):
    backend = backend_factory(max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=1, assembly_timeout=1.0)})
    (conn,) = backend.wait_open(1)
    rx = Receiver(daemon.connect(name="rx"))
    close_all(rx)
    frame = make_frame(SENDER, 1, 1000)
    backend.send(conn, frame[:10])
    time.sleep(0.2)  # the stimulus: a slow but timely server
    backend.send(conn, frame[10:])
    wait_until(lambda: rx.count() >= 1, 5, "the completed message")
    assert rx.messages() == [frame]
    assert backend.conn(conn).open
    assert daemon.logs("connection_failed") == []


def test_assembly_timeout_is_per_message_on_a_steady_stream(backend_factory, daemon_factory, close_all):
    backend = backend_factory(max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=1, assembly_timeout=0.5)})
    (conn,) = backend.wait_open(1)
    rx = Receiver(daemon.connect(name="rx"))
    close_all(rx)
    frames = [make_frame(SENDER, s, 200) for s in range(1, 13)]
    # Each chunk completes the previous message and starts the next one: every
    # message takes about 0.1 s, far below assembly_timeout, but the stream is
    # never between messages for 1.2 s.
    chunks = [frames[0][:100]] + [p[100:] + n[:100] for p, n in zip(frames, frames[1:])] + [frames[-1][100:]]
    for i, chunk in enumerate(chunks):
        if i:
            time.sleep(0.1)  # the stimulus: a stream that is never between messages, at a steady pace
        if not backend.conn(conn).open:
            break
        backend.send(conn, chunk)
    wait_until(lambda: rx.count() >= len(frames) or daemon.logs("connection_failed"), 5, "delivery or failure")
    assert daemon.logs("connection_failed") == []
    assert rx.messages() == frames
