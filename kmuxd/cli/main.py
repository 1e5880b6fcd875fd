"""``kmux-cli``: look at and steer a running kmuxd through its control socket.

Conventions follow ``ip``/``ss``/``varnishstat``: one line per object,
aligned columns with human units, ``-j`` for machines (raw numbers, the
daemon's record field names as keys), ``--watch`` for a live view. The wire
contract is "Control socket, version 1" in ``docs/protocol.md``; the output
and the exit codes are documented in ``docs/cli.md``.

This module holds the commands, their arguments, ``--watch`` and the exit
codes; what each command prints is in ``views.py``, units and tables in
``format.py``, the Prometheus exposition in ``metrics.py``.

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
import signal
import socket
import sys
import time
from typing import Any, Callable, Mapping, TextIO

from kmux.control import DEFAULT_CONTROL, ControlClient
from kmux.errors import ConnectFailed, DaemonUnavailable, KmuxError, UnknownGroup

from kmuxd import __version__
from .format import RateTracker, fmt_bytes, fmt_count, fmt_duration, records
from .metrics import metrics_registry, metrics_text
from .views import Rates, clients_view, find_group, group_view, groups_view, problem_lines, select_clients, status_view

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
    "Rates",
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
#: Seconds kmux-cli unattach waits for its answer at most: the largest unattach_timeout, and some.
UNATTACH_WAIT_MAX = 610.0

_NOT_RUNNING_ERRNOS = {errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR}
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM}


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

    Pure, so the mapping is tested without a daemon. Permission comes in
    two forms: the kernel refusing the connection (EACCES: the socket's
    mode) and kmuxd refusing an op (``permission_denied``); both exit 4.
    ``groups``/``conns`` are optional context
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
                "(only root and the socket's group may connect: daemon.control_group, or SocketGroup= under systemd)"
            )
        if num == errno.ECONNREFUSED:
            return EXIT_NOT_RUNNING, f"kmux-cli: kmuxd is not running (nothing listens on {control})"
        if num in _NOT_RUNNING_ERRNOS:
            return EXIT_NOT_RUNNING, f"kmux-cli: kmuxd is not running (no control socket at {control})"
        if num in (errno.EPIPE, errno.ECONNRESET):
            return EXIT_NOT_RUNNING, f"kmux-cli: kmuxd closed the control connection on {control} (did it exit?)"
        if num == errno.EPROTOTYPE and isinstance(exc, KmuxError):
            # kmux.control recognised the apps' socket by its answer and says so.
            return EXIT_FAILED, f"kmux-cli: {exc.message}"
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
        if code == "permission_denied":
            # kmuxd let us connect (we may look) but not do this.
            return EXIT_PERMISSION, f"kmux-cli: permission denied: {exc.message}"
        what = f"{command} failed" if command else "failed"
        problems = problem_lines(exc.details.get("problems"))
        if code == "config_invalid" and len(problems) > 1:
            # One line per problem, as `kmuxd --check` prints them.
            return EXIT_FAILED, "\n".join([f"kmux-cli: {what}: [{exc.code}] {len(problems)} problems:",
                                           *(f"  {line}" for line in problems)])
        # Details the message already spells out (config_invalid's path) are not repeated,
        # and only plain values are shown (never a Python repr of a list or a map).
        extra = "".join(f" {k}={v}" for k, v in sorted(exc.details.items())
                        if isinstance(v, (str, int, float)) and str(v) not in exc.message)
        return EXIT_FAILED, f"kmux-cli: {what}: [{exc.code}] {exc.message}{extra}"
    return EXIT_FAILED, f"kmux-cli: {exc}"


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


def take_ctrl_c(out: TextIO) -> bool:
    """Let ^C end a ``--watch`` on a terminal even if SIGINT was inherited ignored; True if it did.

    A shell without job control (``sh -c 'cmd &'``, many scripts and CI
    runners) starts background commands with SIGINT ignored, and Python
    keeps an ignored SIGINT ignored: ^C on the watch's own terminal then did
    nothing, and the watch ran on. Ignoring stays right for a process in the
    background, where a ^C is not meant for it. A process in its terminal's
    foreground process group gets SIGINT only because someone typed ^C at
    it, and ^C is how a watch ends, so there the default handler comes back.
    """
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        return False
    try:
        foreground = os.tcgetpgrp(out.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False  # not a terminal after all, or out has no descriptor
    if foreground:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return foreground


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
    if tty:
        take_ctrl_c(out)
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


def cmd_attach(args: argparse.Namespace, client: ControlClient, out: TextIO) -> int:
    """Dial HOST:PORT (or take the inherited descriptor --fd N) and hand it to kmuxd."""
    if args.fd is not None:
        answer = client.attach(args.group, args.fd)
    else:
        host, _, port = args.address.rpartition(":")
        try:
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=args.timeout)
        except (OSError, ValueError) as exc:
            raise ConnectFailed(f"dialling {args.address}: {exc}") from None
        with sock:  # kmuxd holds its own copy now; ours closes with this process
            answer = client.attach(args.group, sock)
    if args.json:
        out.write(_json_line(_without_ok(answer), pretty=True) + "\n")
    else:
        out.write(f"group {args.group}: attached as connection {answer.get('conn')} (to {answer.get('remote')})\n")
    return EXIT_OK


def cmd_unattach(args: argparse.Namespace, client: ControlClient, out: TextIO) -> int:
    answer = client.unattach(args.group, args.conn, io_timeout=max(args.timeout, UNATTACH_WAIT_MAX))
    if args.json:
        out.write(_json_line(_without_ok(answer), pretty=True) + "\n")
    else:
        out.write(f"group {args.group} connection {args.conn}: unattached in {fmt_duration(answer.get('seconds'))}, "
                  f"{fmt_count(answer.get('owed'))} answers owed, {fmt_count(answer.get('unanswered'))} "
                  f"left unanswered (connection_lost or retried)\n")
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
                   help="refresh every SECONDS until Ctrl-C: --watch 2 or --watch=2 (a bare --watch: every 1 s)")
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
    p = command("attach", cmd_attach, "hand kmuxd a TCP connection for a group's pool (dial HOST:PORT, or --fd N)",
                watchable=False)
    p.add_argument("group", metavar="GROUP")
    p.add_argument("address", metavar="HOST:PORT", nargs="?", help="dial this and attach it")
    p.add_argument("--fd", metavar="N", type=int, help="attach descriptor N, inherited from the caller, instead")
    p = command("unattach", cmd_unattach, "take an attached connection out of its group once its answers are in",
                watchable=False)
    p.add_argument("group", metavar="GROUP")
    p.add_argument("conn", metavar="CONN", type=int)
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
    if args.command == "attach" and (args.address is None) == (args.fd is None):
        parser.error("attach needs HOST:PORT or --fd N (one of them)")
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
