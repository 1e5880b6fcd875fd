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


def test_success_heals_and_a_young_connection_that_dies_counts_as_a_failure():
    p = pool("a")
    ep, _ = p.choose(0.0)
    p.connected(ep)
    p.closed(ep, 1.0, stable=False)  # accepted, then closed at once
    assert p.choose(1.0)[0] is None  # ejected: wait
    ep, wait = p.choose(5.0)
    assert ep == "a" and wait == 0
    p.connected(ep)
    p.closed(ep, 20.0, stable=True)
    assert p.choose(20.0)[0] == "a"  # healthy: redial at once
