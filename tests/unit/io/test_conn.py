"""A group's connections without a daemon: writing, reading, recycling, half-close, the end.

Each test drives a real :class:`~kmuxd.io.group.Group` over socket pairs
(kmuxd/io/conn.py, kmuxd/io/slot.py), with the clock in the test's hands.
"""

from __future__ import annotations

import socket


from kmuxd.core.states import ConnState, RetireReason, RxState

from .world import frame, read_all, split



def test_a_request_is_written_and_its_response_reaches_only_its_client(world_factory):
    w = world_factory(steering="fifo")
    server = w.connect()
    a, b = w.attach(name="a"), w.attach(name="b")
    a.send(frame(b"from a"))
    w.run()
    assert split(read_all(server)) == [frame(b"from a")]
    server.send(frame(b"answer for a"))
    w.run()
    assert a.messages() == [frame(b"answer for a")] and b.packets() == []
    s = w.stats()
    assert (s.tx_msgs, s.rx_msgs, s.requests_in_flight) == (1, 1, 0)
    slot = w.group.slots[0].statistics()
    assert (slot.tx_msgs, slot.rx_msgs, slot.state) == (1, 1, "ready")
    assert a.session.statistics().rx_msgs == 1 and a.session.statistics().tx_msgs == 1


def test_a_blocked_write_makes_the_connection_busy_until_the_kernel_takes_it(world_factory):
    w = world_factory(write_buffer=16384)
    server = w.connect(sndbuf=4096)
    app = w.attach()
    for i in range(64):
        app.send(frame(bytes([i]) * 1000))
    w.run()
    conn = w.conn()
    assert conn.sm.state is ConnState.BUSY  # the kernel refused part of a batch
    assert w.stats().waiting_clients == 0 and w.group.sched.outbox_of(conn).pending
    stream = bytearray()
    for _ in range(500):
        stream += read_all(server)  # room in the socket: EPOLLOUT, the rest is written
        w.run()
        if conn.sm.state is ConnState.READY and not w.group.sched.outbox_of(conn).pending:
            break
    stream += read_all(server)
    assert split(bytes(stream)) == [frame(bytes([i]) * 1000) for i in range(64)]
    assert conn.sm.state is ConnState.READY and w.stats().tx_msgs == 64


def test_max_requests_per_connection_recycles_make_before_break(world_factory):
    """The connection that reached its limit takes nothing new at once (DRAINING)
    and its slot wants a replacement; it closes once its requests are answered."""
    w = world_factory(steering="fifo", max_requests_per_connection=2)
    old_server = w.connect()
    old = w.conn()
    app = w.attach()
    app.send(frame(b"1"))
    app.send(frame(b"2"))
    w.run()
    slot = w.group.slots[0]
    assert old.sm.state is ConnState.DRAINING and slot.live is None and old in slot.retiring
    app.send(frame(b"3"))  # nowhere to go yet: it waits for the replacement
    w.run()
    assert split(read_all(old_server)) == [frame(b"1"), frame(b"2")]
    new_server = w.connect()  # the replacement the slot dials
    w.run()
    assert split(read_all(new_server)) == [frame(b"3")]
    old_server.send(frame(b"r1") + frame(b"r2"))
    w.run()
    assert old.sm.closed and not slot.retiring
    assert app.messages() == [frame(b"r1"), frame(b"r2")]
    (closed,) = w.log.events("connection_closed")
    assert closed["reason"] == "max_requests_per_connection" and closed["counted"] == "requested"
    s = w.stats()
    assert s.recycles == 1 and s.tx_msgs == 3 and slot.statistics().retired == 1


def test_the_server_closing_first_fails_what_it_did_not_answer(world_factory):
    """Half-close: the server sends its FIN with a request unanswered. The connection
    ends (EndReason.FIN), the client is told connection_lost for that seq, once."""
    w = world_factory(steering="fifo")
    server = w.connect()
    app = w.attach()
    app.send(frame(b"q1"))
    app.send(frame(b"q2"))
    w.run()
    read_all(server)
    server.send(frame(b"a1"))
    server.shutdown(socket.SHUT_WR)
    w.run()
    assert w.group.slots[0].live is None
    packets = app.packets()
    assert packets[0] == ("data", frame(b"a1"))
    (notice,) = [v for k, v in packets if k == "notice"]
    assert notice.code == "connection_lost" and notice.seq == 2
    (closed,) = w.log.events("connection_closed")
    assert closed["how"] == "fin" and closed["counted"] == "recycle"  # it answered, then closed: a recycle
    assert w.stats().requests_failed == 1 and w.group.slots[0].statistics().recycles == 1


def test_a_balance_drain_half_closes_and_waits_for_the_server_to_close(world_factory):
    """Balance mode: nothing says when the server has answered everything, so a
    drained connection shuts its writing side (WRITE_SHUT) and reads on until the
    server closes; its late messages are still delivered."""
    w = world_factory(steering="balance")
    server = w.connect()
    app = w.attach()
    app.send(frame(b"m"))
    w.run()
    conn = w.conn()
    w.reactor.call(conn.retire, RetireReason.DRAIN, False)
    w.run()
    assert conn.sm.state is ConnState.WRITE_SHUT and conn.sm.shown == "draining"
    assert w.group.slots[0].statistics().state == "draining"
    assert read_all(server) == frame(b"m")  # then EOF: our FIN
    assert server.recv(1) == b""
    server.send(frame(b"late"))
    server.close()
    w.run()
    assert app.messages() == [frame(b"late")] and conn.sm.closed


def test_a_paused_connection_that_hangs_up_is_read_to_its_end_when_a_receiver_comes(world_factory):
    """Balance with no receiver: the connection stops reading (PAUSED); the server
    hangs up meanwhile (SUSPENDED: out of the epoll); a receiver turning on gets
    everything the server sent before it went."""
    w = world_factory(steering="balance")
    server = w.connect()
    app = w.attach(receive=False)
    server.send(frame(b"one") + frame(b"two"))
    w.run()
    conn = w.conn()
    assert conn.sm.rx is RxState.PAUSED
    server.close()
    w.run()
    assert conn.sm.rx is RxState.SUSPENDED and not conn.sm.closed
    w.reactor.call(app.session.set_receiving, True)
    w.run()
    assert app.messages() == [frame(b"one"), frame(b"two")]
    assert conn.sm.closed and w.stats().rx_paused == 1


def test_a_partial_response_that_stalls_ejects_its_endpoint(world_factory):
    """assembly_timeout on the connection: the server sent half a message and stopped."""
    w = world_factory(steering="fifo", assembly_timeout=2.0)
    server = w.connect()
    app = w.attach()
    app.send(frame(b"q"))
    w.run()
    server.send(frame(b"half a response")[:6])
    w.run()
    w.tick(1.0)
    assert not w.conn().sm.closed
    w.tick(1.5)
    assert w.group.slots[0].live is None
    (failed,) = w.log.events("connection_failed")
    assert failed["error_code"] == "remote_assembly_timeout"
    assert w.group.slots[0].statistics().msg_timeouts == 1
    (health,) = w.stats().endpoint_health
    assert health.state == "ejected" and health.reason == "assembly timeout"
    assert [n.code for n in app.notices()] == ["connection_lost"]



def test_a_dialled_connection_holds_at_most_tcp_notsent_lowat_unsent_bytes():
    """The kernel's own limit is megabytes, filled in one burst with whatever was
    at hand; kmuxd sets TCP_NOTSENT_LOWAT on every connection, its own default
    unless ``[groups.NAME.socket]`` names one, so what waits beyond it waits in
    kmuxd, in turn (the turns test in tests/integration/test_isolation.py)."""
    from kmuxd.io.sockopts import SocketPlan
    from kmuxd.system.config import NOTSENT_LOWAT_DEFAULT, SocketConfig

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        for cfg, want in ((SocketConfig(), NOTSENT_LOWAT_DEFAULT), (SocketConfig(tcp_notsent_lowat=16384), 16384)):
            sock, _ = SocketPlan("g", cfg).connect(socket.AF_INET, socket.SOCK_STREAM, 0, server.getsockname(),
                                                   lambda s: None)
            with sock:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == want
    assert not SocketConfig().configured  # a default, not an option the operator set


def test_the_connections_notsent_mark_rises_with_its_messages_and_falls_back(world_factory):
    """A message larger than the mark allows for raises TCP_NOTSENT_LOWAT on the live
    socket to tcp_notsent_lowat_messages of it (kmuxd.core.notsent), so it is not cut
    into pieces that each wait for a drained buffer; small messages bring back the floor."""
    from kmuxd.core.notsent import EPOCH_COMMITS

    w = world_factory(max_message=1 << 20, socket={"tcp_notsent_lowat": 16384, "tcp_notsent_lowat_messages": 3})
    server = w.connect(tcp=True)
    conn = w.conn()

    def lowat() -> int:
        return conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)

    app = w.attach(sndbuf=1 << 20)
    assert lowat() == 16384
    big = frame(b"x" * 20000)
    app.send(big)
    w.run()
    assert split(read_all(server)) == [big]
    assert lowat() == 3 * len(big)
    small = frame(b"y" * 100)
    for _ in range(2 * EPOCH_COMMITS):
        app.send(small)
        w.run()
        read_all(server)
    assert lowat() == 16384 and conn.notsent.statistics().changes == 2


def test_a_client_past_client_max_in_flight_is_read_again_once_answered(world_factory):
    """Its further requests wait in its own socket, not in the connection's and the
    server's queues where another client's request would wait behind them; a
    client alone in its group is not limited. (The contended limit is off here:
    see the next test.)"""
    w = world_factory(steering="fifo", client_max_in_flight=4, client_max_in_flight_contended=0)
    server = w.connect()
    a = w.attach(name="a")
    for i in range(6):
        a.send(frame(b"alone %d" % i))
    w.run()
    assert len(split(read_all(server))) == 6  # alone: no limit
    for i in range(6):
        server.send(frame(b"r"))
    w.run()
    assert len(a.messages()) == 6
    b = w.attach(name="b")
    for i in range(10):
        a.send(frame(b"a%d" % i))
    w.run()
    assert split(read_all(server)) == [frame(b"a%d" % i) for i in range(4)]
    assert a.session.awaiting_answers
    b.send(frame(b"b0"))
    w.run()
    assert split(read_all(server)) == [frame(b"b0")]  # b is not held behind a's backlog
    server.send(frame(b"answer a0"))
    w.run()
    assert a.messages() == [frame(b"answer a0")]
    assert split(read_all(server)) == [frame(b"a4")]  # one answered: one more read
    server.send(frame(b"r") * 5)  # fifo: a1, a2, a3, b0 (written before a4), a4 answered
    w.run()
    assert len(a.messages()) == 4 and b.messages() == [frame(b"r")]
    assert split(read_all(server)) == [frame(b"a%d" % i) for i in range(5, 9)]  # four more, a9 waits
    assert w.stats().requests_in_flight == 4
    assert a.session.holds == 3 and w.group.holds == 3 and w.group.statistics().clients_held == 1


def test_while_another_client_sends_a_client_may_have_only_the_contended_count_in_flight(world_factory):
    """client_max_in_flight_contended: a light client's request is answered after
    whatever the server already holds, so while another client sent within
    contention_window a heavy one keeps only that many requests in flight; once
    the others have been quiet that long, client_max_in_flight applies again."""
    w = world_factory(steering="fifo", client_max_in_flight=8, client_max_in_flight_contended=2,
                      contention_window=1.0)
    server = w.connect()
    heavy, light = w.attach(name="heavy"), w.attach(name="light")
    for i in range(12):
        heavy.send(frame(b"h%d" % i))
    w.run()
    assert len(split(read_all(server))) == 8  # the light one has not sent: client_max_in_flight
    light.send(frame(b"l0"))
    w.run()
    assert split(read_all(server)) == [frame(b"l0")]  # not held behind the heavy one's backlog
    server.send(frame(b"r") * 8)  # the heavy one's eight answered; it has room for two only now
    w.run()
    assert split(read_all(server)) == [frame(b"h8"), frame(b"h9")]
    server.send(frame(b"r") * 3)  # l0, h8, h9
    w.run()
    assert light.messages() == [frame(b"r")]
    assert split(read_all(server)) == [frame(b"h10"), frame(b"h11")]
    w.tick(1.5)  # the light one quiet for longer than contention_window
    for i in range(12, 24):
        heavy.send(frame(b"h%d" % i))
    server.send(frame(b"r") * 2)
    w.run()
    assert len(split(read_all(server))) == 8  # client_max_in_flight again
    assert heavy.session.statistics().holds >= 2 and not light.session.statistics().holds


def test_balance_paces_a_client_that_streams_while_a_light_one_is_active(world_factory):
    """client_rate_contended: balance has no answers to count, so while a light client
    (a message at a time) is active, one that streams is accepted in bursts of
    client_burst_contended at client_rate_contended, and waits in its own socket
    meanwhile. The light one is never paced; a client alone, or once the light one
    has been quiet for contention_window, streams unpaced."""
    w = world_factory(client_rate_contended=1000.0, client_burst_contended=8, contention_window=1.0)
    server = w.connect()
    heavy, light = w.attach(name="heavy", receive=False), w.attach(name="light", receive=False)
    for i in range(100):
        heavy.send(frame(b"h%d" % i))
    w.run()
    assert len(split(read_all(server))) == 100  # nobody light is active: not paced
    for i in range(2):  # two reads in a row of one message each: a light client
        light.send(frame(b"l%d" % i))
        w.run()
    assert split(read_all(server)) == [frame(b"l0"), frame(b"l1")]
    for i in range(100, 200):
        heavy.send(frame(b"h%d" % i))
    w.run()
    assert split(read_all(server)) == [frame(b"h%d" % i) for i in range(100, 108)]  # one burst
    assert heavy.session in w.group.pacer.held and heavy.session.statistics().paced_for == 0.0
    light.send(frame(b"l2"))
    w.run()
    assert split(read_all(server)) == [frame(b"l2")]  # the light one is not held behind it
    w.tick(0.004)
    assert read_all(server) == b""  # half a burst refilled: still held
    w.tick(0.004)
    assert split(read_all(server)) == [frame(b"h%d" % i) for i in range(108, 116)]  # a burst a 8 ms
    s = w.stats()
    assert (s.clients_paced, s.paces) == (1, 2) and heavy.session.statistics().paces == 2
    assert light.session.statistics().paces == 0 and light.session.statistics().paced_for is None
    w.tick(1.5)  # the light one quiet for longer than contention_window: the rest at once
    assert split(read_all(server)) == [frame(b"h%d" % i) for i in range(116, 200)]
    assert w.stats().clients_paced == 0


def test_balance_clients_that_all_stream_are_not_paced(world_factory):
    """Pacing protects light clients; flooders among themselves share the
    connections by client_turn, at full speed (the benchmark's 8-sender flood)."""
    w = world_factory(client_rate_contended=1000.0, client_burst_contended=8)
    server = w.connect()
    apps = [w.attach(name=f"s{i}", receive=False) for i in range(3)]
    for round_ in range(3):
        for i, app in enumerate(apps):
            for j in range(50):
                app.send(frame(b"%d-%d-%d" % (round_, i, j)))
        w.run()
    assert len(split(read_all(server))) == 450
    assert w.stats().paces == 0 and not w.group.pacer.held
