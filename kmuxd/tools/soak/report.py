"""The soak's summary table, from the result document (no I/O).

The result document (``--json`` prints it) has stable keys: ``ok``, ``seed``,
``settings``, ``features``, ``client_processes``, ``groups`` (per group: the clients' totals, plus
``daemon``, counters from ``kmux-cli groups -j``, and ``backend``, the chaos
servers' counts), ``faults``, ``outages``, ``operations`` (each with its ``result``: ``ok`` or
an error code), ``rss_kib``, ``fds``, ``checks``
(``name``, ``ok``, ``detail``) and ``run_dir``. The table shows the same.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

__all__ = ["render"]


def _n(v: Any) -> str:
    return "-" if v is None else f"{v:,}" if isinstance(v, int) else str(v)


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def _table(header: list[str], rows: list[list[Any]], left: int = 1) -> list[str]:
    cells = [header] + [[_n(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for r in cells:
        parts = [c.ljust(w) if i < left or i == len(r) - 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  " + "  ".join(parts).rstrip())
    return out


def _codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{code} {n:,}" for code, n in sorted(counts.items())) or "-"


def _operations(ops: list[dict[str, Any]]) -> str:
    done: dict[str, Counter] = {}
    for o in ops:
        done.setdefault(o["op"], Counter())[o["result"]] += 1
    return "  ".join(f"{op} {sum(c.values())}" + (f" ({', '.join(f'{r} {n}' for r, n in c.items() if r != 'ok')})"
                                                 if set(c) != {"ok"} else "") for op, c in done.items()) or "none"


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    feats = "  ".join(f"{k} {v if v else 'off'}" for k, v in result["features"].items())
    faults = "  ".join(f"{k} {v}" for k, v in sorted(result["faults"].items())) or "none"
    whole = sum(1 for o in result["outages"] if len(o["endpoints"]) > 1)
    lines = [
        f"kmuxd soak: {s['duration']:g} s, seed {result['seed']}, {s['clients']} client processes, "
        f"{len(result['groups'])} groups x {s['endpoints']} endpoints x {s['connections']} connections "
        f"({result['seconds']} s in all)",
        f"  daemon settings: {feats}",
        f"  faults struck: {faults}",
        f"  endpoint outages: {len(result['outages'])} ({whole} of every endpoint of a group)",
        f"  operator actions: {_operations(result['operations'])}",
        "",
        "Clients (their own ledgers)",
    ]
    groups = result["groups"]
    lines += _table(
        ["GROUP", "MODE", "SESSIONS", "ABRUPT", "REQUESTS", "RESPONSES", "ABANDONED", "NOTICES"],
        [[n, g["mode"], g["sessions"], g["abrupt"], g["requests"], g["responses"] if g["mode"] != "balance" else None,
          g["abandoned"] if g["mode"] != "balance" else None, _codes(g["notices"])] for n, g in groups.items()],
        left=2,
    )
    lines += ["", "Problems seen by clients and backends"]
    lines += _table(
        ["GROUP", "MISSING", "TWICE", "CROSS", "TORN", "WRONG_ID", "ORDER", "DUPLICATES"],
        [[n, g["missing"], g["problems"].get("second_outcome", 0) + g["problems"].get("never_sent", 0),
          g["problems"].get("cross_delivery", 0) + g["problems"].get("unexpected_data", 0),
          g["problems"].get("torn", 0) + g["backend"].get("torn", 0), g["problems"].get("wrong_id", 0),
          g["problems"].get("order", 0) + g["backend"].get("order", 0), g["backend"].get("duplicates", 0)]
         for n, g in groups.items()],
    )
    lines += ["", "kmuxd's counters (kmux-cli groups -j) and the backends' counts"]
    lines += _table(
        ["GROUP", "JOINED", "TX_MSGS", "RX_MSGS", "FAILED", "TIMED_OUT", "LATE", "DROPPED", "UNMATCHED",
         "RETRIES", "BACKEND_FRAMES", "ANSWERED", "UNASKED", "CONNS"],
        [[n, g["daemon"]["clients_joined"], g["daemon"]["tx_msgs"], g["daemon"]["rx_msgs"], g["daemon"]["requests_failed"],
          g["daemon"]["requests_timed_out"], g["daemon"]["late_responses"], g["daemon"]["dropped_responses"],
          g["daemon"]["unmatched_responses"], g["daemon"]["tx_retries"], g["backend"].get("frames"),
          g["backend"].get("answered"), g["backend"].get("stray_sent"), g["backend"].get("conns")]
         for n, g in groups.items()],
    )
    rss, fds = result["rss_kib"], result["fds"]
    lines += [
        "",
        f"daemon RSS: before clients {_mib(rss.get('before_clients'))}, after warm-up {_mib(rss.get('after_warmup'))}, "
        f"end {_mib(rss.get('end'))}, peak {_mib(rss.get('peak'))}",
        f"daemon fds: baseline {fds.get('baseline')}, end {fds.get('end')}, peak {fds.get('peak')}",
        "",
    ]
    lines += _table(["CHECK", "RESULT", "DETAIL"],
                    [[c["name"], "ok" if c["ok"] else "FAILED", c["detail"]] for c in result["checks"]], left=2)
    failed = [c["name"] for c in result["checks"] if not c["ok"]]
    lines.append("")
    if failed:
        lines.append(f"FAILED: {', '.join(failed)} (seed {result['seed']}; logs in {result['run_dir']})")
    else:
        total = sum(g["requests"] for g in groups.values())
        lines.append(f"OK: {total:,} messages from {sum(g['sessions'] for g in groups.values()):,} sessions, "
                     f"every check passed (seed {result['seed']})")
    return "\n".join(lines)
