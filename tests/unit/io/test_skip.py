"""A response over ``max_message`` in the I/O shell, without a daemon: skipped in its place.

Socket pairs and a fake clock (:mod:`.world`): the server sends an
oversized response in pieces across passes, among others; the shell hands
over what comes before it, tells the asker ``response_too_big``, and cuts
on. ``tests/integration/test_oversize.py`` does the same through a daemon.
"""

from __future__ import annotations

import struct

from .world import frame, read_all, split

MAX = 1024


def big(size: int) -> bytes:
    """A u32be message of ``size`` bytes in all."""
    return struct.pack(">I", size - 4) + b"B" * (size - 4)


def test_fifo_a_skipped_response_keeps_its_place_across_reads(world_factory):
    w = world_factory(steering="fifo", max_message=MAX, read_buffer=4096)
    server = w.connect()
    a, b = w.attach(name="a"), w.attach(name="b")
    a.send(frame(b"q1"))
    b.send(frame(b"q2"))
    a.send(frame(b"q3"))
    b.send(frame(b"q4"))
    w.run()
    assert len(split(read_all(server))) == 4
    stream = frame(b"r1") + big(20_000) + frame(b"r3") + frame(b"r4")
    conn = w.conn()
    for i in range(0, len(stream), 3000):  # in pieces: the skip spans several reads
        server.send(stream[i : i + 3000])
        w.run()
        assert conn.inbox.tail - conn.inbox.head <= MAX + 4096  # never held whole
    # q2 (b's first) was answered by the big one; what came after it follows in order.
    assert a.messages() == [frame(b"r1"), frame(b"r3")] and not a.notices()
    (kind, notice), after = b.packets()
    assert kind == "notice" and after == ("data", frame(b"r4"))
    assert (notice.code, notice.seq, notice.details["size"], notice.details["max_message"]) == (
        "response_too_big", 1, 20_000, MAX)
    assert w.conn() is conn and not conn.sm.closed
    s, slot = w.stats(), w.group.slots[0].statistics()
    assert (s.skipped_msgs, s.skipped_bytes, s.rx_msgs, s.requests_in_flight) == (1, 20_000, 3, 0)
    assert (slot.skipped_msgs, slot.rx_msgs, slot.msg_too_big) == (1, 4, 1)
    (line,) = w.log.events("response_skipped")
    assert (line["seq"], line["bytes"]) == (1, 20_000)
    (health,) = s.endpoint_health
    assert (health.state, health.failures, health.reason) == ("healthy", 0, None)


def test_a_skip_that_stalls_is_bounded_by_the_assembly_timeout(world_factory):
    w = world_factory(steering="fifo", max_message=MAX, assembly_timeout=2.0)
    server = w.connect()
    app = w.attach()
    app.send(frame(b"q"))
    w.run()
    server.send(big(50_000)[:10_000])
    w.run()
    assert w.conn().inbox.skipping
    w.tick(1.0)
    assert not w.conn().sm.closed
    w.tick(1.5)
    assert w.group.slots[0].live is None
    (failed,) = w.log.events("connection_failed")
    assert failed["error_code"] == "remote_assembly_timeout"
    assert "50000 bytes announced and being skipped" in failed["error"]
    assert [n.code for n in app.notices()] == ["connection_lost"]


def test_balance_a_skip_behind_messages_no_one_takes_waits_with_them(world_factory):
    """No receiver: the connection pauses with a skipped message behind the ones it
    could not hand over; a receiver coming gets those, the skip is counted once, and
    the message after it follows."""
    w = world_factory(steering="balance", max_message=MAX)
    server = w.connect()
    app = w.attach(receive=False)
    server.send(frame(b"one") + big(5000) + frame(b"two"))
    w.run()
    conn = w.conn()
    assert not conn.sm.reading and conn.inbox.skip is not None
    w.reactor.call(app.session.set_receiving, True)
    w.run()
    assert app.messages() == [frame(b"one"), frame(b"two")]
    s = w.stats()
    assert (s.skipped_msgs, s.skipped_bytes, s.rx_msgs) == (1, 5000, 2) and conn.sm.reading
    (line,) = w.log.events("response_skipped")
    assert line["seq"] is None and line["steering"] == "balance"
