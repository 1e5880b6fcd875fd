"""memcached (the Debian package) behind kmuxd, over its binary protocol.

The group uses ``framing = "memcached-binary"`` and either ``steering = "id"``
on the 4-byte ``opaque`` (offset 12 in requests and responses) or
``steering = "fifo"`` (opaque 0 everywhere, responses matched by order).
Many clients, one thread and one kmux connection each, set random values
under their own keys and read them back: a response delivered to the wrong
client, or matched to the wrong request, shows up as a wrong value, a wrong
opaque or a wrong opcode.
"""

from __future__ import annotations

import os
import random
import socket
import time
from typing import Any

import pytest

import kmux
from kmux import errors as kmux_errors

from . import (
    MC_HEADER,
    OP_GET,
    OP_SET,
    STATUS_KEY_NOT_FOUND,
    STATUS_OK,
    McResponse,
    mc_get,
    mc_parse,
    mc_set,
    recv_exact,
    run_threads,
)
from .conftest import assert_request_counters, group_stats, start_kmuxd, start_memcached
from tests.integration.helpers import local_port, wait_until

CLIENTS = 16
RECV_TIMEOUT = 5.0


def id_group(rewrite: bool, **kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "framing": "memcached-binary",
        "steering": "id",
        "id": {"request_offset": 12, "response_offset": 12, "size": 4, "rewrite": rewrite},
        "unmatched": "drop",
        "request_timeout": 10.0,
    }
    cfg.update(kw)
    return cfg


def fifo_group(**kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"framing": "memcached-binary", "steering": "fifo", "unmatched": "drop",
                           "request_timeout": 10.0}
    cfg.update(kw)
    return cfg


def random_value(rng: random.Random) -> bytes:
    """Random bytes of a random size, mostly small, some over a few KiB."""
    n = rng.choice((rng.randint(1, 64), rng.randint(65, 1024), rng.randint(1025, 6000)))
    return rng.randbytes(n)


def expect(r: McResponse, opcode: int, opaque: int, what: str) -> None:
    assert r.opcode == opcode, f"{what}: got a response to opcode {r.opcode:#x} (opaque {r.opaque:#x}), not {opcode:#x}"
    assert r.opaque == opaque, f"{what}: response opaque {r.opaque:#x}, request opaque {opaque:#x}"
    assert r.status == STATUS_OK, f"{what}: status {r.status:#x} {r.value[:80]!r}"


def roundtrip(c: kmux.Client, request: bytes) -> McResponse:
    c.send(request)
    return mc_parse(c.recv(timeout=RECV_TIMEOUT))


def no_more(c: kmux.Client, wait: float = 0.2) -> None:
    """Nothing else is queued for this client (no stray or duplicated responses)."""
    try:
        extra = c.recv(timeout=wait)
    except TimeoutError:
        return
    raise AssertionError(f"client {c.client_id} got a response it did not ask for: {extra[:40]!r}")


def lockstep_workload(daemon, rounds: int, opaque_of, seed: int):
    """Each client: ``rounds`` x (SET own key to a random value; GET it back), then re-GET a sample."""
    tag = os.urandom(4).hex()

    def client(i: int) -> int:
        rng = random.Random(seed * 1000 + i)
        stored: dict[bytes, bytes] = {}
        with daemon.connect(receive=True, name=f"mc{i}") as c:
            n = 0
            for j in range(rounds):
                key = f"{tag}:c{i}:k{j}".encode()
                value = random_value(rng)
                n += 1
                op = opaque_of(i, n)
                expect(roundtrip(c, mc_set(key, value, opaque=op, flags=i)), OP_SET, op, f"client {i} SET #{j}")
                stored[key] = value
                n += 1
                op = opaque_of(i, n)
                r = roundtrip(c, mc_get(key, opaque=op))
                expect(r, OP_GET, op, f"client {i} GET #{j}")
                assert r.value == stored[key], f"client {i} GET {key!r}: got {len(r.value)} bytes, not its value"
                assert r.extras == i.to_bytes(4, "big"), f"client {i} GET {key!r}: flags {r.extras!r}"
            for key in rng.sample(sorted(stored), 20):  # values survive other clients' traffic
                n += 1
                op = opaque_of(i, n)
                r = roundtrip(c, mc_get(key, opaque=op))
                expect(r, OP_GET, op, f"client {i} re-GET")
                assert r.value == stored[key], f"client {i} re-GET {key!r}: wrong value"
            no_more(c)
        return n

    return run_threads(CLIENTS, client, timeout=25)


def test_id_rewrite_many_clients_same_opaques(memcached, daemon_factory):
    """rewrite = true: every client numbers its requests 1, 2, 3, ... (the same opaques in flight at once)."""
    daemon = start_kmuxd(daemon_factory, memcached, **id_group(rewrite=True))
    counts = lockstep_workload(daemon, rounds=150, opaque_of=lambda i, n: n, seed=1)
    assert counts == [320] * CLIENTS
    assert_request_counters(daemon)


def test_id_rewrite_constant_opaque(memcached, daemon_factory):
    """rewrite = true: every request of every client carries opaque 0x1234."""
    daemon = start_kmuxd(daemon_factory, memcached, **id_group(rewrite=True))
    lockstep_workload(daemon, rounds=60, opaque_of=lambda i, n: 0x1234, seed=2)
    assert_request_counters(daemon)


def test_id_no_rewrite_distinct_opaques(memcached, daemon_factory):
    """rewrite = false: each client uses its own opaques (client in the high bits), ids pass unchanged."""
    daemon = start_kmuxd(daemon_factory, memcached, **id_group(rewrite=False))
    lockstep_workload(daemon, rounds=150, opaque_of=lambda i, n: ((i + 1) << 20) | n, seed=3)
    assert_request_counters(daemon)


@pytest.mark.parametrize("rewrite", [True, False], ids=["rewrite", "no-rewrite"])
def test_id_pipelined_50_in_flight(memcached, daemon_factory, rewrite):
    """Each client sends 50 requests (SETs of new keys mixed with GETs of the last batch's keys,
    shuffled), then reads 50 responses, which may come in any order, and matches them by opaque."""
    daemon = start_kmuxd(daemon_factory, memcached, **id_group(rewrite=rewrite))
    tag = os.urandom(4).hex()
    batches, per_batch = 6, 50

    def client(i: int) -> None:
        rng = random.Random(100 + i)
        base = 0 if rewrite else (i + 1) << 20  # with rewrite, all clients use opaques 1..50
        stored: dict[bytes, bytes] = {}
        previous: list[bytes] = []
        with daemon.connect(receive=True, name=f"pipe{i}") as c:
            for b in range(batches):
                plan: list[tuple[int, bytes, bytes | None]] = []  # (opcode, key, value set)
                fresh = [f"{tag}:c{i}:b{b}:{k}".encode() for k in range(per_batch - len(previous))]
                plan += [(OP_SET, k, random_value(rng)) for k in fresh]
                plan += [(OP_GET, k, None) for k in previous]
                rng.shuffle(plan)
                opaques = [base + o for o in rng.sample(range(1, per_batch + 1), per_batch)]
                pending: dict[int, tuple[int, bytes, bytes | None]] = {}
                for op, (opcode, key, value) in zip(opaques, plan):
                    c.send(mc_set(key, value, opaque=op) if opcode == OP_SET else mc_get(key, opaque=op))
                    pending[op] = (opcode, key, value)
                for _ in range(per_batch):
                    r = mc_parse(c.recv(timeout=RECV_TIMEOUT))
                    assert r.opaque in pending, (
                        f"client {i} batch {b}: response with opaque {r.opaque:#x}, which it has not got in flight"
                    )
                    opcode, key, value = pending.pop(r.opaque)
                    expect(r, opcode, r.opaque, f"client {i} batch {b} {key!r}")
                    if opcode == OP_SET:
                        stored[key] = value
                    else:
                        assert r.value == stored[key], f"client {i} batch {b}: GET {key!r} returned another value"
                assert not pending
                previous = fresh[: per_batch // 2]
            no_more(c)

    run_threads(CLIENTS, client, timeout=25)
    assert_request_counters(daemon)


def test_fifo_many_clients(memcached, daemon_factory):
    """steering = "fifo": opaque 0 on every request; responses find their client by request order."""
    daemon = start_kmuxd(daemon_factory, memcached, **fifo_group())
    lockstep_workload(daemon, rounds=150, opaque_of=lambda i, n: 0, seed=4)
    assert_request_counters(daemon)


def test_fifo_pipelined_in_order_one_connection(memcached, daemon_factory):
    """fifo over one TCP connection: each client pipelines SET k / GET k pairs (opaque 0) and must
    get the responses back in exactly the order it sent the requests."""
    daemon = start_kmuxd(daemon_factory, memcached, **fifo_group(connections=1))
    tag = os.urandom(4).hex()

    def client(i: int) -> None:
        rng = random.Random(200 + i)
        with daemon.connect(receive=True, name=f"fifo{i}") as c:
            for b in range(5):
                expected: list[tuple[int, bytes | None]] = []
                for k in range(25):
                    key = f"{tag}:c{i}:b{b}:{k}".encode()
                    value = random_value(rng)
                    c.send(mc_set(key, value))
                    c.send(mc_get(key))
                    expected += [(OP_SET, None), (OP_GET, value)]
                for n, (opcode, value) in enumerate(expected):
                    r = mc_parse(c.recv(timeout=RECV_TIMEOUT))
                    expect(r, opcode, 0, f"client {i} batch {b} response #{n}")
                    if value is not None:
                        assert r.value == value, f"client {i} batch {b} response #{n}: another request's value"
            no_more(c)

    run_threads(CLIENTS, client, timeout=25)
    assert_request_counters(daemon)


def test_fifo_pipelined_four_connections(memcached, daemon_factory):
    """fifo over four connections: 50 pipelined GETs (opaque 0) of the client's own keys; the
    50 responses are exactly the client's 50 values (order across connections is not promised)."""
    daemon = start_kmuxd(daemon_factory, memcached, **fifo_group(connections=4))
    tag = os.urandom(4).hex()

    def client(i: int) -> None:
        rng = random.Random(300 + i)
        with daemon.connect(receive=True, name=f"fifo{i}") as c:
            values = {}
            for k in range(50):
                key = f"{tag}:c{i}:{k}".encode()
                values[key] = random_value(rng) + key  # distinct values
                expect(roundtrip(c, mc_set(key, values[key])), OP_SET, 0, f"client {i} SET {k}")
            for _ in range(3):
                keys = list(values)
                rng.shuffle(keys)
                for key in keys:
                    c.send(mc_get(key))
                got = []
                for _ in keys:
                    r = mc_parse(c.recv(timeout=RECV_TIMEOUT))
                    expect(r, OP_GET, 0, f"client {i} GET")
                    got.append(r.value)
                assert sorted(got) == sorted(values.values()), f"client {i}: the 50 responses are not its 50 values"
            no_more(c)

    run_threads(CLIENTS, client, timeout=25)
    assert_request_counters(daemon)


# -- per-request failures, caused by the real server stopping or dying -------------------------------


def test_id_request_timeout_then_late_response_discarded(memcached, daemon_factory):
    """A stopped server: the request times out (RequestTimeout naming its seq and the client's id);
    the response that comes after the server resumes is discarded, and the next request works."""
    daemon = start_kmuxd(daemon_factory, memcached, **id_group(rewrite=True, request_timeout=0.5))
    key = b"late:" + os.urandom(4).hex().encode()
    with daemon.connect(receive=True, name="late") as c, daemon.connect(receive=True, name="other") as other:
        expect(roundtrip(c, mc_set(key, b"v1", opaque=5)), OP_SET, 5, "SET before the stop")
        memcached.pause()
        try:
            seq = c.send(mc_get(key, opaque=7))
            other.send(mc_get(key, opaque=7))
            t0 = time.monotonic()
            with pytest.raises(kmux.RequestTimeout) as info:
                c.recv(timeout=RECV_TIMEOUT)
            waited = time.monotonic() - t0
            assert info.value.seq == seq
            assert info.value.details.get("id") == 7, info.value.details
            assert 0.3 <= waited <= 3.0, f"request_timeout 0.5 s fired after {waited:.2f}s"
            with pytest.raises(kmux.RequestTimeout):
                other.recv(timeout=RECV_TIMEOUT)
        finally:
            memcached.resume()
        # Both late responses came back and were discarded (counted), not delivered to anyone.
        wait_until(lambda: group_stats(daemon)["late_responses"] == 2, 5.0, "the late responses")
        no_more(c, wait=0.1)
        no_more(other, wait=0.1)
        r = roundtrip(c, mc_get(key, opaque=7))
        expect(r, OP_GET, 7, "GET after the resume")
        assert r.value == b"v1"
        no_more(c)
    assert_request_counters(daemon, requests_timed_out=2, late_responses=2)


def test_id_no_rewrite_id_in_use(memcached, daemon_factory):
    """rewrite = false: a second request with an opaque already in flight (from another client) is
    refused with id_in_use and never written; the first one is answered normally."""
    daemon = start_kmuxd(daemon_factory, memcached, **id_group(rewrite=False))
    key = b"inuse:" + os.urandom(4).hex().encode()
    with daemon.connect(receive=True, name="first") as a, daemon.connect(receive=True, name="second") as b:
        expect(roundtrip(a, mc_set(key, b"A", opaque=1)), OP_SET, 1, "SET")
        memcached.pause()
        try:
            a.send(mc_get(key, opaque=99))
            # a's request holds opaque 99 (the server is stopped, so it stays in flight).
            wait_until(lambda: group_stats(daemon)["requests_in_flight"] == 1, 5.0, "a's request in flight")
            seq = b.send(mc_set(key, b"B", opaque=99))
            with pytest.raises(kmux_errors.error_class("id_in_use")) as info:
                b.recv(timeout=RECV_TIMEOUT)
            assert info.value.code == "id_in_use"
            assert info.value.seq == seq
        finally:
            memcached.resume()
        r = mc_parse(a.recv(timeout=RECV_TIMEOUT))
        expect(r, OP_GET, 99, "the first request")
        assert r.value == b"A", "the refused SET was written after all"
        no_more(b, wait=0.2)
        expect(roundtrip(b, mc_set(key, b"B", opaque=99)), OP_SET, 99, "the id is free again")
        no_more(a)
    assert_request_counters(daemon)


@pytest.mark.parametrize("steering", ["id", "fifo"])
def test_server_killed_requests_in_flight_get_connection_lost(memcached, daemon_factory, steering):
    """The server dies with requests in flight on every connection: each client gets ConnectionLost
    for each of its requests (by seq), and no response from anyone else."""
    # Four requests of each of the four clients in flight at once: past client_max_in_flight_contended.
    group = {**(id_group(rewrite=True) if steering == "id" else fifo_group()), "client_max_in_flight_contended": 0}
    daemon = start_kmuxd(daemon_factory, memcached, **group)
    clients = [daemon.connect(receive=True, name=f"lost{i}") for i in range(4)]
    try:
        for i, c in enumerate(clients):
            expect(roundtrip(c, mc_set(b"k%d" % i, b"v", opaque=1 if steering == "id" else 0)), OP_SET,
                   1 if steering == "id" else 0, "warm-up SET")
        memcached.pause()
        sent: list[set[int]] = []
        for c in clients:
            sent.append({c.send(mc_get(b"k%d" % n, opaque=n + 1 if steering == "id" else 0)) for n in range(4)})
        # Every request written to a connection (the stopped server's kernel takes them) before it dies.
        wait_until(lambda: sum(c["in_flight"] for c in group_stats(daemon)["connections"]) == 16, 5.0,
                   "16 requests written")
        memcached.stop()  # SIGKILL: the kernel closes its sockets
        for i, c in enumerate(clients):
            lost = set()
            for _ in range(4):
                with pytest.raises(kmux.ConnectionLost) as info:
                    c.recv(timeout=RECV_TIMEOUT)
                lost.add(info.value.seq)
            assert lost == sent[i], f"client {i}: connection_lost for seqs {lost}, sent {sent[i]}"
            no_more(c, wait=0.05)
        assert_request_counters(daemon, requests_failed=16)
    finally:
        for c in clients:
            c.close()


#: The value the issue's run stored: 200,000 bytes, a 200,028-byte GET response (24 + 4 + value).
BIG_VALUE = 200_000
OVERSIZE_CLIENTS = 8
OVERSIZE_PER_CLIENT = 20


def store_directly(server, key: bytes, value: bytes) -> None:
    """SET straight to memcached, not through kmuxd (a value kmuxd could never carry)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5.0) as s:
        s.sendall(mc_set(key, value, opaque=0x51))
        head = recv_exact(s, MC_HEADER.size)
        r = mc_parse(head + recv_exact(s, MC_HEADER.unpack(head)[6]))
    expect(r, OP_SET, 0x51, "the direct SET")


@pytest.mark.parametrize("steering", ["fifo", "id"])
def test_a_value_over_max_message_is_skipped_and_every_request_in_flight_beside_it_answered(
        short_dir, daemon_factory, steering):
    """The issue's run: a 200 KB value stored straight into memcached (started with -I 2m), fetched
    through a group with max_message = 65536 and one connection, while other clients' requests are
    in flight on it. The asker gets response_too_big naming its seq; every other request its answer;
    the connection is the same one afterwards (its local port, no reconnect, no endpoint failure)."""
    server = start_memcached(short_dir, "-I", "2m")
    try:
        tag = os.urandom(4).hex().encode()
        big_key = b"%s:big" % tag
        store_directly(server, big_key, os.urandom(BIG_VALUE))
        values = {i: {k: os.urandom(64 + 37 * k) for k in range(OVERSIZE_PER_CLIENT)} for i in range(OVERSIZE_CLIENTS)}
        for i, kv in values.items():
            for k, v in kv.items():
                store_directly(server, b"%s:c%d:k%d" % (tag, i, k), v)
        group = id_group(rewrite=True) if steering == "id" else fifo_group()
        # Every client's requests in flight together: past client_max_in_flight_contended.
        daemon = start_kmuxd(daemon_factory, server, **{**group, "connections": 1, "max_message": 65536,
                                                        "client_max_in_flight_contended": 0})
        (conn,) = group_stats(daemon)["connections"]
        port = local_port(conn)
        clients = [daemon.connect(name=f"mc{i}") for i in range(OVERSIZE_CLIENTS)]
        asker = daemon.connect(name="asker")
        try:
            op = (lambda n: n) if steering == "id" else (lambda n: 0)
            server.pause()  # everything sent now is in flight together on the one connection
            sent: dict[int, list[tuple[int, int]]] = {}
            for k in range(OVERSIZE_PER_CLIENT):  # interleaved: the big GET sits among the others
                for i, c in enumerate(clients):
                    c.send(mc_get(b"%s:c%d:k%d" % (tag, i, k), opaque=op(1000 * i + k + 1)))
                    sent.setdefault(i, []).append((k, op(1000 * i + k + 1)))
                if k == OVERSIZE_PER_CLIENT // 2:
                    asker.send(mc_get(b"%s:c0:k0" % tag, opaque=op(7)))
                    big_seq = asker.send(mc_get(big_key, opaque=op(8)))
                    asker.send(mc_get(b"%s:c1:k1" % tag, opaque=op(9)))
            total = OVERSIZE_CLIENTS * OVERSIZE_PER_CLIENT + 3
            in_flight = wait_until(lambda: (g := group_stats(daemon))["requests_in_flight"] == total
                                   and g["requests_in_flight"], 5.0, "every request in flight")
            server.resume()
            answers = 0
            for i, c in enumerate(clients):
                for k, opaque in sent[i]:
                    r = mc_parse(c.recv(timeout=RECV_TIMEOUT))
                    expect(r, OP_GET, opaque, f"client {i} GET #{k}")
                    assert r.value == values[i][k], f"client {i} GET #{k}: another request's value"
                    answers += 1
                no_more(c, wait=0.05)
            r = mc_parse(asker.recv(timeout=RECV_TIMEOUT))
            expect(r, OP_GET, op(7), "the asker's GET before the big one")
            assert r.value == values[0][0]
            with pytest.raises(kmux.ResponseTooBig) as info:
                asker.recv(timeout=RECV_TIMEOUT)
            r = mc_parse(asker.recv(timeout=RECV_TIMEOUT))
            expect(r, OP_GET, op(9), "the asker's GET after the big one")
            assert r.value == values[1][1]
            answers += 2
            # It carries on: the same connection serves the next requests, the big one again included.
            expect(roundtrip(clients[3], mc_get(b"%s:c3:k5" % tag, opaque=op(77))), OP_GET, op(77), "after")
            clients[4].send(mc_get(big_key, opaque=op(78)))
            with pytest.raises(kmux.ResponseTooBig):
                clients[4].recv(timeout=RECV_TIMEOUT)
        finally:
            server.resume()
            for c in [*clients, asker]:
                c.close()
        err = info.value
        size = MC_HEADER.size + 4 + BIG_VALUE  # header, flags, value
        assert (err.seq, err.details["size"], err.details["max_message"]) == (big_seq, size, 65536), err
        if steering == "id":
            assert err.details["id"] == 8
        g = assert_request_counters(daemon)
        (conn,) = g["connections"]
        (health,) = g["endpoint_health"]
        assert (local_port(conn), conn["reconnects"], conn["last_error"]) == (port, 0, None), conn
        assert (health["state"], health["failures"], health["reason"]) == ("healthy", 0, None), health
        assert (g["skipped_msgs"], g["skipped_bytes"]) == (2, 2 * size)
        assert not daemon.logs("connection_failed") and not daemon.logs("connection_closed")
        print(f"memcached {steering}: {OVERSIZE_CLIENTS} clients + the asker, {in_flight} requests in flight "
              f"on one connection (local port {port}), {answers} answers, the asker's notice: {err}")
    finally:
        server.stop()
