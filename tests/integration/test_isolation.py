"""No client can hurt another: slow readers, flooders and turns, with real processes.

Every app here is a process of its own (:class:`~tests.integration.as_user.AppPeer`),
so a flooding or stalled app competes with the measured one for the CPU and
for kmuxd the way it would in production. The backend is the echo server of
:mod:`tests.integration.helpers`; requests are
:func:`~tests.integration.reqresp.make_req` frames, so every
response names the client and the request it answers and a mis-delivery is
seen by whoever receives it.

* Slow readers (``id``, ``fifo``): a client that stops reading gets its
  responses queued in its own bounded queue; past ``client_rx_limit`` it is
  detached (``slow_consumer``) or its responses dropped with a notice each
  (``response_dropped``); nobody else waits for it.
* Flooders (``balance``, ``fifo``, ``id``): a client sending as fast as it can
  against one doing lockstep request/response. In ``fifo``/``id`` the flooder
  keeps at most ``client_max_in_flight_contended`` requests in flight while
  the other is active, so the other's request waits behind few of its at the
  server (64 in flight: 13-21x; 2: 1.2-1.8x). ``balance`` has no answers to
  count; there the flooder's CPU was what the other waited for (kmuxd, the
  flooder and the backend on 2 CPUs: 12-22x, on both legs, every queue near
  empty), and the flooder is paced to ``client_rate_contended`` messages a
  second while the other is active.
* Turns: when the connection is the bottleneck, clients are served a
  ``client_turn`` each.

Latency is a ratio measured within one test run: the measured client's
round-trip p99 with the other client active against its p99 without it,
from :data:`SAMPLES` lockstep round trips each, taken in alternating chunks.
The bound is :data:`P99_RATIO_MAX`; a run over it is measured once more (this
machine is shared and noisy), and the test fails if the second run is over
it too. Each run's figures are printed (and appended to :data:`FIGURES_FILE` if set); the flooder
test adds where the time went (see :class:`Legs`, :class:`Usage`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from collections import Counter

import pytest

from kmux.control import ControlClient


from .as_user import AppPeer, need_root
from .helpers import group_config, wait_until
from .reqresp import MAX, parse_resp, summarize_req

#: Lockstep round trips per measurement and side, in ROUNDS alternating chunks
#: (quiet, disturbed, quiet, ...), so that the machine's own load drifts into both.
SAMPLES = 600
ROUNDS = 4
#: Most a disturbing client may raise the measured client's round-trip p99.
P99_RATIO_MAX = 3.0
#: Measurements made (baseline + disturbed) before a test gives up.
ATTEMPTS = 2
#: Where each measurement's figures are appended, one JSON line each, when set
#: (``$KMUX_ISOLATION_FIGURES``); they are printed either way (``pytest -s``).
FIGURES_FILE = os.environ.get("KMUX_ISOLATION_FIGURES", "")
#: Client ids in the requests: the measured client, the disturbing one.
MEASURED, OTHER = 1, 2
MEASURED_BYTES = MEASURED.to_bytes(2, "big")  # where make_req puts the client id: bytes 8-9
REQUEST = 64


def p99(samples: list[float]) -> float:
    """Nearest-rank 99th percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def p50(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2]


def rr_config(backend, mode: str, **kw) -> dict:
    cfg = group_config(backend, steering=mode, **{"max_message": MAX, **kw})
    if mode == "id":
        cfg["id"] = {"request_offset": 4, "response_offset": 4, "size": 4, "rewrite": True}
    return cfg


def group_stats(daemon, name: str = "g") -> dict:
    with ControlClient(daemon.control_socket, timeout=5.0) as c:
        return c.request("stats", group=name)["groups"][0]


def reactor_stats(daemon) -> dict:
    with ControlClient(daemon.control_socket, timeout=5.0) as c:
        return c.request("stats")["daemon"]["reactor"]


def client_stats(daemon, name: str) -> dict:
    with ControlClient(daemon.control_socket, timeout=5.0) as c:
        (record,) = [r for r in c.request("stats")["clients"] if r["name"] == name]
    return record


def lockstep(peer: AppPeer, handle: int, count: int = SAMPLES // ROUNDS) -> list[float]:
    """``count`` round trips; the latencies (µs). Any foreign or torn message fails the test."""
    return lockstep_traced(peer, handle, count)["latency_us"]


def lockstep_traced(peer: AppPeer, handle: int, count: int = SAMPLES // ROUNDS) -> dict:
    """:func:`lockstep`, with each request's ``sent_at`` too."""
    got = peer.lockstep(client=handle, cid=MEASURED, count=count, size=REQUEST)
    assert not got["anomalies"], got["anomalies"]
    assert len(got["latency_us"]) == count
    return got


def record_figures(figures: dict) -> None:
    line = json.dumps(figures)
    print(f"isolation figures: {line}")
    if FIGURES_FILE:
        with open(FIGURES_FILE, "a") as f:
            f.write(line + "\n")


def measure(name: str, quiet, disturbed) -> dict:
    """Alternate ``quiet()`` and ``disturbed()`` (each returns the latencies of one
    chunk) ROUNDS times; up to ATTEMPTS times until the p99 ratio is within
    bounds. Returns the figures of the last attempt."""
    for attempt in range(1, ATTEMPTS + 1):
        base: list[float] = []
        loud: list[float] = []
        for _ in range(ROUNDS):
            base += quiet()
            loud += disturbed()
        figures = {
            "test": name, "attempt": attempt, "samples": [len(base), len(loud)],
            "baseline_p50_us": round(p50(base), 1), "baseline_p99_us": round(p99(base), 1),
            "disturbed_p50_us": round(p50(loud), 1), "disturbed_p99_us": round(p99(loud), 1),
            "p99_ratio": round(p99(loud) / p99(base), 2),
        }
        record_figures(figures)
        if figures["p99_ratio"] <= P99_RATIO_MAX:
            break
    return figures


@pytest.fixture
def peers():
    started: list[AppPeer] = []

    def start(daemon) -> AppPeer:
        peer = AppPeer(daemon.socket_path)
        started.append(peer)
        return peer

    try:
        yield start
    finally:
        for p in started:
            p.close()


# -- slow readers ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["id", "fifo"])
def test_a_client_that_stops_reading_holds_back_no_one(backend_factory, daemon_factory, peers, mode):
    """One connection carries everyone's requests. A client that keeps sending and
    never reads gets its responses queued in its own queue (``client_rx_limit``,
    16 MiB here, not reached); the measured client's responses keep flowing."""
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_config(backend, mode, connections=1, client_rx_limit=16 << 20)})
    backend.wait_open(1)
    measured, stalled = peers(daemon), peers(daemon)
    m = measured.connect(group="g", name="measured")["client"]
    s = stalled.connect(group="g", name="stalled")["client"]

    def with_stalled_reader() -> list[float]:
        stalled.flood_start(client=s, cid=OTHER, size=1024, read=False, pace=0.001)
        # Its socket's buffer is full: its responses now wait in the daemon.
        wait_until(lambda: client_stats(daemon, "stalled")["rx_queued_bytes"] > 0, 10, "the stalled queue in use")
        latency = lockstep(measured, m)
        assert client_stats(daemon, "stalled")["rx_queued_bytes"] > 0
        sent = stalled.flood_stop(client=s)
        assert sent["end"] is None and sent["sent"] > 0
        with_stalled_reader.sent += sent["sent"]
        return latency

    with_stalled_reader.sent = 0
    figures = measure(f"stalled reader, {mode}", lambda: lockstep(measured, m), with_stalled_reader)
    # Nothing was lost or mis-delivered: the stalled client reads its own, all of them, in order.
    back = stalled.recv_all(client=s, cid=OTHER, timeout=2.0, expect=with_stalled_reader.sent)
    assert back["foreign"] == [] and back["notices"] == [] and back["end"] is None
    assert back["responses"] == list(range(1, with_stalled_reader.sent + 1))
    g = group_stats(daemon)
    assert (g["slow_consumers"], g["responses_dropped"], g["unmatched_responses"]) == (0, 0, 0)
    assert figures["p99_ratio"] <= P99_RATIO_MAX, figures


#: Overflow tests: small responses, a small queue, a stalled client that sends many requests.
SMALL_LIMIT = 32768
STALLED_REQUESTS = 3000


@pytest.mark.parametrize("mode", ["id", "fifo"])
def test_a_full_queue_detaches_the_slow_consumer_and_nobody_else(backend_factory, daemon_factory, peers, mode):
    """``rx_overflow = "disconnect"`` (the default): past ``client_rx_limit`` the stalled
    client gets ``slow_consumer`` and is detached; the measured client, sharing its
    only connection, is served throughout."""
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_config(backend, mode, connections=1, max_message=16384,
                                            client_rx_limit=SMALL_LIMIT)})
    backend.wait_open(1)
    measured, stalled = peers(daemon), peers(daemon)
    m = measured.connect(group="g", name="measured")["client"]
    s = stalled.connect(group="g", name="stalled")["client"]
    stalled.flood_start(client=s, cid=OTHER, size=1024, read=False, count=STALLED_REQUESTS)
    measured.begin("lockstep", client=m, cid=MEASURED, count=400, size=REQUEST)  # while it floods and stalls
    daemon.wait_log("slow_consumer", timeout=10)
    # It reads again at once (within slow_consumer_grace): the responses its socket
    # held, in order, then the notice, then the end.
    back = stalled.recv_all(client=s, cid=OTHER, timeout=2.0)
    assert back["foreign"] == [] and back["notices"] == []
    assert back["responses"] == list(range(1, len(back["responses"]) + 1))
    assert back["end"]["code"] == "slow_consumer", back["end"]
    assert f"client_rx_limit={SMALL_LIMIT}" in back["end"]["message"]
    flood = stalled.flood_stop(client=s)
    assert flood["end"] is None or flood["end"]["code"] in ("daemon_shutdown", "oserror"), flood
    served = measured.end()
    assert len(served["latency_us"]) == 400 and not served["anomalies"], served["anomalies"]
    lockstep(measured, m, count=200)  # and after
    g = group_stats(daemon)
    assert (g["slow_consumers"], g["responses_dropped"], g["clients"]) == (1, 0, 1)
    (line,) = daemon.logs("slow_consumer")
    assert line["client_rx_limit"] == SMALL_LIMIT and line["queued_bytes"] > 0


#: slow_consumer_grace in the test below, and how long its client does not read.
GRACE, LATE = 4.0, 2.0


def test_a_slow_consumer_that_reads_late_still_learns_why(backend_factory, daemon_factory, peers):
    """Its socket is full, so the notice waits behind its backlog: the daemon keeps
    the detached socket slow_consumer_grace seconds so a late reader still learns why."""
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_config(backend, "fifo", connections=1, max_message=16384,
                                            client_rx_limit=SMALL_LIMIT, slow_consumer_grace=GRACE)})
    backend.wait_open(1)
    stalled = peers(daemon)
    s = stalled.connect(group="g", name="stalled")["client"]
    stalled.flood_start(client=s, cid=OTHER, size=1024, read=False, count=STALLED_REQUESTS)
    daemon.wait_log("slow_consumer", timeout=10)
    time.sleep(LATE)  # a GC pause, a busy app, a debugger: the sleep is the point of the test
    back = stalled.recv_all(client=s, cid=OTHER, timeout=2.0)
    assert back["responses"] == list(range(1, len(back["responses"]) + 1))
    assert back["end"]["code"] == "slow_consumer", back["end"]


@pytest.mark.parametrize("mode", ["id", "fifo"])
def test_a_full_queue_drops_responses_with_a_notice_each(backend_factory, daemon_factory, peers, mode):
    """``rx_overflow = "drop"``: a response that does not fit the stalled client's
    queue is dropped and the client told, by the request's seq. Every request
    still ends in exactly one outcome; the measured client is served throughout."""
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_config(backend, mode, connections=1, max_message=16384,
                                            client_rx_limit=SMALL_LIMIT, rx_overflow="drop")})
    backend.wait_open(1)
    measured, stalled = peers(daemon), peers(daemon)
    m = measured.connect(group="g", name="measured")["client"]
    s = stalled.connect(group="g", name="stalled")["client"]
    stalled.flood_start(client=s, cid=OTHER, size=1024, read=False, count=STALLED_REQUESTS)
    lockstep(measured, m, count=200)
    wait_until(lambda: group_stats(daemon)["responses_dropped"] > 0, 10, "a response dropped")
    lockstep(measured, m, count=200)
    # Now it reads: its own responses and notices, until its last request is answered.
    back = stalled.recv_all(client=s, cid=OTHER, timeout=2.0, expect=STALLED_REQUESTS)
    flood = stalled.flood_stop(client=s)
    assert flood["end"] is None and flood["sent"] == STALLED_REQUESTS
    assert back["foreign"] == [] and back["end"] is None
    codes = Counter(code for code, _ in back["notices"])
    assert set(codes) == {"response_dropped"}, codes
    dropped = [seq for _, seq in back["notices"]]
    assert sorted(back["responses"] + dropped) == list(range(1, STALLED_REQUESTS + 1))  # one outcome each
    assert back["responses"] == sorted(back["responses"])
    g = group_stats(daemon)
    assert g["responses_dropped"] == len(dropped) > 0
    assert (g["slow_consumers"], g["clients"]) == (0, 2)


# -- flooders -------------------------------------------------------------------------


class Legs:
    """Where the measured client's round trips went: to the backend, and back.

    The backend stamps each measured request when it reads it (``time.monotonic``,
    the system's clock, which the measured client's ``sent_at`` also uses), so a
    round trip splits into *out* (the app's socket, kmuxd's reading and outbox, the
    TCP connection and the server's reading) and *back* (the server's answer, TCP,
    kmuxd's steering and the app's socket)."""

    def __init__(self) -> None:
        self.out: list[float] = []
        self.back: list[float] = []

    @staticmethod
    def stamp(frame: bytes):
        """The backend's record of a frame: the measured client's get a timestamp.
        (Others cost one comparison: the backend must not be the bottleneck.)"""
        if frame[8:10] != MEASURED_BYTES:
            return None
        _, client, seq = parse_resp(frame)
        return (client, seq, time.monotonic())

    def add(self, backend, got: dict) -> None:
        arrived = {rec[1]: rec[2] for _, rec in backend.records() if rec is not None and rec[0] == MEASURED}
        for (seq, sent), total in zip(got["sent_at"], got["latency_us"]):
            out = (arrived[seq] - sent) * 1e6
            self.out.append(out)
            self.back.append(total - out)

    def figures(self) -> dict:
        return {"out_p50_us": round(p50(self.out)), "out_p99_us": round(p99(self.out)),
                "back_p50_us": round(p50(self.back)), "back_p99_us": round(p99(self.back))}


class Usage:
    """CPU time and run-queue wait of some processes (all their threads) over a window.

    From ``/proc/PID/task/TID/schedstat``: nanoseconds on a CPU and nanoseconds
    runnable but waiting for one. A round trip wakes the measured app, kmuxd
    and the backend about twice each; their run-queue wait per round trip is
    what the machine's CPU contention adds to it, apart from kmuxd's queues.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.start = {name: self._read(pid) for name, pid in pids.items()}

    @staticmethod
    def _read(pid: int) -> tuple[int, int]:
        run = wait = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    r, w, _ = map(int, f.read().split())
            except OSError:
                continue  # a thread that ended meanwhile
            run += r
            wait += w
        return run, wait

    def report(self, round_trips: int) -> dict:
        elapsed = time.monotonic() - self.t0
        out = {}
        for name, pid in self.pids.items():
            run, wait = (b - a for a, b in zip(self.start[name], self._read(pid)))
            out[name] = {"cpu": round(run / 1e9 / elapsed, 2), "rq_wait_us_per_rtt": round(wait / 1e3 / round_trips)}
        return out


def tcp_queues(port: int) -> dict:
    """Bytes in the kernel's queues of the backend's connections (``ss``), both ends:
    the daemon's unsent requests and unread responses, the backend's unread
    requests and unsent responses."""
    totals = Counter()
    for side, key in (("daemon", "dport"), ("backend", "sport")):
        out = subprocess.run(["ss", "-tnH", "state", "established", f"( {key} = :{port} )"],
                             capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            recv_q, send_q = map(int, line.split()[:2])
            totals[f"{side}_recv_q"] += recv_q
            totals[f"{side}_send_q"] += send_q
    return dict(totals)


@pytest.mark.parametrize("mode", ["balance", "fifo", "id"])
def test_a_flooder_does_not_raise_anothers_round_trip_p99_past_the_bound(backend_factory, daemon_factory, peers, mode):
    """A client sending as fast as kmuxd takes its messages (``balance``: a pure
    sender whose messages the server only sinks; ``fifo``/``id``: requests whose
    responses it reads) against a client doing lockstep request/response, on a
    group of 4 connections with the default settings.

    Each measurement also records where the measured round trips went (to the
    backend and back), kmuxd's passes and CPU per pass, every process's CPU and
    run-queue wait per round trip, and, while it floods, kmuxd's queues and the
    kernel's TCP queues (``FIGURES_FILE``, and the assertion's message)."""
    echo = True if mode != "balance" else (lambda frame: frame[8:10] == MEASURED_BYTES)
    backend = backend_factory(echo=echo, summarize=Legs.stamp, max_frame=MAX)
    daemon = daemon_factory({"g": rr_config(backend, mode) if mode != "balance" else group_config(backend)})
    backend.wait_open(4)
    measured, flooder = peers(daemon), peers(daemon)
    m = measured.connect(group="g", name="measured")["client"]
    f = flooder.connect(group="g", name="flooder", receive=mode != "balance")["client"]
    pids = {"kmuxd": daemon.proc.pid, "measured": measured.pid, "flooder": flooder.pid, "tests+backend": os.getpid()}
    legs = {"quiet": Legs(), "flooded": Legs()}
    seen: dict = {"flooded_msgs": 0}

    def round_trips(leg: str) -> list[float]:
        usage, before = Usage(pids), reactor_stats(daemon)
        got = lockstep_traced(measured, m)
        passes = reactor_stats(daemon)["passes"] - before["passes"]
        report = usage.report(len(got["latency_us"]))
        seen[leg] = {"passes": passes, "kmuxd_cpu_us_per_pass": round(
            report["kmuxd"]["cpu"] * (time.monotonic() - usage.t0) * 1e6 / max(1, passes)), "usage": report}
        legs[leg].add(backend, got)
        return got["latency_us"]

    def flooding() -> list[float]:
        flooder.flood_start(client=f, cid=OTHER, size=REQUEST, read=mode != "balance")
        wait_until(lambda: flooder.flood_sent(client=f)["sent"] > 1000, 10, "the flood under way")
        latency = round_trips("flooded")
        g = group_stats(daemon)  # what waits where, while it floods
        seen["queues"] = dict(
            in_flight=g["requests_in_flight"], outbox_bytes=[c["queued_bytes"] for c in g["connections"]],
            holds=g.get("holds"), paces=g.get("paces"),
            flooder_in_flight=client_stats(daemon, "flooder").get("in_flight"),
            flooder_rx_queued=client_stats(daemon, "flooder")["rx_queued_bytes"],
            backend_unsent=sum(c.pending_out for c in backend.conns()), **tcp_queues(backend.port),
        )
        got = flooder.flood_stop(client=f)
        assert got["end"] is None and got["anomaly_count"] == 0 and not got["notices"], got
        if mode != "balance":
            assert got["responses"] == got["sent"], got  # every request answered, to its sender
        seen["flooded_msgs"] += got["sent"]
        return latency

    figures = measure(f"flooder, {mode}", lambda: round_trips("quiet"), flooding)
    figures["legs"] = {leg: legs[leg].figures() for leg in legs}
    figures.update(seen)
    record_figures({"test": f"flooder, {mode}", "breakdown": figures})
    if mode != "balance":  # the flooder was held at its contended in-flight limit, and the control socket says so
        assert seen["queues"]["holds"] > 0 and seen["queues"]["flooder_in_flight"] <= 2, seen["queues"]
    else:  # the flooder was paced (client_rate_contended), and the control socket says so
        assert seen["queues"]["paces"] > 0 and client_stats(daemon, "flooder")["paces"] > 0, seen["queues"]
        assert client_stats(daemon, "measured")["paces"] == 0  # the light client never is
    assert figures["p99_ratio"] <= P99_RATIO_MAX, figures


# -- turns ------------------------------------------------------------------------------

#: The group's client_turn (the default): messages taken from one client per turn.
CLIENT_TURN = 64
#: Fairness bounds: the longest stretch of one client's messages on the stream, in
#: turns (a client may get a second turn, and part of a third, before the others
#: are seen waiting in the same pass), and the smallest share of a client against
#: the largest one.
MAX_TURNS_IN_A_ROW = 3
MIN_SHARE = 0.6
#: Nice value of the senders in the turns test (root only): the CPU scheduler must
#: not leave a sender with an empty socket, or it drops out of the rotation by itself.
SENDER_NICE = -10


def runs_of(sequence: list[int]) -> list[tuple[int, int]]:
    """``[(client, length)]`` of consecutive equal items."""
    out: list[tuple[int, int]] = []
    for item in sequence:
        if out and out[-1][0] == item:
            out[-1] = (item, out[-1][1] + 1)
        else:
            out.append((item, 1))
    return out


def tcp_wmem_max() -> int:
    """The largest send buffer the kernel grows a TCP socket to (net.ipv4.tcp_wmem)."""
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        return int(f.read().split()[2])


def client_and_seq(frame: bytes) -> tuple[int, int]:
    """Where make_req puts them (bytes 8-9 and 10-13); cheap, for a backend under load."""
    return int.from_bytes(frame[8:10], "big"), int.from_bytes(frame[10:14], "big")


def test_when_the_connection_is_the_bottleneck_clients_are_served_in_turn(backend_factory, daemon_factory, peers):
    """Three clients each send 4000 messages at once to a group of one connection to
    a slow server (it sleeps 2 ms after each read of at most 64 KiB). Once the
    kernel's buffers are full, the clients alternate on the stream, a turn
    (``client_turn``) each, until one runs out: none may keep the connection by
    refilling its outbox while the others wait for it.

    The connection stays the bottleneck only while the kernel takes little at a
    time (``[groups.NAME.socket] tcp_notsent_lowat``, 131072 unless set): with a send buffer of megabytes
    that reports room once a third of it is free, each write took about 1,400
    messages at once, faster than the apps refilled their sockets, and whoever
    still had messages got the stream to itself (6 turns in a row)."""
    need_root()
    per_client = 4000
    backend = backend_factory(summarize=client_and_seq, max_frame=MAX, rcvbuf=65536, read_pause=0.002)
    # max_message 1 MiB: the apps' sockets then hold about 1000 messages each.
    daemon = daemon_factory({"g": group_config(backend, connections=1, max_message=1 << 20)})
    backend.wait_open(1)
    senders = [peers(daemon) for _ in range(3)]
    for peer in senders:
        os.setpriority(os.PRIO_PROCESS, peer.pid, SENDER_NICE)
    handles = [p.connect(group="g", name=f"s{i}", receive=False)["client"] for i, p in enumerate(senders)]
    start_at = time.monotonic() + 0.2
    for cid, (peer, handle) in enumerate(zip(senders, handles), start=10):
        peer.flood_start(client=handle, cid=cid, size=1024, read=False, count=per_client, start_at=start_at)
    backend.wait_count(3 * per_client, timeout=60)
    for peer, handle in zip(senders, handles):
        assert peer.flood_stop(client=handle)["sent"] == per_client
    records = [rec for _, rec in backend.records()]
    for cid in (10, 11, 12):  # each client's own messages in order, once
        assert [seq for client, seq in records if client == cid] == list(range(1, per_client + 1))
    # From when the kernel's buffers are full (before that the connection takes whatever
    # comes) until the first client runs out: who was served, for how long.
    order = [client for client, _ in records]
    absorbed = (tcp_wmem_max() + 65536) // 1024
    first_end = max(absorbed, *(order.index(cid) for cid in (10, 11, 12)))
    last_start = min(len(order) - 1 - order[::-1].index(cid) for cid in (10, 11, 12))
    window = order[first_end:last_start]
    longest = max(n for _, n in runs_of(window))
    shares = Counter(window)
    figures = {"test": "turns", "window": len(window), "turns": len(runs_of(window)), "longest_turn": longest,
               "shares": dict(shares)}
    record_figures(figures)
    assert len(window) >= per_client, figures  # the three were served together most of the time
    assert longest <= MAX_TURNS_IN_A_ROW * CLIENT_TURN, figures
    assert min(shares.values()) >= MIN_SHARE * max(shares.values()), figures
