"""One cell of the benchmark: one workload, one target, one setting.

A *target* is what the clients talk to: ``kmuxd`` (a group of the running
daemon), ``kmuxd-tls`` (the same group's TLS twin, to a TLS service), ``direct`` (the service itself, one TCP connection per client),
``twemproxy``, ``zmq`` (the broker) or ``crelay`` (the C relay, flood only).
The same C load generator drives every target, so the client's cost is the
same on every row; except in the cells whose ``client`` is ``python``
(:mod:`.appclient`: one closed-loop client as a Python app, through the
``kmux`` library or a raw socket): the ``latency`` cells that measure what
a Python app sees, and the ``app`` cells, which measure the client's own
CPU and system calls per round trip.

CPU comes from each thread's ``/proc/PID/task/TID/schedstat`` (nanoseconds)
where the kernel has it, else from ``/proc/PID/stat`` in clock ticks (10 ms):
a figure made of fewer than :data:`CPU_MIN_TICKS` steps of that clock is
reported as unmeasured (None, with ``cpu_unmeasured`` saying why), never as
a small number.

Timeline of a timed cell (all times on CLOCK_MONOTONIC, shared with the load
generator)::

    go ── START_DELAY ── start ── GUARD ── [ window: --seconds ] ── GUARD ── stop

The clients run from start to stop; everything reported is taken inside the
window: the sink's counts and clock (``mark``), the load generator's
completions and latencies, the proxy's CPU time from ``/proc``. The proxy's
peak RSS (``VmHWM``) is reset just before the cell and read just after, so it
covers the whole cell.

Results are plain dicts (the JSON output's ``cells``); ``None`` means "does
not apply" (a direct run has no proxy).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from kmux.protocol import Hello, encode_hello

from . import syscalls
from .appclient import RAW_TWIN
from .peers import ASCII_GET_REQUEST, GET_REQUEST, Parties, group_name, mark
from .procs import (CPU_CLOCK, CPU_RESOLUTION_S, LoadGen, appclient_argv, cpu_seconds, process_tree, reset_peak_rss, set_affinity,
                    sleep_until, status_kib, system_cpu)

#: Seconds from "go" to the clients' start (they are connected already).
START_DELAY = 0.2
#: Seconds run before and after the measured window.
GUARD = 0.3
#: Sink drain after a flood cell: poll interval, and the most time to wait.
QUIESCE_POLL = 0.05
QUIESCE_TIMEOUT = 10.0
#: Idle clients: seconds to let the daemon settle before reading its RSS.
IDLE_SETTLE = 1.0
#: After the idle cell's clients close: the daemon counts as done with them when its CPU
#: rose by less than IDLE_QUIET_CPU_S over IDLE_QUIET_S; waited for at most IDLE_DRAIN_MAX_S.
IDLE_QUIET_S = 0.2
IDLE_QUIET_CPU_S = 0.004
IDLE_DRAIN_MAX_S = 20.0
#: Idle/churn: most seconds for all the clients to connect (or churn).
IDLE_CONNECT_TIMEOUT = 300.0
#: Churn: seconds after the last close before the daemon's CPU is read.
CHURN_SETTLE = 0.5
#: RSS over a long flood: seconds between samples, and the warm-up not judged.
RSS_SAMPLE_EVERY = 1.0
RSS_WARMUP = 5.0
#: "Flat": every sample after the warm-up within this fraction of their median.
RSS_FLAT_TOLERANCE = 0.10
#: A CPU figure needs at least this many steps of its clock (procs.CPU_RESOLUTION_S) to be reported (±1 step: ±10%).
CPU_MIN_TICKS = 10
#: app cells: round trips whose system calls are counted (perf: this many and three times as many).
APP_SYSCALL_ROUND_TRIPS = 2000
#: app cells (appclient --paired): the raw twin's figures and the paired difference, library minus raw.
PAIRED_KEYS = ("raw_cpu_us", "raw_user_us", "raw_sys_us", "raw_p50_us", "extra_cpu_us", "extra_cpu_p25_us",
               "extra_cpu_p75_us", "extra_cpu_min_us", "extra_cpu_max_us", "pairs", "block")


@dataclass(frozen=True)
class Cell:
    workload: str  # flood | rr | open | latency | app | idle | churn | rss
    target: str  # kmuxd | kmuxd-tls | direct | twemproxy | zmq | crelay
    clients: int = 1
    size: int = 64
    steering: str | None = None  # kmuxd only
    connections: int | None = None  # proxy's connections to the service
    rate: float = 0.0  # open loop: requests per second
    placement: str = "unpinned"  # latency: "pinned" (one CPU) or "unpinned"
    seconds: float = 2.0
    client: str = "c"  # "c": the C load generator; "python": the app client (api, recv_timeout)
    api: str | None = None  # python: kmux | kmux-trio | raw | raw-trio | stream (appclient --api)
    recv_timeout: float | None = None  # python: every receive bounded by this (appclient --timeout)

    def label(self) -> str:
        who = self.target
        if self.target in ("kmuxd", "kmuxd-tls") and self.steering:
            who = f"{'kmuxd+tls' if self.target == 'kmuxd-tls' else 'kmuxd'} {self.steering}/{self.connections}c"
        elif self.connections and self.target in ("twemproxy", "crelay"):
            who = f"{self.target}/{self.connections}c"
        if self.client == "python":
            who += f" py {self.api}" + ("" if self.recv_timeout is None else f" t={self.recv_timeout:g}s")
        what = {"flood": f"flood {size_label(self.size)} x{self.clients}",
                "rr": f"rr 64 B x{self.clients}",
                "open": f"open {self.rate:,.0f}/s x{self.clients}",
                "latency": f"rtt 1 client {self.placement}",
                "app": "app 1 client",
                "idle": f"idle x{self.clients}", "churn": f"churn x{self.clients}",
                "rss": f"rss flood {size_label(self.size)} {self.seconds:g}s"}[self.workload]
        return f"{what:<24} {who}"


def size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


# -- which process is the proxy, and how clients reach it -----------------------------------------


def proxy_pid(p: Parties, cell: Cell) -> int | None:
    zmq_broker = p.zmq_broker_flood if cell.workload in ("flood", "rss") else p.zmq_broker_rr
    proxy = {"kmuxd": p.daemon, "kmuxd-tls": p.daemon, "twemproxy": p.twemproxy, "zmq": zmq_broker,
             "crelay": p.crelay}.get(cell.target)
    return proxy.pid if proxy is not None else None


def backend_pid(p: Parties, cell: Cell) -> int | None:
    if cell.workload in ("flood", "rss"):
        sink = p.zmq_sink if cell.target == "zmq" else p.sink
        return sink.pid if sink else None
    service = {"zmq": p.zmq_echo, "kmuxd-tls": p.memcached_tls}.get(cell.target, p.memcached)
    return service.pid if service else None


def client_args(p: Parties, cell: Cell) -> list[str]:
    """The load generator's transport options for this cell's target."""
    if cell.client == "python":
        return python_client_args(p, cell)
    flood = cell.workload in ("flood", "rss")
    if cell.target in ("kmuxd", "kmuxd-tls"):
        group = f"flood{cell.connections}" if flood else group_name(cell.steering, cell.connections)
        if cell.workload in ("idle", "churn"):
            group = group_name("id", 4) if p.memcached_port else "flood4"
        if cell.target == "kmuxd-tls":
            group += "tls"
        hello = encode_hello(Hello(group, receive=not flood, name="bench"))
        return ["--transport", "kmux", "--path", p.socket_path, "--hello", hello.hex()]
    if cell.target == "direct":
        return ["--transport", "tcp", "--port", p.sink.port if flood else p.memcached_port]
    if cell.target == "twemproxy":
        return ["--transport", "tcp", "--port", p.twemproxy_ports[cell.connections], "--reply", "ascii"]
    if cell.target == "zmq":
        return ["--transport", "zmtp", "--path", p.zmq_ipc_flood if flood else p.zmq_ipc_rr]
    if cell.target == "crelay":
        return ["--transport", "seqpacket", "--path", p.crelay_path]
    raise ValueError(cell.target)


def python_client_args(p: Parties, cell: Cell) -> list[Any]:
    """The app client's options: kmuxd's id/4 group (library or raw socket), or a stream to the service
    (direct, TCP) or to twemproxy (its Unix socket, as a local app would use it)."""
    args: list[Any] = ["--api", cell.api, "--request", request_hex(cell)]
    if cell.workload == "app":
        args.append("--paired")  # the library against its raw twin, in one process
    if cell.recv_timeout is not None:
        args += ["--timeout", cell.recv_timeout]
    if cell.target == "kmuxd":
        return args + ["--path", p.socket_path, "--group", group_name(cell.steering or "id", cell.connections or 4)]
    if cell.target == "direct":
        return args + ["--port", p.memcached_port]
    if cell.target == "twemproxy":
        return args + ["--path", p.twemproxy_unix, "--reply", "ascii"]
    raise ValueError(f"no Python client for {cell.target}")


def request_hex(cell: Cell) -> str:
    return (ASCII_GET_REQUEST if cell.target == "twemproxy" else GET_REQUEST).hex()


def available(p: Parties, cell: Cell) -> str | None:
    """None if the cell can run, else why not."""
    for peer in ("twemproxy", "zmq", "crelay"):
        if cell.target == peer and peer in p.skipped:
            return p.skipped[peer]
    if cell.target in ("twemproxy", "zmq", "crelay") and proxy_pid(p, cell) is None:
        return f"{cell.target} is not running in this run"
    if cell.target == "kmuxd-tls":
        served = p.tls_term_port if cell.workload in ("flood", "rss") else p.memcached_tls_port
        if not served or cell.connections != 4:
            return p.skipped.get("tls", "no TLS service for this cell in this run (TLS groups have 4 connections)")
    return None


# -- timed cells ---------------------------------------------------------------------------------


def _timeline(seconds: float) -> tuple[float, float, float, float]:
    guard = min(GUARD, seconds / 2)  # short (--quick) windows get short guards
    start = time.monotonic() + min(START_DELAY, seconds / 2)
    ws = start + guard
    we = ws + seconds
    return start, we + guard, ws, we


class _Probe:
    """CPU of the proxy, the backend, the clients and the whole machine, at one instant."""

    def __init__(self, proxy: int | None, backend: int | None, clients: list[int]) -> None:
        self.t = time.monotonic()
        self.proxy = cpu_seconds(proxy) if proxy else 0.0
        self.backend = cpu_seconds(backend) if backend else 0.0
        self.clients = sum(cpu_seconds(pid) for pid in clients)
        self.machine, self.steal = system_cpu()


def _base(cell: Cell, run_dir: Path, p: Parties) -> tuple[dict[str, Any], int | None, int | None, bool]:
    out: dict[str, Any] = {"label": cell.label(), **asdict(cell)}
    proxy, backend = proxy_pid(p, cell), backend_pid(p, cell)
    peak_reset = reset_peak_rss(proxy) if proxy else False
    return out, proxy, backend, peak_reset


def cpu_per(seconds: float, count: int, out: dict[str, Any], key: str) -> float | None:
    """µs of CPU per item, or None (and why, in ``out[key + "_unmeasured"]``) below
    CPU_MIN_TICKS steps of the CPU clock (procs.CPU_RESOLUTION_S)."""
    ticks = round(seconds / CPU_RESOLUTION_S)
    if not count:
        return None
    if ticks < CPU_MIN_TICKS:
        step = f"{CPU_RESOLUTION_S * 1e3:g} ms" if CPU_CLOCK == "ticks" else f"{CPU_RESOLUTION_S * 1e6:g} µs"
        out[key + "_unmeasured"] = (f"{ticks} clock tick(s) of CPU ({step} each, {CPU_CLOCK}) is below "
                                    f"the {CPU_MIN_TICKS} a figure needs: give the cell more work")
        return None
    return seconds / count * 1e6


def _finish(out: dict[str, Any], proxy: int | None, peak_reset: bool, a: _Probe, b: _Probe, count: int,
            nbytes: int, elapsed: float) -> dict[str, Any]:
    out["window_s"] = round(elapsed, 4)
    out["msgs"] = count
    out["msgs_per_s"] = count / elapsed if elapsed > 0 else 0.0
    out["mb_per_s"] = nbytes / elapsed / 1e6 if elapsed > 0 else 0.0
    out["proxy_cpu_us"] = cpu_per(b.proxy - a.proxy, count, out, "proxy_cpu") if proxy else None
    out["proxy_cpu_share"] = (b.proxy - a.proxy) / elapsed if proxy else None
    out["backend_cpu_share"] = (b.backend - a.backend) / elapsed
    out["clients_cpu_share"] = (b.clients - a.clients) / elapsed
    out["machine_cpu_share"] = (b.machine - a.machine) / elapsed
    out["steal_share"] = (b.steal - a.steal) / elapsed
    out["peak_rss_kib"] = status_kib(proxy, "VmHWM") if proxy else None
    out["peak_rss_is_cell_peak"] = peak_reset
    return _other_share(out)


def _other_share(out: dict[str, Any]) -> dict[str, Any]:
    """Whatever else used the CPUs in the window (softirq work, other users of the
    machine): when it is large, the cell's throughput and latency are noise."""
    out["other_cpu_share"] = (out["machine_cpu_share"] - out["clients_cpu_share"] - out["backend_cpu_share"]
                              - (out["proxy_cpu_share"] or 0.0))
    return out


def run_flood(p: Parties, cell: Cell, run_dir: Path) -> dict[str, Any]:
    """8 (``clients``) C senders flood the target; the sink counts inside the window."""
    out, proxy, backend, peak_reset = _base(cell, run_dir, p)
    sink = p.zmq_sink if cell.target == "zmq" else p.sink
    lg = LoadGen(p.loadgen, "flood", [*client_args(p, cell), "--procs", cell.clients, "--size", cell.size],
                 run_dir / "loadgen.log")
    try:
        lg.wait_ready()
        client_pids = process_tree(lg.pid)  # its flood processes are connected: all there
        start, stop, ws, we = _timeline(cell.seconds)
        lg.go(start, stop, ws, we)
        sleep_until(ws)
        m1, a = mark(sink), _Probe(proxy, backend, client_pids)
        sleep_until(we)
        m2, b = mark(sink), _Probe(proxy, backend, client_pids)
        res = lg.result(stop - time.monotonic() + 30)
    finally:
        lg.stop()
    _quiesce(sink)
    out = _finish(out, proxy, peak_reset, a, b, m2[0] - m1[0], m2[1] - m1[1], m2[2] - m1[2])
    out["backend_cpu_share"] = (m2[3] - m1[3]) / (m2[2] - m1[2])  # the sink's own clock
    _other_share(out)
    out["sent_in_window"] = res.get("sent_in_window")
    out["sent_total"] = res.get("sent")
    if res.get("exit_status"):
        out["error"] = res.get("error", "load generator failed")
    return out


def _quiesce(sink: Any) -> None:
    """Wait until the sink's count stops moving: no backlog of one cell is counted in the next."""
    deadline = time.monotonic() + QUIESCE_TIMEOUT
    last, stable = mark(sink)[0], 0
    while stable < 2 and time.monotonic() < deadline:
        time.sleep(QUIESCE_POLL)
        now = mark(sink)[0]
        stable = stable + 1 if now == last else 0
        last = now


def run_requests(p: Parties, cell: Cell, run_dir: Path) -> dict[str, Any]:
    """rr (closed loop), open (fixed rate) and latency (rr, 1 client, placed) cells."""
    out, proxy, backend, peak_reset = _base(cell, run_dir, p)
    mode = "open" if cell.workload == "open" else "rr"
    if cell.client == "python":
        args = client_args(p, cell)
    else:
        args = [*client_args(p, cell), "--clients", cell.clients, "--request", request_hex(cell)]
    if mode == "open":
        args += ["--rate", cell.rate]
    cpu = None
    pinned: list[int] = []
    if cell.placement == "pinned":
        cpu = min(os.sched_getaffinity(0))
        pinned = [pid for pid in (proxy, backend) if pid]
        for pid in pinned:
            set_affinity(pid, {cpu})
    if cell.client == "python":
        lg = LoadGen.python(args, run_dir / "appclient.log", cpu=cpu)
    else:
        lg = LoadGen(p.loadgen, mode, args, run_dir / "loadgen.log", cpu=cpu)
    try:
        lg.wait_ready()
        client_pids = [lg.pid]
        start, stop, ws, we = _timeline(cell.seconds)
        lg.go(start, stop, ws, we)
        sleep_until(ws)
        a = _Probe(proxy, backend, client_pids)
        sleep_until(we)
        b = _Probe(proxy, backend, client_pids)
        res = lg.result(stop - time.monotonic() + 30)
    finally:
        lg.stop()
        everywhere = os.sched_getaffinity(0)
        for pid in pinned:
            set_affinity(pid, everywhere)
    out = _finish(out, proxy, peak_reset, a, b, res.get("completed", 0), res.get("bytes", 0), we - ws)
    for key in ("p50_us", "p99_us", "p999_us", "max_us", "mean_us", "unfinished", "notices", "overruns", "strays",
                "inflight_at_end", "client_cpu_us", "client_user_us", "client_sys_us", "switches_per_rt"):
        out[key] = res.get(key)
    if cell.workload == "app":  # appclient --paired: the raw twin's figures and the paired difference
        for key in PAIRED_KEYS:
            out[key] = res.get(key)
    if cell.placement == "pinned":
        out["cpu"] = cpu
    if res.get("exit_status"):
        out["error"] = res.get("error", "load generator failed")
    return out


def run_app(p: Parties, cell: Cell, run_dir: Path) -> dict[str, Any]:
    """One Python client's own cost per round trip, the library (``cell.api``) against its raw twin:
    CPU paired in one process (appclient ``--paired``: alternating blocks in the timed window), and
    the system calls of each (counted in runs of their own: counting must not slow the timed one)."""
    out = run_requests(p, cell, run_dir)
    if out.get("error"):
        return out
    no_perf, no_strace = syscalls.perf_usable(), syscalls.available()
    if no_perf and no_strace:
        out["syscalls_unmeasured"] = f"{no_perf}; {no_strace}"
        return out
    args = [a for a in client_args(p, cell) if a != "--paired"]
    for api, key in ((cell.api, "syscalls_per_rt"), (RAW_TWIN[cell.api], "raw_syscalls_per_rt")):
        argv = appclient_argv([*args[:1], api, *args[2:]])  # args[1] is the api
        per, how = syscalls.per_round_trip(argv, APP_SYSCALL_ROUND_TRIPS)
        out[key] = {k: round(v, 3) for k, v in per.items() if v >= 0.001}
        out["syscalls_counted_by"] = how
    return out


# -- kmuxd only: idle clients, churn, RSS over a long flood ---------------------------------------------


def run_idle(p: Parties, cell: Cell, run_dir: Path) -> dict[str, Any]:
    """Connect ``clients`` kmux clients (hello answered) and hold them: RSS per client, connect time."""
    out: dict[str, Any] = {"label": cell.label(), **asdict(cell)}
    pid = p.daemon.pid
    rss0 = status_kib(pid, "VmRSS")
    lg = LoadGen(p.loadgen, "idle", [*client_args(p, cell), "--clients", cell.clients], run_dir / "loadgen.log")
    try:
        res = json.loads(lg.readline(IDLE_CONNECT_TIMEOUT))
        time.sleep(IDLE_SETTLE)
        rss1 = status_kib(pid, "VmRSS")
    finally:
        lg.stop()  # SIGTERM: the clients close
    # The daemon detaches them after they close: let it finish, so that the
    # next cell (churn) does not count this cell's 10,000 detaches as its own.
    out["drain_s"] = _wait_quiet(pid)
    out.update(connect_s=res["connect_s"], connected=res["connected"], rss_before_kib=rss0, rss_after_kib=rss1,
               rss_per_client_kib=(rss1 - rss0) / cell.clients,
               connect_us_per_client=res["connect_s"] / cell.clients * 1e6)
    return out


def _wait_quiet(pid: int) -> float:
    """Wait (bounded) until ``pid`` spends almost no CPU; returns the seconds waited."""
    start = time.monotonic()
    before = cpu_seconds(pid)
    while time.monotonic() - start < IDLE_DRAIN_MAX_S:
        time.sleep(IDLE_QUIET_S)
        now = cpu_seconds(pid)
        if now - before < IDLE_QUIET_CPU_S:
            break
        before = now
    return time.monotonic() - start


def run_churn(p: Parties, cell: Cell, run_dir: Path, procs: int) -> dict[str, Any]:
    """``procs`` processes x ``clients`` each: connect, hello, close. Daemon CPU per client."""
    out: dict[str, Any] = {"label": cell.label(), **asdict(cell), "procs": procs}
    pid = p.daemon.pid
    lg = LoadGen(p.loadgen, "churn", [*client_args(p, cell), "--procs", procs, "--clients", cell.clients // procs],
                 run_dir / "loadgen.log")
    try:
        lg.wait_ready()
        a = cpu_seconds(pid)
        start = time.monotonic() + START_DELAY
        lg.go(start, start, start, start)
        res = lg.result(IDLE_CONNECT_TIMEOUT)
        time.sleep(CHURN_SETTLE)
        b = cpu_seconds(pid)
    finally:
        lg.stop()
    n = res.get("clients", 0)
    out.update(clients_done=n, seconds=res.get("seconds"), daemon_cpu_s=b - a,
               cpu_us_per_client=cpu_per(b - a, n, out, "cpu"),
               clients_per_s=n / res["seconds"] if res.get("seconds") else None)
    if res.get("exit_status"):
        out["error"] = res.get("error", "load generator failed")
    return out


def run_rss(p: Parties, cell: Cell, run_dir: Path, on_sample: Callable[[float, int], None]) -> dict[str, Any]:
    """Flood kmuxd for ``seconds``, sampling its RSS: is it flat?"""
    out: dict[str, Any] = {"label": cell.label(), **asdict(cell)}
    pid = p.daemon.pid
    lg = LoadGen(p.loadgen, "flood", [*client_args(p, cell), "--procs", cell.clients, "--size", cell.size],
                 run_dir / "loadgen.log")
    samples: list[tuple[float, int]] = []
    try:
        lg.wait_ready()
        start, stop, ws, we = _timeline(cell.seconds)
        lg.go(start, stop, ws, we)
        sleep_until(ws)
        m1 = mark(p.sink)
        t = ws
        while t < we:  # bounded by the clock
            rss = status_kib(pid, "VmRSS")
            samples.append((round(time.monotonic() - ws, 2), rss))
            on_sample(time.monotonic() - ws, rss)
            t += RSS_SAMPLE_EVERY
            sleep_until(min(t, we))
        m2 = mark(p.sink)
        res = lg.result(stop - time.monotonic() + 30)
    finally:
        lg.stop()
    _quiesce(p.sink)
    judged = [rss for at, rss in samples if at >= RSS_WARMUP] or [rss for _, rss in samples]
    median = statistics.median(judged)
    worst = max(abs(r - median) / median for r in judged) if median else 0.0
    out.update(samples=samples, rss_median_kib=median, rss_min_kib=min(judged), rss_max_kib=max(judged),
               rss_max_deviation=worst, flat=worst <= RSS_FLAT_TOLERANCE,
               msgs_per_s=(m2[0] - m1[0]) / (m2[2] - m1[2]), sent_in_window=res.get("sent_in_window"))
    if res.get("exit_status"):
        out["error"] = res.get("error", "load generator failed")
    return out
