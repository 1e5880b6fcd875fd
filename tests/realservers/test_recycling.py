"""Recycling by real servers is invisible to apps, or at least never silent (issue #10).

* **dnsmasq** closes every TCP connection after 100 queries (compiled in).
  30 app *processes* (:mod:`tests.realservers.dns_app`) pipeline 8 queries
  each, 8 rounds, all with ids 1..8 (kmuxd rewrites them), through a group
  of 4 connections with ``u16be`` framing and ``id`` steering. Run three
  ways: as is (queries in flight on a closed connection get
  ``connection_lost``), with ``max_requests_per_connection = 90`` (kmuxd
  retires a connection before dnsmasq closes it, make-before-break: nothing
  is lost), and with ``retry_unanswered = 1`` (lost queries are asked again:
  every one is answered). Meanwhile the test samples ``connections_up`` on
  the control socket and reports the longest time the group had none.
* **unbound** with a short ``tcp-idle-timeout`` and **memcached** with
  ``-o idle_timeout=N`` close connections that were idle: requests after
  such a close are answered, nothing is lost, no notice is sent.

Every run prints its figures (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import kmux

from . import OP_GET, OP_SET, STATUS_OK, dns_parse, dns_query, mc_get, mc_parse, mc_set
from .conftest import group_stats, start_kmuxd, start_memcached, start_unbound
from .test_dns import check_answer, dns_group

APPS = 30
ROUNDS = 8
PIPELINE = 8
#: Seconds every app together may take (the run takes about a second; a loaded CI machine more).
RUN_TIMEOUT = 60.0
#: Seconds between samples of connections_up.
SAMPLE_EVERY = 0.005
#: The longest stretch with no connection up that still counts as "a moment". A recycle
#: redials at once, but every dial spends a token of max_dials_per_second (default 10: one
#: dial per 0.1 s once the burst is spent), and dnsmasq here recycles ~20 connections a second;
#: a failure would wait a back-off step on top (reconnect_initial 0.5 s below).
MOMENT = 0.5
REPO = Path(__file__).resolve().parents[2]


class UpSampler:
    """Samples the group's connections_up on the control socket until stopped."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from kmux.control import ControlClient

        try:
            with ControlClient(self.daemon.control_socket, timeout=5.0) as c:
                while not self._stop.is_set():
                    (g,) = [g for g in c.request("stats", group="g")["groups"] if g["name"] == "g"]
                    self.samples.append((time.monotonic(), g["connections_up"]))
                    self._stop.wait(SAMPLE_EVERY)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self) -> float:
        """Stop; the longest time (s) between a sample at 0 up and the next sample above 0."""
        self._stop.set()
        self._thread.join(10)
        assert self.error is None, f"sampling failed: {self.error!r}"
        assert len(self.samples) > 10, "too few samples of connections_up"
        longest, down_since = 0.0, None
        for t, up in self.samples:
            if up == 0 and down_since is None:
                down_since = t
            elif up > 0 and down_since is not None:
                longest = max(longest, t - down_since)
                down_since = None
        if down_since is not None:
            longest = max(longest, self.samples[-1][0] - down_since)
        return longest


def run_dns_apps(daemon, records: dict[str, str]) -> tuple[Counter, list[str], float]:
    """Start the apps, release them together, collect their counts; also the longest time at 0 up."""
    zone = sorted(records)
    procs = []
    for i in range(APPS):
        names = [zone[(i * 37 + k) % len(zone)] for k in range(ROUNDS * PIPELINE)]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.realservers.dns_app", daemon.socket_path, "g", str(i), str(ROUNDS),
             str(PIPELINE), json.dumps(names)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    try:
        for p in procs:
            line = p.stdout.readline()
            assert line == "ready\n", (line, p.stderr.read() if p.poll() is not None else "")
        sampler = UpSampler(daemon)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        totals: Counter = Counter()
        problems: list[str] = []
        deadline = time.monotonic() + RUN_TIMEOUT
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert p.returncode == 0, f"app exited {p.returncode}: {err[-2000:]}"
            result = json.loads(out.splitlines()[-1])
            totals.update(result["counts"])
            problems += result["problems"]
        longest_down = sampler.stop()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    return totals, problems, longest_down


RUNS = {
    "plain": {},
    "max_requests_90": {"max_requests_per_connection": 90},
    "retry_1": {"retry_unanswered": 1},
}


@pytest.mark.parametrize("run", [
    "plain",
    "max_requests_90",
    "retry_1",
])
def test_dnsmasq_30_apps_pipelining_through_its_100_query_limit(dnsmasq, daemon_factory, run):
    daemon = start_kmuxd(daemon_factory, dnsmasq, **dns_group(request_timeout=10.0, reconnect_initial=0.5,
                                                               reconnect_max=2.0, **RUNS[run]))
    totals, problems, longest_down = run_dns_apps(daemon, dnsmasq.records)
    g = group_stats(daemon)
    queries = APPS * ROUNDS * PIPELINE
    lost = totals["connection_lost"]
    figures = (f"dnsmasq {run}: {totals['queries']} queries, {totals['answers']} answers, {lost} connection_lost, "
               f"{g['requests_retried']} retried, {totals['timeouts']} timeouts (+{totals['request_timeout']} "
               f"request_timeout), {totals['mismatches']} mismatches; {g['recycles']} recycles; "
               f"longest with no connection up {longest_down * 1000:.0f} ms")
    print(figures)
    assert totals["queries"] == queries, figures
    assert not problems, f"{figures}; e.g. {problems[:3]}"
    assert totals["timeouts"] == 0 and totals["request_timeout"] == 0 and totals["mismatches"] == 0, figures
    assert totals["answers"] + lost == queries, f"{figures}; other outcomes: {dict(totals)}"
    assert g["requests_failed"] == lost and g["requests_in_flight"] == 0, g
    assert g["recycles"] >= 1, "no connection was recycled: did dnsmasq's 100-query limit change?"
    health = g["endpoint_health"][0]
    # dnsmasq answers its 100th query and closes (FIN); writes that follow draw its reset (EPIPE):
    # a recycle all the same, never a failure.
    assert health["state"] == "healthy" and health["failures"] == 0, health
    # A connection that answered pays for its replacement's dial (no wait for a token), so even
    # make-before-break at ~20 recycles a second keeps a connection up.
    assert longest_down < MOMENT, figures
    if run == "plain":
        assert lost >= 1, f"{figures}: dnsmasq's closes lost nothing in flight (is the load pipelined?)"
        return
    if run == "retry_1":
        assert g["requests_retried"] >= 1 and g["retries_exhausted"] == lost, (figures, g["retries_exhausted"])
    assert lost == 0, figures


# -- idle closes ----------------------------------------------------------------------------------------

IDLE_QUERIES = 12


def ask_all(c: kmux.Client, names: list[str], records: dict[str, str], qid: int, who: str) -> None:
    """Each name in turn (lockstep): every query is answered correctly, no notice."""
    for name in names:
        c.send(dns_query(qid, name))
        check_answer(dns_parse(c.recv(timeout=5.0)), qid, name, records, who)


def test_unbound_idle_close_is_invisible(short_dir, daemon_factory):
    """unbound closes a connection after 300 ms of silence. Queries, a pause until unbound has
    closed every connection, queries again: all answered, no notice, nothing lost."""
    idle_ms = 300
    server = start_unbound(short_dir, tcp_idle_timeout_ms=idle_ms)
    try:
        daemon = start_kmuxd(daemon_factory, server, **dns_group(connections=2, reconnect_initial=0.5,
                                                                  reconnect_max=2.0))
        names = sorted(server.records)
        with daemon.connect(name="idle") as c:
            ask_all(c, names[:IDLE_QUERIES], server.records, 0x0101, "before the idle close")
            # Both connections answered, so unbound's idle closes are recycles; ask again at once.
            wait_until_closed = daemon.wait_log("connection_closed", count=2, timeout=5.0)
            ask_all(c, names[IDLE_QUERIES:2 * IDLE_QUERIES], server.records, 0x0202, "after the idle close")
        g, failed = group_stats(daemon), daemon.logs("connection_failed")
    finally:
        server.stop()  # its own close of our connections is not what is measured: read before
    report_idle("unbound", g, failed, len(wait_until_closed))


def test_memcached_idle_timeout_is_invisible(short_dir, daemon_factory):
    """memcached -o idle_timeout=1 closes connections idle for a second. SETs, a pause until
    memcached has closed an idle connection, GETs: all answered with the stored values, no
    notice, nothing lost."""
    server = start_memcached(short_dir, "-o", "idle_timeout=1")
    try:
        daemon = start_kmuxd(daemon_factory, server, connections=2, framing="memcached-binary", steering="id",
                             id={"request_offset": 12, "response_offset": 12, "size": 4, "rewrite": True},
                             request_timeout=10.0, reconnect_initial=0.5, reconnect_max=2.0)
        values = {f"idle:{os.getpid()}:{k}".encode(): os.urandom(40 + k) for k in range(IDLE_QUERIES)}
        with daemon.connect(name="idle") as c:
            for n, (key, value) in enumerate(values.items(), 1):
                c.send(mc_set(key, value, opaque=n))
                r = mc_parse(c.recv(timeout=5.0))
                assert (r.opcode, r.status, r.opaque) == (OP_SET, STATUS_OK, n), r
            closed = daemon.wait_log("connection_closed", count=1, timeout=5.0)  # memcached checks every second
            for n, (key, value) in enumerate(values.items(), 100):
                c.send(mc_get(key, opaque=n))
                r = mc_parse(c.recv(timeout=5.0))
                assert (r.opcode, r.status, r.opaque, r.value) == (OP_GET, STATUS_OK, n, value), r
        g, failed = group_stats(daemon), daemon.logs("connection_failed")
    finally:
        server.stop()
    report_idle("memcached", g, failed, len(closed))


def test_unbound_idle_close_of_an_unused_connection_is_not_a_failure(short_dir, daemon_factory):
    """unbound closes idle connections after 300 ms. kmuxd's connections carry nothing
    until unbound has closed each of them three times: each idle close is the server's
    routine, not a sign of a bad endpoint. The endpoint must stay healthy with no
    failures, and the group must keep its connections."""
    idle_ms, conns = 300, 2
    server = start_unbound(short_dir, tcp_idle_timeout_ms=idle_ms)
    try:
        daemon = start_kmuxd(daemon_factory, server, **dns_group(connections=conns))
        closes = 3 * conns
        daemon.wait_log("connection_closed", count=closes, timeout=closes * idle_ms / 1000 + 10.0)
        # Read before the server stops: stopping it closes the redialled connections at
        # once, which is rightly a failure and not what this test measures.
        g, failed, closed = group_stats(daemon), daemon.logs("connection_failed"), daemon.logs("connection_closed")
    finally:
        server.stop()
    health = g["endpoint_health"][0]
    print(f"unbound idle, no traffic: {len(closed)} closes counted as recycles, "
          f"{len(failed)} as failures ({failed[0].get('error') if failed else None}); endpoint {health}")
    assert not failed and health["failures"] == 0 and health["state"] == "healthy", health


def report_idle(what: str, g: dict[str, Any], failed: list[dict[str, Any]], closes: int) -> None:
    health = g["endpoint_health"][0]
    print(f"{what} idle close: {closes} closes seen, {len(failed)} counted as failures "
          f"({[f.get('error') for f in failed][:3]}); endpoint {health['state']}, recycles {health['recycles']}, "
          f"failures {health['failures']}; notices {g['notices_sent']}, failed {g['requests_failed']}")
    assert g["notices_sent"] == 0 and g["requests_failed"] == 0 and g["requests_timed_out"] == 0, g
