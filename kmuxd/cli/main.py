"""``kmux-cli``: look at and steer a running kmuxd through its control socket.

Conventions follow ``ip``/``ss``/``varnishstat``: one line per object,
aligned columns with human units, ``-j`` for machines (raw numbers, the
daemon's record field names as keys), ``--watch`` for a live view. The wire
contract is "Control socket, version 1" in ``docs/protocol.md``; the output
and the exit codes are documented in ``docs/cli.md``.

The CLI is deliberately defensive about records: the daemon may be newer or
older than this tool and records only ever gain keys, so every field is read
with ``.get`` and anything missing shows as ``-`` (or is left out of the
Prometheus output) instead of failing.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import socket
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, TextIO

import msgpack

from kmux.control import DEFAULT_CONTROL, MAX_ANSWER, ControlClient
from kmux.errors import DaemonUnavailable, KmuxError, RemoteError, UnknownGroup, error_from_code

from kmuxd import __version__
from .format import (
    CONNECTED_STATES,
    MISSING,
    Column,
    RateTracker,
    fmt_byte_rate,
    fmt_bytes,
    fmt_count,
    fmt_duration,
    fmt_plain,
    fmt_rate,
    fmt_us,
    records,
    render_table,
)
from .metrics import metrics_registry, metrics_text

__all__ = [
    "ControlClient",
    "DEFAULT_CONTROL",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_NOT_RUNNING",
    "EXIT_PERMISSION",
    "EXIT_NO_SUCH",
    "exit_status",
    "groups_view",
    "group_view",
    "clients_view",
    "status_view",
    "metrics_registry",
    "metrics_text",
    "watch",
    "main",
]


EXIT_OK = 0
EXIT_FAILED = 1  # the daemon answered with an error (drain_timeout, config_invalid, ...)
EXIT_USAGE = 2  # argparse's own code for bad arguments
EXIT_NOT_RUNNING = 3
EXIT_PERMISSION = 4
EXIT_NO_SUCH = 5  # no such group / connection

_NOT_RUNNING_ERRNOS = {errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR}
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM}
#: States in which a connection slot holds an established TCP connection.


# -- exit codes -------------------------------------------------------------------


def exit_status(
    exc: BaseException,
    control: str,
    *,
    command: str = "",
    group: str | None = None,
    conn: int | None = None,
    groups: list[str] | None = None,
    conns: int | None = None,
) -> tuple[int, str]:
    """The exit code and the one-line message for a failure.

    Pure, so the mapping is tested without a daemon (we cannot make a
    permission error as root). ``groups``/``conns`` are optional context
    for "no such ..." messages: the known names, the group's size.
    """
    if isinstance(exc, DaemonUnavailable):
        name = exc.details.get("errno")
        num = getattr(errno, name, None) if isinstance(name, str) else None
    elif isinstance(exc, OSError):
        num = exc.errno
    else:
        num = None
    if isinstance(exc, (DaemonUnavailable, OSError)):
        if num in _PERMISSION_ERRNOS:
            return EXIT_PERMISSION, (
                f"kmux-cli: permission denied on {control} "
                "(the control socket is root-only unless control_group is set)"
            )
        if num == errno.ECONNREFUSED:
            return EXIT_NOT_RUNNING, f"kmux-cli: kmuxd is not running (nothing listens on {control})"
        if num in _NOT_RUNNING_ERRNOS:
            return EXIT_NOT_RUNNING, f"kmux-cli: kmuxd is not running (no control socket at {control})"
        if num in (errno.EPIPE, errno.ECONNRESET):
            return EXIT_NOT_RUNNING, f"kmux-cli: kmuxd closed the control connection on {control} (did it exit?)"
        if num in (errno.ENOTSOCK, errno.EPROTOTYPE):
            return EXIT_FAILED, f"kmux-cli: {control} is not a kmuxd control socket"
        text = exc.message if isinstance(exc, KmuxError) else (exc.strerror or str(exc))
        return EXIT_NOT_RUNNING, f"kmux-cli: cannot reach kmuxd on {control}: {text}"
    if isinstance(exc, KmuxError):
        code = exc.code
        if code == "unknown_group" or isinstance(exc, UnknownGroup):
            known = f" (groups: {', '.join(groups)})" if groups else " (no groups configured)" if groups == [] else ""
            return EXIT_NO_SUCH, f"kmux-cli: no such group {group!r}{known}"
        if code == "unknown_connection":
            known = f" (connections: 0-{conns - 1})" if conns else ""
            return EXIT_NO_SUCH, f"kmux-cli: no such connection {conn} in group {group!r}{known}"
        if code == "control_timeout":
            return EXIT_FAILED, f"kmux-cli: {exc.message}"
        what = f"{command} failed" if command else "failed"
        # Details the message already spells out (config_invalid's path) are not repeated.
        extra = "".join(f" {k}={v}" for k, v in sorted(exc.details.items()) if str(v) not in exc.message)
        return EXIT_FAILED, f"kmux-cli: {what}: [{exc.code}] {exc.message}{extra}"
    return EXIT_FAILED, f"kmux-cli: {exc}"


# -- table views --------------------------------------------------------------------


def _get(field: str, fmt: Callable[[Any], str] = fmt_plain) -> Callable[[Mapping[str, Any]], str]:
    return lambda r: fmt(r.get(field))


def _tcp(field: str, fmt: Callable[[Any], str]) -> Callable[[Mapping[str, Any]], str]:
    """A TCP_INFO field; ``tcp`` is None when the slot has no connection."""
    return lambda r: fmt((r.get("tcp") or {}).get(field))


def _conns_updown(r: Mapping[str, Any]) -> str:
    return f"{fmt_count(r.get('connections_up'))}/{fmt_count(r.get('connections_total'))}"


class Rates:
    """Rate columns for one ``--watch`` refresh: a tracker and the sample time."""

    def __init__(self, tracker: RateTracker, now: float) -> None:
        self.tracker = tracker
        self.now = now

    def columns(self, key: Callable[[Mapping[str, Any]], Any], fields: Iterable[tuple[str, str, bool]]) -> list[Column]:
        """Columns ``(header, counter field, is_bytes)``; first sample shows ``-``."""
        out = []
        for header, field, is_bytes in fields:
            fmt = fmt_byte_rate if is_bytes else fmt_rate
            out.append(Column(header, lambda r, f=field, fmt=fmt: fmt(self.tracker.rate(key(r), r, f, self.now))))
        return out

    def commit(self, key: Callable[[Mapping[str, Any]], Any], rows: Iterable[Mapping[str, Any]]) -> None:
        for r in rows:
            self.tracker.commit(key(r), r, self.now)


_TRAFFIC_RATES = [
    ("TX/s", "tx_msgs", False), ("TX_B/s", "tx_bytes", True), ("RX/s", "rx_msgs", False), ("RX_B/s", "rx_bytes", True),
]


def _group_key(r: Mapping[str, Any]) -> Any:
    return ("group", r.get("name"))


def _conn_key(group: Any) -> Callable[[Mapping[str, Any]], Any]:
    return lambda r: ("conn", group, r.get("index"))


def _client_key(r: Mapping[str, Any]) -> Any:
    return ("client", r.get("id"))


GROUP_COLUMNS = [
    Column("GROUP", _get("name"), right=False),
    Column("CONNS", _conns_updown),
    Column("CLIENTS", _get("clients", fmt_count)),
    Column("TX_MSGS", _get("tx_msgs", fmt_count)),
    Column("TX_BYTES", _get("tx_bytes", fmt_bytes)),
    Column("RX_MSGS", _get("rx_msgs", fmt_count)),
    Column("RX_BYTES", _get("rx_bytes", fmt_bytes)),
    Column("QUEUED", _get("queued_bytes", fmt_bytes)),
    Column("RETRIES", _get("tx_retries", fmt_count)),
    Column("REFUSED", _get("refused", fmt_count)),
]

CONN_COLUMNS = [
    Column("CONN", _get("index", fmt_count)),
    Column("STATE", _get("state"), right=False),
    Column("ENDPOINT", _get("endpoint"), right=False),
    Column("LOCAL", _get("local"), right=False),
    Column("AGE", lambda r: fmt_duration(r.get("age")) if r.get("local") else MISSING),
    Column("TX_MSGS", _get("tx_msgs", fmt_count)),
    Column("TX_BYTES", _get("tx_bytes", fmt_bytes)),
    Column("RX_MSGS", _get("rx_msgs", fmt_count)),
    Column("RX_BYTES", _get("rx_bytes", fmt_bytes)),
    Column("QUEUED", _get("queued_bytes", fmt_bytes)),
    Column("RTT", _tcp("rtt_us", fmt_us)),
    Column("RTTVAR", _tcp("rttvar_us", fmt_us)),
    Column("RETRANS", _tcp("total_retrans", fmt_count)),
    Column("CWND", _tcp("snd_cwnd", fmt_count)),
    Column("UNACKED", _tcp("unacked", fmt_count)),
    Column("RECONNECTS", _get("reconnects", fmt_count)),
    Column("LAST_ERROR", _get("last_error"), right=False),
]

CLIENT_COLUMNS = [
    Column("ID", _get("id", fmt_plain)),
    Column("PID", _get("pid", fmt_plain)),
    Column("UID", _get("uid", fmt_plain)),
    Column("COMM", _get("comm"), right=False),
    Column("GROUP", _get("group"), right=False),
    Column("RX_ON", _get("receiving"), right=False),
    Column("TX_MSGS", _get("tx_msgs", fmt_count)),
    Column("TX_BYTES", _get("tx_bytes", fmt_bytes)),
    Column("RX_MSGS", _get("rx_msgs", fmt_count)),
    Column("RX_BYTES", _get("rx_bytes", fmt_bytes)),
    Column("QUEUED", _get("queued_bytes", fmt_bytes)),
    Column("SINCE", _get("connected_for", fmt_duration)),
]


def groups_view(answer: Mapping[str, Any], *, header: bool = True, rates: Rates | None = None) -> list[str]:
    """``kmux-cli groups``: one line per group."""
    groups = records(answer, "groups")
    columns = list(GROUP_COLUMNS)
    if rates is not None:
        columns += rates.columns(_group_key, _TRAFFIC_RATES)
    lines = render_table(columns, groups, header=header)
    if rates is not None:
        rates.commit(_group_key, groups)
    return lines


def find_group(answer: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """The named group's record; :class:`UnknownGroup` if the answer lacks it."""
    for g in records(answer, "groups"):
        if g.get("name") == name:
            return g
    raise UnknownGroup(f"no such group: {name}")


def group_summary(g: Mapping[str, Any]) -> list[str]:
    """The ``key value`` block above the connection table, ``ip -s link`` style."""
    def c(field: str) -> str:
        return fmt_count(g.get(field))

    def b(field: str) -> str:
        return fmt_bytes(g.get(field))

    return [
        f"group {fmt_plain(g.get('name'))}: {_conns_updown(g)} connections up, {c('clients')} clients "
        f"({c('receivers_ready')} ready to receive, {c('waiting_clients')} waiting to send)",
        f"    endpoints {fmt_plain(g.get('endpoints'))}  framing {fmt_plain(g.get('framing'))}  "
        f"steering {fmt_plain(g.get('steering'))}  up {fmt_duration(g.get('uptime'))}",
        f"    tx {c('tx_msgs')} msgs {b('tx_bytes')}  rx {c('rx_msgs')} msgs {b('rx_bytes')}  "
        f"queued {c('queued_msgs')} msgs {b('queued_bytes')}  in flight {c('requests_in_flight')}",
        f"    latency p50 {fmt_us(g.get('latency_p50_us'))} p99 {fmt_us(g.get('latency_p99_us'))}  "
        f"retries {c('tx_retries')}  refused {c('refused')}  requeued {c('requeued')}  "
        f"rx_paused {c('rx_paused')}  unmatched {c('unmatched_responses')}  notices {c('notices_sent')}",
        f"    attached {c('attached')}  unattached {c('unattached')}",
    ]


def group_view(
    answer: Mapping[str, Any], name: str, *, header: bool = True, rates: Rates | None = None
) -> list[str]:
    """``kmux-cli group NAME``: the summary block, then one line per connection with TCP_INFO."""
    g = find_group(answer, name)
    conns = [r for r in g.get("connections") or [] if isinstance(r, Mapping)]
    lines = group_summary(g)
    columns = list(CONN_COLUMNS)
    if rates is not None:
        def rate(field: str, fmt: Callable[[Any], str]) -> str:
            return fmt(rates.tracker.rate(_group_key(g), g, field, rates.now))

        lines.append(
            f"    rate tx {rate('tx_msgs', fmt_rate)} {rate('tx_bytes', fmt_byte_rate)}  "
            f"rx {rate('rx_msgs', fmt_rate)} {rate('rx_bytes', fmt_byte_rate)}"
        )
        columns[5:5] = rates.columns(_conn_key(name), [("TX/s", "tx_msgs", False), ("RX/s", "rx_msgs", False)])
        rates.commit(_group_key, [g])
        rates.commit(_conn_key(name), conns)
    lines.append("")
    lines += render_table(columns, conns, header=header)
    return lines


def clients_view(
    answer: Mapping[str, Any], *, group: str | None = None, header: bool = True, rates: Rates | None = None
) -> list[str]:
    """``kmux-cli clients``: one line per attached client, by group then id."""
    clients = select_clients(answer, group)
    columns = list(CLIENT_COLUMNS)
    if rates is not None:
        columns[-1:-1] = rates.columns(_client_key, [("TX/s", "tx_msgs", False), ("RX/s", "rx_msgs", False)])
    lines = render_table(columns, clients, header=header)
    if rates is not None:
        rates.commit(_client_key, clients)
    return lines


def select_clients(answer: Mapping[str, Any], group: str | None) -> list[Mapping[str, Any]]:
    clients = [c for c in records(answer, "clients") if group is None or c.get("group") == group]
    return sorted(clients, key=lambda c: (str(c.get("group", "")), _sort_num(c.get("id"))))


def _sort_num(v: Any) -> float:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else float("inf")


def status_view(answer: Mapping[str, Any]) -> list[str]:
    """``kmux-cli status``: the daemon record."""
    d = answer.get("daemon") if isinstance(answer.get("daemon"), Mapping) else {}
    groups = d.get("groups")
    ngroups = len(groups) if isinstance(groups, (list, tuple)) else groups
    return [
        f"kmuxd {fmt_plain(d.get('version'))}  pid {fmt_plain(d.get('pid'))}  up {fmt_duration(d.get('uptime'))}",
        f"    config {fmt_plain(d.get('config'))}",
        f"    socket {fmt_plain(d.get('socket'))}  control {fmt_plain(d.get('control_socket'))}",
        f"    clients {fmt_count(d.get('clients'))}  groups {fmt_count(ngroups)}",
        f"    reloads {fmt_count(d.get('reloads'))}  failed {fmt_count(d.get('reload_failures'))}  "
        f"last error {fmt_plain(d.get('last_reload_error'))}",
    ]


# -- watch --------------------------------------------------------------------------

CLEAR = "\x1b[H\x1b[2J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"


def watch(
    fetch: Callable[[], Mapping[str, Any]],
    render: Callable[[Mapping[str, Any], Rates], list[str]],
    *,
    interval: float,
    count: int | None,
    out: TextIO,
    tty: bool,
    title: str = "",
    separate: bool = True,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Refresh a view every ``interval`` seconds until Ctrl-C (or ``count`` refreshes).

    On a terminal: clear and redraw in place, lines cut to the terminal
    width so a wide table does not wrap into a mess, cursor hidden and
    restored on any exit. Elsewhere (a pipe, a log): plain tables one after
    another, blank-line separated (``separate``; not for JSON Lines), so
    ``--watch`` output stays greppable.
    Ticks are scheduled from the start time, so slow answers do not make
    the interval drift.
    """
    tracker = RateTracker()
    done = 0
    start = clock()
    try:
        if tty:
            out.write(HIDE_CURSOR)
        while True:
            answer = fetch()
            lines = render(answer, Rates(tracker, clock()))
            tracker.advance()
            if tty:
                width = shutil.get_terminal_size().columns
                head = f"Every {interval:g}s: kmux-cli {title}".ljust(max(0, width - 9)) + time.strftime(" %H:%M:%S")
                out.write(CLEAR + "\n".join(line[:width].rstrip() for line in [head.rstrip(), "", *lines]) + "\n")
            else:
                out.write(("\n" if done and separate else "") + "\n".join(lines) + "\n")
            out.flush()
            done += 1
            if count is not None and done >= count:
                return EXIT_OK
            sleep(max(0.0, start + done * interval - clock()))
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if tty:
            out.write(SHOW_CURSOR + "\n")
            out.flush()


# -- commands -----------------------------------------------------------------------


def _json_line(data: Any, pretty: bool) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, (bytes, bytearray)):
            return o.hex()
        return str(o)

    if pretty:
        return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=default)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=default)


def _without_ok(answer: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k != "ok"}


def _show(args: argparse.Namespace, client: ControlClient, out: TextIO, request: dict[str, Any],
          table: Callable[[Mapping[str, Any], Rates | None], list[str]],
          data: Callable[[Mapping[str, Any]], Any]) -> int:
    """Shared by the read-only commands: once, or ``--watch``; table or ``-j``."""
    def fetch() -> Mapping[str, Any]:
        return client.request("stats", **request)

    if args.watch is None:
        answer = fetch()
        text = _json_line(data(answer), pretty=True) if args.json else "\n".join(table(answer, None))
        if text:
            out.write(text + "\n")
        return EXIT_OK

    def render(answer: Mapping[str, Any], rates: Rates) -> list[str]:
        if args.json:
            return [_json_line(data(answer), pretty=False)]
        return table(answer, rates)

    tty = out.isatty() and not args.json
    return watch(fetch, render, interval=args.watch, count=args.count, out=out, tty=tty, title=args.title,
                 separate=not args.json)


def cmd_groups(args: argparse.Namespace, client: ControlClient, out: TextIO) -> int:
    return _show(
        args, client, out, {},
        lambda a, r: groups_view(a, header=args.header, rates=r),
        lambda a: records(a, "groups"),
    )


def cmd_group(args: argparse.Namespace, client: ControlClient, out: TextIO) -> int:
    return _show(
        args, client, out, {"group": args.group},
        lambda a, r: group_view(a, args.group, header=args.header, rates=r),
        lambda a: find_group(a, args.group),
    )


def cmd_clients(args: argparse.Namespace, client: ControlClient, out: TextIO) -> int:
    request = {"group": args.group} if args.group is not None else {}
    return _show(
        args, client, out, request,
        lambda a, r: clients_view(a, group=args.group, header=args.header, rates=r),
        lambda a: select_clients(a, args.group),
    )


def cmd_status(args: argparse.Namespace, client: ControlClient, out: TextIO) -> int:
    return _show(args, client, out, {}, lambda a, r: status_view(a), lambda a: a.get("daemon"))


def cmd_reconnect(args: argparse.Namespace, client: ControlClient, out: TextIO) -> int:
    request: dict[str, Any] = {"group": args.group}
    if args.conn is not None:
        request["conn"] = args.conn
    answer = client.request("reconnect", **request)
    if args.json:
        out.write(_json_line(_without_ok(answer), pretty=True) + "\n")
    else:
        done = answer.get("reconnected")
        which = ", ".join(str(i) for i in done) if isinstance(done, list) and done else "none"
        out.write(f"group {args.group}: reconnected connection(s) {which}\n")
    return EXIT_OK


def cmd_drain(args: argparse.Namespace, client: ControlClient, out: TextIO) -> int:
    answer = client.request(
        "drain", group=args.group, conn=args.conn, timeout=args.drain_timeout,
        io_timeout=max(args.timeout, args.drain_timeout + 5),
    )
    if args.json:
        out.write(_json_line(_without_ok(answer), pretty=True) + "\n")
    else:
        out.write(
            f"group {args.group} connection {args.conn}: drained {fmt_count(answer.get('drained_msgs'))} msgs "
            f"({fmt_bytes(answer.get('drained_bytes'))}) in {fmt_duration(answer.get('seconds'))}, replaced\n"
        )
    return EXIT_OK


def cmd_reload(args: argparse.Namespace, client: ControlClient, out: TextIO) -> int:
    answer = client.request("reload")
    if args.json:
        out.write(_json_line(_without_ok(answer), pretty=True) + "\n")
        return EXIT_OK
    out.write("kmuxd: configuration reloaded\n")
    for key in ("added", "removed", "resized", "replaced", "unchanged"):
        names = answer.get(key)
        if isinstance(names, list) and names:
            out.write(f"    {key:<10} {', '.join(str(n) for n in names)}\n")
    return EXIT_OK


def cmd_metrics(args: argparse.Namespace, client: ControlClient, out: TextIO) -> int:
    try:
        answer = client.request("stats")
    except DaemonUnavailable:
        # A textfile left from the last good run would report a dead daemon
        # as healthy; overwrite it with kmux_up 0 before failing.
        if args.textfile:
            _write_textfile(args.textfile, {}, up=False)
        raise
    if args.textfile:
        _write_textfile(args.textfile, answer, up=True)
    else:
        out.write(metrics_text(answer))
    return EXIT_OK


def _write_textfile(path: str, answer: Mapping[str, Any], up: bool) -> None:
    """Atomic (write a temporary file, rename), so node_exporter never reads half a file."""
    from prometheus_client import write_to_textfile

    write_to_textfile(path, metrics_registry(answer, up))


# -- arguments ----------------------------------------------------------------------


def _watch_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= value <= 86400:
        raise argparse.ArgumentTypeError("must be between 0.1 and 86400 seconds")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _add_common(p: argparse.ArgumentParser, top: bool) -> None:
    """The options every command takes, before or after the command name.

    Defined on the main parser with real defaults and on each subparser
    with SUPPRESS, so ``kmux-cli -j groups`` and ``kmux-cli groups -j``
    both work without the subparser resetting what the main one parsed.
    """
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument("-j", "--json", action="store_true", default=d(False),
                   help="JSON of the daemon's records (raw numbers)")
    p.add_argument("-H", "--no-header", dest="header", action="store_false", default=d(True),
                   help="no table header line")
    p.add_argument("--watch", metavar="SECONDS", nargs="?", const=1.0, type=_watch_interval, default=d(None),
                   help="refresh every SECONDS (default 1) until Ctrl-C; write it --watch=SECONDS")
    p.add_argument("--count", metavar="N", type=_count, default=d(None), help="with --watch: stop after N refreshes")
    p.add_argument("--control", metavar="PATH", default=d(os.environ.get("KMUX_CONTROL") or DEFAULT_CONTROL),
                   help=f"control socket (default $KMUX_CONTROL or {DEFAULT_CONTROL})")
    p.add_argument("--timeout", metavar="SECONDS", type=_positive, default=d(5.0), help="answer timeout (default 5)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmux-cli", description="inspect and steer a running kmuxd through its control socket",
        epilog="exit codes: 0 ok, 1 operation failed, 2 usage, 3 kmuxd not running, "
        "4 permission denied, 5 no such group/connection",
    )
    parser.add_argument("--version", action="version", version=f"kmux-cli {__version__}")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[..., int], help: str, watchable: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _add_common(p, top=False)
        p.set_defaults(func=func, watchable=watchable)
        return p

    command("groups", cmd_groups, "one line per group")
    p = command("group", cmd_group, "one group, then a line per connection with TCP_INFO")
    p.add_argument("group", metavar="NAME")
    p = command("clients", cmd_clients, "one line per attached client")
    p.add_argument("--group", metavar="NAME", help="only this group's clients")
    command("status", cmd_status, "the daemon: version, pid, uptime, sockets, reloads")
    p = command("reconnect", cmd_reconnect, "close and redial a group's connections (or one)", watchable=False)
    p.add_argument("group", metavar="GROUP")
    p.add_argument("conn", metavar="CONN", type=int, nargs="?")
    p = command("drain", cmd_drain, "let one connection write its queue, then replace it", watchable=False)
    p.add_argument("group", metavar="GROUP")
    p.add_argument("conn", metavar="CONN", type=int)
    p.add_argument("--drain-timeout", metavar="SECONDS", type=_positive, default=10.0,
                   help="how long the daemon waits for the queue to empty (default 10)")
    command("reload", cmd_reload, "read the configuration file again and apply it", watchable=False)
    p = command("metrics", cmd_metrics, "the statistics in the Prometheus text format", watchable=False)
    p.add_argument("--textfile", metavar="PATH",
                   help="write atomically to PATH (node_exporter textfile collector) instead of stdout")
    return parser


def _expand_bare_watch(argv: list[str]) -> list[str]:
    """``--watch NAME`` must not swallow NAME as the interval: make a bare --watch ``--watch=1``.

    argparse's optional value (nargs="?") takes the next word whatever it
    is, so ``kmux-cli --watch group web`` would fail on "group". Only a
    following word that parses as a number is taken as the interval.
    """
    out = []
    for i, arg in enumerate(argv):
        if arg == "--watch":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            try:
                float(nxt)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                arg = "--watch=1"
        out.append(arg)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(_expand_bare_watch(list(sys.argv[1:] if argv is None else argv)))
    if args.watch is not None and not args.watchable:
        parser.error(f"--watch does not apply to {args.command}")
    if args.count is not None and args.watch is None:
        parser.error("--count needs --watch")
    args.title = f"group {args.group}" if args.command == "group" else args.command
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = ControlClient(args.control, timeout=args.timeout)
    try:
        return args.func(args, client, sys.stdout)
    except BrokenPipeError:
        # `kmux-cli groups | head`: the reader left; not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    except KmuxError as exc:
        code, message = exit_status(exc, args.control, command=args.command, **_context(exc, args, client))
        print(message, file=sys.stderr)
        return code
    finally:
        client.close()


def _context(exc: KmuxError, args: argparse.Namespace, client: ControlClient) -> dict[str, Any]:
    """Best-effort names for "no such ..." messages: ask the daemon what exists."""
    ctx: dict[str, Any] = {"group": getattr(args, "group", None), "conn": getattr(args, "conn", None)}
    if exc.code not in ("unknown_group", "unknown_connection"):
        return ctx
    try:
        answer = client.request("stats")
    except KmuxError:
        return ctx
    groups = records(answer, "groups")
    ctx["groups"] = [str(g.get("name")) for g in groups]
    for g in groups:
        if g.get("name") == ctx["group"] and isinstance(g.get("connections_total"), int):
            ctx["conns"] = g["connections_total"]
    return ctx


if __name__ == "__main__":
    sys.exit(main())
