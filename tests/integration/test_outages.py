"""Outages: an app learns that its group has no connection, and health looks at traffic (issue #10).

A real kmuxd subprocess, real apps, real loopback servers that refuse, close,
die and come back on the same port (:class:`~tests.integration.helpers.Backend`
with ``port=``, on the ``refusing_port`` fixture's port).

* ``queue_timeout``: a message that waited that long for a connection is
  refused with ``group_unavailable`` naming its seq and is never written
  later, also when it had been accepted onto a connection that died and
  no other connection adopted (an orphan). The server is brought up
  afterwards and must never see those messages.
* The hello's answer says whether the group is ``up``; ``kmux-cli`` shows a
  group with no connection up as DOWN.
* Health by traffic: a FIN after answers is a recycle (redial at once, the
  endpoint stays healthy); a server that accepts and closes at once gets
  at most ``max_dials_per_second``; a server that dies and comes back on
  its port gets the group back within one back-off step.
* A server's half-close (FIN) with requests in flight: they get
  ``connection_lost`` (or are retried) as soon as the FIN is read, never
  after ``request_timeout``.

Timing bounds are generous on purpose (a loaded 2-core CI machine); each
says what it stands for.
"""

from __future__ import annotations

import json
import time

import pytest

import kmux
from kmux.protocol import decode_notice

from .helpers import (
    AcceptingServer,
    Backend,
    RawApp,
    frame_packet,
    group_config,
    group_record,
    kmux_cli,
    make_frame,
    parse_frame,
    summarize_frame,
    wait_flat,
    wait_until,
)
from .reqresp import (
    Fault,
    assert_exactly_one_outcome,
    rr_group,
    run_clients,
)

#: queue_timeout in these tests: short, so a test waits little for it.
QUEUE_TIMEOUT = 0.5
#: Slack on top of a deadline the daemon applies in its housekeeping tick (a
#: quarter of the shortest timeout) on a loaded machine.
SLACK = 1.5


def down_group(port: int, **kw) -> dict:
    cfg = {"endpoints": [f"127.0.0.1:{port}"], "connections": 2, "max_message": 65536,
           "reconnect_initial": 0.05, "reconnect_max": 0.2, "connect_timeout": 2.0}
    cfg.update(kw)
    return cfg


def notices(packets: list[tuple[int, bytes]]) -> list:
    return [decode_notice(body) for kind, body in packets if kind == 0x01]


# -- queue_timeout ----------------------------------------------------------------------------------


def test_queue_timeout_refuses_by_seq_and_never_writes_later(daemon_factory, backend_factory, refusing_port):
    """No connection up: three messages wait queue_timeout, each is refused with
    group_unavailable naming its seq; the server comes up afterwards and never sees them."""
    daemon = daemon_factory({"g": down_group(refusing_port, queue_timeout=QUEUE_TIMEOUT)})
    with daemon.connect() as c:
        sent_at = time.monotonic()
        seqs = [c.send(make_frame(1, seq, 100)) for seq in (1, 2, 3)]
        got = []
        for _ in seqs:
            with pytest.raises(kmux.GroupUnavailable) as info:
                c.recv(timeout=QUEUE_TIMEOUT + SLACK + 2)
            got.append(info.value.seq)
        waited = time.monotonic() - sent_at
        assert got == seqs, got
        assert QUEUE_TIMEOUT * 0.9 <= waited < QUEUE_TIMEOUT + SLACK, f"refused after {waited:.2f}s"
        backend = backend_factory(echo=True, summarize=summarize_frame, port=refusing_port)
        wait_until(lambda: group_record(daemon)["connections_up"] == 2, 5.0, "the group up again")
        c.send(make_frame(1, 4, 100))
        assert parse_frame(c.recv(timeout=5.0)) == (1, 4)
    # Nothing is left in the daemon that could still be written: one message written, none queued.
    g = group_record(daemon)
    assert (g["tx_msgs"], g["queued_msgs"], g["waiting_clients"]) == (1, 0, 0), g
    assert [r for _, r in backend.records()] == [(1, 4, 100)], "a refused message was written after all"
    assert g["queue_timeouts"] == 3, g
    print(f"queue_timeout: 3 messages refused after {waited:.2f}s (queue_timeout {QUEUE_TIMEOUT}s), none written later")


def test_orphans_expire_with_group_unavailable_and_are_never_written(daemon_factory, backend_factory, refusing_port):
    """fifo steering, one connection, a server that stopped reading: an app's requests fill
    the kernel and the outbox. The server resets and its port refuses: the written requests
    get connection_lost, the orphaned outbox and the unread rest get group_unavailable
    after queue_timeout, each named by seq, exactly one outcome each. The server comes back
    and never sees any of them."""
    first = backend_factory(rcvbuf=4096, summarize=summarize_frame, port=refusing_port)
    daemon = daemon_factory({"g": down_group(refusing_port, connections=1, steering="fifo", write_buffer=16384,
                                             queue_timeout=QUEUE_TIMEOUT, request_timeout=0)})
    first.wait_open(1)
    first.pause()
    app = RawApp(daemon.socket_path, "g", "orphaned")
    sent = wait_flat(lambda: (app.push(frame_packet(5, 2000)), app.sent)[1], 0.3, 10.0, "packets sent")
    g = group_record(daemon)
    assert g["queued_msgs"] > 0, g
    first.kill(rst=True)
    first.close()
    # len(ps) first: decoding every packet at each arrival would be quadratic (1555 notices).
    packets = app.read_packets(QUEUE_TIMEOUT + SLACK + 5, lambda ps: len(ps) >= sent and len(notices(ps)) >= sent)
    outcome: dict[int, list[str]] = {}
    for n in notices(packets):
        outcome.setdefault(n.seq, []).append(n.code)
    assert sorted(outcome) == list(range(1, sent + 1)), f"{sent} sent, outcomes for {len(outcome)}"
    assert all(len(v) == 1 for v in outcome.values()), {s: v for s, v in outcome.items() if len(v) > 1}
    codes = [outcome[s][0] for s in range(1, sent + 1)]
    lost, unavailable = codes.count("connection_lost"), codes.count("group_unavailable")
    assert lost + unavailable == sent and unavailable > 0, (lost, unavailable)
    # Written ones first, then the refused ones: a message is never refused before an older one is written.
    assert codes == ["connection_lost"] * lost + ["group_unavailable"] * unavailable
    # The notices go out before the daemon's log line is read here: wait for it.
    daemon.wait_log("orphans_expired", timeout=5.0)
    written = group_record(daemon)["tx_msgs"]
    second = Backend(echo=True, summarize=summarize_frame, port=refusing_port)
    try:
        g = wait_until(lambda: (g := group_record(daemon))["connections_up"] == 1 and g, 5.0, "the group up again")
        # Up, with nothing queued or in flight: nothing refused is left that could still be written.
        assert (g["tx_msgs"], g["queued_msgs"], g["requests_in_flight"]) == (written, 0, 0), g
        assert second.records() == [], f"refused requests written later: {second.records()[:5]}"
        app.sock.setblocking(True)
        app.sock.send(b"\x00" + make_frame(5, sent + 1, 100))
        answer = app.read_packets(5.0, lambda ps: any(k == 0 for k, _ in ps))
        assert [parse_frame(b) for k, b in answer if k == 0] == [(5, sent + 1)]
        assert [r for _, r in second.records()] == [(5, sent + 1, 100)]
    finally:
        second.close()
    print(f"orphans: {sent} requests: {lost} connection_lost (written), {unavailable} group_unavailable "
          f"(orphaned or unread), none written later")


# -- the app and the operator see that a group is down ------------------------------------------------


def test_hello_says_up_and_kmux_cli_shows_down(daemon_factory, backend_factory, refusing_port):
    daemon = daemon_factory({"g": down_group(refusing_port)})
    app = RawApp(daemon.socket_path, "g")
    assert app.answer.up is False
    app.close()
    out = kmux_cli(daemon, "groups")
    assert out.returncode == 0, out.stderr
    (row,) = [line for line in out.stdout.splitlines() if line.startswith("g ")]
    assert "0/2 DOWN" in row, out.stdout
    detail = kmux_cli(daemon, "group", "g")
    assert detail.returncode == 0 and "DOWN" in detail.stdout.splitlines()[0], detail.stdout
    record = json.loads(kmux_cli(daemon, "group", "g", "-j").stdout)
    assert record["down"] is True and record["connections_up"] == 0, record

    backend_factory(echo=True, port=refusing_port)
    wait_until(lambda: group_record(daemon)["connections_up"] == 2, 5.0, "the group up")
    app = RawApp(daemon.socket_path, "g")
    assert app.answer.up is True
    app.close()
    out = kmux_cli(daemon, "groups")
    (row,) = [line for line in out.stdout.splitlines() if line.startswith("g ")]
    assert "2/2" in row and "DOWN" not in row, out.stdout
    print("kmux-cli groups, down then up:\n" + row)


# -- health by traffic ----------------------------------------------------------------------------------


@pytest.mark.parametrize("steering", ["balance", "fifo"])
def test_fin_after_answers_is_a_recycle(daemon_factory, backend_factory, steering):
    """The server answers, then closes with a FIN: the slot dials again at once (well before
    reconnect_initial's shortest jittered step) and the endpoint stays healthy."""
    backend = backend_factory(echo=True, summarize=summarize_frame)
    initial = 4.0  # a back-off would hold the redial for at least initial / 2 = 2 s
    daemon = daemon_factory({"g": group_config(backend, connections=1, steering=steering,
                                               reconnect_initial=initial, reconnect_max=initial)})
    (old,) = backend.wait_open(1)
    with daemon.connect() as c:
        c.send(make_frame(1, 1, 100))
        assert parse_frame(c.recv(timeout=5.0)) == (1, 1)
        closed = time.monotonic()
        backend.kill([old], rst=False)
        wait_until(lambda: len(ids := backend.open_ids()) == 1 and ids != [old], initial / 2, "the redial")
        redial = time.monotonic() - closed
        wait_until(lambda: group_record(daemon)["connections_up"] == 1, 5.0, "the new connection up")
        c.send(make_frame(1, 2, 100))
        assert parse_frame(c.recv(timeout=5.0)) == (1, 2)
    record = json.loads(kmux_cli(daemon, "group", "g", "-j").stdout)
    (health,) = record["endpoint_health"]
    assert health["state"] == "healthy" and health["recycles"] == 1 and health["failures"] == 0, health
    print(f"FIN after answers ({steering}): redialled in {redial * 1000:.0f} ms, endpoint {health}")


def test_accept_and_close_server_gets_at_most_max_dials_per_second(daemon_factory):
    """A server that accepts and closes at once, 4 slots, a back-off far shorter than the
    dial budget: the accepts the server counts stay within the token bucket (a burst of
    max_dials_per_second, then max_dials_per_second a second)."""
    rate, window = 2.0, 3.0
    server = AcceptingServer(keep=False)
    try:
        daemon = daemon_factory({"g": {"endpoints": [server.address], "connections": 4, "reconnect_initial": 0.02,
                                       "reconnect_max": 0.05, "max_dials_per_second": rate}})
        started = time.monotonic()
        time.sleep(window)  # the accepts of a fixed window are what is measured
        accepts = [t for t in server.accepts if t <= started + window]
        bound = int(max(1.0, rate) + rate * (time.monotonic() - started + 0.5)) + 1
        g = group_record(daemon)
    finally:
        server.close()
    assert 2 <= len(accepts) <= bound, f"{len(accepts)} accepts in {window}s (bound {bound})"
    (health,) = g["endpoint_health"]
    assert health["failures"] >= 2 and health["recycles"] == 0, health
    print(f"accept-and-close: {len(accepts)} accepts in {window:.0f}s at max_dials_per_second={rate} "
          f"(bound {bound}); endpoint {health['state']}, {health['failures']} failures")


def test_server_killed_and_restarted_recovers_within_one_backoff_step(daemon_factory, backend_factory,
                                                                      refusing_port):
    """The server dies (its connections reset, its port refuses) long enough for the back-off
    to reach reconnect_max, then comes back on the same port: every slot is up again within
    one back-off step (reconnect_max) of its return."""
    initial, maximum, conns = 0.1, 1.0, 4
    first = backend_factory(echo=True, port=refusing_port)
    daemon = daemon_factory({"g": down_group(refusing_port, connections=conns, reconnect_initial=initial,
                                             reconnect_max=maximum)})
    first.wait_open(conns)
    first.kill(rst=True)
    first.close()
    wait_until(lambda: group_record(daemon)["connections_up"] == 0, 5.0, "the group down")
    # Each reset and each failed probe is one more back-off step (nothing was answered to reset it):
    # after the conns resets, initial * 2**conns >= maximum, so the next probes all wait the maximum.
    assert initial * 2**conns >= maximum
    at_max = conns + 3  # three failed probes at the maximum
    failures = wait_until(lambda: (n := group_record(daemon)["endpoint_health"][0]["failures"]) >= at_max and n,
                          10 * maximum, f"{at_max} failures")
    back = time.monotonic()
    second = backend_factory(echo=True, port=refusing_port)
    second.wait_open(conns, timeout=maximum + SLACK)
    recovered = time.monotonic() - back
    wait_until(lambda: group_record(daemon)["connections_up"] == conns, 2.0, "every slot up")
    assert recovered <= maximum + SLACK, recovered
    with daemon.connect() as c:
        c.send(make_frame(1, 1, 100))
        assert parse_frame(c.recv(timeout=5.0)) == (1, 1)
    print(f"restart: {failures} failures while down; all {conns} connections back {recovered * 1000:.0f} ms "
          f"after the server returned (reconnect_max {maximum}s)")


# -- a server's half-close ---------------------------------------------------------------------------------


@pytest.mark.parametrize("retry", [0, 1])
@pytest.mark.parametrize("mode", ["id", "fifo"])
def test_half_close_with_requests_in_flight_is_settled_at_once(fault_servers, daemon_factory, mode, retry):
    """The server answers 3 requests, then sends its FIN on reading the 4th and reads (and
    drops) whatever else comes. With 12 requests pipelined, those written after it stopped
    answering get connection_lost (retry 0) or are written again on the next connection
    (retry 1) as soon as the FIN is read: far sooner than request_timeout."""
    request_timeout = 10.0
    server = fault_servers(lambda n: Fault("fin", after=3) if n == 0 else None)
    daemon = daemon_factory({"g": rr_group([server.address], mode, connections=1, request_timeout=request_timeout,
                                           retry_unanswered=retry)})
    wait_until(lambda: group_record(daemon)["connections_up"] == 1, 5.0, "connected")
    (ledger,) = run_clients(daemon, 1, 12, window=12, mode=mode, seed=3, size=lambda rng: 200)
    codes = assert_exactly_one_outcome([ledger], allowed={"connection_lost"} if retry == 0 else set())
    took = max(ledger.outcome_at[s] - ledger.sent_at[s] for s in ledger.sent)
    assert took < request_timeout / 2, f"an outcome took {took:.2f}s (request_timeout {request_timeout}s)"
    g = group_record(daemon)
    if retry:
        assert len(ledger.responses) == 12 and g["requests_retried"] >= 1, g
    else:
        assert codes["connection_lost"] >= 1 and g["requests_failed"] == codes["connection_lost"], (codes, g)
    print(f"half-close ({mode}, retry {retry}): {len(ledger.responses)} answered, "
          f"{codes.get('connection_lost', 0)} connection_lost, {g['requests_retried']} retried; slowest outcome {took * 1000:.0f} ms")


# -- flush: the last messages of an app that leaves during an outage ----------------------------------


@pytest.mark.parametrize("flush", [True, False], ids=["flush", "no-flush"])
def test_flush_before_close_keeps_the_last_messages_of_an_outage(daemon_factory, backend_factory, refusing_port,
                                                                  flush):
    """No connection up and queue_timeout off: the daemon does not read a sender it cannot
    place messages for. ``flush()`` waits (TimeoutError while the group is down), the
    server comes up, ``flush()`` returns and every message is written after the app has
    gone. Without it, ``close()`` drops the unread messages and the daemon counts them."""
    daemon = daemon_factory({"g": down_group(refusing_port, queue_timeout=0)})
    c = daemon.connect(receive=False)
    seqs = [c.send(make_frame(1, seq, 100)) for seq in (1, 2, 3)]
    backend = None
    if flush:
        with pytest.raises(TimeoutError, match=r"the daemon has not read \d+ bytes"):
            c.flush(timeout=0.3)
        backend = backend_factory(summarize=summarize_frame, port=refusing_port)
        t0 = time.monotonic()
        c.flush(timeout=10.0)
        flushed = time.monotonic() - t0
    c.close()
    if flush:
        wait_until(lambda: len(backend.records()) == len(seqs), 10.0, "every flushed message written")
        assert [r for _, r in backend.records()] == [(1, s, 100) for s in seqs]
        print(f"flush: returned {flushed * 1000:.0f} ms after the server came up; {len(seqs)} of {len(seqs)} written")
    else:
        g = wait_until(lambda: (g := group_record(daemon))["dropped_unread"] == len(seqs) and g, 5.0,
                       "the unread messages counted")
        assert g["tx_msgs"] == 0, g
        print(f"no flush: close() with {len(seqs)} unread messages: {g['dropped_unread']} dropped unread, counted")


async def test_trio_flush_waits_until_the_daemon_has_read(daemon_factory, backend_factory, refusing_port):
    import trio

    import kmux.trio

    daemon = daemon_factory({"g": down_group(refusing_port, queue_timeout=0)})
    async with await kmux.trio.connect("g", daemon.socket_path, receive=False) as c:
        for seq in (1, 2):
            await c.send(make_frame(2, seq, 64))
        with trio.move_on_after(0.3) as scope:
            await c.flush()
        assert scope.cancelled_caught, "flush returned while the group was down"
        backend = backend_factory(summarize=summarize_frame, port=refusing_port)
        with trio.fail_after(10):
            await c.flush()
    wait_until(lambda: len(backend.records()) == 2, 10.0, "both flushed messages written")
