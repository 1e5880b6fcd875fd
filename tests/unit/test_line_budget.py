"""LineBudget: a token bucket for per-client log lines."""

from kmuxd.system.log import LineBudget


def test_a_burst_of_rate_then_rate_per_second_and_the_rest_counted():
    b = LineBudget(10, now=0.0)
    assert [b.allow(0.0) for _ in range(12)] == [True] * 10 + [False] * 2
    assert b.take_suppressed() == 2 and b.take_suppressed() is None
    assert b.allow(0.05) is False  # half a token
    assert b.allow(0.1) is True  # 0.1 s at 10/s: one more
    assert b.take_suppressed() == 1


def test_the_bucket_never_holds_more_than_one_burst():
    b = LineBudget(5, now=0.0)
    allowed = sum(b.allow(1000.0) for _ in range(100))
    assert allowed == 5


def test_rate_zero_writes_every_line():
    b = LineBudget(0, now=0.0)
    assert all(b.allow(0.0) for _ in range(10_000)) and b.take_suppressed() is None


def test_no_time_passing_adds_nothing():
    b = LineBudget(2, now=10.0)
    assert b.allow(10.0) and b.allow(10.0) and not b.allow(10.0)
