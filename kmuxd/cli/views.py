"""What ``kmux-cli groups``, ``group NAME``, ``clients`` and ``status`` print.

Each view turns one control-socket ``stats`` answer into lines, with no
I/O, so it is tested on records built from the daemon's own dataclasses.
Records only ever gain keys and the daemon may be older or newer than the
CLI, so every field is read with ``.get``: a missing value shows as ``-``,
and a block that only a newer daemon fills in (the access policy, the
endpoint health table, the outage counters) is left out when none of its
keys are there rather than printed as a row of dashes.

Strings that an app chose (its hello ``name``, its process ``comm``) are
escaped before they reach a terminal (:func:`~kmuxd.cli.format.fmt_text`):
``kmux-cli`` runs as root, and a client must not be able to move its
cursor or retitle its window.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from kmux.errors import UnknownGroup

from .format import (
    MISSING,
    Column,
    RateTracker,
    fmt_byte_rate,
    fmt_bytes,
    fmt_count,
    fmt_duration,
    fmt_plain,
    fmt_rate,
    fmt_text,
    fmt_us,
    records,
    render_table,
)

__all__ = [
    "Rates",
    "problem_lines",
    "GROUP_COLUMNS",
    "CONN_COLUMNS",
    "ENDPOINT_COLUMNS",
    "CLIENT_COLUMNS",
    "groups_view",
    "find_group",
    "group_summary",
    "group_view",
    "clients_view",
    "select_clients",
    "status_view",
    "policy_short",
    "conns_updown",
]

#: Names of a policy list shown in the POLICY column before ``+N`` stands for the rest.
POLICY_NAMES_SHOWN = 2
#: Widest client NAME shown in the clients table (names may be 128 characters).
NAME_WIDTH = 24
#: Group counters that only a daemon with outage handling sends, in display order.
OUTAGE_COUNTERS = (
    ("retried", "requests_retried", fmt_count),
    ("retries exhausted", "retries_exhausted", fmt_count),
    ("queue timeouts", "queue_timeouts", fmt_count),
    ("slow consumers", "slow_consumers", fmt_count),
    ("responses dropped", "responses_dropped", fmt_count),
    ("recycles", "recycles", fmt_count),
    ("rx queued", "rx_queued_bytes", fmt_bytes),
    ("skipped", "skipped_msgs", fmt_count),
    ("skipped bytes", "skipped_bytes", fmt_bytes),
)


# -- cells ------------------------------------------------------------------------


def _get(field: str, fmt: Callable[[Any], str] = fmt_plain) -> Callable[[Mapping[str, Any]], str]:
    return lambda r: fmt(r.get(field))


def _tcp(field: str, fmt: Callable[[Any], str]) -> Callable[[Mapping[str, Any]], str]:
    """A TCP_INFO field; ``tcp`` is None when the slot has no connection."""
    return lambda r: fmt((r.get("tcp") or {}).get(field))


def fmt_sockopts(s: Any) -> str:
    """A connection's socket options as the kernel reported them: ``mark=0x2a tos=0xb8 cc=reno dev=lo``.

    Zero and empty values (the kernel's defaults) are left out; the congestion
    algorithm is always shown (every connection has one).
    """
    if not isinstance(s, Mapping):
        return MISSING
    parts = []
    for label, field, fmt in _SOCKOPT_CELLS:
        value = s.get(field)
        if value:
            parts.append(f"{label}={fmt(value)}")
    return " ".join(parts) or MISSING


def _hex(width: int) -> Callable[[Any], str]:
    return lambda v: f"{v:#0{width}x}" if _is_int(v) else fmt_text(v)


#: (label, field, format) of a connection's SOCKET cell, in display order.
_SOCKOPT_CELLS = (
    ("mark", "mark", _hex(0)),
    ("tos", "tos", _hex(4)),
    ("cc", "congestion", fmt_text),
    ("dev", "bind_device", fmt_text),
    ("lowat", "notsent_lowat", fmt_plain),
)


def socket_summary(sock: Any) -> str | None:
    """The group's ``[socket]`` line for ``kmux-cli group``: what is configured, and the port walk."""
    if not isinstance(sock, Mapping) or not isinstance(sock.get("configured"), Mapping):
        return None
    cfg = sock["configured"]
    parts = [f"{key} {_hex(0)(value) if key in ('mark', 'tos') else fmt_text(value)}"
             for key, value in cfg.items() if key != "source_ports"]
    ports, walk = cfg.get("source_ports"), sock.get("source_ports")
    if isinstance(ports, list) and len(ports) == 2:
        text = f"source_ports {fmt_plain(ports[0])}..{fmt_plain(ports[1])}"
        if isinstance(walk, Mapping):
            text += (f" ({fmt_count(walk.get('taken'))} taken, {fmt_count(walk.get('busy'))} busy, "
                     f"{fmt_count(walk.get('exhausted'))} exhausted)")
        parts.insert(0, text)
    return "    socket " + "  ".join(parts)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def conns_updown(r: Mapping[str, Any]) -> str:
    """``3/4``; ``0/4 DOWN`` when no connection is up (the group cannot carry a message)."""
    up = r.get("connections_up")
    text = f"{fmt_count(up)}/{fmt_count(r.get('connections_total'))}"
    return f"{text} DOWN" if _is_int(up) and up == 0 else text


def policy_short(access: Any) -> str:
    """The POLICY column: ``open``, or who is allowed in a few words (``u:alice,bob+1 g:kmux``)."""
    if not isinstance(access, Mapping):
        return MISSING
    if access.get("open") is True:
        return "open"
    parts = []
    for prefix, key in (("u", "users"), ("g", "groups")):
        entries = access.get(key)
        if not isinstance(entries, list):
            continue
        names = [_principal(e) for e in entries]
        shown = ",".join(names[:POLICY_NAMES_SHOWN]) or "none"
        more = len(names) - POLICY_NAMES_SHOWN
        parts.append(f"{prefix}:{shown}" + (f"+{more}" if more > 0 else ""))
    return " ".join(parts) or fmt_text(access.get("text"))


def _principal(entry: Any) -> str:
    """``[id, label]`` as the operator wrote it (the label), else the id."""
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        ident, label = entry
        return fmt_text(label) if isinstance(label, str) and label else fmt_plain(ident)
    return fmt_text(entry)


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


# -- columns ------------------------------------------------------------------------

GROUP_COLUMNS = [
    Column("GROUP", _get("name"), right=False),
    Column("CONNS", conns_updown),
    Column("CLIENTS", _get("clients", fmt_count)),
    Column("TX_MSGS", _get("tx_msgs", fmt_count)),
    Column("TX_BYTES", _get("tx_bytes", fmt_bytes)),
    Column("RX_MSGS", _get("rx_msgs", fmt_count)),
    Column("RX_BYTES", _get("rx_bytes", fmt_bytes)),
    Column("QUEUED", _get("queued_bytes", fmt_bytes)),
    Column("RETRIES", _get("tx_retries", fmt_count)),
    Column("REFUSED", _get("refused", fmt_count)),
    Column("POLICY", lambda r: policy_short(r.get("access")), right=False),
]

CONN_COLUMNS = [
    Column("CONN", _get("index", str)),  # a number to type back (attached ones are 1024 and up), never 1.0k
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
    Column("SKIPPED", _get("skipped_msgs", fmt_count)),
    Column("LAST_ERROR", _get("last_error"), right=False),
]

def fmt_origin(origin: Any) -> str:
    """``dialled``, or ``attached uid=U pid=P`` (an app made it and passed it in)."""
    if not isinstance(origin, Mapping):
        return MISSING
    if origin.get("kind") != "attached":
        return str(origin.get("kind", MISSING))
    return f"attached uid={origin.get('uid')} pid={origin.get('pid')}"


#: A group with attached connections: where each came from.
ORIGIN_COLUMN = Column("ORIGIN", lambda r: fmt_origin(r.get("origin")), right=False)

#: A group with [socket] options: each connection's, as the kernel reports them.
SOCKET_COLUMN = Column("SOCKET", lambda r: fmt_sockopts(r.get("socket")), right=False)


def last_failure(r: Mapping[str, Any]) -> str:
    """An endpoint's last failure as history: ``12.3s ago: bad framing: ...`` (``-``: none).
    Its HEALTH column is the verdict now, on its own."""
    reason = r.get("reason")
    if not reason:
        return MISSING
    age = r.get("reason_age")
    when = f"{fmt_duration(age)} ago: " if isinstance(age, (int, float)) and not isinstance(age, bool) else ""
    return when + fmt_text(reason)


#: One line per endpoint of ``endpoint_health``; RETRY_IN only means something off duty.
ENDPOINT_COLUMNS = [
    Column("ENDPOINT", _get("endpoint"), right=False),
    Column("HEALTH", _get("state"), right=False),
    Column("CONNS", _get("connections", fmt_count)),
    Column("RECYCLES", _get("recycles", fmt_count)),
    Column("FAILURES", _get("failures", fmt_count)),
    Column("RETRY_IN", lambda r: MISSING if r.get("state") == "healthy" else fmt_duration(r.get("retry_in"))),
    Column("LAST_FAILURE", last_failure, right=False),
]

CLIENT_COLUMNS = [
    Column("ID", _get("id", fmt_plain)),
    Column("NAME", lambda r: fmt_text(r.get("name"), NAME_WIDTH), right=False),
    Column("PID", _get("pid", fmt_plain)),
    Column("UID", _get("uid", fmt_plain)),
    Column("COMM", _get("comm", fmt_text), right=False),
    Column("GROUP", _get("group"), right=False),
    Column("RX_ON", _get("receiving"), right=False),
    Column("TX_MSGS", _get("tx_msgs", fmt_count)),
    Column("TX_BYTES", _get("tx_bytes", fmt_bytes)),
    Column("RX_MSGS", _get("rx_msgs", fmt_count)),
    Column("RX_BYTES", _get("rx_bytes", fmt_bytes)),
    Column("QUEUED", _get("queued_bytes", fmt_bytes)),
    Column("RX_QUEUED", _get("rx_queued_bytes", fmt_bytes)),
    Column("IN_FLIGHT", _get("in_flight", fmt_count)),
    # A group steers one way: held at the in-flight limit (id/fifo) or paced (balance), never both.
    Column("HELD", lambda r: fmt_duration(r.get("held_for") if r.get("paced_for") is None else r.get("paced_for"))),
    Column("HOLDS", lambda r: fmt_count(r.get("holds") if not r.get("paces") else r.get("paces"))),
    Column("SINCE", _get("connected_for", fmt_duration)),
]


# -- views --------------------------------------------------------------------------


def groups_view(answer: Mapping[str, Any], *, header: bool = True, rates: Rates | None = None) -> list[str]:
    """``kmux-cli groups``: one line per group."""
    groups = records(answer, "groups")
    columns = list(GROUP_COLUMNS)
    if rates is not None:
        columns[-1:-1] = rates.columns(_group_key, _TRAFFIC_RATES)  # POLICY, a text, stays last
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
    """The ``key value`` block above the tables, ``ip -s link`` style."""
    def c(field: str) -> str:
        return fmt_count(g.get(field))

    def b(field: str) -> str:
        return fmt_bytes(g.get(field))

    # id/fifo, from a daemon that counts them: clients held at their in-flight limit.
    held = (f", {c('clients_held')} held at their in-flight limit ({c('holds')} holds)"
            if "clients_held" in g and g.get("steering") in ("id", "fifo") else "")
    # balance, once a client was paced (client_rate_contended): clients paced for want of tokens.
    if g.get("paces") and g.get("steering") == "balance":
        held = f", {c('clients_paced')} paced ({c('paces')} paces)"
    up = g.get("connections_up")
    down = " (DOWN)" if _is_int(up) and up == 0 else ""
    lines = [
        f"group {fmt_plain(g.get('name'))}: {fmt_count(up)}/{c('connections_total')} connections up{down}, "
        f"{c('clients')} clients ({c('receivers_ready')} ready to receive, {c('waiting_clients')} waiting to send{held})",
        f"    endpoints {fmt_plain(g.get('endpoints'))}  framing {fmt_plain(g.get('framing'))}  "
        f"steering {fmt_plain(g.get('steering'))}  up {fmt_duration(g.get('uptime'))}",
    ]
    access = g.get("access")
    if isinstance(access, Mapping):
        lines.append(f"    access {fmt_text(access.get('text')) if access.get('text') else policy_short(access)}")
    lines += security_lines(g.get("security"))
    lines += [
        f"    tx {c('tx_msgs')} msgs {b('tx_bytes')}  rx {c('rx_msgs')} msgs {b('rx_bytes')}  "
        f"queued {c('queued_msgs')} msgs {b('queued_bytes')}  in flight {c('requests_in_flight')}",
        f"    latency p50 {fmt_us(g.get('latency_p50_us'))} p99 {fmt_us(g.get('latency_p99_us'))}  "
        f"retries {c('tx_retries')}  refused {c('refused')}  requeued {c('requeued')}  "
        f"rx_paused {c('rx_paused')}  unmatched {c('unmatched_responses')}  notices {c('notices_sent')}",
    ]
    if any(field in g for _, field, _ in OUTAGE_COUNTERS):
        lines.append("    " + "  ".join(f"{label} {fmt(g.get(field))}" for label, field, fmt in OUTAGE_COUNTERS))
    lines.append(f"    clients joined {c('clients_joined')}  left {c('clients_left')}")
    sock = socket_summary(g.get("socket"))
    if sock is not None:
        lines.append(sock)
    return lines


def security_lines(sec: Any) -> list[str]:
    """TLS and handshake steps, and the loud warning when TLS does not verify the server."""
    if not isinstance(sec, Mapping) or not (sec.get("tls") or sec.get("handshake_steps")):
        return []
    parts = []
    if sec.get("tls"):
        verify = "verify on" if sec.get("verify") else "VERIFY OFF"
        parts.append(f"tls {fmt_plain(sec.get('min_version'))}+ {verify}"
                     + (f" name {fmt_text(sec.get('server_name'))}" if sec.get("server_name") else "")
                     + ("  client cert" if sec.get("client_cert") else "")
                     + f"  handshakes {fmt_count(sec.get('tls_handshakes'))} resumed {fmt_count(sec.get('tls_resumed'))}")
    if sec.get("handshake_steps"):
        parts.append(f"handshake steps {fmt_count(sec.get('handshake_steps'))}")
    lines = ["    " + "  ".join(parts)]
    if sec.get("warning"):
        lines.append(f"    WARNING: {fmt_text(sec.get('warning'))}")
    return lines


def group_view(
    answer: Mapping[str, Any], name: str, *, header: bool = True, rates: Rates | None = None
) -> list[str]:
    """``kmux-cli group NAME``: the summary, the endpoints' health (when sent), one line per connection."""
    g = find_group(answer, name)
    conns = [r for r in g.get("connections") or [] if isinstance(r, Mapping)]
    lines = group_summary(g)
    columns = list(CONN_COLUMNS)
    if g.get("socket"):
        columns.insert(-1, SOCKET_COLUMN)  # before LAST_ERROR, a text that stays last
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
    if any(isinstance(c.get("origin"), Mapping) and c["origin"].get("kind") == "attached" for c in conns):
        columns.insert(3, ORIGIN_COLUMN)  # after ENDPOINT: how the connection came to be
    health = g.get("endpoint_health")
    if isinstance(health, list):
        lines.append("")
        lines += render_table(ENDPOINT_COLUMNS, [e for e in health if isinstance(e, Mapping)], header=header)
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


def _by_key(counts: Any) -> str:
    """``{code: n}`` as `` (a 2, b 1)``, largest first; "" when empty or not a map."""
    if not isinstance(counts, Mapping):
        return ""
    items = sorted(((k, v) for k, v in counts.items() if _is_int(v) and v), key=lambda kv: (-kv[1], str(kv[0])))
    return " (" + ", ".join(f"{fmt_text(k)} {fmt_count(v)}" for k, v in items) + ")" if items else ""


def _total(counts: Any) -> int | None:
    """The sum of a ``{key: count}`` map; None when it is not one."""
    return sum(v for v in counts.values() if _is_int(v)) if isinstance(counts, Mapping) else None


def problem_lines(problems: Any) -> list[str]:
    """``key.path: reason`` for each ``[path, reason]`` of a config_invalid error; [] if it has none."""
    if not isinstance(problems, (list, tuple)):
        return []
    out = []
    for p in problems:
        if isinstance(p, (list, tuple)) and len(p) == 2:
            path, reason = p
            out.append(f"{fmt_text(path)}: {fmt_text(reason)}" if path else fmt_text(reason))
    return out


def status_view(answer: Mapping[str, Any]) -> list[str]:
    """``kmux-cli status``: the daemon record (and the control socket's own counters, when sent)."""
    d = answer.get("daemon") if isinstance(answer.get("daemon"), Mapping) else {}
    groups = d.get("groups")
    ngroups = len(groups) if isinstance(groups, (list, tuple)) else groups
    lines = [
        f"kmuxd {fmt_plain(d.get('version'))}  pid {fmt_plain(d.get('pid'))}  up {fmt_duration(d.get('uptime'))}",
        f"    config {fmt_plain(d.get('config'))}",
        f"    socket {fmt_plain(d.get('socket'))}  control {fmt_plain(d.get('control_socket'))}",
        f"    clients {fmt_count(d.get('clients'))}  groups {fmt_count(ngroups)}",
        f"    hellos accepted {fmt_count(d.get('clients_accepted'))}  "
        f"refused {fmt_count(d.get('clients_refused'))}{_by_key(d.get('refused_by_code'))}",
    ]
    reloads = f"    reloads {fmt_count(d.get('reloads'))}  failed {fmt_count(d.get('reload_failures'))}  last error "
    problems = problem_lines(d.get("last_reload_problems"))
    if len(problems) > 1:
        # A refused file's problems, one per line (the error's text says them all on one).
        lines.append(f"{reloads}config_invalid, {len(problems)} problems:")
        lines += [f"        {line}" for line in problems]
    else:
        lines.append(f"{reloads}{fmt_plain(d.get('last_reload_error'))}")
    control = answer.get("control")
    if isinstance(control, Mapping):
        requests, refused = control.get("requests"), control.get("refused")
        lines.append(
            f"    control requests {fmt_count(_total(requests))}{_by_key(requests)}  "
            f"refused {fmt_count(_total(refused))}{_by_key(refused)}  errors {fmt_count(control.get('errors'))}"
        )
    return lines
