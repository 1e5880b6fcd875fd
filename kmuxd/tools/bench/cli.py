"""``python -m kmuxd.tools.bench``: the plan of cells, running them, and the output.

The options become a *plan*: an ordered list of :class:`~.workloads.Cell`
(flood sizes × targets, then request/response client counts × steering ×
connections, then open loop, latency, idle, churn, rss). Every party starts
once (:func:`~.peers.start_all`), the cells run in order with a progress
line each, and the parties stop, whatever happened (``finally``).

Error handling: a cell that fails (a load generator's error, a notice from
kmuxd, a party that died) is recorded with its error and the run goes on;
the exit status is then 1. A party that cannot start at all ends the run
with status 1 and kmuxd's log tail. Ctrl-C or SIGTERM stops everything in
order (status 130). A missed target is a result, not a failure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import report
from .peers import CONNECTION_COUNTS, STEERINGS, Parties, start_all
from .procs import busy_cpus, machine, raise_nofile
from .workloads import Cell, available, run_app, run_churn, run_flood, run_idle, run_requests, run_rss

WORKLOADS = ("flood", "rr", "open", "latency", "app", "idle", "churn", "rss")
#: The full run: everything but the 60 s RSS flood (select it with --workload rss).
DEFAULT_WORKLOADS = ("flood", "rr", "open", "latency", "app", "idle", "churn")
#: app cells: the library's Python APIs, each paired in one process with its raw twin (appclient --paired).
APP_APIS = ("kmux", "kmux-trio")
#: The receive bound of the Python clients' rows with a timeout (the library's recv(timeout=...)).
APP_TIMEOUT = 5.0
PEERS = ("direct", "twemproxy", "zmq", "crelay", "tls")
DEFAULT_SIZES = "64,1k,16k,256k"
DEFAULT_RR_CLIENTS = "1,8,64"
FLOOD_CLIENTS = 8
OPEN_CLIENTS = 8
DEFAULT_OPEN_RATE = 10_000.0
DEFAULT_SECONDS = 2.0
DEFAULT_IDLE_CLIENTS = 10_000
CHURN_PROCS = 4
DEFAULT_CHURN_PER_PROC = 2_500
DEFAULT_RSS_SECONDS = 60.0
#: Before the run, the machine's load is sampled this long; above
#: BUSY_WARNING CPUs of others' work the output warns that figures are noise.
BUSY_SAMPLE = 0.5
BUSY_WARNING = 0.3
#: --quick: a few short cells of each kind, for the test suite.
QUICK = {"seconds": 0.25, "sizes": [64], "clients": [8], "steering": ["id"], "connections": [4],
         "open_rate": 2_000.0, "idle_clients": 200, "churn_per_proc": 25}
#: Most the bench accepts (each is a bound on processes, sockets or time).
MAX_CLIENTS = 1024
MAX_IDLE_CLIENTS = 60_000
MAX_SECONDS = 600.0
MAX_REPEAT = 20


def build_plan(a: argparse.Namespace) -> list[Cell]:
    cells: list[Cell] = []
    s = a.seconds
    peers = set(a.peers)
    w = set(a.workload)
    if "flood" in w:
        for size in a.sizes:
            for n in a.connections:
                cells.append(Cell("flood", "kmuxd", FLOOD_CLIENTS, size, "balance", n, seconds=s))
            if "tls" in peers:  # the TLS twin of flood4, right after the plaintext cells of its size
                cells.append(Cell("flood", "kmuxd-tls", FLOOD_CLIENTS, size, "balance", 4, seconds=s))
            cells += [Cell("flood", t, FLOOD_CLIENTS, size, connections=4 if t != "direct" else None, seconds=s)
                      for t in ("direct", "crelay", "zmq") if t in peers]
    if "rr" in w:
        for clients in a.clients:
            for steering in a.steering:
                for n in a.connections:
                    cells.append(Cell("rr", "kmuxd", clients, 64, steering, n, seconds=s))
                if "tls" in peers and steering == ("id" if "id" in a.steering else a.steering[0]):
                    cells.append(Cell("rr", "kmuxd-tls", clients, 64, steering, 4, seconds=s))
            if "direct" in peers:
                cells.append(Cell("rr", "direct", clients, seconds=s))
            if "twemproxy" in peers:
                cells += [Cell("rr", "twemproxy", clients, connections=n, seconds=s) for n in a.connections]
            if "zmq" in peers:
                cells.append(Cell("rr", "zmq", clients, seconds=s))
    steering = "id" if "id" in a.steering else a.steering[0]
    conns = 4 if 4 in a.connections else a.connections[0]
    if "open" in w:
        cells.append(Cell("open", "kmuxd", OPEN_CLIENTS, 64, steering, conns, rate=a.open_rate, seconds=s))
        cells += [Cell("open", t, OPEN_CLIENTS, connections=conns if t == "twemproxy" else None, rate=a.open_rate,
                       seconds=s) for t in ("direct", "twemproxy", "zmq") if t in peers]
    if "latency" in w:
        for placement in ("pinned", "unpinned"):
            cells.append(Cell("latency", "kmuxd", 1, 64, steering, conns, placement=placement, seconds=s))
            cells += [Cell("latency", t, 1, connections=conns if t == "twemproxy" else None, placement=placement,
                           seconds=s) for t in ("direct", "twemproxy", "zmq") if t in peers and not a.quick]
            if a.quick and "direct" in peers:
                cells.append(Cell("latency", "direct", 1, placement=placement, seconds=s))
            if a.quick and placement == "unpinned":
                continue
            # The same round trip as a Python app sees it: the kmux library (and a raw socket) against
            # a raw socket to the service and to twemproxy (its Unix socket).
            py = {"placement": placement, "seconds": s, "client": "python"}
            cells.append(Cell("latency", "kmuxd", 1, 64, steering, conns, api="kmux", recv_timeout=APP_TIMEOUT, **py))
            if not a.quick:
                cells.append(Cell("latency", "kmuxd", 1, 64, steering, conns, api="raw", **py))
            # Python direct is the baseline of every "added" figure here (and memcached is always up):
            # it runs whatever --peers says, so the Python latency targets are never left without it.
            cells += [Cell("latency", t, 1, connections=4 if t == "twemproxy" else None, api="stream", **py)
                      for t in ("direct", "twemproxy") if t == "direct" or t in peers]
    if "app" in w:
        for timeout in ((APP_TIMEOUT,) if a.quick else (None, APP_TIMEOUT)):
            cells += [Cell("app", "kmuxd", 1, 64, steering, conns, seconds=s, client="python", api=api,
                           recv_timeout=timeout) for api in APP_APIS]
    if "idle" in w:
        cells.append(Cell("idle", "kmuxd", a.idle_clients))
    if "churn" in w:
        cells.append(Cell("churn", "kmuxd", CHURN_PROCS * a.churn_per_proc))
    if "rss" in w:
        cells.append(Cell("rss", "kmuxd", FLOOD_CLIENTS, 64, "balance", 4, seconds=a.rss_seconds))
    return cells


def progress(i: int, n: int, c: dict[str, Any]) -> str:
    head = f"[{i:>3}/{n}] {c['label']:<44}"
    if "skipped" in c:
        return f"{head} skipped: {c['skipped']}"
    if c.get("error"):
        return f"{head} ERROR: {c['error']}"
    if c["workload"] == "idle":
        return f"{head} {c['connect_s']:.2f} s to connect, {c['rss_per_client_kib']:.2f} KiB RSS per client"
    if c["workload"] == "churn":
        cpu = c["cpu_us_per_client"]
        cpu_text = f"{cpu:.1f} µs kmuxd CPU per client" if cpu is not None else f"CPU unmeasured ({c['cpu_unmeasured']})"
        return f"{head} {cpu_text}, {c['clients_per_s']:,.0f} clients/s"
    if c["workload"] == "rss":
        return f"{head} max RSS deviation {c['rss_max_deviation']:.1%} ({'flat' if c['flat'] else 'NOT flat'})"
    line = f"{head} {c['msgs_per_s']:>10,.0f} msg/s {c['mb_per_s']:>8,.1f} MB/s"
    if c.get("p50_us") is not None:
        line += f"  p50 {c['p50_us']:.0f} p99 {c['p99_us']:.0f} p99.9 {c['p999_us']:.0f} µs"
    if c.get("client_cpu_us") is not None:
        line += f"  client {c['client_cpu_us']:.2f} µs/rt"
    if c.get("syscalls_per_rt"):
        line += f"  {c['syscalls_per_rt'].get('all', 0):.2f} calls/rt ({c['syscalls_counted_by']})"
    if c.get("proxy_cpu_us") is not None:
        line += f"  proxy {c['proxy_cpu_us']:.2f} µs/msg ({c['proxy_cpu_share']:.0%})"
        if c.get("peak_rss_kib"):
            line += f" peak {c['peak_rss_kib'] / 1024:.0f} MiB"
    return line


def _sizes(text: str) -> list[int]:
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            value = int(part.rstrip("k")) * (1024 if part.endswith("k") else 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"size {part!r} is not a number (like 64 or 16k)") from None
        if not 5 <= value <= 1024 * 1024:
            raise argparse.ArgumentTypeError(f"size {part} is not 5..1048576 bytes")
        sizes.append(value)
    return sizes


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _words(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        words = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in words if x not in choices]
        if bad or not words:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return words
    return parse


def parser() -> argparse.ArgumentParser:
    from . import __doc__ as doc

    p = argparse.ArgumentParser(prog="python -m kmuxd.tools.bench", description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Method: docs/benchmark.md. Figures from a shared 2-core machine are noisy: "
                                       "compare the ratios within one run.")
    p.add_argument("--quick", action="store_true", help="a few short cells of each workload (seconds; the test suite's "
                   "run); overrides --seconds, --sizes, --clients, --steering, --connections and the idle/churn counts")
    p.add_argument("--workload", type=_words(WORKLOADS), default=",".join(DEFAULT_WORKLOADS),
                   help=f"comma-separated, from {', '.join(WORKLOADS)} (rss: a {DEFAULT_RSS_SECONDS:g} s flood, "
                   "not in the default)")
    p.add_argument("--peers", type=_words(PEERS), default=",".join(PEERS), help="peers to run next to kmuxd")
    p.add_argument("--sizes", type=_sizes, default=DEFAULT_SIZES, help="flood message sizes, header "
                   "included, 'k' = KiB")
    p.add_argument("--clients", type=_ints, default=DEFAULT_RR_CLIENTS, help="request/response: closed-loop "
                   "client counts")
    p.add_argument("--steering", type=_words(STEERINGS), default=",".join(STEERINGS), help="kmuxd steering modes "
                   "for request/response")
    p.add_argument("--connections", type=_ints, default=",".join(map(str, CONNECTION_COUNTS)),
                   help=f"kmuxd/twemproxy connections to the service, from {CONNECTION_COUNTS}")
    p.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="measured window per cell")
    p.add_argument("--open-rate", type=float, default=DEFAULT_OPEN_RATE, help="open loop: requests per second "
                   f"(spread over {OPEN_CLIENTS} clients)")
    p.add_argument("--idle-clients", type=int, default=DEFAULT_IDLE_CLIENTS, help="idle: clients held at once")
    p.add_argument("--churn-per-proc", type=int, default=DEFAULT_CHURN_PER_PROC,
                   help=f"churn: clients each of {CHURN_PROCS} processes connects, hellos and closes")
    p.add_argument("--rss-seconds", type=float, default=DEFAULT_RSS_SECONDS, help="rss: length of the flood")
    p.add_argument("--repeat", type=int, default=1, help="run the plan this many times, in rounds; each figure is "
                   "then the median of its cell's runs (the rss flood runs once)")
    p.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    p.add_argument("--plot", metavar="PATH", default="bench-results/bench.png", help="the PNG plot ('' for none)")
    p.add_argument("--keep", action="store_true", help="keep the run directory (configs, logs) and print its path")
    return p


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.quick:
        for key, value in QUICK.items():
            setattr(a, key, value)
    if not 0.1 <= a.seconds <= MAX_SECONDS or not 1 <= a.rss_seconds <= MAX_SECONDS:
        p.error(f"--seconds and --rss-seconds must be 0.1..{MAX_SECONDS:g}")
    if any(not 1 <= n <= MAX_CLIENTS for n in a.clients):
        p.error(f"--clients: each 1..{MAX_CLIENTS}")
    if any(n not in CONNECTION_COUNTS for n in a.connections):
        p.error(f"--connections: from {CONNECTION_COUNTS} (the groups kmuxd is given)")
    if not 1 <= a.idle_clients <= MAX_IDLE_CLIENTS or not 1 <= a.churn_per_proc <= MAX_IDLE_CLIENTS:
        p.error(f"--idle-clients and --churn-per-proc: 1..{MAX_IDLE_CLIENTS}")
    if not 1 <= a.repeat <= MAX_REPEAT:
        p.error(f"--repeat: 1..{MAX_REPEAT}")
    if not 1 <= a.open_rate <= 1_000_000:
        p.error("--open-rate: 1..1000000 requests/s")


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell from its repeats: each number the median of the good runs; ``runs`` keeps each run's
    headline figures. A cell whose runs all failed (or were skipped) is its first run."""
    good = [r for r in runs if not r.get("error") and "skipped" not in r]
    if len(runs) == 1 or not good:
        return runs[0]
    out = dict(good[0])
    for key, value in good[0].items():
        values = [r.get(key) for r in good]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and all(
                isinstance(v, (int, float)) for v in values):
            out[key] = statistics.median(values)
    out["runs"] = [{k: r.get(k) for k in ("msgs_per_s", "p50_us", "p99_us", "proxy_cpu_us", "cpu_us_per_client",
                                          "client_cpu_us", "extra_cpu_us", "rss_per_client_kib", "error")
                    if r.get(k) is not None}
                   for r in runs]
    return out


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_cell(p: Parties, cell: Cell, run_dir: Path) -> dict[str, Any]:
    why = available(p, cell)
    if why:
        return {**asdict(cell), "label": cell.label(), "skipped": why}  # every field: its target names it
    try:
        if cell.workload == "flood":
            return run_flood(p, cell, run_dir)
        if cell.workload in ("rr", "open", "latency"):
            return run_requests(p, cell, run_dir)
        if cell.workload == "app":
            return run_app(p, cell, run_dir)
        if cell.workload == "idle":
            return run_idle(p, cell, run_dir)
        if cell.workload == "churn":
            return run_churn(p, cell, run_dir, CHURN_PROCS)
        return run_rss(p, cell, run_dir, lambda t, rss: None)
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        return {**asdict(cell), "label": cell.label(), "error": str(exc)[:2000]}


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    signal.signal(signal.SIGTERM, _terminate)
    nofile = raise_nofile()
    if "idle" in args.workload and args.idle_clients + 256 > nofile:
        print(f"bench: only {nofile} open files allowed; idle clients cut to {nofile - 256}")
        args.idle_clients = max(1, nofile - 256)
    plan = build_plan(args)
    info = machine()
    command = " ".join(["python -m kmuxd.tools.bench", *(sys.argv[1:] if argv is None else argv)])
    print(f"kmuxd bench: {len(plan)} cells, {args.seconds:g} s window each"
          + (f", {args.repeat} rounds (medians)" if args.repeat > 1 else "") + f"; workloads {','.join(args.workload)}")
    print(f"machine: {info['cpus']} CPUs ({info['cpu_model']}), Linux {info['kernel']}, Python {info['python']}; "
          "nothing pinned except the 'pinned' latency cells (client, proxy and service on one CPU)")
    busy = busy_cpus(BUSY_SAMPLE)
    info["busy_cpus_before"] = round(busy, 2)
    if busy > BUSY_WARNING:
        print(f"WARNING: the machine was already busy before the run ({busy:.1f} of {info['cpus_usable']} CPUs): "
              "throughput and latency figures will be noisy; see 'other_cpu_share' per cell in --json")
    run_dir = Path(tempfile.mkdtemp(prefix="kb-", dir="/tmp"))  # short: Unix socket paths
    parties: Parties | None = None
    cells: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        parties = start_all(run_dir, set(args.workload), max(args.sizes), tls="tls" in args.peers)
        print(f"kmuxd (pid {parties.daemon.pid}) and the peers up in {time.monotonic() - t0:.1f} s; "
              f"run directory {run_dir}")
        for peer in args.peers:
            if peer in parties.skipped:
                print(f"peer {peer} skipped: {parties.skipped[peer]}")
        sys.stdout.flush()
        runs: list[list[dict[str, Any]]] = [[] for _ in plan]
        for rep in range(args.repeat):  # rounds, so slow drifts of the machine hit every cell alike
            for i, cell in enumerate(plan):
                if rep and cell.workload == "rss":
                    continue
                result = run_cell(parties, cell, run_dir)
                runs[i].append(result)
                line = progress(i + 1, len(plan), result)
                print(line if args.repeat == 1 else f"r{rep + 1}/{args.repeat} {line}")
                sys.stdout.flush()
        cells = [merge_runs(r) for r in runs]
        finals = parties.stop()
    except KeyboardInterrupt:
        print("\ninterrupted; stopping", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        if parties is not None and parties.daemon is not None:
            print(f"kmuxd log tail:\n{parties.daemon.log_tail()}", file=sys.stderr)
        return 1
    finally:
        if parties is not None:
            parties.stop()
        if args.keep:
            print(f"run directory kept: {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    skipped = dict(parties.skipped)
    ts = report.targets(cells, skipped)
    print()
    print(report.cell_table(cells))
    app = report.app_table(cells)
    if app:
        print()
        print(app)
    other = report.other_table(cells)
    if other:
        print()
        print(other)
    ratios = report.ratio_table(cells)
    if ratios:
        print()
        print(ratios)
    tls = report.tls_table(cells)
    if tls:
        print()
        print(tls)
    print()
    print("targets (same machine, same run)")
    print(report.target_table(ts))
    title = (f"kmuxd bench {time.strftime('%Y-%m-%d %H:%M')}: {info['cpus']} CPUs, Linux {info['kernel']}; "
             f"{command}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        why = report.plot(cells, args.plot, title)
        print(f"plot: {'skipped: ' + why if why else args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": command, "machine": info, "args": vars(args), "skipped_peers": skipped,
            "seconds_total": round(time.monotonic() - t0, 1), "cells": cells,
            "targets": [t.__dict__ for t in ts], "group_final": finals,
        }, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    print(f"({time.monotonic() - t0:.0f} s)")
    return 1 if any(c.get("error") for c in cells) else 0
