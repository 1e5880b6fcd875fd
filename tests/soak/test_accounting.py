"""The soak's accounting without sockets: frames, ledgers and the verdict.

The soak can only find a bug if its own bookkeeping notices every kind of
wrong outcome; each test here feeds one wrong outcome and expects it named.
"""

from __future__ import annotations

import random

import pytest

from kmuxd.tools.soak.checks import Evidence, evaluate
from kmuxd.tools.soak.frames import (
    HEADER_SIZE,
    BadSoakFrame,
    make_frame,
    parse_frame,
    split_frames,
    stamp_conn,
)
from kmuxd.tools.soak.ledger import OneWayLedger, RequestLedger


def frame(session: int, seq: int, rid: int = 0, size: int = 100, conn: int = 0) -> bytes:
    f = make_frame(session, seq, rid, size, random.Random(seq))
    return stamp_conn(f, conn) if conn else f


# -- frames ---------------------------------------------------------------------------


def test_frame_round_trip_and_the_fields_outside_the_checksum():
    f = frame(7, 42, rid=9, size=300)
    got = parse_frame(f)
    assert (got.session, got.seq, got.id, got.conn, got.size) == (7, 42, 9, 0, 300)
    # The daemon rewrites the id and the server stamps conn: still intact.
    rewritten = f[:4] + (12345).to_bytes(4, "big") + f[8:]
    assert parse_frame(stamp_conn(rewritten, 3)).conn == 3


@pytest.mark.parametrize("where", [8, 12, HEADER_SIZE, 299])
def test_any_changed_byte_of_identity_or_body_is_torn(where):
    f = bytearray(frame(7, 42, size=300))
    f[where] ^= 0x01
    with pytest.raises(BadSoakFrame):
        parse_frame(bytes(f))


def test_split_frames_keeps_a_partial_frame_and_refuses_a_huge_header():
    a, b = frame(1, 1, size=50), frame(1, 2, size=70)
    buf = bytearray(a + b[:30])
    assert split_frames(buf, 1000) == [a]
    buf += b[30:]
    assert split_frames(buf, 1000) == [b] and not buf
    with pytest.raises(BadSoakFrame):
        split_frames(bytearray((5000).to_bytes(4, "big") + b"x" * 10), 1000)


# -- request ledger ----------------------------------------------------------------------


def sent(ledger: RequestLedger, n: int, rid: int = 5) -> None:
    for seq in range(1, n + 1):
        ledger.will_send(seq, rid, 100)


def test_clean_session_has_one_outcome_each():
    led = RequestLedger(7, "id")
    sent(led, 3)
    led.response(frame(7, 1, rid=5, conn=1))
    led.notice("connection_lost", 2, {"seq": 2, "id": 5})
    led.response(frame(7, 3, rid=5, conn=1))
    led.close(graceful=True)
    assert (led.responses, dict(led.notices), dict(led.problems)) == (2, {"connection_lost": 1}, {})


@pytest.mark.parametrize(
    "feed, kind",
    [
        (lambda led: led.response(frame(8, 1, rid=5)), "cross_delivery"),
        (lambda led: led.response(frame(0, 1, rid=0xFFFF_FF01)), "cross_delivery"),
        (lambda led: (led.response(frame(7, 1, rid=5)), led.response(frame(7, 1, rid=5))), "second_outcome"),
        (lambda led: (led.response(frame(7, 1, rid=5)), led.notice("request_timeout", 1, {"id": 5})),
         "second_outcome"),
        (lambda led: led.response(frame(7, 9, rid=5)), "never_sent"),
        (lambda led: led.response(frame(7, 1, rid=6)), "wrong_id"),
        (lambda led: led.notice("connection_lost", 1, {"id": 99}), "wrong_id"),
        (lambda led: led.notice("connection_lost", None, {}), "notice_without_seq"),
        (lambda led: (led.response(frame(7, 2, rid=5, conn=4)), led.response(frame(7, 1, rid=5, conn=4))), "order"),
        (lambda led: led.response(frame(7, 1, rid=5)[:-1]), "torn"),
    ],
)
def test_each_wrong_outcome_is_named(feed, kind):
    led = RequestLedger(7, "id")
    sent(led, 3)
    feed(led)
    assert led.problems[kind] >= 1, dict(led.problems)


def test_responses_on_different_connections_may_interleave():
    led = RequestLedger(7, "fifo")
    sent(led, 2, rid=0)
    led.response(frame(7, 2, conn=1))
    led.response(frame(7, 1, conn=2))
    assert not led.problems


def test_graceful_close_makes_outstanding_missing_abrupt_abandons_them():
    led = RequestLedger(7, "fifo")
    sent(led, 4, rid=0)
    led.response(frame(7, 1))
    led.close(graceful=True)
    assert (led.missing, led.abandoned, led.problems["missing"]) == (3, 0, 3)
    led = RequestLedger(7, "fifo")
    sent(led, 4, rid=0)
    led.close(graceful=False)
    assert (led.missing, led.abandoned, dict(led.problems)) == (0, 4, {})


def test_oneway_ledger_refuses_data_and_notes_notices():
    led = OneWayLedger(3)
    led.will_send(1, 40)
    led.notice("group_unavailable", 1, {})
    led.data(frame(3, 1))
    led.notice("group_unavailable", 5, {})
    assert led.notices["group_unavailable"] == 2
    assert led.problems["unexpected_data"] == 1 and led.problems["never_sent"] == 1


# -- the verdict --------------------------------------------------------------------------

SETTINGS = {"queue_timeout": 0.0, "retry_unanswered": 0, "request_timeout": 1.0, "rss_growth_mib": 32.0}


def session(group: str, mode: str, n: int, **kw) -> dict:
    rec = {"group": group, "mode": mode, "session": n, "departure": "graceful", "sent": 10, "sent_bytes": 1000,
           "responses": 9 if mode != "balance" else 0, "notices": {"connection_lost": 1} if mode != "balance" else {},
           "abandoned": 0, "missing": 0, "problems": {}, "examples": []}
    rec.update(kw)
    return rec


def evidence(**over) -> Evidence:
    sessions = [session("rr", "id", 1), session("rr", "id", 2), session("ow", "balance", 3)]
    cli = [
        {"name": "rr", "clients_joined": 2, "clients_left": 2, "clients": 0, "tx_msgs": 20, "rx_msgs": 18,
         "requests_failed": 2, "requests_timed_out": 0, "refused": 0, "unmatched_responses": 4},
        {"name": "ow", "clients_joined": 1, "clients_left": 1, "clients": 0, "tx_msgs": 10, "rx_msgs": 0},
    ]
    backends = {"rr": {"frames": 20, "stray_sent": 4, "stray_at_risk": 0},
                "ow": {"frames": 10, "bytes": 1000, "per_session": {"3": 10}}}
    ev = dict(groups={"rr": "id", "ow": "balance"}, sessions=sessions, backends=backends, cli_groups=cli,
              settings=dict(SETTINGS), rss_kib={"after_warmup": 40000, "end": 41000}, fds={"baseline": 20, "end": 20},
              quiet={"reached": True, "seconds": 0.1}, process_problems=[], daemon_exit=0)
    ev.update(over)
    return Evidence(**ev)


def failed(ev: Evidence) -> dict[str, str]:
    return {c.name: c.detail for c in evaluate(ev)[1] if not c.ok}


def test_consistent_evidence_passes_every_check():
    assert failed(evidence()) == {}


def test_a_counter_off_by_one_fails_counters():
    ev = evidence()
    ev.cli_groups[0]["rx_msgs"] = 19
    assert "rr rx_msgs 19 != 18" in failed(ev)["counters"]


def test_abandoned_requests_widen_only_their_bound():
    ev = evidence(sessions=[session("rr", "id", 1), session("rr", "id", 2, departure="abrupt", responses=8, abandoned=1),
                            session("ow", "balance", 3)])
    assert failed(ev) == {}  # the daemon delivered one response the client did not wait for
    ev.cli_groups[0]["rx_msgs"] = 19
    assert "counters" in failed(ev)


def test_a_lost_oneway_message_fails_delivery_and_counters():
    ev = evidence()
    ev.backends["ow"]["per_session"]["3"] = 9
    ev.backends["ow"]["frames"] = 9
    got = failed(ev)
    assert "session 3: sent 10, refused 0, the backend read 9" in got["one-way delivery"]
    assert "backend frames 9 != 10" in got["counters"]


def test_an_abrupt_oneway_session_may_fall_short_by_what_the_daemon_dropped_unread():
    # It hung up while paced or pushed back: 3 packets were never read, dropped and counted.
    ev = evidence(sessions=[session("rr", "id", 1), session("rr", "id", 2),
                            session("ow", "balance", 3, departure="abrupt")])
    ev.backends["ow"].update(frames=7, bytes=700, per_session={"3": 7})
    ev.cli_groups[1].update(tx_msgs=7, dropped_unread=3)
    assert failed(ev) == {}
    # Short by more than the daemon dropped: a message it read was lost.
    ev.cli_groups[1].update(dropped_unread=2)
    assert "3 message(s) short, more than the daemon's dropped_unread 2" in failed(ev)["one-way delivery"]
    # A graceful session flushed first: any shortfall is a loss, whatever dropped_unread says.
    ev = evidence()
    ev.backends["ow"].update(frames=7, bytes=700, per_session={"3": 7})
    ev.cli_groups[1].update(tx_msgs=7, dropped_unread=3)
    assert "session 3: sent 10, refused 0, the backend read 7" in failed(ev)["one-way delivery"]


def test_unexpected_codes_rss_fds_and_processes_fail():
    ev = evidence(sessions=[session("rr", "id", 1, notices={"group_unavailable": 1}), session("rr", "id", 2),
                            session("ow", "balance", 3)],
                  rss_kib={"after_warmup": 40000, "end": 40000 + 33 * 1024}, fds={"baseline": 20, "end": 21},
                  daemon_exit=1)
    got = failed(ev)
    assert set(got) >= {"notice codes", "rss", "fds", "processes"}, got


def test_problems_from_ledgers_and_backends_fail_their_checks():
    ev = evidence(sessions=[session("rr", "id", 1, problems={"cross_delivery": 1}), session("rr", "id", 2),
                            session("ow", "balance", 3)])
    ev.backends["rr"]["duplicates"] = 1
    ev.backends["ow"]["order"] = 2
    assert set(failed(ev)) >= {"no cross-delivery", "written once", "order"}


def test_a_tx_shortfall_is_allowed_only_up_to_the_packets_dropped_unread():
    """A session that left without flushing while pushed back: the daemon dropped (and
    counted) what it had not read. tx_msgs may fall short by that many, not more."""
    ev = evidence()
    ev.cli_groups[0]["tx_msgs"] = ev.backends["rr"]["frames"] = 15
    ev.cli_groups[0]["dropped_unread"] = 5
    assert "counters" not in failed(ev)
    ev.cli_groups[0]["dropped_unread"] = 4
    assert "rr tx_msgs 15 != 16..20" in failed(ev)["counters"]