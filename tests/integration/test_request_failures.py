"""Request/response steering when a server or a client fails: every request ends in exactly one outcome.

A real kmuxd subprocess, real SEQPACKET clients, real loopback TCP servers
that drop (FIN), reset (RST), stall or answer late on cue
(:class:`reqresp.FaultServer`).

The contract under test (docs/config.md, docs/protocol.md):

* every request a client hands over ends in exactly one outcome: its
  response, or one error notice naming its ``seq`` (``connection_lost``,
  ``request_timeout``; in id mode with the client's ``id``);
* a response goes only to the client whose request it answers (id: by id,
  restored if rewritten; fifo: the oldest outstanding request on the
  connection it came from);
* responses that match nothing are counted and dropped (or balanced);
  late responses (after ``request_timeout``) and responses for clients that
  left are discarded;
* a dead endpoint costs dials on an exponential back-off, nothing else.

Here: connections closed or reset part-way (``connection_lost``, and never
a response the server did not send whole), a stalled server
(``request_timeout``), late responses (discarded, the stream stays in
step), responses read after the write side saw a reset (never reach
anyone), a client that dies (its responses discarded, the others'
untouched) and an endpoint down at start (bounded dials).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

from .helpers import wait_flat, wait_until
from .reqresp import (
    MAX,
    Fault,
    FaultServer,
    Ledger,
    RequestClient,
    assert_exactly_one_outcome,
    first_n,
    group_stats,
    header_size,
    make_req,
    parse_resp,
    rr_group,
    run_clients,
    summarize_req,
)

MODES = ["id", "fifo"]


def _check_against_server(ledgers: list[Ledger], server: FaultServer, *, strict: bool) -> None:
    """A request is answered iff the server wrote its whole echo (strict), or at least only then."""
    received, answered, _ = server.snapshot()
    assert not server.errors, server.errors
    dup = [k for k, v in Counter((c, s) for _, c, s in received).items() if v > 1]
    assert not dup, f"requests read whole by the server twice (retried after being written): {dup[:5]}"
    echoed = {(c, s) for _, c, s in answered}
    for led in ledgers:
        for seq in led.sent:
            got = led.outcomes(seq)
            if got == ["response"]:
                assert (led.cid, seq) in echoed, f"client {led.cid} seq {seq}: a response the server never sent"
            elif strict:
                assert (led.cid, seq) not in echoed, f"client {led.cid} seq {seq}: echoed whole before a FIN, yet {got}"


@pytest.mark.parametrize("mode", MODES)
def test_fin_part_way_written_requests_get_connection_lost(fault_servers, daemon_factory, mode):
    """(a) The first connections answer a few frames, then FIN (half of them after half an echo)."""
    server = fault_servers(first_n(4, lambda k: Fault("fin_mid" if k % 2 else "fin", after=3 + k)))
    daemon = daemon_factory({"g": rr_group([server.address], mode)})

    ledgers = run_clients(daemon, 3, 60, window=6, mode=mode, seed=4, pick_id=lambda used: min(set(range(100, 110)) - used))

    codes = assert_exactly_one_outcome(ledgers, {"connection_lost"})
    _check_against_server(ledgers, server, strict=True)
    _, _, faults = server.snapshot()
    assert faults["fin"] + faults["fin_mid"] >= 2, faults
    # Each fault closed a connection after reading a request whole and not answering it.
    assert codes["connection_lost"] >= faults["fin"] + faults["fin_mid"], (codes, faults)
    for led in ledgers:
        for seq, lst in led.notices.items():
            for code, details in lst:
                assert details.get("seq") == seq
                if mode == "id":
                    assert details.get("id") == led.sent[seq]
    g = group_stats(daemon)
    if "requests_failed" in g:
        assert g["requests_failed"] == codes["connection_lost"]


@pytest.mark.parametrize("mode", MODES)
def test_rst_written_requests_get_connection_lost(fault_servers, daemon_factory, mode):
    """(b) The first connections reset (RST) part-way, some after half an echo."""
    server = fault_servers(first_n(4, lambda k: Fault("rst_mid" if k % 2 else "rst", after=2 + 2 * k)))
    daemon = daemon_factory({"g": rr_group([server.address], mode)})

    ledgers = run_clients(daemon, 3, 60, window=6, mode=mode, seed=5)

    codes = assert_exactly_one_outcome(ledgers, {"connection_lost"})
    _check_against_server(ledgers, server, strict=False)
    _, _, faults = server.snapshot()
    assert faults["rst"] + faults["rst_mid"] >= 2, faults
    assert codes["connection_lost"] >= 1
    assert sum(len(led.responses) for led in ledgers) > 0


@pytest.mark.parametrize("mode", MODES)
def test_stalled_server_request_timeout(fault_servers, daemon_factory, mode):
    """(c) Every connection answers two frames, then reads on and answers nothing: request_timeout."""
    timeout = 0.3
    server = fault_servers(lambda k: Fault("stall", after=2, hold=30.0))
    daemon = daemon_factory({"g": rr_group([server.address], mode, request_timeout=timeout)})

    ledgers = run_clients(daemon, 2, 24, window=6, mode=mode, seed=6, deadline=10)

    codes = assert_exactly_one_outcome(ledgers, {"request_timeout"})
    assert codes["request_timeout"] >= 24 * 2 - 4 * 2, codes  # at most 2 answers per connection
    _check_against_server(ledgers, server, strict=True)
    for led in ledgers:
        for seq, lst in led.notices.items():
            waited = led.outcome_at[seq] - led.sent_at[seq]
            assert timeout * 0.9 <= waited <= timeout + 1.5, f"request_timeout after {waited:.3f}s (timeout {timeout})"
            if mode == "id":
                assert lst[0][1].get("id") == led.sent[seq]
    g = group_stats(daemon)
    if "requests_timed_out" in g:
        assert g["requests_timed_out"] == codes["request_timeout"]


@pytest.mark.parametrize("mode", MODES)
def test_late_responses_discarded_and_stream_stays_matched(fault_servers, daemon_factory, mode):
    """(c) One connection: 2 answers, then answers held 0.8 s (request_timeout 0.3 s): the late
    answers are discarded and counted, and later requests on the same stream still match."""
    server = fault_servers(lambda k: Fault("late", after=2, hold=0.8) if k == 0 else None)
    daemon = daemon_factory({"g": rr_group([server.address], mode, connections=1, request_timeout=0.3)})
    wait_until(lambda: server.accepted == 1, 5, "the connection")
    c = RequestClient(daemon, 1, 10, window=10, mode=mode, seed=7, deadline=5)
    try:
        led = c.join()
        assert_exactly_one_outcome([led], {"request_timeout"})
        assert sorted(led.responses) == [1, 2], led.responses
        assert sorted(led.notices) == list(range(3, 11))
        wait_until(lambda: len(server.snapshot()[1]) == 10, 5, "the held answers sent")
        # The same stream, after the late answers: still in step.
        c.count, c.window = 20, 4
        c.thread = threading.Thread(target=c._run, daemon=True)
        c.thread.start()
        led = c.join()
        assert_exactly_one_outcome([led], {"request_timeout"})
        assert sorted(led.responses) == [1, 2, *range(11, 21)], led.responses
        with pytest.raises(TimeoutError):
            c.client.recv(timeout=0.3)
    finally:
        c.close()
    g = group_stats(daemon)
    assert g.get("unmatched_responses", 0) == 0, g
    if "late_responses" in g:
        assert g["late_responses"] == 8, g
    else:  # pragma: no cover - the statistic is optional in the contract
        pytest.fail("no late_responses statistic")


def _max_dials(uptime: float, initial: float, maximum: float) -> int:
    """Most dials one back-off schedule allows in ``uptime`` s: the first at once, then after
    delays initial*2^k (capped at ``maximum``), each jittered into [d/2, d]."""
    dials, t, k = 1, 0.0, 0
    while True:
        t += min(maximum, initial * 2**k) / 2
        if t > uptime:
            return dials
        dials, k = dials + 1, k + 1


@pytest.mark.parametrize("mode", MODES)
def test_endpoint_down_at_start_costs_bounded_dials(backend_factory, daemon_factory, refusing_port, mode):
    """(d) endpoints = [dead, live]: traffic flows through the live one; the dead endpoint's
    dial failures grow on the exponential back-off (at most ~log2(T/initial)+1 per slot)."""
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    initial, maximum, conns = 0.05, 30.0, 4
    daemon = daemon_factory({"g": rr_group([f"127.0.0.1:{refusing_port}", backend.address], mode, connections=conns,
                                           reconnect_initial=initial, reconnect_max=maximum)})
    wait_until(lambda: len(backend.open_ids()) >= conns // 2, 5, "the live endpoint's connections")
    ledgers = run_clients(daemon, 3, 40, window=4, mode=mode, seed=8, deadline=10)
    assert_exactly_one_outcome(ledgers)
    assert sum(len(led.responses) for led in ledgers) == 120
    # The bound is on failures over the daemon's uptime: let the dead endpoint fail for 2 s at least.
    time.sleep(max(0.0, 2.0 - group_stats(daemon)["uptime"]))
    g = group_stats(daemon)
    per_slot = _max_dials(g["uptime"], initial, maximum)
    failures = sum(c["dial_failures"] for c in g["connections"])
    # Slots start on endpoints round robin: conns/2 of them on the dead one (a daemon that
    # moves slots to healthy endpoints only dials less).
    bound = per_slot * (conns // 2)
    assert 1 <= failures <= bound, (
        f"{failures} dial failures in {g['uptime']:.2f}s; at most {per_slot} per slot ({bound} in all) expected: "
        + str([(c["index"], c["endpoint"], c["dial_failures"]) for c in g["connections"]])
    )
    assert g["connections_up"] >= conns // 2
    print(f"dead endpoint: {failures} dial failures in {g['uptime']:.2f}s (bound {bound})")


# -- client death ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_dead_client_responses_discarded_others_untouched(backend_factory, daemon_factory, mode):
    """A client that stops reading holds back nobody (its responses wait in its own queue);
    once it dies, its responses are discarded and the others get exactly theirs, in order."""
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], mode, connections=1)})
    backend.wait_open(1)
    rng = random.Random(11)
    hog, other = daemon.connect(name="hog"), daemon.connect(name="other")
    try:
        for seq in range(1, 41):  # ~2.4 MB of responses: more than hog's socket holds
            hog.send(make_req(1, seq, seq, 60000, rng))
        for seq in range(1, 21):
            other.send(make_req(2, seq, 1000 + seq, 200, rng))
        backend.wait_count(60, timeout=10)
        hog.close()
        got = []
        end = time.monotonic() + 10
        while len(got) < 20 and time.monotonic() < end:
            try:
                got.append(parse_resp(other.recv(timeout=0.5)))
            except TimeoutError:
                pass
        assert got == [(1000 + s, 2, s) for s in range(1, 21)], got[:5]
        with pytest.raises(TimeoutError):
            other.recv(timeout=0.3)
        g = wait_flat(lambda: group_stats(daemon).get("requests_in_flight", 0), 0.2, 5)
        assert g == 0
        # A newcomer is served normally.
        with daemon.connect(name="new") as c:
            c.send(make_req(3, 1, 4, 64, rng))
            assert parse_resp(c.recv(timeout=5))[1:] == (3, 1)
        gs = group_stats(daemon)
        assert gs.get("unmatched_responses", 0) == 0
        if "dropped_responses" in gs:
            assert gs["dropped_responses"] >= 1
    finally:
        hog.close()
        other.close()


# -- responses read after their connection was failed ---------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_responses_after_write_side_reset_never_reach_anyone(fault_servers, daemon_factory, mode):
    """Connections reset (RST) right after answering a few frames, while clients keep writing:
    the server never sends a frame nobody asked for, so nothing may be unmatched, and with
    unmatched = "balance" nobody may get a response it did not ask for.

    Regression: when the write side saw the reset first (ConnSlot.flush_nowait -> fail ->
    Group.fail_requests: connection_lost for every written request), the reader task, already
    scheduled, went on parsing the answers still in the socket's receive queue; they matched
    nothing, were counted unmatched and balanced to other clients (a second outcome, or another
    client's response). Fixed by ConnSlot._take_arrived_responses (answers that arrived are
    steered before the rest is failed)."""
    server = fault_servers(lambda k: Fault("rst", after=random.Random(k).randint(2, 12)) if k < 400 else None)
    daemon = daemon_factory({"g": rr_group([server.address], mode, unmatched="balance",
                                           reconnect_initial=0.005, reconnect_max=0.01)})

    ledgers = run_clients(daemon, 6, 400, window=8, mode=mode, seed=12, deadline=8,
                          size=lambda r: r.randint(header_size(), 300))

    g = group_stats(daemon)
    anomalies = [a for led in ledgers for a in led.anomalies]
    assert (g["unmatched_responses"], len(anomalies)) == (0, 0), (
        f"{g['unmatched_responses']} unmatched responses; {len(anomalies)} misdelivered, first {anomalies[:3]}"
    )
    assert_exactly_one_outcome(ledgers, {"connection_lost"})

