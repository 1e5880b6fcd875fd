"""The endpoint pool with no sockets: spreading, ejection, one probe per back-off step."""

from __future__ import annotations

import random

from kmuxd.core.endpoints import EndpointPool


def pool(*eps: str) -> EndpointPool:
    return EndpointPool(list(eps), initial=1.0, maximum=8.0, rng=random.Random(3))


def test_concurrent_dials_spread_over_healthy_endpoints():
    p = pool("a", "b")
    picks = [p.choose(0.0)[0] for _ in range(4)]
    assert sorted(picks) == ["a", "a", "b", "b"]


def test_a_failing_endpoint_is_ejected_and_the_others_take_the_dials():
    p = pool("a", "b")
    ep, _ = p.choose(0.0)
    p.failed(ep, 0.0)
    other = "b" if ep == "a" else "a"
    for _ in range(3):
        assert p.choose(0.1)[0] == other
    stats = {s.endpoint: s for s in p.statistics(0.1)}
    assert not stats[ep].healthy and stats[ep].failures == 1 and 0 < stats[ep].retry_in <= 1.0
    assert stats[ep].reason == "dial failed"


def test_a_dead_endpoint_costs_one_dial_per_back_off_step_whatever_the_slot_count():
    p = pool("dead")
    now = 0.0
    dials = []
    ep, _ = p.choose(now)  # the first slot's dial fails: ejected;
    p.failed(ep, now)
    for _ in range(7):  # the other seven slots are told to wait, not to dial
        assert p.choose(now)[0] is None
    for step in range(200):  # 20 s in 0.1 s ticks; eight slots ask every tick
        now = step * 0.1
        for _slot in range(8):
            ep, wait = p.choose(now)
            if ep is not None:
                dials.append(now)
                p.failed(ep, now)
    # One probe at a time, each after its back-off (0.5-1, 1-2, 2-4, 4-8, 4-8 s ...).
    assert 3 <= len(dials) <= 6, dials
    gaps = [b - a for a, b in zip(dials, dials[1:])]
    assert all(g >= 0.9 for g in gaps), gaps


def test_a_connection_closed_before_answering_ejects_and_an_answer_heals():
    p = pool("a")
    ep, _ = p.choose(0.0)
    p.connected(ep)
    assert p.closed(ep, 1.0, answered=False, graceful=True) == "failure"  # accepted, then closed at once
    assert p.choose(1.0)[0] is None  # ejected: wait
    s = p.statistics(1.0)[0]
    assert s.state == "ejected" and s.reason == "closed before answering"
    ep, wait = p.choose(5.0)
    assert ep == "a" and wait == 0
    p.connected(ep)
    p.answered(ep)
    assert p.closed(ep, 20.0, answered=True, graceful=True) == "recycle"
    assert p.choose(20.0)[0] == "a"  # healthy: redial at once
    assert p.statistics(20.0)[0].recycles == 1


def test_a_server_that_recycles_every_connection_never_ejects_however_young():
    # dnsmasq closes each TCP connection after 100 queries: a recycle every
    # few milliseconds under load must not back the group off.
    p = pool("dns")
    now = 0.0
    for i in range(500):
        ep, wait = p.choose(now)
        assert ep == "dns" and wait == 0, (i, wait)
        p.connected(ep)
        p.answered(ep)
        now += 0.001
        assert p.closed(ep, now, answered=True, graceful=True) == "recycle"
        now += 0.1  # the dial rate allows 10 a second
    assert p.statistics(now)[0].state == "healthy" and p.statistics(now)[0].failures == 0


def test_accept_and_close_backs_off_longer_each_time_and_dials_stay_within_the_rate():
    p = EndpointPool(["x"], initial=0.1, maximum=30.0, rng=random.Random(1), max_dials_per_second=5.0)
    now = 0.0
    dials = []
    while now < 20.0:
        ep, wait = p.choose(now)
        if ep is None:
            now += max(wait, 0.001)
            continue
        dials.append(now)
        p.connected(ep)
        p.closed(ep, now, answered=False, graceful=True)
    gaps = [b - a for a, b in zip(dials, dials[1:])]
    assert gaps == sorted(gaps) or max(gaps) > 4 * min(gaps)  # growing back-off
    assert len(dials) < 20  # 5/s would allow 100 in 20 s


def test_dial_rate_bounds_a_healthy_endpoint_that_resets_after_answering():
    p = EndpointPool(["r"], initial=0.1, maximum=30.0, rng=random.Random(1), max_dials_per_second=10.0)
    now = 0.0
    dials = 0
    while now < 5.0:
        ep, wait = p.choose(now)
        if ep is None:
            now += max(wait, 0.0005)
            continue
        dials += 1
        p.connected(ep)
        p.answered(ep)
        assert p.closed(ep, now, answered=True, graceful=False) == "failure"
    assert dials <= 10 + 5 * 10 + 1  # the burst, then 10 a second


def test_consecutive_request_timeouts_eject_and_an_answer_resets_the_count():
    p = EndpointPool(["t", "u"], initial=1.0, maximum=8.0, rng=random.Random(1), eject_after_timeouts=3)
    ep = "t"
    assert not p.request_timed_out(ep, 1.0) and not p.request_timed_out(ep, 1.0)
    p.answered(ep)
    assert not p.request_timed_out(ep, 2.0) and not p.request_timed_out(ep, 2.0)
    assert p.request_timed_out(ep, 2.0)
    s = p.statistics(2.0)[0]
    assert s.state == "ejected" and s.reason == "3 request timeouts in a row"
    # ... but never the last healthy endpoint: a slow service beats none.
    for _ in range(10):
        assert not p.request_timed_out("u", 3.0)
    assert p.statistics(3.0)[1].state == "healthy"
