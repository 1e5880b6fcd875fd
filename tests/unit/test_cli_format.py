"""kmux-cli without a daemon: units, tables, watch, metrics and exit codes.

Everything runs on canned answers shaped like the daemon's records (the
``stats`` answer of "Control socket, version 1"), so the formatting rules
and the Prometheus output are pinned down independently of the daemon.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import re
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kmux.errors import DaemonUnavailable, KmuxError, ControlTimeout, UnknownGroup, error_from_code
from kmuxd.cli import main as kmuxcli
from kmuxd.core.access import OPEN, AccessPolicy, Principal
from kmuxd.io.conn import ConnStatistics
from kmuxd.io.control import ControlStatistics, to_wire
from kmuxd.io.daemon import DaemonStatistics
from kmuxd.io.group import GroupStatistics
from kmuxd.io.session import ClientStatistics
from kmuxd.io.tcpinfo import TcpInfo
from kmuxd.cli.format import (
    Column,
    RateTracker,
    fmt_byte_rate,
    fmt_bytes,
    fmt_count,
    fmt_duration,
    fmt_plain,
    fmt_rate,
    fmt_us,
    render_table,
)
from kmuxd.cli.views import NAME_WIDTH, policy_short
from kmuxd.cli.main import (
    EXIT_FAILED,
    EXIT_NO_SUCH,
    EXIT_NOT_RUNNING,
    EXIT_PERMISSION,
    Rates,
    clients_view,
    exit_status,
    group_view,
    groups_view,
    metrics_text,
    parse_args,
    status_view,
    watch,
)


#: Fields the daemon's records are gaining (outage handling, access policies)
#: that its dataclasses may not have yet; the wire carries them as plain keys.
UPCOMING: dict[type, set[str]] = {GroupStatistics: set(), ClientStatistics: set(), DaemonStatistics: set(),
                                   ConnStatistics: set()}


def _zero(annotation: Any) -> Any:
    # A string under `from __future__ import annotations`; the type itself in a
    # dataclass compiled by mypyc.
    if not isinstance(annotation, str):
        annotation = getattr(annotation, "__name__", str(annotation))
    if "None" in annotation or annotation == "type":  # mypyc keeps "X | None" only as `type`
        return None
    return {"int": 0, "float": 0.0, "str": "", "bool": False, "dict": {}}.get(annotation.split("[")[0], ())


def record(cls: type, **values: Any) -> dict[str, Any]:
    """A record as the daemon sends it: ``to_wire`` of the real statistics dataclass.

    Fields the test leaves out get zero values; a key the dataclass does
    not have must be one of the announced UPCOMING fields, so a renamed or
    misspelt field fails here instead of rendering as ``-``.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    extra = {k: v for k, v in values.items() if k not in names}
    assert set(extra) <= UPCOMING[cls], f"{cls.__name__} has no field(s) {sorted(set(extra) - UPCOMING[cls])}"
    fields = {f.name: values.get(f.name, _zero(f.type)) for f in dataclasses.fields(cls)}
    return {**to_wire(cls(**fields)), **extra}


def conn(index: int, *, up: bool = True, **kw: Any) -> dict[str, Any]:
    values = {
        "index": index, "state": "ready" if up else "backoff", "endpoint": "10.0.0.1:9000",
        "local": f"10.0.0.9:{40000 + index}" if up else None, "remote": "10.0.0.1:9000" if up else None,
        "age": 192.0 if up else 0.0, "tx_msgs": 1234, "tx_bytes": 3_565_158, "rx_msgs": 1200, "rx_bytes": 1_500_000,
        "queued_bytes": 512, "queued_msgs": 2, "reconnects": 1, "last_error": None if up else "ECONNREFUSED: connect",
        "tcp": TcpInfo(rtt_us=850, rttvar_us=120, retransmits=0, total_retrans=3, snd_cwnd=10, unacked=1)
        if up else None,
    }
    values.update(kw)
    return record(ConnStatistics, **values)


def group(name: str, conns: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    values = {
        "name": name, "endpoints": ("10.0.0.1:9000",), "framing": "u32be", "steering": "balance",
        "connections_up": sum(1 for c in conns if c["state"] == "ready"), "connections_total": len(conns),
        "clients": 2, "receivers_ready": 1, "tx_msgs": 1_234_567, "tx_bytes": 3_565_158_400,
        "rx_msgs": 999, "rx_bytes": 512, "tx_retries": 4, "clients_joined": 7, "clients_left": 5, "rx_ready_drops": 0,
        "rx_paused": 1, "queued_msgs": 3, "queued_bytes": 2048, "waiting_clients": 0, "refused": 1,
        "requeued": 0, "uptime": 3600.5, "requests_in_flight": 5, "notices_sent": 2,
        "unmatched_responses": 0, "latency_p50_us": 850, "latency_p99_us": 12_300,
    }
    values.update(kw)
    return {**record(GroupStatistics, **values), "connections": conns}


def client(cid: int, grp: str, **kw: Any) -> dict[str, Any]:
    values = {
        "id": cid, "name": "", "group": grp, "pid": 4000 + cid, "uid": 1000, "comm": "worker",
        "state": "receiving", "receiving": True, "tx_msgs": 10, "tx_bytes": 1000, "queued_msgs": 0,
        "queued_bytes": 0, "rx_msgs": 5, "rx_bytes": 500, "refused": 0, "requeued": 0,
        "notices_sent": 0, "notices_pending": 0, "connected_for": 75.0,
    }
    values.update(kw)
    return record(ClientStatistics, **values)


def daemon_record(**kw: Any) -> dict[str, Any]:
    values = {
        "version": "0.1.0", "pid": 321, "uptime": 7200.0, "config": "/etc/kmuxd/kmuxd.toml",
        "socket": "/run/kmuxd/kmuxd.sock", "control_socket": "/run/kmuxd/control.sock",
        "clients": 3, "groups": 2, "reloads": 1, "reload_failures": 0, "last_reload_error": None,
    }
    values.update(kw)
    return record(DaemonStatistics, **values)


#: Fields an older daemon (before access policies, endpoint health and the
#: outage counters) does not send: kmux-cli must render its answers too.
OLDER_DAEMON_LACKS = {
    "groups": {"access", "endpoint_health", "requests_retried", "retries_exhausted", "queue_timeouts",
               "slow_consumers", "responses_dropped", "recycles", "rx_queued_bytes", "dropped_unread", "down",
               "skipped_msgs", "skipped_bytes"},
    "clients": {"rx_queued_bytes", "rx_queued_msgs", "gid"},
    "daemon": {"refused_by_code", "reactor"},
}


def older(record: dict[str, Any], kind: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in OLDER_DAEMON_LACKS[kind]}


def stats() -> dict[str, Any]:
    """A stats answer of an older daemon: no access policies, endpoint health or outage counters."""
    return {
        "ok": True,
        "daemon": older(daemon_record(), "daemon"),
        "groups": [
            older(group("web", [conn(0), conn(1, up=False)]), "groups"),
            older(group("cache", [conn(0)], latency_p99_us=None), "groups"),
        ],
        "clients": [older(c, "clients") for c in
                    (client(3, "web"), client(1, "web", receiving=False), client(2, "cache", comm="batch job"))],
    }


ALICE_AND_KMUX = AccessPolicy(users=(Principal(1000, "alice"), Principal(1042, "1042")),
                              groups=(Principal(998, "kmux"),))
HEALTH = [
    {"endpoint": "10.0.0.1:9000", "state": "healthy", "reason": None, "connections": 3, "recycles": 12,
     "failures": 0, "retry_in": 0.0},
    {"endpoint": "10.0.0.2:9000", "state": "ejected", "reason": "ECONNREFUSED: connect to 10.0.0.2:9000",
     "connections": 0, "recycles": 0, "failures": 7, "retry_in": 12.5, "reason_age": 0.5},
    # Healthy again since: the failure is history, with its age; the verdict stands on its own.
    {"endpoint": "10.0.0.3:9000", "state": "healthy", "reason": "bad framing: out of step", "connections": 1,
     "recycles": 0, "failures": 1, "retry_in": 0.0, "reason_age": 754.0},
]
OUTAGE = {"requests_retried": 3, "retries_exhausted": 1, "queue_timeouts": 2, "slow_consumers": 1,
          "responses_dropped": 0, "recycles": 12, "rx_queued_bytes": 3 * 1024**2, "skipped_msgs": 2,
          "skipped_bytes": 400056}


def stats_new() -> dict[str, Any]:
    """A stats answer of a daemon with access policies, endpoint health, outage counters and control stats."""
    return {
        "ok": True,
        "daemon": daemon_record(clients_accepted=40, clients_refused=5,
                                refused_by_code={"unknown_group": 1, "permission_denied": 4}),
        "groups": [
            group("web", [conn(0), conn(1, up=False)], access=ALICE_AND_KMUX.to_wire(), endpoint_health=tuple(HEALTH),
                  endpoints=("10.0.0.1:9000", "10.0.0.2:9000"), **OUTAGE),
            group("down", [conn(0, up=False)], access=OPEN.to_wire(), endpoint_health=tuple(HEALTH[1:]), **OUTAGE),
        ],
        "clients": [client(1, "web", name="billing-worker", rx_queued_bytes=2048),
                    older(client(2, "web", name="\x1b]0;owned\x07" + "x" * 100, comm="evil\x1b[2J"), "clients")],
        "control": to_wire(ControlStatistics(connections=1, connections_total=9,
                                             requests={"stats": 8, "reload": 1}, refused={"reload": 1}, errors=0)),
    }


def cells(line: str) -> list[str]:
    """Table cells: columns are separated by two or more spaces, cells hold at most single ones."""
    return re.split(r"\s{2,}", line.strip())


# -- units ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [(0, "0"), (999, "999"), (1000, "1.0k"), (1234, "1.2k"), (12_345, "12.3k"), (123_456, "123k"),
     (999_999, "1.0M"), (3_400_000, "3.4M"), (5.6e9, "5.6G"), (None, "-"), ("x", "-"), (True, "-")],
)
def test_fmt_count(value: Any, text: str) -> None:
    assert fmt_count(value) == text


@pytest.mark.parametrize(
    "value, text",
    [(0, "0 B"), (512, "512 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
     (3_565_158, "3.4 MiB"), (1024**2 - 1, "1.0 MiB"), (5 * 1024**3, "5.0 GiB"), (None, "-")],
)
def test_fmt_bytes(value: Any, text: str) -> None:
    assert fmt_bytes(value) == text


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (850e-6, "850µs"), (7e-6, "7µs"), (2.5e-6, "2.5µs"), (0.0123, "12.3ms"), (0.00123, "1.23ms"),
     (0.25, "250ms"), (4.2, "4.2s"), (59.99, "1m00s"), (192, "3m12s"), (7500, "2h05m"), (273600, "3d04h"),
     (None, "-"), (float("nan"), "-")],
)
def test_fmt_duration(seconds: Any, text: str) -> None:
    assert fmt_duration(seconds) == text


def test_fmt_us_rate_plain() -> None:
    assert fmt_us(850) == "850µs"
    assert fmt_us(12_300) == "12.3ms"
    assert fmt_us(None) == "-"
    assert fmt_rate(1234.4) == "1.2k/s"
    assert fmt_rate(0) == "0/s"
    assert fmt_rate(None) == "-"
    assert fmt_byte_rate(3.4 * 1024**2) == "3.4 MiB/s"
    assert fmt_plain(True) == "yes" and fmt_plain(False) == "no"
    assert fmt_plain(["a:1", "b:2"]) == "a:1,b:2"
    assert fmt_plain(None) == fmt_plain("") == "-"


def test_render_table_aligns_and_survives_bad_rows() -> None:
    cols = [Column("NAME", lambda r: r["name"], right=False), Column("N", lambda r: fmt_count(r["n"]))]
    lines = render_table(cols, [{"name": "a", "n": 1}, {"name": "longer", "n": 12_345}, {"n": 1}])
    assert lines == ["NAME        N", "a           1", "longer  12.3k", "-           1"]
    assert render_table(cols, [{"name": "a", "n": 1}], header=False) == ["a  1"]


def test_rate_tracker() -> None:
    t = RateTracker()
    assert t.rate("k", {"n": 10}, "n", 1.0) is None  # first sample
    t.commit("k", {"n": 10}, 1.0)
    t.advance()
    assert t.rate("k", {"n": 30}, "n", 3.0) == 10.0
    assert t.rate("k", {"n": 5}, "n", 3.0) is None  # counter went backwards: no rate
    assert t.rate("other", {"n": 5}, "n", 3.0) is None
    t.advance()  # nothing committed: everything forgotten
    assert t.rate("k", {"n": 30}, "n", 4.0) is None


# -- views ---------------------------------------------------------------------


def test_groups_view() -> None:
    lines = groups_view(stats())
    assert lines[0].split() == [
        "GROUP", "CONNS", "CLIENTS", "TX_MSGS", "TX_BYTES", "RX_MSGS", "RX_BYTES", "QUEUED", "RETRIES", "REFUSED",
        "POLICY",
    ]
    # Today's daemon sends no access policy: POLICY shows "-".
    assert lines[1].split() == ["web", "1/2", "2", "1.2M", "3.3", "GiB", "999", "512", "B", "2.0", "KiB", "4", "1",
                                "-"]
    assert lines[2].startswith("cache")
    pos = lines[0].index("POLICY")  # aligned: every row's last column starts under its header
    assert all(line[pos - 2 : pos] == "  " and line[pos] != " " for line in lines)
    assert len({len(line[:pos]) for line in lines}) == 1
    assert groups_view(stats(), header=False)[0].startswith("web")


def test_views_show_missing_keys_as_dash() -> None:
    answer = {"ok": True, "groups": [{"name": "old"}], "clients": [{"id": 1}]}
    assert groups_view(answer)[1].split() == ["old", "-/-"] + ["-"] * 9
    assert set(clients_view(answer)[1].split()) == {"1", "-"}
    assert group_view(answer, "old")[0].startswith("group old: -/- connections up")
    assert status_view({"ok": True})[0] == "kmuxd -  pid -  up -"


def test_group_view_has_tcp_info_per_connection() -> None:
    lines = group_view(stats(), "web")
    assert lines[0] == "group web: 1/2 connections up, 2 clients (1 ready to receive, 0 waiting to send)"
    assert "latency p50 850µs p99 12.3ms" in lines[3]
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("CONN ")) :]
    assert table[0].split()[:3] == ["CONN", "STATE", "ENDPOINT"]
    assert table[0].split()[-8:] == ["RTT", "RTTVAR", "RETRANS", "CWND", "UNACKED", "RECONNECTS", "SKIPPED",
                                     "LAST_ERROR"]
    up, down = table[1], table[2]
    assert up.split()[:5] == ["0", "ready", "10.0.0.1:9000", "10.0.0.9:40000", "3m12s"]
    assert up.split()[-8:] == ["850µs", "120µs", "3", "10", "1", "1", "0", "-"]
    assert down.split()[:5] == ["1", "backoff", "10.0.0.1:9000", "-", "-"]
    assert down.endswith("ECONNREFUSED: connect")
    assert "p99 -" in group_view(stats(), "cache")[3]


def test_group_view_unknown_group() -> None:
    with pytest.raises(UnknownGroup):
        group_view(stats(), "nope")


def test_clients_view_sorted_and_filtered() -> None:
    lines = clients_view(stats())
    assert lines[0].split() == [
        "ID", "NAME", "PID", "UID", "COMM", "GROUP", "RX_ON", "TX_MSGS", "TX_BYTES", "RX_MSGS", "RX_BYTES", "QUEUED",
        "RX_QUEUED", "IN_FLIGHT", "HELD", "HOLDS", "SINCE",
    ]
    assert [line.split()[0] for line in lines[1:]] == ["2", "1", "3"]  # by group, then id
    assert "batch job" in lines[1]
    web = clients_view(stats(), group="web", header=False)
    assert [line.split()[0] for line in web] == ["1", "3"]
    assert web[0].split()[6] == "no" and web[1].split()[6] == "yes"
    assert web[0].split()[1] == "-" and web[0].split()[-5] == "-"  # no name; no rx_queued_bytes from this daemon
    assert web[0].split()[-1] == "1m15s"


def test_groups_view_shows_policy_and_down_groups() -> None:
    lines = groups_view(stats_new())
    web, down = (cells(line) for line in lines[1:])
    assert (web[0], web[1], web[-1]) == ("web", "1/2", "u:alice,1042 g:kmux")
    assert (down[0], down[1], down[-1]) == ("down", "0/1 DOWN", "open")


@pytest.mark.parametrize(
    "policy, short",
    [
        (OPEN, "open"),
        (AccessPolicy(users=(Principal(1000, "alice"),)), "u:alice"),
        (AccessPolicy(groups=(Principal(1, "daemon"), Principal(4, "adm"), Principal(27, "sudo"), Principal(5, "5"))),
         "g:daemon,adm+2"),
        (AccessPolicy(users=(), groups=(Principal(998, "kmux"),)), "u:none g:kmux"),
    ],
)
def test_policy_short_forms(policy: AccessPolicy, short: str) -> None:
    assert policy_short(policy.to_wire()) == short


def test_policy_short_of_odd_records() -> None:
    assert policy_short(None) == policy_short("open") == "-"
    assert policy_short({"open": False, "text": "users x"}) == "users x"  # no lists: the daemon's own words
    assert policy_short({"open": False, "users": [[7, ""], "\x1b"]}) == "u:7,\\x1b"


def test_group_view_shows_access_outage_counters_and_endpoint_health() -> None:
    lines = group_view(stats_new(), "web")
    assert lines[2] == "    access users alice(1000), 1042; groups kmux(998)"
    assert lines[5] == (
        "    retried 3  retries exhausted 1  queue timeouts 2  slow consumers 1  responses dropped 0  recycles 12  "
        "rx queued 3.0 MiB  skipped 2  skipped bytes 390.7 KiB"
    )
    first_blank = lines.index("")
    endpoints = lines[first_blank + 1 : lines.index("", first_blank + 1)]
    assert cells(endpoints[0]) == ["ENDPOINT", "HEALTH", "CONNS", "RECYCLES", "FAILURES", "RETRY_IN",
                                   "LAST_FAILURE"]
    assert cells(endpoints[1]) == ["10.0.0.1:9000", "healthy", "3", "12", "0", "-", "-"]
    assert cells(endpoints[2]) == ["10.0.0.2:9000", "ejected", "0", "0", "7", "12.5s",
                                   "500ms ago: ECONNREFUSED: connect to 10.0.0.2:9000"]
    assert cells(endpoints[3]) == ["10.0.0.3:9000", "healthy", "1", "0", "1", "-",
                                   "12m34s ago: bad framing: out of step"]
    assert cells(lines[-1])[:2] == ["1", "backoff"]  # then the connection table, as before
    down = group_view(stats_new(), "down")
    assert down[0].startswith("group down: 0/1 connections up (DOWN), 2 clients")
    assert down[2] == "    access open"


def test_group_view_of_todays_daemon_has_no_empty_blocks() -> None:
    lines = group_view(stats(), "web")
    assert not [line for line in lines if line.startswith(("    access", "    retried"))]
    assert lines.count("") == 1 and lines[lines.index("") + 1].startswith("CONN")
    assert "DOWN" not in "\n".join(lines)


def test_clients_view_names_escaped_and_rx_queued() -> None:
    lines = clients_view(stats_new())
    one, two = (cells(line) for line in lines[1:])
    assert (one[0], one[1], one[-5]) == ("1", "billing-worker", "2.0 KiB")
    # Strings an app chose reach the terminal escaped and cut to NAME_WIDTH.
    assert "\x1b" not in "".join(lines) and "\x07" not in "".join(lines)
    assert two[1] == "\\x1b]0;owned\\x07xxxxxxx…" and len(two[1]) == NAME_WIDTH
    assert two[4] == "evil\\x1b[2J"
    assert two[-5] == "-"  # no rx_queued_bytes for this client


def test_status_view_shows_hello_refusals_by_code_and_control_counters() -> None:
    lines = status_view(stats_new())
    assert lines[4] == "    hellos accepted 40  refused 5 (permission_denied 4, unknown_group 1)"
    assert lines[6] == "    control requests 9 (stats 8, reload 1)  refused 1 (reload 1)  errors 0"
    old = status_view(stats())
    assert old[4] == "    hellos accepted 0  refused 0" and len(old) == 6  # no control block from an old daemon


def test_status_view_lists_a_refused_files_problems_one_per_line() -> None:
    """Not one giant "last error" line: kmux-cli status after a reload of a file with typos."""
    answer = stats_new()
    answer["daemon"].update(
        reload_failures=1,
        last_reload_error="[config_invalid] 2 problems: groups.mc.stering: unknown key; did you mean 'steering'?; "
                          "groups.mc.connections: must be between 1 and 1024, not 0",
        last_reload_problems=[["groups.mc.stering", "unknown key; did you mean 'steering'?"],
                              ["groups.mc.connections", "must be between 1 and 1024, not 0"]],
    )
    lines = status_view(answer)
    at = next(i for i, line in enumerate(lines) if line.startswith("    reloads"))
    assert lines[at:at + 3] == [
        "    reloads 1  failed 1  last error config_invalid, 2 problems:",
        "        groups.mc.stering: unknown key; did you mean 'steering'?",
        "        groups.mc.connections: must be between 1 and 1024, not 0",
    ]
    # One problem (or a daemon that sends no list): the error's text on the line itself.
    answer["daemon"].update(last_reload_error="[reload_refused] daemon.socket changed; that needs a restart",
                            last_reload_problems=None)
    assert "    reloads 1  failed 1  last error [reload_refused] daemon.socket changed; that needs a restart" in (
        status_view(answer))


def test_watch_rates_columns() -> None:
    tracker = RateTracker()
    first = groups_view(stats(), rates=Rates(tracker, 10.0))
    tracker.advance()
    later = stats()
    later["groups"][0]["tx_msgs"] += 2000
    later["groups"][0]["tx_bytes"] += 2 * 1024**2
    second = groups_view(later, rates=Rates(tracker, 12.0))
    assert first[0].split()[-5:] == ["TX/s", "TX_B/s", "RX/s", "RX_B/s", "POLICY"]  # the text column stays last
    assert first[1].split()[-5:] == ["-"] * 5
    assert second[1].split()[-7:] == ["1.0k/s", "1.0", "MiB/s", "0/s", "0", "B/s", "-"]


# -- watch ---------------------------------------------------------------------


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_plain_output_is_tables_without_ansi() -> None:
    out = io.StringIO()
    answers = iter([stats(), stats(), stats()])
    rc = watch(lambda: next(answers), lambda a, r: groups_view(a, header=True, rates=r),
               interval=1.0, count=3, out=out, tty=False, sleep=lambda s: None)
    text = out.getvalue()
    assert rc == 0
    assert "\x1b" not in text
    assert text.count("GROUP  CONNS") == 3
    assert "\n\nGROUP" in text


def test_watch_terminal_redraws_and_ctrl_c_restores_cursor() -> None:
    out = FakeTty()
    calls = []

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 2:
            raise KeyboardInterrupt

    rc = watch(lambda: stats(), lambda a, r: groups_view(a, rates=r),
               interval=0.5, count=None, out=out, tty=True, title="groups", sleep=sleep)
    text = out.getvalue()
    assert rc == 0
    assert text.startswith(kmuxcli.HIDE_CURSOR)
    assert text.count(kmuxcli.CLEAR) == 2
    assert "Every 0.5s: kmux-cli groups" in text
    assert text.endswith(kmuxcli.SHOW_CURSOR + "\n")


def test_watch_json_lines() -> None:
    out = io.StringIO()
    watch(lambda: stats(), lambda a, r: [json.dumps(a["groups"])], interval=1, count=2, out=out, tty=False,
          separate=False, sleep=lambda s: None)
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(docs) == 2 and docs[0][0]["name"] == "web"


# -- metrics -------------------------------------------------------------------


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict[str, Any], family: str, name: str | None = None, **labels: str) -> float:
    matches = [s.value for s in fams[family].samples
               if s.name == (name or family) and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (family, labels, matches)
    return matches[0]


def test_metrics_parse_with_types_units_and_labels() -> None:
    fams = families(metrics_text(stats()))
    assert fams["kmux_up"].type == "gauge" and sample(fams, "kmux_up") == 1
    assert fams["kmux_group_tx_msgs"].type == "counter"
    assert sample(fams, "kmux_group_tx_msgs", "kmux_group_tx_msgs_total", group="web") == 1_234_567
    assert fams["kmux_group_connections_up"].type == "gauge"
    assert sample(fams, "kmux_group_connections_up", group="web") == 1
    assert sample(fams, "kmux_group_latency_seconds", group="web", quantile="0.99") == pytest.approx(0.0123)
    # None is left out, not exported as 0 or NaN
    assert not [s for s in fams["kmux_group_latency_seconds"].samples
                if s.labels == {"group": "cache", "quantile": "0.99"}]
    assert sample(fams, "kmux_conn_tx_bytes", "kmux_conn_tx_bytes_total",
                  group="web", conn="0", endpoint="10.0.0.1:9000") == 3_565_158
    assert fams["kmux_conn_rtt_seconds"].type == "gauge"
    assert sample(fams, "kmux_conn_rtt_seconds", group="web", conn="0") == pytest.approx(850e-6)
    rtts = fams["kmux_conn_rtt_seconds"].samples
    assert not [s for s in rtts if s.labels["conn"] == "1" and s.labels["group"] == "web"]
    assert fams["kmux_conn_retrans_segments"].type == "counter"
    assert sample(fams, "kmux_conn_up", group="web", conn="1") == 0
    assert sample(fams, "kmux_conn_state", group="web", conn="1", state="backoff") == 1
    assert sample(fams, "kmux_conn_state", group="web", conn="1", state="ready") == 0
    assert sample(fams, "kmux_client_rx_msgs", "kmux_client_rx_msgs_total",
                  group="cache", client="2", pid="4002", comm="batch job") == 5
    assert sample(fams, "kmux_client_receiving", client="1") == 0
    assert sample(fams, "kmux_daemon_info", version="0.1.0", pid="321") == 1
    for fam in fams.values():  # Prometheus naming conventions
        assert fam.name.startswith("kmux_")
        if fam.type == "counter":
            assert all(s.name == fam.name + "_total" for s in fam.samples)
        else:
            assert not fam.name.endswith("_total")
        assert not fam.name.endswith(("_us", "_ms", "_kib"))


def test_metrics_of_an_old_daemon_and_of_no_daemon() -> None:
    fams = families(metrics_text({"ok": True, "groups": [{"name": "g", "tx_msgs": 1, "connections": [{"index": 0}]}]}))
    assert sample(fams, "kmux_group_tx_msgs", "kmux_group_tx_msgs_total", group="g") == 1
    assert fams["kmux_group_queued_bytes"].samples == []
    down = families(metrics_text({}, up=False))
    assert list(down) == ["kmux_up"] and sample(down, "kmux_up") == 0


def test_metrics_of_the_new_records() -> None:
    fams = families(metrics_text(stats_new()))
    for field, value in OUTAGE.items():
        name = "kmux_group_" + field
        assert fams[name].type == ("gauge" if field == "rx_queued_bytes" else "counter")
        suffix = "" if field == "rx_queued_bytes" else "_total"
        assert sample(fams, name, name + suffix, group="web") == value
    assert sample(fams, "kmux_endpoint_failures", "kmux_endpoint_failures_total",
                  group="web", endpoint="10.0.0.2:9000") == 7
    assert sample(fams, "kmux_endpoint_retry_in_seconds", group="web", endpoint="10.0.0.2:9000") == 12.5
    assert sample(fams, "kmux_endpoint_state", group="web", endpoint="10.0.0.2:9000", state="ejected") == 1
    assert sample(fams, "kmux_endpoint_state", group="web", endpoint="10.0.0.2:9000", state="healthy") == 0
    # A healthy endpoint's last failure is history, with its age; one that never failed has none.
    assert sample(fams, "kmux_endpoint_last_failure_age_seconds", group="web", endpoint="10.0.0.3:9000") == 754.0
    assert [s.labels["endpoint"] for s in fams["kmux_endpoint_last_failure_age_seconds"].samples
            if s.labels["group"] == "web"] == ["10.0.0.2:9000", "10.0.0.3:9000"]
    assert sample(fams, "kmux_daemon_clients_refused", "kmux_daemon_clients_refused_total",
                  code="permission_denied") == 4
    assert sample(fams, "kmux_control_requests", "kmux_control_requests_total", op="stats") == 8
    assert sample(fams, "kmux_control_refused", "kmux_control_refused_total", op="reload") == 1
    assert sample(fams, "kmux_client_rx_queued_bytes", client="1") == 2048
    assert not [s for s in fams["kmux_client_rx_queued_bytes"].samples if s.labels["client"] == "2"]
    # Today's daemon sends none of them: the families are there, empty.
    old = families(metrics_text(stats()))
    for name in ("kmux_group_recycles", "kmux_endpoint_state", "kmux_daemon_clients_refused", "kmux_control_refused"):
        assert old[name].samples == []


def test_metrics_label_values_are_escaped() -> None:
    answer = stats()
    answer["clients"][0]["comm"] = 'we"ird\\name\n'
    fams = families(metrics_text(answer))
    assert sample(fams, "kmux_client_tx_msgs", "kmux_client_tx_msgs_total", client="3") == 10
    assert [s.labels["comm"] for s in fams["kmux_client_receiving"].samples if s.labels["client"] == "3"] == [
        'we"ird\\name\n'
    ]


# -- exit codes ------------------------------------------------------------------

PATH = "/run/kmuxd/control.sock"


@pytest.mark.parametrize(
    "exc, code, text",
    [
        (DaemonUnavailable("x", path=PATH, errno="ENOENT"), EXIT_NOT_RUNNING,
         f"kmux-cli: kmuxd is not running (no control socket at {PATH})"),
        (DaemonUnavailable("x", path=PATH, errno="ECONNREFUSED"), EXIT_NOT_RUNNING, "kmuxd is not running"),
        (FileNotFoundError(errno.ENOENT, "No such file"), EXIT_NOT_RUNNING, "kmuxd is not running"),
        (DaemonUnavailable("x", path=PATH, errno="EACCES"), EXIT_PERMISSION,
         f"kmux-cli: permission denied on {PATH} (only root and the socket's group may connect: "
         "daemon.control_group, or SocketGroup= under systemd)"),
        (PermissionError(errno.EACCES, "Permission denied"), EXIT_PERMISSION, "permission denied"),
        (DaemonUnavailable("closed", path=PATH, errno="EPIPE"), EXIT_NOT_RUNNING, "closed the control connection"),
        (DaemonUnavailable("x", path=PATH, errno="ENOTSOCK"), EXIT_FAILED, "is not a kmuxd control socket"),
        (error_from_code("drain_timeout", "still 3 queued"), EXIT_FAILED, "kmux-cli: drain failed: [drain_timeout]"),
        (error_from_code("config_invalid", "groups.a.connections: too many", path="groups.a.connections"),
         EXIT_FAILED, "[config_invalid] groups.a.connections: too many"),
        (ControlTimeout("no answer from kmuxd on X within 5s"), EXIT_FAILED, "kmux-cli: no answer from kmuxd"),
    ],
)
def test_exit_status(exc: BaseException, code: int, text: str) -> None:
    got_code, message = exit_status(exc, PATH, command="drain")
    assert got_code == code
    assert text in message
    assert "\n" not in message


def test_exit_status_of_a_refused_op_and_of_the_app_socket() -> None:
    refused = error_from_code("permission_denied", "reload needs uid 0 (root), whatever the socket's file mode; "
                              "you are uid 1000", op="reload", rule="uid 0 (root), whatever the socket's file mode")
    assert exit_status(refused, PATH, command="reload") == (
        EXIT_PERMISSION,
        "kmux-cli: permission denied: reload needs uid 0 (root), whatever the socket's file mode; you are uid 1000",
    )
    app = DaemonUnavailable("/run/kmuxd/kmuxd.sock is kmuxd's app socket, not its control socket "
                            "(see daemon.control_socket)", path="/run/kmuxd/kmuxd.sock", errno="EPROTOTYPE")
    assert exit_status(app, "/run/kmuxd/kmuxd.sock") == (
        EXIT_FAILED,
        "kmux-cli: /run/kmuxd/kmuxd.sock is kmuxd's app socket, not its control socket (see daemon.control_socket)",
    )


def test_exit_status_of_a_refused_file_lists_its_problems_once() -> None:
    """Each problem on its own line, as `kmuxd --check` prints them; never the details' Python repr."""
    problems = [["groups.mc.stering", "unknown key; did you mean 'steering'?"],
                ["groups.mc.connections", "must be between 1 and 1024, not 0"]]
    exc = error_from_code("config_invalid", "2 problems: groups.mc.stering: unknown key; did you mean 'steering'?; "
                          "groups.mc.connections: must be between 1 and 1024, not 0",
                          path="groups.mc.stering", problems=problems)
    assert exit_status(exc, PATH, command="reload") == (EXIT_FAILED, "\n".join([
        "kmux-cli: reload failed: [config_invalid] 2 problems:",
        "  groups.mc.stering: unknown key; did you mean 'steering'?",
        "  groups.mc.connections: must be between 1 and 1024, not 0",
    ]))
    one = error_from_code("config_invalid", "groups.mc.connections: must be between 1 and 1024, not 0",
                          path="groups.mc.connections", problems=problems[1:])
    assert exit_status(one, PATH, command="reload") == (
        EXIT_FAILED, "kmux-cli: reload failed: [config_invalid] groups.mc.connections: must be between 1 and 1024, not 0")


def test_exit_status_no_such_group_or_connection() -> None:
    assert exit_status(UnknownGroup("no group"), PATH, group="x", groups=["a", "b"]) == (
        EXIT_NO_SUCH, "kmux-cli: no such group 'x' (groups: a, b)")
    assert exit_status(error_from_code("unknown_group", ""), PATH, group="x", groups=[])[0] == EXIT_NO_SUCH
    assert exit_status(error_from_code("unknown_connection", ""), PATH, group="web", conn=7, conns=4) == (
        EXIT_NO_SUCH, "kmux-cli: no such connection 7 in group 'web' (connections: 0-3)")
    # a code from a newer daemon is still a plain failure
    assert exit_status(KmuxError("?"), PATH)[0] == EXIT_FAILED


def test_main_without_daemon_exits_3(tmp_path: Any, capsys: Any) -> None:
    missing = str(tmp_path / "control.sock")
    assert kmuxcli.main(["groups", "--control", missing]) == EXIT_NOT_RUNNING
    assert capsys.readouterr().err == f"kmux-cli: kmuxd is not running (no control socket at {missing})\n"


# -- arguments -------------------------------------------------------------------


def test_arguments() -> None:
    a = parse_args(["--watch", "group", "web", "-j"])
    assert (a.command, a.group, a.watch, a.json) == ("group", "web", 1.0, True)
    a = parse_args(["groups", "--watch", "2.5", "-H", "--count", "3"])
    assert (a.watch, a.header, a.count) == (2.5, False, 3)
    a = parse_args(["-j", "--control", "/x", "clients", "--group", "g"])
    assert (a.json, a.control, a.group) == (True, "/x", "g")
    assert parse_args(["drain", "g", "1", "--drain-timeout", "30"]).drain_timeout == 30.0
    for bad in (["reload", "--watch"], ["groups", "--count", "2"], ["drain", "g"], ["groups", "--watch=0"]):
        with pytest.raises(SystemExit) as info:
            parse_args(bad)
        assert info.value.code == 2


def test_control_default_from_environment(monkeypatch: Any) -> None:
    monkeypatch.setenv("KMUX_CONTROL", "/tmp/k/control.sock")
    assert parse_args(["groups"]).control == "/tmp/k/control.sock"
    monkeypatch.delenv("KMUX_CONTROL")
    assert parse_args(["groups"]).control == kmuxcli.DEFAULT_CONTROL


# -- commands end to end, with the transport replaced ------------------------------


@pytest.fixture
def canned(monkeypatch: Any) -> list[tuple[str, dict[str, Any]]]:
    """ControlClient.request answering from stats(); records the requests."""
    sent: list[tuple[str, dict[str, Any]]] = []

    def request(self: Any, op: str, *, io_timeout: float | None = None, **args: Any) -> dict[str, Any]:
        sent.append((op, args))
        if op == "drain":
            raise error_from_code("drain_timeout", "conn 0 still had 10 bytes queued")
        if op == "stats" and args.get("group") not in (None, "web", "cache"):
            raise error_from_code("unknown_group", f"no group {args['group']!r}")
        return stats()

    monkeypatch.setattr(kmuxcli.ControlClient, "request", request)
    return sent


def test_main_json_and_tables(canned: list, capsys: Any) -> None:
    assert kmuxcli.main(["-j", "groups"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [g["name"] for g in data] == ["web", "cache"] and "connections" in data[0]
    assert kmuxcli.main(["group", "web", "-j"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "web"
    assert kmuxcli.main(["clients", "--group", "cache", "-H"]) == 0
    assert capsys.readouterr().out.split()[0] == "2"
    assert canned[-1] == ("stats", {"group": "cache"})
    assert kmuxcli.main(["metrics", "-j"]) == 0  # -j is ignored
    assert "kmux_group_tx_msgs_total" in families(capsys.readouterr().out)["kmux_group_tx_msgs"].samples[0].name


def test_main_failures(canned: list, capsys: Any) -> None:
    assert kmuxcli.main(["group", "nope"]) == EXIT_NO_SUCH
    assert capsys.readouterr().err == "kmux-cli: no such group 'nope' (groups: web, cache)\n"
    assert kmuxcli.main(["drain", "web", "0", "--drain-timeout", "2"]) == EXIT_FAILED
    assert "[drain_timeout] conn 0 still had 10 bytes queued" in capsys.readouterr().err
    assert canned[-1] == ("drain", {"group": "web", "conn": 0, "timeout": 2.0})


def test_metrics_textfile_when_daemon_is_down(tmp_path: Any, capsys: Any) -> None:
    prom = tmp_path / "kmux.prom"
    rc = kmuxcli.main(["metrics", "--control", str(tmp_path / "none.sock"), "--textfile", str(prom)])
    assert rc == EXIT_NOT_RUNNING
    assert sample(families(prom.read_text()), "kmux_up") == 0


def test_a_paced_balance_client_shows_in_held_and_holds_and_the_group_line() -> None:
    """client_rate_contended: a balance group that paced a client says so in its
    summary; the client's HELD/HOLDS show its pace (a group steers one way, so
    a client is held at an in-flight limit or paced, never both)."""
    answer = stats_new()
    answer["groups"][0].update(clients_paced=1, paces=42)
    answer["clients"] = [client(1, "web", paces=42, paced_for=0.0032), client(2, "web", paces=0)]
    assert group_view(answer, "web")[0].endswith("0 waiting to send, 1 paced (42 paces))")
    paced, light = (cells(line) for line in clients_view(answer)[1:])
    assert (paced[-3], paced[-2]) == ("3.20ms", "42")
    assert (light[-3], light[-2]) == ("-", "0")
    answer["groups"][0].update(clients_paced=0, paces=0)  # never paced: the line as before
    assert group_view(answer, "web")[0].endswith("0 waiting to send)")
