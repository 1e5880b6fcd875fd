"""Apps without a daemon: messages in pieces, slow consumers, idleness, hang-ups, REQUEUE.

AppSession, its Intake and Replies, and Assembly (kmuxd/io/session.py,
intake.py, replies.py, assembly.py), over socket pairs with a fake clock.
"""

from __future__ import annotations

from itertools import groupby

from kmux.protocol import KIND_REQUEUE, Control, encode_control

from .world import App, World, frame, read_all, split



def test_a_message_in_pieces_is_written_whole_and_keeps_others_out_meanwhile(world_factory):
    w = world_factory(connections=1)
    server = w.connect()
    big, small = w.attach(name="big"), w.attach(name="small")
    whole = frame(b"x" * 3000)
    big.send(whole[:1000], kind=0x80)  # DATA_MORE: the rest follows
    w.run()
    small.send(frame(b"small"))  # may not land inside the open message
    w.run()
    big.send(whole[1000:2000], kind=0x80)
    big.send(whole[2000:])
    w.run()
    assert split(read_all(server)) == [whole, frame(b"small")]
    assert big.session.statistics().tx_msgs == 1 and w.stats().tx_msgs == 2


def test_pieces_that_stop_coming_are_refused_after_assembly_timeout(world_factory):
    w = world_factory(assembly_timeout=2.0)
    server = w.connect()
    app, other = w.attach(), w.attach()
    app.send(frame(b"y" * 3000)[:500], kind=0x80)
    w.run()
    w.tick(2.1)
    (notice,) = app.notices()
    assert (notice.code, notice.seq) == ("bad_packet", 1)
    other.send(frame(b"after"))  # the connection is everyone's again
    w.run()
    assert split(read_all(server)) == [frame(b"after")]


def _answers_pile_up(world_factory, **settings) -> tuple[World, App]:
    """16 requests, then 16 answers of 2000 bytes for an app whose socket takes about
    8 KiB and that reads nothing: its queue (client_rx_limit 4096) overflows."""
    w = world_factory(steering="fifo", max_message=2048, client_rx_limit=4096, **settings)
    server = w.connect()
    app = w.attach(sndbuf=8192)
    for _ in range(16):
        app.send(frame(b"q"))
    w.run()
    read_all(server)
    server.send(b"".join(frame(b"r" * 2000) for _ in range(16)))
    w.run()
    return w, app


def test_a_client_that_stops_reading_is_detached_as_a_slow_consumer(world_factory):
    w, app = _answers_pile_up(world_factory, slow_consumer_grace=1.0)
    s = w.stats()
    assert s.slow_consumers == 1 and s.clients == 0 and app.session.gone
    assert not app.session.closed  # its last notice waits in its queue, for its grace
    data = app.packets()  # it reads its backlog at last ...
    assert data and all(kind == "data" for kind, _ in data)
    w.run()  # ... so its last notice goes out, and it is closed
    assert app.session.closed and [n.code for n in app.notices()] == ["slow_consumer"]


def test_a_slow_consumer_that_never_reads_is_closed_after_its_grace(world_factory):
    w, app = _answers_pile_up(world_factory, slow_consumer_grace=1.0)
    assert app.session.gone and not app.session.closed
    w.tick(0.9)
    assert not app.session.closed
    w.tick(0.2)
    assert app.session.closed and w.log.events("client_detached")[-1]["reason"] == "slow consumer"


def test_with_rx_overflow_drop_a_response_is_dropped_by_seq(world_factory):
    w, app = _answers_pile_up(world_factory, rx_overflow="drop")
    packets = []
    for _ in range(10):  # it reads; what waited in its queue follows, in order
        packets += app.packets()
        w.run()
    data = [v for k, v in packets if k == "data"]
    dropped = [v.seq for k, v in packets if k == "notice" and v.code == "response_dropped"]
    assert len(data) + len(dropped) == 16 and dropped == sorted(dropped) and dropped[-1] == 16
    assert w.stats().responses_dropped == len(dropped) and not app.session.gone


def test_an_idle_client_is_detached(world_factory):
    w = world_factory(client_idle_timeout=3.0)
    w.connect()
    app = w.attach()
    w.tick(1.0)
    w.tick(2.5)
    assert not app.session.closed  # the first look only marks what it had done
    w.tick(3.1)
    assert app.session.closed and [n.code for n in app.notices()] == ["idle_timeout"]
    assert w.log.events("client_detached")[-1]["reason"] == "idle"


def test_a_client_that_hangs_up_pushed_back_has_its_unread_packets_dropped_and_counted(world_factory):
    w = world_factory(queue_timeout=0)
    app = w.attach()
    for i in range(5):
        app.send(frame(b"m%d" % i))
    w.run()
    app.sock.close()
    w.run()
    assert app.session.closed and w.stats().dropped_unread == 5
    (line,) = w.log.events("client_detached")
    assert line["reason"] == "hung up while pushed back" and line["dropped_unread"] == 5


def test_handed_back_messages_go_to_another_receiver_first(world_factory):
    """REQUEUE (balance): a client switches receiving off and hands back what it got."""
    w = world_factory(steering="balance", rx_batch=16)
    server = w.connect()
    a = w.attach(name="a")
    server.send(frame(b"m1") + frame(b"m2"))
    w.run()
    assert a.messages() == [frame(b"m1"), frame(b"m2")]
    a.sock.send(encode_control(Control("receive", {"on": False})))
    w.run()
    assert [n.event for n in a.notices()] == ["receive_off"]
    b = w.attach(name="b")
    a.send(frame(b"m2"), kind=KIND_REQUEUE)
    server.send(frame(b"m3"))
    w.run()
    assert b.messages() == [frame(b"m2"), frame(b"m3")]
    assert w.stats().requeued == 1 and a.session.statistics().requeued == 1



def test_a_client_that_waits_its_turn_still_gets_whole_turns(world_factory):
    """The connection is the bottleneck and two clients already stream on it when
    a third starts. Waiting for its turn, the third is never read in two passes
    in a row; it still streams, so its read batch must grow from turn to turn
    (1, 2, 4, ... ``client_turn``), not stay at one message a turn: it would
    get a sliver of the connection (the turns test in
    tests/integration/test_isolation.py saw 19 messages against 1900)."""
    turn = 8
    w = world_factory(write_buffer=4096, client_turn=turn)
    server = w.connect(sndbuf=4096)
    apps = [w.attach(name=f"app{i}") for i in range(3)]

    def send(i: int) -> None:
        for n in range(150):
            apps[i].send(frame(bytes([i]) + n.to_bytes(2, "big") + bytes(97)))

    send(0)
    send(1)
    w.run()  # the server reads nothing yet: the connection is blocked
    send(2)
    stream = bytearray()
    for _ in range(2000):
        w.run()
        got = read_all(server)
        if not got:
            break  # nothing more was written: all of it is here
        stream += got
    order = [m[4] for m in split(bytes(stream))]
    assert sorted(order) == sorted([0, 1, 2] * 150)
    runs = [(who, len(list(run))) for who, run in groupby(order)]
    late = [n for who, n in runs if who == 2]
    assert late[:3] == [min(turn, 2 ** (k + 1)) for k in range(3)], runs
    assert all(n >= turn for n in late[3:]), runs
