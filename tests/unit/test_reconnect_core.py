"""The sans-IO reconnect core: policy, back-off, resend buffer, accounting. No sockets."""

from __future__ import annotations

import random
import warnings

import pytest

from kmux import AccountingLost, AccountingWarning, ReconnectPolicy
from kmux._reconnect import ReconnectBackoff, ReconnectCore, as_policy, is_retryable, translate_seq
from kmux.errors import BadFrame, DaemonUnavailable, UnknownGroup


def core(**kw) -> ReconnectCore:
    c = ReconnectCore(ReconnectPolicy(**kw))
    c.connected()
    return c


def send(c: ReconnectCore, n: int) -> list[int]:
    return [c.message_sent(b"m%d" % (c.seq + 1)) for _ in range(n)]


def resend_all(c: ReconnectCore) -> list[int]:
    out = []
    while c.next_resend() is not None:
        out.append(c.resent_one())
    return out


# -- policy and back-off -----------------------------------------------------------


def test_policy_must_be_bounded_and_sane():
    with pytest.raises(ValueError):
        ReconnectPolicy(max_attempts=None, deadline=None)
    with pytest.raises(ValueError):
        ReconnectPolicy(initial_delay=3, max_delay=1)
    with pytest.raises(ValueError):
        ReconnectPolicy(unknown="maybe")  # type: ignore[arg-type]
    assert as_policy(False) is None and as_policy(None) is None
    assert as_policy(True) == ReconnectPolicy()
    with pytest.raises(TypeError):
        as_policy("yes")  # type: ignore[arg-type]


def test_backoff_grows_is_capped_jittered_and_gives_up_after_max_attempts():
    p = ReconnectPolicy(max_attempts=6, deadline=None, initial_delay=0.1, max_delay=0.5, multiplier=2, jitter=0.5)
    b = ReconnectBackoff(p, 0.0, random.Random(1))
    delays = [b.failed(0.0) for _ in range(5)]
    caps = [0.1, 0.2, 0.4, 0.5, 0.5]
    assert all(cap * 0.5 <= d <= cap for d, cap in zip(delays, caps)), delays
    assert len(set(delays)) == 5  # jittered
    assert b.failed(0.0) is None  # the 6th failure ends the outage


def test_backoff_respects_the_deadline():
    b = ReconnectBackoff(ReconnectPolicy(deadline=1.0, initial_delay=0.4, max_delay=0.4, jitter=0), 10.0)
    assert b.failed(10.0) == pytest.approx(0.4)
    assert b.failed(10.8) == pytest.approx(0.2)  # clipped to what is left
    assert b.failed(11.0) is None


def test_retryable_errors():
    assert is_retryable(DaemonUnavailable("x")) and is_retryable(TimeoutError()) and is_retryable(ConnectionRefusedError())
    assert not is_retryable(UnknownGroup("x"))


# -- graceful shutdown: exact accounting ----------------------------------------------


def test_shutdown_notice_accounts_and_queues_the_unread_for_resending():
    c = core()
    assert send(c, 10) == list(range(1, 11))
    rec = c.connection_lost(accepted=7)
    assert rec.unknown is None and rec.lost is None
    assert rec.accepted_seq == 7 == c.accepted_seq and rec.resend == 3
    c.connected()
    assert c.counters.reconnects == 1
    assert resend_all(c) == [8, 9, 10]
    assert c.counters.resent == 3 and c.counters.resent_unknown == 0
    # New messages continue the seq; notices on this connection translate.
    assert send(c, 2) == [11, 12]
    assert c.message_seq(1) == 8 and c.message_seq(5) == 12
    err = translate_seq(BadFrame("x", seq=4), c)
    assert err.seq == 11 and err.details["conn_seq"] == 4


def test_new_messages_wait_for_the_resend_queue():
    c = core()
    send(c, 3)
    c.connection_lost(accepted=1)
    c.connected()
    with pytest.raises(ValueError):
        c.message_sent(b"new")


def test_connection_lost_during_resend_keeps_order_and_seqs():
    c = core()
    send(c, 10)
    c.connection_lost(accepted=4)  # 5..10 queued
    c.connected()
    assert c.resent_one() == 5 and c.resent_one() == 6  # conn seqs 1, 2
    c.connection_lost(accepted=1)  # the second daemon read only 5
    assert c.accepted_seq == 5
    c.connected()
    assert resend_all(c) == [6, 7, 8, 9, 10]
    assert send(c, 1) == [11]


def test_accepted_zero_and_clamping():
    c = core()
    send(c, 3)
    c.connection_lost(accepted=0)
    assert c.accepted_seq == 0 and len(c.resend_queue) == 3
    c.connected()
    resend_all(c)
    c.connection_lost(accepted=99)  # more than was sent: clamped
    assert c.accepted_seq == 3 and not c.resend_queue


# -- crash: unknown fate ---------------------------------------------------------------


def test_crash_resend_mode_reports_and_resends_at_least_once():
    seen = []
    c = core(on_unknown=seen.append)
    send(c, 5)
    c.connection_lost(accepted=2)
    c.connected()
    resend_all(c)  # 3, 4, 5
    send(c, 2)  # 6, 7
    rec = c.connection_lost(accepted=None)
    u = rec.unknown
    assert seen == [u]
    assert (u.first_seq, u.last_seq, u.held, u.missing, u.resent, u.messages) == (3, 7, 5, 0, True, ())
    assert c.accepted_seq == 2 and rec.lost is None
    c.connected()
    assert resend_all(c) == [3, 4, 5, 6, 7]
    assert c.counters.resent_unknown == 5 and c.counters.unknown == 5


def test_crash_report_mode_hands_the_messages_over_and_does_not_resend():
    c = core(unknown="report")
    send(c, 4)
    rec = c.connection_lost(accepted=None)
    assert [s for s, _ in rec.unknown.messages] == [1, 2, 3, 4]
    assert rec.unknown.messages[0][1] == b"m1" and not rec.unknown.resent
    assert c.accepted_seq == 4 and not c.resend_queue and c.buffered == 0
    c.connected()
    assert send(c, 1) == [5] and c.message_seq(1) == 5


def test_crash_while_resending_only_reports_what_was_sent_again():
    c = core()
    send(c, 6)
    c.connection_lost(accepted=3)  # 4, 5, 6 never read: known undelivered
    c.connected()
    c.resent_one()  # 4 went out on the new connection
    rec = c.connection_lost(accepted=None)
    assert (rec.unknown.first_seq, rec.unknown.last_seq) == (4, 4)
    c.connected()
    assert resend_all(c) == [4, 5, 6]
    assert c.counters.resent_unknown == 1


def test_crash_with_nothing_sent_reports_nothing():
    c = core()
    rec = c.connection_lost(accepted=None)
    assert rec.unknown is None and rec.lost is None


# -- the bound -----------------------------------------------------------------------------


def test_overflow_drops_the_oldest_and_reports_it():
    reports = []
    c = core(buffer_messages=3, on_overflow=reports.append)
    send(c, 3)
    assert reports == [] and c.guaranteed
    send(c, 2)
    assert [(r.first_seq, r.last_seq, r.count) for r in reports] == [(1, 1, 1), (2, 2, 1)]
    assert c.buffered == 3 and c.counters.dropped == 2 and not c.guaranteed


def test_overflow_by_bytes_warns_without_a_callback():
    c = core(buffer_bytes=10)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        c.message_sent(b"x" * 6)
        c.message_sent(b"y" * 6)
    assert [x.category for x in w] == [AccountingWarning]
    assert c.buffered == 1 and c.buffered_bytes == 6


def test_overflow_is_harmless_when_the_shutdown_notice_covers_it():
    c = core(buffer_messages=2, on_overflow=lambda r: None)
    send(c, 10)  # 9, 10 held
    rec = c.connection_lost(accepted=8)
    assert rec.lost is None and c.guaranteed and rec.resend == 2


def test_overflow_past_the_accepted_seq_raises_accounting_lost():
    c = core(buffer_messages=2, on_overflow=lambda r: None)
    send(c, 10)  # 9, 10 held
    rec = c.connection_lost(accepted=5)  # 6, 7, 8 were never read and are gone
    assert isinstance(rec.lost, AccountingLost)
    assert rec.lost.details == {"first_seq": 6, "last_seq": 8, "count": 3}
    assert c.accepted_seq == 8 and c.guaranteed
    c.connected()
    assert resend_all(c) == [9, 10]


def test_overflow_then_crash_reports_missing_unknowns():
    c = core(buffer_messages=2, on_overflow=lambda r: None)
    send(c, 5)  # 4, 5 held
    rec = c.connection_lost(accepted=None)
    assert (rec.unknown.first_seq, rec.unknown.last_seq, rec.unknown.held, rec.unknown.missing) == (1, 5, 2, 3)
    assert rec.lost.details["count"] == 3
    assert c.accepted_seq == 3
    c.connected()
    assert resend_all(c) == [4, 5]


def test_message_is_copied_into_the_buffer():
    c = core()
    buf = bytearray(b"abc")
    c.message_sent(buf)
    buf[0] = 0
    c.connection_lost(accepted=0)
    assert c.next_resend() == b"abc"


def test_session_records_the_shutdown_notice():
    from kmux._session import ClientSession
    from kmux.errors import DaemonShutdown
    from kmux.framing import PRESETS
    from kmux.protocol import Accepted, Notice, encode_answer, encode_notice

    s = ClientSession("g")
    s.hello_packet()
    s.receive_answer(encode_answer(Accepted(group="g", client_id=1, max_message=64, framing=PRESETS["u32be"],
                                            steering="balance")))
    assert s.receive_packet(memoryview(encode_notice(Notice(event="shutdown", details={"accepted": 7})))) is None
    assert s.shutdown_accepted == 7
    err = s.eof()
    assert isinstance(err, DaemonShutdown) and "up to seq 7" in err.message


# -- settled messages -------------------------------------------------------------------------


def test_a_settled_message_is_not_resent_after_a_crash():
    c = core()
    send(c, 5)
    c.settle(2)  # e.g. group_unavailable named it: never written, never will be
    rec = c.connection_lost(accepted=None)
    u = rec.unknown
    assert (u.first_seq, u.last_seq, u.held, u.settled) == (1, 5, 4, 1)
    c.connected()
    assert resend_all(c) == [1, 3, 4, 5]
    assert send(c, 1) == [6]
    # Notices on this connection name its own count: 1, 3, 4, 5, then 6.
    assert [c.message_seq(n) for n in range(1, 6)] == [1, 3, 4, 5, 6]


def test_a_settled_message_is_not_resent_after_a_shutdown_notice():
    c = core()
    send(c, 5)
    c.settle(4)
    rec = c.connection_lost(accepted=2)
    assert rec.resend == 2
    c.connected()
    assert resend_all(c) == [3, 5]


def test_settled_messages_leave_with_the_buffer():
    c = core(buffer_messages=2, on_overflow=lambda r: None)
    send(c, 2)
    c.settle(1)
    c.settle(99)  # never sent: ignored
    send(c, 1)  # 1 leaves the buffer
    assert c._settled == set()
    c.settle(3)
    c.connection_lost(accepted=3)
    assert c._settled == set() and not c.resend_queue
