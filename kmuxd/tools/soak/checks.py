"""The soak's verdict: totals per group and every check, from what was collected (no I/O).

Inputs (:class:`Evidence`): the clients' session records (:mod:`.client`),
the backends' report (:mod:`.backends`), the group records of
``kmux-cli groups -j`` taken once the daemon was quiet, the daemon's RSS and
open descriptors over the run, and what went wrong in the processes.

What each check means
---------------------
``one outcome``
    Every request of a session that left gracefully has exactly one outcome:
    its response, or one notice naming its ``seq``; no request got two, and
    nothing answered a request never sent. (Requests outstanding when a
    session left abruptly are *abandoned*: owed nothing, counted apart.)
``no cross-delivery``
    No client received a message of another session (nor an unasked frame
    from the backend); a ``balance`` sender with receiving off got no data.
``intact``
    No torn or garbled message, at a client or at a backend.
``ids``
    ``id`` steering gave every response and notice back the client's own id.
``order``
    Per session, responses arrived in order per backend connection; per
    session, requests arrived at each backend connection in order.
``written once``
    No request reached the backends twice (unless ``retry_unanswered``).
``notice codes``
    Only codes the run's settings can produce.
``one-way delivery``
    ``balance``: each session's messages all reached a backend (less those
    refused with a notice); a session that left abruptly may fall short by
    what the daemon had not read yet, at most the group's ``dropped_unread``
    for all of them together.
``counters``
    ``kmux-cli groups -j`` agrees with the clients' and backends' counts:
    exactly where nothing is unknown, else within the bound set by the
    abandoned requests (a client that left cannot report what it would have
    received). Each comparison is listed in ``detail``.
``quiet``
    After the clients left: no client attached, every connection up,
    nothing queued, nothing in flight.
``rss`` / ``fds``
    RSS growth from the end of the warm-up to the end within the bound;
    open descriptors back to the baseline taken before any client.
``processes``
    The daemon ran throughout and stopped cleanly; every client process
    finished its sessions; every connect succeeded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Check", "Evidence", "GroupTotals", "group_totals", "evaluate", "NOT_WRITTEN_CODES"]

#: Notice codes that mean "this message was never written".
NOT_WRITTEN_CODES = frozenset({"id_in_use", "ids_exhausted", "bad_frame", "message_too_big", "group_unavailable"})
#: Notice codes that end a written request.
REMOTE_CODES = frozenset({"connection_lost", "request_timeout"})
#: Problem descriptions carried into the verdict, per check.
EXAMPLES = 5


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class GroupTotals:
    """One group's sessions, added up."""

    name: str
    mode: str
    sessions: int = 0
    graceful: int = 0
    abrupt: int = 0
    connect_errors: int = 0
    sent: int = 0
    sent_bytes: int = 0
    responses: int = 0
    notices: Counter = field(default_factory=Counter)
    abandoned: int = 0
    missing: int = 0
    problems: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def not_written(self) -> int:
        return sum(n for code, n in self.notices.items() if code in NOT_WRITTEN_CODES)

    @property
    def remote_notices(self) -> int:
        return sum(n for code, n in self.notices.items() if code in REMOTE_CODES)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "sessions": self.sessions, "graceful": self.graceful, "abrupt": self.abrupt,
            "connect_errors": self.connect_errors, "requests": self.sent, "bytes": self.sent_bytes,
            "responses": self.responses, "notices": dict(self.notices), "abandoned": self.abandoned,
            "missing": self.missing, "problems": dict(self.problems), "examples": self.examples[:EXAMPLES],
        }


@dataclass
class Evidence:
    """Everything the driver collected (see the module docstring)."""

    groups: dict[str, str]  # name -> steering mode
    sessions: list[dict[str, Any]]
    backends: dict[str, dict[str, Any]]
    cli_groups: list[dict[str, Any]]
    settings: dict[str, Any]
    rss_kib: dict[str, int]  # before_clients, after_warmup, end, peak
    fds: dict[str, int]  # baseline, end, peak
    quiet: dict[str, Any]  # reached, seconds, last (problems when not reached)
    process_problems: list[str]
    daemon_exit: int | None
    #: the operator actions taken (driver.Operation fields and ``result``)
    operations: list[dict[str, Any]] = field(default_factory=list)


def group_totals(groups: dict[str, str], sessions: list[dict[str, Any]]) -> dict[str, GroupTotals]:
    totals = {name: GroupTotals(name, mode) for name, mode in groups.items()}
    for s in sessions:
        t = totals.get(s.get("group"))
        if t is None:
            continue
        if "connect_error" in s:
            t.connect_errors += 1
            t.examples.append(f"session {s['session']}: connect failed: {s['connect_error']}")
            continue
        t.sessions += 1
        t.graceful += s["departure"] == "graceful"
        t.abrupt += s["departure"] == "abrupt"
        t.sent += s["sent"]
        t.sent_bytes += s["sent_bytes"]
        t.responses += s["responses"]
        t.notices.update(s["notices"])
        t.abandoned += s["abandoned"]
        t.missing += s["missing"]
        t.problems.update(s["problems"])
        for e in s["examples"]:
            if len(t.examples) < EXAMPLES * 4:
                t.examples.append(f"session {s['session']}: {e}")
    return totals


def _problem_check(name: str, totals: dict[str, GroupTotals], kinds: tuple[str, ...], backend_field: str = "",
                   backends: dict[str, dict[str, Any]] | None = None) -> Check:
    parts, bad = [], 0
    for t in totals.values():
        n = sum(t.problems.get(k, 0) for k in kinds)
        b = (backends or {}).get(t.name, {}).get(backend_field, 0) if backend_field else 0
        bad += n + b
        if n or b:
            shown = [e for e in t.examples if any(f"{k}:" in e for k in kinds)][:EXAMPLES]
            parts.append(f"{t.name}: {n} at clients, {b} at backends; " + "; ".join(shown))
    if backends and backend_field:
        for group, b in backends.items():
            if b.get(backend_field) and b.get("examples"):
                parts.append(f"{group} backend: " + "; ".join(b["examples"][:EXAMPLES]))
    return Check(name, bad == 0, "; ".join(parts) if parts else "0")


def _compare(label: str, value: Any, low: int, high: int | None = None) -> tuple[bool, str]:
    """``value`` within [low, high] (high None: exactly low)."""
    if value is None:
        return False, f"{label}: missing from kmux-cli"
    high = low if high is None else high
    ok = low <= value <= high
    want = f"{low}" if low == high else f"{low}..{high}"
    return ok, f"{label} {value} {'=' if ok else '!='} {want}"


def _counter_checks(t: GroupTotals, g: dict[str, Any] | None, b: dict[str, Any], settings: dict[str, Any]
                    ) -> list[tuple[bool, str]]:
    if g is None:
        return [(False, f"{t.name}: no such group in kmux-cli groups -j")]
    exact = not settings["queue_timeout"] and not settings["retry_unanswered"]
    out = [
        _compare("clients_joined", g.get("clients_joined"), t.sessions),
        _compare("clients_left", g.get("clients_left"), t.sessions),
        _compare("clients", g.get("clients"), 0),
    ]
    written = t.sent - t.not_written
    # A session that left abruptly (no flush) while the daemon pushed it back
    # left packets unread: the daemon dropped and counted them, never wrote them.
    unread = g.get("dropped_unread") or 0
    if t.mode == "balance":
        out.append(_compare("tx_msgs", g.get("tx_msgs"), written - unread, written))
        out.append(_compare("backend frames", b.get("frames"), g.get("tx_msgs") or 0))
        out.append(_compare("rx_msgs", g.get("rx_msgs"), 0))
        if exact:
            out.append(_compare("backend bytes", b.get("bytes"), 0 if unread else t.sent_bytes, t.sent_bytes))
        return out
    # A request a client abandoned may have been refused after it left (queue_timeout):
    # its refusal is unseen, so the bound widens by the abandoned requests.
    unseen = t.abandoned if settings["queue_timeout"] else 0
    if exact:
        out.append(_compare("tx_msgs", g.get("tx_msgs"), written - unread, written))
    else:
        out.append(_compare("tx_msgs", g.get("tx_msgs"), written - unseen, 1 << 62))
    out.append(_compare("rx_msgs", g.get("rx_msgs"), t.responses, t.responses + t.abandoned))
    failed = (g.get("requests_failed") or 0) + (g.get("requests_timed_out") or 0)
    out.append(_compare("requests_failed+requests_timed_out", failed, t.remote_notices,
                        t.remote_notices + t.abandoned))
    out.append(_compare("refused", g.get("refused"), t.not_written, t.not_written + unseen))
    out.append(_compare("backend frames <= tx_msgs", b.get("frames"), 0, g.get("tx_msgs") or 0))
    stray, at_risk = b.get("stray_sent", 0), b.get("stray_at_risk", 0)
    out.append(_compare("unmatched_responses", g.get("unmatched_responses"), stray - at_risk, stray))
    return out


def _oneway_delivery(t: GroupTotals, b: dict[str, Any], sessions: list[dict[str, Any]],
                     g: dict[str, Any] | None) -> tuple[int, list[str]]:
    """Sessions whose messages did not all reach the backend (less those refused with a notice).

    A graceful session flushed before it closed, so every message it sent
    must arrive. A session that left abruptly may fall short: what the
    daemon had not read yet (pushed back, or paced: ``client_rate_contended``)
    was dropped when it hung up, and counted in the group's
    ``dropped_unread``. So the abrupt sessions' shortfall, together, must be
    at most that count, and no session may ever have more arrive than it sent.
    """
    got = b.get("per_session", {})
    unread = (g or {}).get("dropped_unread") or 0
    bad, examples = 0, []
    short_abrupt = 0
    for s in sessions:
        if s.get("group") != t.name or "connect_error" in s:
            continue
        refused = sum(n for code, n in s["notices"].items() if code in NOT_WRITTEN_CODES)
        arrived = got.get(str(s["session"]), 0)
        want = s["sent"] - refused
        if s.get("departure") == "abrupt" and arrived < want:
            short_abrupt += want - arrived
            continue
        if arrived != want:
            bad += 1
            if len(examples) < EXAMPLES:
                examples.append(f"session {s['session']}: sent {s['sent']}, refused {refused}, "
                                f"the backend read {arrived}")
    if short_abrupt > unread:
        bad += 1
        examples.append(f"sessions that left abruptly are {short_abrupt} message(s) short, "
                        f"more than the daemon's dropped_unread {unread}")
    return bad, examples


def evaluate(ev: Evidence) -> tuple[dict[str, GroupTotals], list[Check]]:
    totals = group_totals(ev.groups, ev.sessions)
    settings = ev.settings
    backends = ev.backends
    checks = [
        _problem_check("one outcome", totals, ("missing", "second_outcome", "never_sent", "notice_without_seq")),
        _problem_check("no cross-delivery", totals, ("cross_delivery", "unexpected_data")),
        _problem_check("intact", totals, ("torn",), "torn", backends),
        _problem_check("ids", totals, ("wrong_id",)),
    ]
    if settings["retry_unanswered"]:
        # A request written again lands on another connection after later ones: neither
        # order nor "read once" can be asked of the backends then.
        skipped = "not checked: retry_unanswered writes requests again"
        checks += [Check("order", True, skipped), Check("written once", True, skipped)]
    else:
        checks.append(_problem_check("order", totals, ("order",), "order", backends))
        dup = {n: b.get("duplicates", 0) for n, b in backends.items()}
        checks.append(Check("written once", not any(dup.values()), ", ".join(f"{n} {v}" for n, v in dup.items())))

    allowed = {"connection_lost"}
    if settings["request_timeout"]:
        allowed.add("request_timeout")
    if settings["queue_timeout"]:
        allowed.add("group_unavailable")
    seen = Counter()
    for t in totals.values():
        seen.update(t.notices)
    extra = sorted(set(seen) - allowed)
    checks.append(Check("notice codes", not extra,
                        f"unexpected {', '.join(f'{c} x{seen[c]}' for c in extra)}" if extra
                        else f"within {sorted(allowed)}"))

    oneway_bad, oneway_examples = 0, []
    groups_seen = {g.get("name"): g for g in ev.cli_groups}
    for t in totals.values():
        if t.mode == "balance":
            n, ex = _oneway_delivery(t, backends.get(t.name, {}), ev.sessions, groups_seen.get(t.name))
            oneway_bad += n
            oneway_examples += [f"{t.name}: {e}" for e in ex]
    checks.append(Check("one-way delivery", oneway_bad == 0,
                        f"{oneway_bad} session(s) short or over: " + "; ".join(oneway_examples) if oneway_bad
                        else "every session's messages reached a backend exactly once"))

    by_name = {g.get("name"): g for g in ev.cli_groups}
    results, failures = [], []
    for t in totals.values():
        for ok, text in _counter_checks(t, by_name.get(t.name), backends.get(t.name, {}), settings):
            results.append(f"{t.name} {text}")
            if not ok:
                failures.append(f"{t.name} {text}")
    checks.append(Check("counters", not failures,
                        ("disagree: " + "; ".join(failures)) if failures else f"{len(results)} comparisons agree"))

    q = ev.quiet
    checks.append(Check("quiet", bool(q.get("reached")),
                        f"after {q.get('seconds')} s" if q.get("reached") else f"not reached: {q.get('last')}"))

    rss = ev.rss_kib
    growth_kib = rss.get("end", 0) - rss.get("after_warmup", 0)
    bound_kib = int(settings["rss_growth_mib"] * 1024)
    checks.append(Check("rss", growth_kib <= bound_kib,
                        f"{rss.get('after_warmup', 0) / 1024:.1f} -> {rss.get('end', 0) / 1024:.1f} MiB "
                        f"(growth {growth_kib / 1024:+.1f} MiB, bound {settings['rss_growth_mib']} MiB)"))
    fds = ev.fds
    checks.append(Check("fds", fds.get("end") == fds.get("baseline"),
                        f"baseline {fds.get('baseline')}, end {fds.get('end')}, peak {fds.get('peak')}"
                        + (f"; {fds['diff']}" if fds.get("diff") else "")))

    procs = list(ev.process_problems)
    connect_errors = sum(t.connect_errors for t in totals.values())
    client_errors = sum(t.problems.get("client_error", 0) for t in totals.values())
    if connect_errors:
        procs.append(f"{connect_errors} connect(s) failed: "
                     + "; ".join(e for t in totals.values() for e in t.examples if "connect failed" in e)[:400])
    if client_errors:
        procs.append(f"{client_errors} client error(s): "
                     + "; ".join(e for t in totals.values() for e in t.examples if "client_error" in e)[:400])
    if ev.daemon_exit not in (0, None):
        procs.append(f"kmuxd exited with status {ev.daemon_exit}")
    checks.append(Check("processes", not procs, "; ".join(procs) if procs else "all ran and stopped cleanly"))
    return totals, checks
