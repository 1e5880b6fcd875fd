"""``python -m kmuxd.tools.soak`` (``./dev.sh soak``): an accounted chaos soak of kmuxd.

A real kmuxd, loopback chaos backends and many client processes run for a
chosen time (default 120 s) while connections are reset, closed after N
requests, stalled and trickled, unasked answers arrive and endpoints go down
and come back. Then every message is accounted for: see ``docs/soak.md``.

Modules, each readable alone:

* :mod:`.frames`: the self-identifying, checksummed message layout (sans-IO);
* :mod:`.ledger`: a session's accounting, outcome by outcome (sans-IO);
* :mod:`.client`: a client process (sessions with the real ``kmux`` library);
* :mod:`.backends`: the chaos servers' process;
* :mod:`.plan`: settings, groups, the daemon's config, the seeded schedules (sans-IO);
* :mod:`.children`: handles on the child processes, the daemon seen from ``/proc``;
* :mod:`.driver`: the run (start, traffic and chaos, settle, accounts);
* :mod:`.checks`: the verdict (sans-IO); :mod:`.report`: the table.

Nothing in the daemon imports this package (``tests/unit/test_layout.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kmux.errors import ConfigInvalid

__all__ = ["main"]

#: Exit statuses.
EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_COULD_NOT_RUN = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    from .driver import SoakSettings

    d = SoakSettings()
    p = argparse.ArgumentParser(prog="python -m kmuxd.tools.soak",
                                description="An accounted chaos soak of kmuxd (docs/soak.md).")
    p.add_argument("--duration", type=float, default=d.duration, help=f"seconds of traffic (default {d.duration:g})")
    p.add_argument("--clients", type=int, default=d.clients, help=f"client processes at a time (default {d.clients})")
    p.add_argument("--seed", type=int, help="seed of the fault schedule and the traffic (default: random, printed)")
    p.add_argument("--window", type=int, default=d.window,
                   help=f"most requests one session keeps outstanding (default {d.window})")
    p.add_argument("--connections", type=int, default=d.connections, help=f"connections per group (default {d.connections})")
    p.add_argument("--endpoints", type=int, default=d.endpoints, help=f"endpoints per group (default {d.endpoints})")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help=f"the id/fifo groups' request_timeout, 0 = off (default {d.request_timeout:g})")
    p.add_argument("--queue-timeout", type=float, default=d.queue_timeout,
                   help="every group's queue_timeout, 0 = off (default: off)")
    p.add_argument("--retry-unanswered", type=int, default=d.retry_unanswered,
                   help="the id/fifo groups' retry_unanswered (default: 0, off)")
    p.add_argument("--max-requests-per-connection", type=int, default=d.max_requests_per_connection,
                   help="every group's max_requests_per_connection (default: 0, off)")
    p.add_argument("--rss-growth-mib", type=float, default=d.rss_growth_mib,
                   help=f"largest RSS growth from the warm-up to the end (default {d.rss_growth_mib:g} MiB)")
    p.add_argument("--no-outages", action="store_true", help="no endpoint outages")
    p.add_argument("--operations", default=",".join(d.operations),
                   help="operator actions to take during the run, comma-separated, or 'none' "
                        f"(default {','.join(d.operations)})")
    p.add_argument("--run-dir", help="where config, sockets, logs and records go (default: a new /tmp/kmux-soak-*)")
    p.add_argument("--keep", action="store_true", help="keep the run directory after a passing run")
    p.add_argument("--json", action="store_true", help="print the result document as JSON instead of the table")
    return p


def main(argv: list[str] | None = None) -> int:
    from .driver import Soak, SoakError, SoakSettings, make_run_dir, remove_run_dir
    from .report import render

    parser = _parser()
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    try:
        settings = SoakSettings(
            duration=args.duration, clients=args.clients, seed=seed, window=args.window,
            connections=args.connections, endpoints=args.endpoints, request_timeout=args.request_timeout,
            queue_timeout=args.queue_timeout, retry_unanswered=args.retry_unanswered,
            max_requests_per_connection=args.max_requests_per_connection, rss_growth_mib=args.rss_growth_mib,
            outages=not args.no_outages,
            operations=tuple(op for op in args.operations.split(",") if op and op != "none"),
        )
    except ConfigInvalid as exc:
        parser.error("; ".join(exc.lines()))

    def say(line: str) -> None:
        print(f"soak: {line}", file=sys.stderr, flush=True)

    run_dir = make_run_dir(args.run_dir)
    say(f"seed {seed} (repeat with --seed {seed}); run dir {run_dir}")
    soak = Soak(settings, run_dir, say)
    try:
        result = soak.run()
    except SoakError as exc:
        say(f"could not run: {exc} (logs in {run_dir})")
        return EXIT_COULD_NOT_RUN
    except KeyboardInterrupt:
        say(f"interrupted (logs in {run_dir})")
        return 130
    finally:
        soak.cleanup()
    print(json.dumps(result, indent=1) if args.json else render(result))
    if result["ok"] and not args.keep and not args.run_dir:
        remove_run_dir(run_dir)
    return EXIT_OK if result["ok"] else EXIT_CHECK_FAILED
