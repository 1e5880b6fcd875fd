"""Request/response steering under random faults: exactly one outcome for every request, run after run.

A real kmuxd subprocess, real SEQPACKET clients, real loopback TCP servers
(:class:`reqresp.FaultServer`) whose first connections close, reset,
stall or answer late at random points. Over ``RUNS`` runs in ``id``,
``fifo`` and ``id`` without rewrite, every request must end in exactly one
outcome (its response, or ``connection_lost``/``request_timeout``), in
order per connection, never cross-delivered, never written twice. The
totals are written to ``kmux-fault-counts.json`` in the test's own
temporary directory (pytest ``tmp_path``; the path is printed).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from typing import Any, Callable

from .reqresp import Fault, RequestClient, group_stats, req_size, rr_group

COUNTS_FILE = "kmux-fault-counts.json"

# -- 5. property: random faults, exactly one outcome each ------------------------------------------

RUNS = 20
RUN_MODES = ["id", "fifo", "id-norewrite"]
FAULTS = ["fin", "fin_mid", "rst", "rst_mid", "stall", "late"]


def _random_plan(rng: random.Random) -> Callable[[int], Fault | None]:
    """The first 6 connections: each faulty with probability 0.7; later ones healthy."""
    plans: dict[int, Fault | None] = {}
    for k in range(6):
        plans[k] = Fault(rng.choice(FAULTS), after=rng.randint(0, 30), hold=rng.uniform(0.3, 0.8)) if rng.random() < 0.7 else None
    return lambda k: plans.get(k)


def _rotating_ids(base: int, span: int) -> Callable[[set[int]], int]:
    n = 0

    def pick(used: set[int]) -> int:
        nonlocal n
        while True:
            rid, n = base + n % span, n + 1
            if rid not in used:
                return rid

    return pick


def _one_run(run: int, daemon_factory, fault_servers, detail: dict | None = None) -> dict[str, Any]:
    rng = random.Random(1000 + run)
    mode = RUN_MODES[run % len(RUN_MODES)]
    server = fault_servers(_random_plan(rng))
    kind = "fifo" if mode == "fifo" else "id"
    group = rr_group([server.address], kind, rewrite=(mode != "id-norewrite"), request_timeout=0.25,
                     connections=rng.choice([2, 3, 4]))
    daemon = daemon_factory({"g": group}, name=f"run{run}")
    n_clients = rng.randint(3, 5)
    count = rng.randint(50, 90)
    window = rng.randint(2, 8)
    if mode == "id-norewrite":
        # Ids unique across clients, rotating over 500 per client: a timed-out request keeps
        # its id until its late answer (docs), so reusing it at once would only be refused.
        pick = lambda cid: _rotating_ids(cid * 1000, 500)  # noqa: E731
    else:  # colliding ids across clients
        pick = lambda cid: (lambda used: min(set(range(1, window + 1)) - used))  # noqa: E731
    start = threading.Event()
    clients = [
        RequestClient(daemon, cid, count, window=window, mode=kind, seed=run, start=start, deadline=15,
                      pick_id=pick(cid), size=req_size)
        for cid in range(1, n_clients + 1)
    ]
    try:
        start.set()
        ledgers = [c.join() for c in clients]
    finally:
        for c in clients:
            c.close()
    received, answered, faults = server.snapshot()
    g = group_stats(daemon)
    daemon.stop()
    if detail is not None:  # for debugging a failed run
        detail.update(ledgers=ledgers, server=server, daemon=daemon, group=g)

    # Tally before asserting, so the file shows what happened even on failure.
    echoed = {(c, s) for _, c, s in answered}
    tally = {
        "run": run, "mode": mode, "clients": n_clients, "requests": 0, "responses": 0,
        "notices": Counter(), "refused": Counter(), "mismatches": 0, "missing": 0, "double_outcomes": 0,
        "order_violations": 0, "faults": dict(faults), "server_accepted": server.accepted,
        "unmatched_responses": g.get("unmatched_responses"), "late_responses": g.get("late_responses"),
        "tx_retries": g.get("tx_retries"), "problems": [],
    }
    conn_of = {(c, s): conn for conn, c, s in answered}
    for led in ledgers:
        tally["requests"] += len(led.sent)
        tally["responses"] += len(led.responses)
        tally["notices"].update(led.codes())
        tally["refused"].update(led.refused.values())
        tally["mismatches"] += len(led.anomalies)
        tally["problems"] += led.anomalies[:3]
        missing = led.missing()
        tally["missing"] += len(missing)
        if missing:
            tally["problems"].append(f"client {led.cid}: no outcome for {missing[:5]}")
        for seq in led.sent:
            if len(led.outcomes(seq)) > 1:
                tally["double_outcomes"] += 1
                tally["problems"].append(f"client {led.cid} seq {seq}: {led.outcomes(seq)}")
        for seq in led.responses:
            if (led.cid, seq) not in echoed:
                tally["mismatches"] += 1
                tally["problems"].append(f"client {led.cid} seq {seq}: a response the server never sent")
        if kind == "fifo":  # in request order per connection
            last: dict[int, int] = {}
            for seq in led.responses:
                conn = conn_of.get((led.cid, seq))
                if conn is not None:
                    if seq <= last.get(conn, 0):
                        tally["order_violations"] += 1
                        tally["problems"].append(f"client {led.cid}: seq {seq} after {last[conn]} on conn {conn}")
                    last[conn] = seq
    if server.errors:
        tally["problems"] += server.errors[:3]
    dup = [k for k, v in Counter((c, s) for _, c, s in received).items() if v > 1]
    if dup:
        tally["problems"].append(f"read whole twice by the server: {dup[:5]}")
    bad_codes = set(tally["notices"]) - {"connection_lost", "request_timeout"}
    if bad_codes:
        tally["problems"].append(f"unexpected notice codes {sorted(bad_codes)}")
    bad_refusals = set(tally["refused"]) - ({"id_in_use"} if mode == "id-norewrite" else set())
    if bad_refusals:
        tally["problems"].append(f"unexpected refusals {dict(tally['refused'])}")
    tally["notices"] = dict(tally["notices"])
    tally["refused"] = dict(tally["refused"])
    return tally


def test_random_faults_exactly_one_outcome(daemon_factory, fault_servers, capsys, tmp_path):
    """20 seeded runs (id with rewrite, fifo, id without rewrite), random sizes and windows, the
    server's connections dropping, resetting, stalling or answering late at random points."""
    t0 = time.monotonic()
    runs = [_one_run(run, daemon_factory, fault_servers) for run in range(RUNS)]
    totals = {
        "runs": len(runs),
        "requests": sum(r["requests"] for r in runs),
        "responses": sum(r["responses"] for r in runs),
        "error_notices": sum(sum(r["notices"].values()) for r in runs),
        "refused_id_in_use": sum(sum(r["refused"].values()) for r in runs),
        "by_code": dict(sum((Counter(r["notices"]) for r in runs), Counter())),
        "mismatches": sum(r["mismatches"] for r in runs),
        "missing": sum(r["missing"] for r in runs),
        "double_outcomes": sum(r["double_outcomes"] for r in runs),
        "order_violations": sum(r["order_violations"] for r in runs),
        "faults_injected": dict(sum((Counter(r["faults"]) for r in runs), Counter())),
        "unmatched_responses": sum(r["unmatched_responses"] or 0 for r in runs),
        "late_responses": sum(r["late_responses"] or 0 for r in runs),
        "seconds": round(time.monotonic() - t0, 2),
    }
    counts_file = tmp_path / COUNTS_FILE
    with open(counts_file, "w") as f:
        json.dump({"totals": totals, "runs": runs}, f, indent=1, default=str)
    with capsys.disabled():
        print(f"\nkmux fault property totals ({counts_file}): {json.dumps(totals)}")
    problems = [(r["run"], r["mode"], p) for r in runs for p in r["problems"]]
    assert not problems, f"{len(problems)} problems, first: {problems[:8]}"
    assert totals["requests"] == totals["responses"] + totals["error_notices"] + totals["refused_id_in_use"]
    assert totals["mismatches"] == totals["missing"] == totals["double_outcomes"] == totals["order_violations"] == 0
    assert totals["error_notices"] > 0 and totals["responses"] > 0

