"""Real DNS servers (unbound and dnsmasq, the Debian packages) behind kmuxd, over DNS-over-TCP.

The server serves the local zone ``kmux.test`` (``host{i}.kmux.test -> 10.x.y.z``,
plain data; names outside it are NXDOMAIN, nothing is forwarded) on a loopback port. kmuxd's group uses
``framing = "u16be"`` and ``steering = "id"`` on the 16-bit DNS id right after
the length prefix, with ``rewrite = true``. Dozens of clients deliberately use
the same query ids at the same time; every answer must carry the id its
client sent, repeat that client's own question, and hold the right address.
"""

from __future__ import annotations

import random
from typing import Any

import kmux

from . import DnsAnswer, dns_parse, dns_query, dns_question, run_threads
from .conftest import ZONE_DOMAIN, assert_request_counters, start_kmuxd

CLIENTS = 32
RECV_TIMEOUT = 5.0
RCODE_NXDOMAIN = 3


def dns_group(**kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "framing": "u16be",
        "steering": "id",
        "id": {"request_offset": 2, "response_offset": 2, "size": 2, "rewrite": True},
        "unmatched": "drop",
        "request_timeout": 10.0,
    }
    cfg.update(kw)
    return cfg


def check_answer(a: DnsAnswer, qid: int, name: str, records: dict[str, str], who: str) -> None:
    assert a.id == qid, f"{who}: answer id {a.id:#06x}, query id {qid:#06x}"
    assert a.question == dns_question(name), f"{who}: asked {name!r}, the answer repeats the question {a.question!r}"
    if name in records:
        assert a.rcode == 0, f"{who}: rcode {a.rcode} for {name}"
        assert a.addresses == (records[name],), f"{who}: {name} -> {a.addresses}, expected {records[name]}"
    else:
        assert a.rcode == RCODE_NXDOMAIN and a.addresses == (), f"{who}: {name} (not in the zone) -> {a}"


def no_more(c: kmux.Client, who: str, wait: float = 0.2) -> None:
    try:
        extra = c.recv(timeout=wait)
    except TimeoutError:
        return
    raise AssertionError(f"{who}: got an answer it did not ask for: {dns_parse(extra)}")


def names_for(i: int, count: int, records: dict[str, str], rng: random.Random, start: int = 0) -> list[str]:
    """Client ``i``'s questions: names of the zone no other client asks for, and a few that do not exist."""
    zone = sorted(records)
    assert len(zone) >= CLIENTS * (start + count), "the zone is too small for distinct questions"
    mine = [zone[i + CLIENTS * k] for k in range(start, start + count)]
    for k in rng.sample(range(count), max(1, count // 10)):
        mine[k] = f"missing-c{i}-{start + k}.{ZONE_DOMAIN}"
    return mine


def test_same_id_everywhere_lockstep(unbound, daemon_factory):
    """32 clients, every query of every client has id 0x1234; each asks and waits, 40 times."""
    daemon = start_kmuxd(daemon_factory, unbound, **dns_group())
    records = unbound.records

    def client(i: int) -> int:
        rng = random.Random(i)
        with daemon.connect(receive=True, name=f"dns{i}") as c:
            names = names_for(i, 40, records, rng)
            for n, name in enumerate(names):
                c.send(dns_query(0x1234, name))
                check_answer(dns_parse(c.recv(timeout=RECV_TIMEOUT)), 0x1234, name, records, f"client {i} query {n}")
            no_more(c, f"client {i}")
        return len(names)

    assert sum(run_threads(CLIENTS, client, timeout=25)) == CLIENTS * 40
    assert_request_counters(daemon)


def test_ids_1_to_4_pipelined(unbound, daemon_factory):
    """32 clients each put 16 queries in flight at once with ids 1..4 (so four of its own queries,
    and 128 of everyone's, share each id), then read 16 answers in whatever order they come and
    match each by its question."""
    daemon = start_kmuxd(daemon_factory, unbound, **dns_group())
    records = unbound.records

    def client(i: int) -> None:
        rng = random.Random(1000 + i)
        with daemon.connect(receive=True, name=f"dns{i}") as c:
            for b in range(4):
                names = names_for(i, 16, records, rng, start=16 * b)
                rng.shuffle(names)
                pending: dict[str, int] = {}
                for n, name in enumerate(names):
                    qid = n % 4 + 1
                    c.send(dns_query(qid, name))
                    pending[name] = qid
                for _ in names:
                    a = dns_parse(c.recv(timeout=RECV_TIMEOUT))
                    asked = [nm for nm in pending if dns_question(nm) == a.question]
                    assert asked, f"client {i} batch {b}: an answer to a question it has not got in flight: {a}"
                    name = asked[0]
                    check_answer(a, pending.pop(name), name, records, f"client {i} batch {b}")
                assert not pending
            no_more(c, f"client {i}")

    run_threads(CLIENTS, client, timeout=25)
    assert_request_counters(daemon)


def test_many_clients_same_question_same_id(unbound, daemon_factory):
    """Identical queries (same id, same name) from 32 clients at once: each client gets exactly one
    answer per query it sent, none more."""
    daemon = start_kmuxd(daemon_factory, unbound, **dns_group())
    records = unbound.records
    name = sorted(records)[7]

    def client(i: int) -> None:
        with daemon.connect(receive=True, name=f"dns{i}") as c:
            for _ in range(5):
                for _ in range(3):
                    c.send(dns_query(0xBEEF, name))
                for _ in range(3):
                    check_answer(dns_parse(c.recv(timeout=RECV_TIMEOUT)), 0xBEEF, name, records, f"client {i}")
            no_more(c, f"client {i}")

    run_threads(CLIENTS, client, timeout=25)
    assert_request_counters(daemon)


def test_dnsmasq_closing_every_100_queries(dnsmasq, daemon_factory):
    """dnsmasq closes each TCP connection after 100 queries (compiled in). The queries in flight
    on a closed connection come back as ConnectionLost (seq and the client's own id); the client
    asks again, kmuxd has reconnected, and still every answer matches its own question."""
    daemon = start_kmuxd(daemon_factory, dnsmasq, **dns_group())
    records = dnsmasq.records
    clients, per_client = 16, 30  # 480 queries over 4 connections: some connection must pass 100

    def client(i: int) -> int:
        rng = random.Random(2000 + i)
        retried = 0
        with daemon.connect(receive=True, name=f"dns{i}") as c:
            for n, name in enumerate(names_for(i, per_client, records, rng)):
                for attempt in range(4):
                    seq = c.send(dns_query(0x1234, name))
                    try:
                        answer = dns_parse(c.recv(timeout=RECV_TIMEOUT))
                    except kmux.ConnectionLost as exc:
                        assert exc.seq == seq and exc.details.get("id") == 0x1234, exc
                        retried += 1
                        continue
                    check_answer(answer, 0x1234, name, records, f"client {i} query {n}")
                    break
                else:
                    raise AssertionError(f"client {i}: {name} lost 4 times")
            no_more(c, f"client {i}")
        return retried

    retried = run_threads(clients, client, timeout=25)
    reconnects = len(daemon.logs("connected")) - 4
    assert_request_counters(daemon, requests_failed=sum(retried))
    assert reconnects >= 1, "dnsmasq never closed a connection: did its 100-query limit change?"
    print(f"dnsmasq: {reconnects} reconnects, {sum(retried)} queries asked again")
