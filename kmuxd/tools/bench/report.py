"""What the benchmark prints, writes and draws.

* :func:`cell_table`: one row per cell, the figures every cell has.
* :func:`app_table`: the Python client's own cost per round trip (the
  ``app`` cells): CPU and system calls, the library against a raw socket.
* :func:`ratio_table`: kmuxd against each peer, cell by cell of the same shape.
* :func:`tls_table`: each TLS cell against its plaintext twin (same group
  settings, same run).
* :func:`targets`: the lead's targets, each next to the figure that decides
  it (met / not met / not measured, and why).
* :func:`plot`: a PNG with matplotlib (Agg): throughput and added latency
  against clients and message size, kmuxd and its peers on the same axes.

The reference kmuxd configurations for the ratios and targets: the flood
goes to group ``flood4`` (balance, 4 connections); request/response uses
``id`` with rewrite and 4 connections, twemproxy's pool of 4 connections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .workloads import size_label

#: The targets the daemon must meet (same machine, same run).
FLOOD_64_MIN_MSGS = 600_000
FLOOD_64_MIN_CRELAY_SHARE = 2 / 3
FLOOD_1K_MIN_MSGS = 450_000
FLOOD_256K_MIN_MB = 2000.0
RR_64_CLIENTS_MAX_CPU_RATIO = 1.0
RR_8_CLIENTS_MAX_CPU_RATIO = 1.5
PINNED_ADDED_P50_MAX_US = 35.0
PINNED_ADDED_P99_MAX_US = 100.0
CHURN_MAX_CPU_US = 100.0
IDLE_MAX_RSS_KIB = 5.0
#: TLS against plaintext, kmuxd CPU per message (issue 18).
TLS_FLOOD_1K_MAX_CPU_RATIO = 2.0
TLS_RR_64_MAX_CPU_RATIO = 1.5
#: The library's own cost: client CPU per round trip over a raw socket's doing the same (µs).
APP_MAX_EXTRA_CPU_US = 2.0
#: Round trip a Python app sees, pinned: the library's added p50/p99 over twemproxy's (same run).
PY_ADDED_P50_MAX_RATIO = 1.5
PY_ADDED_P99_MAX_RATIO = 2.0
#: A per-round-trip count this close to a whole number is that number (perf counts two runs by difference).
CALLS_TOLERANCE = 0.02
#: The system calls app_table shows, in order, and what it calls them.
APP_CALLS = (("sendto", "send"), ("recvfrom", "recv"), ("recvfrom:EAGAIN", "EAGAIN"), ("poll", "poll"),
             ("epoll_wait", "epoll_wait"), ("epoll_ctl", "epoll_ctl"), ("setsockopt", "setsockopt"))


def _num(v: Any, fmt: str = ",.0f", none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def cell_table(cells: list[dict[str, Any]]) -> str:
    rows = [c for c in cells if c["workload"] in ("flood", "rr", "open", "latency") and "skipped" not in c]
    head = (f"{'cell':<44} {'msg/s':>10} {'MB/s':>8} {'p50µs':>7} {'p99µs':>7} {'p99.9µs':>8} "
            f"{'proxyCPU µs/msg':>15} {'proxy CPU':>9} {'peakRSS MiB':>11}")
    lines = [head, "-" * len(head)]
    for c in rows:
        rss = c.get("peak_rss_kib")
        lines.append(
            f"{c['label']:<44} {_num(c.get('msgs_per_s')):>10} {_num(c.get('mb_per_s'), ',.1f'):>8} "
            f"{_num(c.get('p50_us'), '.1f'):>7} {_num(c.get('p99_us'), '.1f'):>7} {_num(c.get('p999_us'), '.1f'):>8} "
            f"{_num(c.get('proxy_cpu_us'), '.2f'):>15} {_num(c.get('proxy_cpu_share'), '.0%'):>9} "
            f"{_num(rss / 1024 if rss else None, '.1f'):>11}" + (f"  ERROR: {c['error'][:60]!r}" if c.get("error") else "")
        )
    for c in cells:
        if "skipped" in c:
            lines.append(f"{c['label']:<44} skipped: {c['skipped']}")
    return "\n".join(lines)


def app_table(cells: list[dict[str, Any]]) -> str:
    """Each app cell is two rows: the library and its raw twin, measured in one process, alternating."""
    rows = [c for c in cells if c["workload"] == "app" and "skipped" not in c and not c.get("error")]
    if not rows:
        return ""
    head = (f"{'app: 1 Python client, kmuxd id/4c':<34} {'client µs/rt':>12} {'user':>6} {'sys':>6} "
            f"{'lib−raw, paired [p25..p75]':>27} {'calls/rt':>8} " + " ".join(f"{name:>10}" for _, name in APP_CALLS)
            + f" {'p50µs':>7}")
    lines = [head, "-" * len(head)]
    for c in rows:
        how = "" if c["recv_timeout"] is None else f", timeout {c['recv_timeout']:g} s"
        paired = (f"{c['extra_cpu_us']:+.2f} [{c['extra_cpu_p25_us']:+.2f}..{c['extra_cpu_p75_us']:+.2f}] "
                  f"×{c['pairs']}" if c.get("pairs") else "unmeasured")
        for name, prefix, calls_key, extra in ((c["api"], "client", "syscalls_per_rt", paired),
                                               (f"  {_raw_api(c['api'])}", "raw", "raw_syscalls_per_rt", "")):
            calls = c.get(calls_key) or {}
            p50 = c.get("p50_us") if prefix == "client" else c.get("raw_p50_us")
            lines.append(f"  {name + how:<32} {_num(c.get(prefix + '_cpu_us'), '.2f'):>12} "
                         f"{_num(c.get(prefix + '_user_us'), '.2f'):>6} {_num(c.get(prefix + '_sys_us'), '.2f'):>6} "
                         f"{extra:>27} {_num(calls.get('all'), '.2f'):>8} "
                         + " ".join(f"{_num(calls.get(key, 0.0) if calls else None, '.2f'):>10}" for key, _ in APP_CALLS)
                         + f" {_num(p50, '.1f'):>7}")
    counted = {c.get("syscalls_counted_by") or c.get("syscalls_unmeasured") for c in rows} - {None}
    lines.append(f"  (library and raw socket alternate in one process, blocks of {rows[0].get('block')} round trips; "
                 "CPU per round trip: medians of the blocks; 'lib−raw': median of the pairs' differences; "
                 f"system calls counted by {', '.join(sorted(counted))})")
    return "\n".join(lines)


def _raw_api(api: str) -> str:
    return "raw-trio" if api.endswith("trio") else "raw"


def find(cells: list[dict[str, Any]], **want: Any) -> dict[str, Any] | None:
    for c in cells:
        if "skipped" not in c and not c.get("error") and all(c.get(k) == v for k, v in want.items()):
            return c
    return None


def _planned(cells: list[dict[str, Any]], **want: Any) -> dict[str, Any] | None:
    """Like :func:`find`, a cell that failed or was skipped included: its target is then unmeasured, not "not run"."""
    return next((c for c in cells if all(c.get(k) == v for k, v in want.items())), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratio_table(cells: list[dict[str, Any]]) -> str:
    lines = []
    sizes = sorted({c["size"] for c in cells if c["workload"] == "flood"})
    if sizes:
        lines.append(f"{'flood (8 clients), kmuxd balance/4c ÷ peer':<46} {'msg/s ÷direct':>13} "
                     f"{'÷crelay':>8} {'÷zmq':>6} {'CPU/msg ÷crelay':>15} {'÷zmq':>6}")
        for size in sizes:
            k = find(cells, workload="flood", target="kmuxd", size=size, connections=4)
            peers = {t: find(cells, workload="flood", target=t, size=size) for t in ("direct", "crelay", "zmq")}
            tp = [_ratio(k and k["msgs_per_s"], v and v["msgs_per_s"]) for v in peers.values()]
            cpu = [_ratio(k and k["proxy_cpu_us"], v and v["proxy_cpu_us"]) for t, v in peers.items() if t != "direct"]
            lines.append(f"  {size_label(size):<44} {_num(tp[0], '.2f'):>13} {_num(tp[1], '.2f'):>8} "
                         f"{_num(tp[2], '.2f'):>6} {_num(cpu[0], '.2f'):>15} {_num(cpu[1], '.2f'):>6}")
    counts = sorted({c["clients"] for c in cells if c["workload"] == "rr"})
    if counts:
        lines.append(f"{'rr 64 B, kmuxd/4c ÷ peer':<46} {'CPU/req ÷twem':>13} {'÷zmq':>8} "
                     f"{'req/s ÷direct':>13} {'added p50 µs: kmuxd':>20} {'twem':>6} {'zmq':>6}")
        for n in counts:
            t = find(cells, workload="rr", target="twemproxy", clients=n, connections=4)
            z = find(cells, workload="rr", target="zmq", clients=n)
            d = find(cells, workload="rr", target="direct", clients=n)
            for steering in ("id", "fifo"):
                k = find(cells, workload="rr", target="kmuxd", clients=n, steering=steering, connections=4)
                if k is None:
                    continue
                added = [_added(x, d) for x in (k, t, z)]
                name = f"{n} clients, {'id+rewrite' if steering == 'id' else steering}"
                lines.append(f"  {name:<44} {_num(_ratio(k['proxy_cpu_us'], t and t['proxy_cpu_us']), '.2f'):>13} "
                             f"{_num(_ratio(k['proxy_cpu_us'], z and z['proxy_cpu_us']), '.2f'):>8} "
                             f"{_num(_ratio(k['msgs_per_s'], d and d['msgs_per_s']), '.2f'):>13} "
                             f"{_num(added[0], '.1f'):>20} {_num(added[1], '.1f'):>6} {_num(added[2], '.1f'):>6}")
    return "\n".join(lines)


def tls_pairs(cells: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """Each TLS cell with its plaintext twin (None if that did not run)."""
    out = []
    for t in cells:
        if t["target"] != "kmuxd-tls" or "skipped" in t or t.get("error"):
            continue
        twin = find(cells, workload=t["workload"], target="kmuxd", size=t["size"], clients=t["clients"],
                    steering=t["steering"], connections=t["connections"])
        out.append((t, twin))
    return out


def tls_table(cells: list[dict[str, Any]]) -> str:
    pairs = tls_pairs(cells)
    if not pairs:
        return ""
    head = (f"{'TLS ÷ plaintext (kmuxd, same group settings)':<46} {'CPU/msg tls':>11} {'plain':>7} {'ratio':>6} "
            f"{'msg/s tls':>10} {'plain':>10} {'ratio':>6}")
    lines = [head]
    for t, p in pairs:
        name = (f"flood {size_label(t['size'])} x{t['clients']}" if t["workload"] == "flood"
                else f"rr 64 B x{t['clients']} {t['steering']}")
        lines.append(f"  {name:<44} {_num(t.get('proxy_cpu_us'), '.2f'):>11} "
                     f"{_num(p and p.get('proxy_cpu_us'), '.2f'):>7} "
                     f"{_num(_ratio(t.get('proxy_cpu_us'), p and p.get('proxy_cpu_us')), '.2f'):>6} "
                     f"{_num(t.get('msgs_per_s')):>10} {_num(p and p.get('msgs_per_s')):>10} "
                     f"{_num(_ratio(t.get('msgs_per_s'), p and p.get('msgs_per_s')), '.2f'):>6}")
    return "\n".join(lines)


def _added(x: dict[str, Any] | None, direct: dict[str, Any] | None, key: str = "p50_us") -> float | None:
    if x is None or direct is None or x.get(key) is None or direct.get(key) is None:
        return None
    return x[key] - direct[key]


@dataclass
class Target:
    name: str
    measured: str
    met: bool | None  # None: not measured
    why: str = ""


def targets(cells: list[dict[str, Any]], skipped: dict[str, str]) -> list[Target]:
    out: list[Target] = []

    def cpu_vs_twemproxy(n: int, limit: float) -> Target:
        name = f"rr id+rewrite 64 B, {n} clients: kmuxd CPU/req ≤ {limit:g}× twemproxy's"
        k = find(cells, workload="rr", target="kmuxd", clients=n, steering="id", connections=4)
        t = find(cells, workload="rr", target="twemproxy", clients=n, connections=4)
        if k is None or t is None:
            return Target(name, "-", None, skipped.get("twemproxy", "") if t is None else "no kmuxd cell")
        for x in (k, t):
            if x["proxy_cpu_us"] is None:
                return Target(name, "unmeasured", None, f"{x['target']}: {x.get('proxy_cpu_unmeasured')}")
        r = k["proxy_cpu_us"] / t["proxy_cpu_us"]
        return Target(name, f"{k['proxy_cpu_us']:.1f} µs vs {t['proxy_cpu_us']:.1f} µs = {r:.2f}×", r <= limit)

    out.append(cpu_vs_twemproxy(64, RR_64_CLIENTS_MAX_CPU_RATIO))
    out.append(cpu_vs_twemproxy(8, RR_8_CLIENTS_MAX_CPU_RATIO))
    for placement in ("pinned", "unpinned"):
        k = find(cells, workload="latency", target="kmuxd", placement=placement, steering="id")
        d = find(cells, workload="latency", target="direct", placement=placement)
        for key, limit in (("p50_us", PINNED_ADDED_P50_MAX_US), ("p99_us", PINNED_ADDED_P99_MAX_US)):
            name = f"1 client 64 B rr, {placement}: added {key[:3]} over direct TCP"
            if placement == "pinned":
                name += f" ≤ {limit:g} µs"
            if k is None or d is None:
                out.append(Target(name, "-", None, "latency cells not run"))
                continue
            added = k[key] - d[key]
            out.append(Target(name, f"{added:.1f} µs ({k[key]:.1f} vs {d[key]:.1f})",
                              added <= limit if placement == "pinned" else None,
                              "" if placement == "pinned" else "reported, no target"))

    def flood(size: int) -> dict[str, Any] | None:
        return find(cells, workload="flood", target="kmuxd", size=size, connections=4, clients=8)

    for size, floor, unit in ((64, FLOOD_64_MIN_MSGS, "msg"), (1024, FLOOD_1K_MIN_MSGS, "msg"),
                              (256 * 1024, FLOOD_256K_MIN_MB, "MB")):
        name = f"flood 8 clients → 4 conns, {size_label(size)}: ≥ {floor:,.0f} {unit}/s"
        k = flood(size)
        if k is None:
            out.append(Target(name, "-", None, "cell not run"))
            continue
        v = k["msgs_per_s"] if unit == "msg" else k["mb_per_s"]
        out.append(Target(name, f"{v:,.0f} {unit}/s", v >= floor))
    name = f"flood 64 B: ≥ {FLOOD_64_MIN_CRELAY_SHARE:.2f} of the C relay"
    k, c = flood(64), find(cells, workload="flood", target="crelay", size=64)
    if k is None or c is None:
        out.append(Target(name, "-", None, skipped.get("crelay", "cell not run")))
    else:
        share = k["msgs_per_s"] / c["msgs_per_s"]
        out.append(Target(name, f"{share:.2f} ({k['msgs_per_s']:,.0f} vs {c['msgs_per_s']:,.0f})",
                          share >= FLOOD_64_MIN_CRELAY_SHARE))
    for workload, size, clients, limit in (("flood", 1024, 8, TLS_FLOOD_1K_MAX_CPU_RATIO),
                                           ("rr", 64, 64, TLS_RR_64_MAX_CPU_RATIO)):
        what = f"flood {size_label(size)}" if workload == "flood" else f"rr 64 B, {clients} clients"
        name = f"TLS {what}: kmuxd CPU/msg ≤ {limit:g}× plaintext's"
        pair = next(((t, p) for t, p in tls_pairs(cells) if t["workload"] == workload and t["size"] == size
                     and t["clients"] == clients), None)
        if pair is None or pair[1] is None:
            out.append(Target(name, "-", None, skipped.get("tls", "cell not run")))
            continue
        t, p = pair
        if t["proxy_cpu_us"] is None or p["proxy_cpu_us"] is None:
            why = t.get("proxy_cpu_unmeasured") or p.get("proxy_cpu_unmeasured") or ""
            out.append(Target(name, "unmeasured", None, why))
            continue
        r = t["proxy_cpu_us"] / p["proxy_cpu_us"]
        out.append(Target(name, f"{t['proxy_cpu_us']:.2f} µs vs {p['proxy_cpu_us']:.2f} µs = {r:.2f}×", r <= limit))
    ch = find(cells, workload="churn")
    name = f"client churn: ≤ {CHURN_MAX_CPU_US:g} µs daemon CPU per client"
    if ch is None:
        out.append(Target(name, "-", None, "not run"))
    elif ch["cpu_us_per_client"] is None:
        out.append(Target(name, "unmeasured", None, ch.get("cpu_unmeasured", "")))
    else:
        out.append(Target(name, f"{ch['cpu_us_per_client']:.1f} µs", ch["cpu_us_per_client"] <= CHURN_MAX_CPU_US))
    idle = find(cells, workload="idle")
    name = f"idle clients: < {IDLE_MAX_RSS_KIB:g} KiB RSS each"
    out.append(Target(name, f"{idle['rss_per_client_kib']:.2f} KiB × {idle['clients']:,}" if idle else "-",
                      idle["rss_per_client_kib"] < IDLE_MAX_RSS_KIB if idle else None, "" if idle else "not run"))
    out += app_targets(cells)
    rss = find(cells, workload="rss")
    name = "RSS flat (±10%) over a long flood"
    out.append(Target(name, f"max deviation {rss['rss_max_deviation']:.1%} over {rss['seconds']:g} s" if rss else "-",
                      rss["flat"] if rss else None, "" if rss else "not run (--workload rss)"))
    return out


def app_targets(cells: list[dict[str, Any]]) -> list[Target]:
    """The library against a raw socket (app cells), and the round trip a Python app sees against twemproxy's."""
    out: list[Target] = []
    for api, transport in (("kmux", "blocking"), ("kmux-trio", "trio")):
        for timeout in (None, 5.0):
            how = "no timeout" if timeout is None else f"timeout {timeout:g} s"
            name = f"app, {transport}, {how}: library client CPU/rt ≤ raw socket's + {APP_MAX_EXTRA_CPU_US:g} µs"
            k = _planned(cells, workload="app", api=api, recv_timeout=timeout)
            if k is None:
                out.append(Target(name, "-", None, "app cells not run"))
                continue
            if not k.get("pairs") or k.get("error") or "skipped" in k:
                why = k.get("error") or k.get("skipped") or "no pair of blocks inside the window"
                out.append(Target(name, "unmeasured", None, why))
                continue
            extra = k["extra_cpu_us"]
            out.append(Target(name, f"{extra:+.2f} µs paired [{k['extra_cpu_p25_us']:+.2f}..{k['extra_cpu_p75_us']:+.2f}] "
                              f"×{k['pairs']} ({k['client_cpu_us']:.2f} vs {k['raw_cpu_us']:.2f})",
                              extra <= APP_MAX_EXTRA_CPU_US))
        out.append(_calls_target(cells, api, transport))
    direct = find(cells, workload="latency", target="direct", placement="pinned", client="python")
    lib = find(cells, workload="latency", target="kmuxd", placement="pinned", client="python", api="kmux")
    twem = find(cells, workload="latency", target="twemproxy", placement="pinned", client="python")
    for key, limit in (("p50_us", PY_ADDED_P50_MAX_RATIO), ("p99_us", PY_ADDED_P99_MAX_RATIO)):
        name = (f"1 client rr through Python, pinned: kmux library's added {key[:3]} over direct "
                f"≤ {limit:g}× twemproxy's")
        missing = [what for what, c in (("Python direct", direct), ("kmux library", lib), ("twemproxy", twem))
                   if c is None or "skipped" in c or c.get("error") or c.get(key) is None]
        if missing:
            # Asked for and not measurable (a peer left out or skipped, a cell failed): said, never met.
            if not any(c["workload"] == "latency" and c.get("client") == "python" for c in cells):
                out.append(Target(name, "-", None, "Python latency cells not run"))
            else:
                out.append(Target(name, "unmeasured", None, f"no {', '.join(missing)} row in this run"))
            continue
        k, t = lib[key] - direct[key], twem[key] - direct[key]
        ratio = k / t if t > 0 else None
        out.append(Target(name, f"+{k:.1f} vs +{t:.1f} µs" + (f" = {ratio:.2f}×" if ratio is not None else ""),
                          ratio is not None and ratio <= limit,
                          "" if ratio is not None else "twemproxy added nothing measurable over direct"))
    return out


def _calls_target(cells: list[dict[str, Any]], api: str, transport: str) -> Target:
    """blocking: one send and one receive per round trip and nothing else; trio: no more calls than a raw
    trio socket and no receive that finds nothing (with and without a timeout)."""
    if transport == "blocking":
        name = "app, blocking, with and without a timeout: one send + one receive per round trip, nothing else"
    else:
        name = "app, trio, with and without a timeout: calls/rt ≤ raw trio socket's, no receive that finds nothing"
    shown, met = [], True
    runs = [c for c in cells if c["workload"] == "app" and c.get("api") == api and "skipped" not in c
            and not c.get("error")]
    if not runs:
        return Target(name, "-", None, "app cells not run")
    for k in runs:
        r = {"syscalls_per_rt": k.get("raw_syscalls_per_rt")}  # the raw twin, counted by the same cell
        if not k.get("syscalls_per_rt"):
            return Target(name, "unmeasured", None, k.get("syscalls_unmeasured", ""))
        calls = k["syscalls_per_rt"]
        shown.append(f"{calls.get('all', 0):.2f}")
        if transport == "blocking":
            met = met and abs(calls.get("sendto", 0) - 1) <= CALLS_TOLERANCE \
                and abs(calls.get("recvfrom", 0) - 1) <= CALLS_TOLERANCE and calls.get("all", 0) <= 2 + CALLS_TOLERANCE
        else:
            raw = (r or {}).get("syscalls_per_rt") or {}
            shown[-1] += f" vs {raw.get('all', 0):.2f}"
            met = met and bool(raw) and calls.get("all", 0) <= raw.get("all", 0) + CALLS_TOLERANCE \
                and calls.get("recvfrom:EAGAIN", 0) <= CALLS_TOLERANCE
    which = ", ".join("no timeout" if k["recv_timeout"] is None else f"timeout {k['recv_timeout']:g} s" for k in runs)
    return Target(name, "calls/rt " + ", ".join(shown) + f" ({which})", met)


def target_table(ts: list[Target]) -> str:
    width = max(len(t.name) for t in ts)
    lines = []
    for t in ts:
        verdict = {True: "met", False: "NOT MET", None: "-"}[t.met]
        lines.append(f"{t.name:<{width}}  {t.measured:<40} {verdict}" + (f"  ({t.why})" if t.why else ""))
    return "\n".join(lines)


def other_table(cells: list[dict[str, Any]]) -> str:
    lines = []
    for c in cells:
        if c["workload"] == "idle" and "skipped" not in c:
            lines.append(f"idle: {c['connected']:,} kmux clients connected in {c['connect_s']:.2f} s "
                         f"({c['connect_us_per_client']:.0f} µs each); kmuxd RSS {c['rss_before_kib'] / 1024:.1f} → "
                         f"{c['rss_after_kib'] / 1024:.1f} MiB = {c['rss_per_client_kib']:.2f} KiB per client")
        elif c["workload"] == "churn" and "skipped" not in c:
            cpu = c["cpu_us_per_client"]
            lines.append(f"churn: {c['procs']} processes × {c['clients'] // c['procs']:,} clients (connect, hello, "
                         f"close) in {c['seconds']:.2f} s = {c['clients_per_s']:,.0f}/s; kmuxd CPU "
                         + (f"{cpu:.1f} µs per client" if cpu is not None else f"unmeasured: {c['cpu_unmeasured']}"))
        elif c["workload"] == "rss" and "skipped" not in c:
            lines.append(f"rss: {c['seconds']:g} s flood of {size_label(c['size'])} at {c['msgs_per_s']:,.0f} msg/s: "
                         f"kmuxd RSS median {c['rss_median_kib'] / 1024:.1f} MiB, min {c['rss_min_kib'] / 1024:.1f}, "
                         f"max {c['rss_max_kib'] / 1024:.1f}, max deviation {c['rss_max_deviation']:.1%} "
                         f"({'flat' if c['flat'] else 'NOT flat'})")
    return "\n".join(lines)


# -- the plot -------------------------------------------------------------------------------------

_STYLE = {"kmuxd": ("tab:blue", "o"), "direct": ("black", "s"), "twemproxy": ("tab:orange", "^"),
          "zmq": ("tab:green", "D"), "crelay": ("tab:red", "v")}
#: kmuxd's steering modes in shades of its colour; 1 connection is dashed.
_KMUXD_SHADES = {"id": "tab:blue", "fifo": "tab:purple", "balance": "tab:cyan"}


def plot(cells: list[dict[str, Any]], path: str, title: str) -> str | None:
    """Write the PNG; returns None, or why it was not written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'; ./dev.sh bench does)"
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (ax_fs, ax_rr), (ax_lat, ax_cpu) = axes

    def series(workload: str, x: str, y: Callable[[dict[str, Any]], float | None], ax: Any, target: str,
               label: str, **want: Any) -> None:
        pts = sorted((c[x], y(c)) for c in cells if c["workload"] == workload and c["target"] == target
                     and "skipped" not in c and not c.get("error") and all(c.get(k) == v for k, v in want.items())
                     and y(c) is not None)
        if pts:
            color, marker = _STYLE[target]
            if target == "kmuxd" and want.get("steering"):
                color = _KMUXD_SHADES[want["steering"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label,
                    linestyle="-" if want.get("connections", 4) == 4 else "--")

    for t in ("kmuxd", "direct", "crelay", "zmq"):
        extra = {"connections": 4, "steering": "balance"} if t == "kmuxd" else {}
        series("flood", "size", lambda c: c["msgs_per_s"], ax_fs, t, t + (" balance/4c" if t == "kmuxd" else ""),
               **extra)
    series("flood", "size", lambda c: c["msgs_per_s"], ax_fs, "kmuxd", "kmuxd balance/1c", connections=1,
           steering="balance")
    ax_fs.set(xscale="log", yscale="log", xlabel="message size (bytes)", ylabel="messages/s (sink-counted)",
              title="one-way flood, 8 clients")
    direct = {c["clients"]: c for c in cells if c["workload"] == "rr" and c["target"] == "direct"
              and "skipped" not in c and not c.get("error")}

    def added(c: dict[str, Any]) -> float | None:
        d = direct.get(c["clients"])
        return c["p50_us"] - d["p50_us"] if d and c.get("p50_us") is not None else None

    for steering in ("id", "fifo", "balance"):
        series("rr", "clients", lambda c: c["msgs_per_s"], ax_rr, "kmuxd", f"kmuxd {steering}/4c",
               steering=steering, connections=4)
    for t in ("direct", "twemproxy", "zmq"):
        extra = {"connections": 4} if t == "twemproxy" else {}
        series("rr", "clients", lambda c: c["msgs_per_s"], ax_rr, t, t, **extra)
    ax_rr.set(xscale="log", xlabel="clients (closed loop, 64 B)", ylabel="requests/s", title="request/response")
    for t, label in (("kmuxd", "kmuxd id/4c"), ("twemproxy", "twemproxy/4c"), ("zmq", "zmq broker")):
        extra = {"steering": "id", "connections": 4} if t == "kmuxd" else ({"connections": 4} if t == "twemproxy" else {})
        series("rr", "clients", added, ax_lat, t, label, **extra)
        series("rr", "clients", lambda c: c["proxy_cpu_us"], ax_cpu, t, label, **extra)
    series("rr", "clients", lambda c: c["proxy_cpu_us"], ax_cpu, "kmuxd", "kmuxd fifo/4c", steering="fifo",
           connections=4)
    ax_lat.set(xscale="log", xlabel="clients", ylabel="added p50 round trip over direct (µs)",
               title="latency a proxy adds")
    ax_cpu.set(xscale="log", xlabel="clients", ylabel="proxy CPU per request (µs)", title="proxy CPU per request")
    for ax in (ax_fs, ax_rr, ax_lat, ax_cpu):
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
