"""Request/response steering, each response to its requester: id (with and without rewrite), fifo, unmatched.

A real kmuxd subprocess, real SEQPACKET clients, a real loopback TCP echo
server; the messages, clients and ledgers are in ``reqresp.py`` (which says
how a request names itself).

* ``id`` with rewrite: colliding ids from many clients, each response to
  its sender with its own id back; the id space exhausted is refused, then
  recovers; a request too short for its id is ``bad_frame``;
* ``id`` without rewrite: a second user of an id in flight gets
  ``id_in_use`` until the first is answered;
* ``fifo``: responses in request order per connection;
* receive off (id, fifo): a client keeps its own responses and a requeue
  is refused;
* a response that matches nothing is counted, logged and dropped (or, with
  ``unmatched = "balance"``, handed to a receiver).
"""

from __future__ import annotations

import random
import socket
import struct
import time

import pytest

from kmux.errors import KmuxError

from .helpers import check_order_per_connection, wait_until
from .reqresp import (
    MAX,
    assert_exactly_one_outcome,
    group_stats,
    make_req,
    parse_resp,
    rr_group,
    run_clients,
    summarize_req,
)

MODES = ["id", "fifo"]

# -- 1. id with rewrite: colliding ids, each answer to its sender with its own id --------------------


def test_id_rewrite_colliding_ids_each_response_to_its_sender(backend_factory, daemon_factory):
    """16 clients all use ids 1..8 at once, through 4 connections to an echo server:
    each response comes back to its sender, with its own id and its own payload."""
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], "id", rewrite=True)})
    backend.wait_open(4)

    ledgers = run_clients(daemon, 16, 48, window=8, mode="id", seed=1)

    assert_exactly_one_outcome(ledgers)
    assert sum(len(led.responses) for led in ledgers) == 16 * 48
    for led in ledgers:
        assert set(led.sent.values()) == set(range(1, 9)), f"client {led.cid} used ids {sorted(set(led.sent.values()))}"
    recs = backend.records()
    assert not [r for _, r in recs if r[0] == "bad"]
    assert len(recs) == 16 * 48, "every request written exactly once"
    assert len({r[:2] for _, r in recs}) == 16 * 48
    # 128 requests in flight with 8 client ids: the wire ids must have been rewritten.
    wire_ids = {r[2] for _, r in recs}
    assert len(wire_ids) > 8, f"ids on the wire: {sorted(wire_ids)[:20]}"
    g = group_stats(daemon)
    assert g.get("unmatched_responses", 0) == 0
    assert g.get("requests_in_flight", 0) == 0


@pytest.mark.parametrize("mode", ["id", "fifo"])
def test_receive_off_keeps_own_responses_and_requeue_is_refused(backend_factory, daemon_factory, mode):
    """In id/fifo modes every response belongs to its requester: switching receiving
    off hands nothing back (no cross-delivery), and a raw REQUEUE is refused."""
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], mode, connections=2)})
    backend.wait_open(2)
    rng = random.Random(11)
    with daemon.connect(name="a") as a, daemon.connect(name="b") as b:
        backend.pause()
        for seq in range(1, 11):
            a.send(make_req(1, seq, seq, 64, rng))
        wait_until(lambda: group_stats(daemon).get("requests_in_flight", 0) == 10, 5, "10 requests in flight")
        backend.resume()
        a.set_receive(False)  # responses arriving now are still a's own
        got = [parse_resp(a.recv(timeout=5)) for _ in range(10)]
        assert sorted(seq for _, _, seq in got) == list(range(1, 11))
        assert all(client == 1 for _, client, _ in got)
        with pytest.raises(TimeoutError):
            b.recv(timeout=0.3)  # nothing of a's reached b
        # A REQUEUE from a program that ignores the mode is refused, not steered.
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        raw.connect(daemon.socket_path)
        import msgpack

        raw.send(msgpack.packb({"kmux": 1, "group": "g"}))
        raw.recv(65536)
        raw.send(b"\x01" + msgpack.packb({"op": "receive", "on": False}))
        raw.send(b"\x02" + make_req(3, 1, 1, 64, rng))
        notices = [msgpack.unpackb(raw.recv(65536)[1:]) for _ in range(2)]
        raw.close()
        assert {"event": "receive_off"} in notices
        assert any(n.get("code") == "bad_packet" and "REQUEUE" in n.get("error", "") for n in notices), notices
        with pytest.raises(TimeoutError):
            b.recv(timeout=0.3)
    assert group_stats(daemon).get("unmatched_responses", 0) == 0


# -- 2. id without rewrite: id_in_use, then free again -----------------------------------------------


def test_id_no_rewrite_second_user_refused_until_first_answered(backend_factory, daemon_factory):
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], "id", rewrite=False, connections=2)})
    backend.wait_open(2)
    a, b = daemon.connect(name="a"), daemon.connect(name="b")
    try:
        rng = random.Random(2)
        backend.pause()  # keeps A's request in flight
        assert a.send(make_req(1, 1, 7, 100, rng)) == 1
        wait_until(lambda: group_stats(daemon).get("requests_in_flight", 1) >= 1, 5, "A's request in flight")

        assert b.send(make_req(2, 1, 7, 100, rng)) == 1  # the same id, another client
        with pytest.raises(KmuxError) as info:
            b.recv(timeout=3)
        assert info.value.code == "id_in_use", info.value
        assert info.value.seq == 1
        assert a.send(make_req(1, 2, 7, 100, rng)) == 2  # the same id, the same client
        with pytest.raises(KmuxError) as info:
            a.recv(timeout=3)
        assert (info.value.code, info.value.seq) == ("id_in_use", 2)
        assert b.send(make_req(2, 2, 8, 100, rng)) == 2  # another id is fine meanwhile

        backend.resume()
        assert parse_resp(a.recv(timeout=5)) == (7, 1, 1)
        assert parse_resp(b.recv(timeout=5)) == (8, 2, 2)
        # Answered: id 7 is free again, for anyone.
        assert b.send(make_req(2, 3, 7, 100, rng)) == 3
        assert parse_resp(b.recv(timeout=5)) == (7, 2, 3)
        assert a.send(make_req(1, 3, 7, 100, rng)) == 3
        assert parse_resp(a.recv(timeout=5)) == (7, 1, 3)
        for c in (a, b):
            with pytest.raises(TimeoutError):
                c.recv(timeout=0.2)
        # The refused requests were never written.
        written = sorted(r[:2] for _, r in backend.records())
        assert written == [(1, 1), (1, 3), (2, 2), (2, 3)]
    finally:
        backend.resume()
        a.close()
        b.close()


def test_id_too_short_for_its_id_is_bad_frame(backend_factory, daemon_factory):
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], "id", rewrite=True, connections=1)})
    backend.wait_open(1)
    with daemon.connect(name="short") as c:
        c.send(struct.pack(">I", 2) + b"ab")  # 6 bytes: the id at 4..8 is not there
        with pytest.raises(KmuxError) as info:
            c.recv(timeout=3)
        assert (info.value.code, info.value.seq) == ("bad_frame", 1)
        c.send(make_req(1, 2, 5, 50, random.Random(0)))  # the session goes on
        assert parse_resp(c.recv(timeout=5)) == (5, 1, 2)
    assert backend.count() == 1


def test_id_rewrite_space_exhausted_is_refused_then_recovers(backend_factory, daemon_factory):
    """size = 1: 256 wire ids. With all in flight a request is refused (ids_exhausted), never written."""
    backend = backend_factory(echo=True, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], "id", rewrite=True, id_size=1, connections=2)})
    backend.wait_open(2)
    rng = random.Random(3)
    with daemon.connect(name="many") as c:
        backend.pause()
        for seq in range(1, 301):
            c.send(make_req(1, seq, 9, 40, rng, id_size=1))
        refused, answered = [], []
        try:
            end = time.monotonic() + 5
            while time.monotonic() < end and len(refused) < 300 - 256:
                try:
                    c.recv(timeout=0.2)
                except KmuxError as exc:
                    assert exc.code == "ids_exhausted", exc
                    refused.append(exc.seq)
                except TimeoutError:
                    pass
        finally:
            backend.resume()
        assert refused, "300 requests with 256 ids: some must be refused"
        assert len(refused) >= 300 - 256
        end = time.monotonic() + 10
        while len(answered) + len(refused) < 300 and time.monotonic() < end:
            try:
                rid, client, seq = parse_resp(c.recv(timeout=0.5), id_size=1)
            except TimeoutError:
                continue
            assert (rid, client) == (9, 1)
            answered.append(seq)
        assert sorted(answered + refused) == list(range(1, 301))
        assert backend.count() == len(answered)


# -- 3. fifo: responses in request order per connection --------------------------------------------


def test_fifo_echo_responses_match_and_keep_order(backend_factory, daemon_factory):
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], "fifo")})
    backend.wait_open(4)

    ledgers = run_clients(daemon, 8, 120, window=8, mode="fifo", seed=3)

    assert_exactly_one_outcome(ledgers)
    assert sum(len(led.responses) for led in ledgers) == 8 * 120
    recs = backend.records()
    check_order_per_connection(recs)
    conn_of = {r[:2]: conn for conn, r in recs}
    assert len(conn_of) == len(recs) == 8 * 120
    used = set(conn_of.values())
    for led in ledgers:
        last: dict[int, int] = {}
        for seq in led.responses:
            conn = conn_of[(led.cid, seq)]
            assert seq > last.get(conn, 0), f"client {led.cid}: seq {seq} answered after {last[conn]} on conn {conn}"
            last[conn] = seq
    assert len(used) > 1, "the requests should have used several connections"
    assert group_stats(daemon).get("unmatched_responses", 0) == 0


# -- unmatched responses --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_unmatched_response_counted_logged_dropped(backend_factory, daemon_factory, mode):
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], mode, connections=1)})
    (conn,) = backend.wait_open(1)
    rng = random.Random(9)
    a, b = daemon.connect(name="a"), daemon.connect(name="b")
    try:
        a.send(make_req(1, 1, 5, 64, rng))
        assert parse_resp(a.recv(timeout=5))[1:] == (1, 1)
        # Nothing in flight now: a response from nowhere (fifo: empty queue; id: unknown id).
        backend.send(conn, make_req(77, 1, 0xDEAD, 80, rng))
        wait_until(lambda: group_stats(daemon).get("unmatched_responses") == 1, 5, "unmatched_responses == 1")
        for c in (a, b):
            with pytest.raises(TimeoutError):
                c.recv(timeout=0.3)
        daemon.wait_log("unmatched_response", timeout=5)
        # The stream is still in step.
        b.send(make_req(2, 1, 5, 64, rng))
        assert parse_resp(b.recv(timeout=5))[1:] == (2, 1)
    finally:
        a.close()
        b.close()


def test_unmatched_balance_goes_to_a_receiver(backend_factory, daemon_factory):
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], "fifo", connections=1, unmatched="balance")})
    (conn,) = backend.wait_open(1)
    rng = random.Random(10)
    with daemon.connect(name="rx") as c:
        stray = make_req(77, 1, 0, 80, rng)
        backend.send(conn, stray)
        assert c.recv(timeout=5) == stray
        assert group_stats(daemon).get("unmatched_responses") == 1
        c.send(make_req(1, 1, 0, 64, rng))
        assert parse_resp(c.recv(timeout=5))[1:] == (1, 1)

