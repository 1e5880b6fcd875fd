"""What waits, and for how long: queue_timeout, orphans, retries, request timeouts.

A group of the I/O shell over socket pairs with a fake clock (tests/unit/io/world.py):
every timeout here is a step of the clock, not a sleep.
"""

from __future__ import annotations

import socket

import pytest

from kmuxd.core.router import RETRY_FRESH_WAIT, retry_room

from .world import frame, read_all, split



def test_with_no_connection_a_client_waits_then_is_refused_by_seq(world_factory):
    """queue_timeout for a client pushed back: what it sent and the daemon did not
    read is refused, each message by its seq, and never written later."""
    w = world_factory(queue_timeout=1.0)
    app = w.attach()
    for i in range(3):
        app.send(frame(b"m%d" % i))
    w.run()
    assert w.stats().waiting_clients == 1 and app.packets() == []
    w.tick(0.9)
    assert app.packets() == []
    w.tick(0.2)
    notices = app.notices()
    assert [(n.code, n.seq) for n in notices] == [("group_unavailable", 1), ("group_unavailable", 2),
                                                    ("group_unavailable", 3)]
    assert w.stats().queue_timeouts == 3
    server = w.connect()  # a connection, too late for them
    w.run()
    assert read_all(server) == b""


def test_an_orphan_no_connection_adopts_is_given_back_by_seq(world_factory):
    """The connection died with messages queued: its outbox is an orphan; with no
    other connection within queue_timeout, each of its messages is refused by seq."""
    w = world_factory(queue_timeout=2.0, write_buffer=16384)
    server = w.connect(sndbuf=4096)
    app = w.attach()
    for i in range(40):
        app.send(frame(bytes([i]) * 1000))
    w.run()
    conn = w.conn()
    outbox = w.group.sched.outbox_of(conn)
    assert outbox.pending  # the server reads nothing: the write is blocked
    written = len(split(read_all(server)))
    server.close()  # the server goes away
    w.run()
    assert conn.sm.closed and w.group.sched.has_orphans()
    s = w.stats()
    orphaned = s.queued_msgs
    assert orphaned > 0
    w.tick(1.5)
    assert [n for n in app.notices() if n.code == "group_unavailable"] == []
    w.tick(1.0)
    # The orphan's messages and those still unread in the client's socket: each
    # message the server did not get whole is refused by its seq, once.
    refused = sorted(n.seq for n in app.notices() if n.code == "group_unavailable")
    assert refused == list(range(written + 1, 41)) and len(refused) > orphaned
    assert not w.group.sched.has_orphans() and w.stats().queued_msgs == 0
    assert w.stats().queue_timeouts == len(refused)
    st = app.session.statistics()
    assert st.queued_msgs == 0 and st.tx_msgs == written  # given back: no longer queued for it


def test_an_orphan_is_adopted_whole_by_the_next_connection(world_factory):
    w = world_factory(queue_timeout=5.0, write_buffer=16384)
    server = w.connect(sndbuf=4096)
    app = w.attach()
    for i in range(30):
        app.send(frame(bytes([i]) * 1000))
    w.run()
    first = split(read_all(server))
    # The stream dies mid-write: whatever the kernel had is lost with it, the
    # outbox is cut back to its first message not fully written.
    server.close()
    w.run()
    assert w.group.sched.has_orphans()
    replacement = w.connect()
    stream = bytearray()
    for _ in range(100):
        w.run()
        stream += read_all(replacement)
        if len(split(bytes(stream))) + len(first) >= 30:
            break
    again = split(bytes(stream))
    seqs = [f[4] for f in first] + [f[4] for f in again]
    # Every message arrives, in order, from the first not whole on the old stream.
    assert seqs[: len(first)] == list(range(len(first)))
    assert sorted(set(seqs)) == list(range(30)) and again[-1][4] == 29
    assert w.stats().tx_retries >= 1


def test_a_request_lost_with_its_connection_is_retried_on_a_fresh_one(world_factory):
    """retry_unanswered: the server closes before answering; the retry feeder waits
    for a fresh connection (one comes: the slot redials) and writes it there, with
    a fresh wire id, and its answer reaches the client, once."""
    w = world_factory(steering="id", id={"request_offset": 4, "response_offset": 4, "size": 2},
                      retry_unanswered=1, request_timeout=10.0)
    first = w.connect()
    app = w.attach()
    app.send(frame(b"\x00\x07 get"))
    w.run()
    (req,) = split(read_all(first))
    first.close()
    w.run()
    assert w.group.slots[0].live is None and w.group.retry_feeder.queue
    second = w.connect()
    w.run()
    (again,) = split(read_all(second))
    assert again[6:] == req[6:] and again[4:6] != req[4:6]  # the same request, a fresh wire id
    second.send(frame(again[4:6] + b" value"))
    w.run()
    assert app.messages() == [frame(b"\x00\x07 value")]  # the client's own id put back
    s = w.stats()
    assert (s.requests_retried, s.requests_failed, s.requests_in_flight) == (1, 0, 0)


def test_retries_that_find_no_connection_in_time_are_refused(world_factory):
    w = world_factory(steering="fifo", retry_unanswered=1, queue_timeout=1.0)
    server = w.connect()
    app = w.attach()
    app.send(frame(b"q"))
    w.run()
    read_all(server)
    server.shutdown(socket.SHUT_RDWR)
    w.run()
    assert w.group.retry_feeder.queue
    w.tick(1.1)
    (notice,) = app.notices()
    assert (notice.code, notice.seq) == ("group_unavailable", 1)
    assert w.stats().queue_timeouts == 1 and not w.group.retry_feeder.queue


def test_request_timeout_answers_once_and_drops_the_late_answer(world_factory):
    w = world_factory(steering="fifo", request_timeout=1.0, eject_after_timeouts=0)
    server = w.connect()
    app = w.attach()
    app.send(frame(b"slow"))
    w.run()
    read_all(server)
    w.tick(1.01)
    (notice,) = app.notices()
    assert (notice.code, notice.seq) == ("request_timeout", 1)
    server.send(frame(b"late"))
    w.run()
    assert app.packets() == [] and w.stats().late_responses == 1


@pytest.mark.parametrize(
    "kw,want",
    [
        # Before the endpoint's limit is known: a fresh connection takes them all ...
        (dict(limit=None, carried=0, queued=0, fresh=True, coming=True), 5),
        # ... one that carried requests already waits for a fresher one, a while.
        (dict(limit=None, carried=3, queued=0, fresh=False, coming=True), 0),
        # The limit known: half of it, less what it carried and holds.
        (dict(limit=10, carried=2, queued=1, fresh=False, coming=True), 2),
        (dict(limit=10, carried=5, queued=0, fresh=False, coming=True), 0),
    ],
)
def test_retry_admission_is_a_pure_rule(kw, want):
    assert retry_room(5, 0.0, **kw) == want


def test_retry_admission_stops_waiting_when_nothing_fresher_comes():
    full = dict(limit=10, carried=5, queued=0, fresh=False)
    assert retry_room(5, RETRY_FRESH_WAIT, coming=True, **full) == 0  # one is on its way: wait
    assert retry_room(5, RETRY_FRESH_WAIT, coming=False, **full) == 5  # none: take this one
    stale = dict(limit=None, carried=3, queued=0, fresh=False, coming=True)
    assert retry_room(5, RETRY_FRESH_WAIT, **stale) == 5
