"""The TCP_NOTSENT_LOWAT rule (kmuxd.core.notsent): at least the floor, at least N of the largest recent message."""

from __future__ import annotations

import pytest

from kmuxd.core.notsent import EPOCH_COMMITS, NotsentMark

FLOOR = 131072
CEILING = 1 << 30


def commits(mark: NotsentMark, n: int, size: int, msgs: int = 1) -> list[int]:
    """``n`` commits of ``msgs`` messages of ``size`` bytes; the marks they asked to set."""
    return [m for m in (mark.committed(msgs, size * msgs) for _ in range(n)) if m]


def test_small_messages_keep_the_floor_and_ask_for_nothing():
    mark = NotsentMark(FLOOR, 4, CEILING)
    assert commits(mark, 3 * EPOCH_COMMITS, 1024, msgs=64) == []  # 64 KiB batches of 1 KiB: the floor is 128 of them
    assert commits(mark, 10, FLOOR // 4) == []  # 4 of these fit the floor exactly
    assert (mark.mark, mark.statistics().changes) == (FLOOR, 0)


def test_a_message_larger_than_the_floor_allows_raises_the_mark_at_once_to_n_of_it():
    mark = NotsentMark(FLOOR, 4, CEILING)
    assert mark.committed(1, 256 * 1024) == 1 << 20
    assert commits(mark, 50, 256 * 1024) == []  # set once, not again while it holds
    assert mark.committed(2, 2 * 300_000) == 1_200_000  # the mean of a commit counts; larger: raised again
    assert mark.statistics() == mark.statistics().__class__(mark=1_200_000, floor=FLOOR, changes=2)


def test_the_mark_falls_back_to_the_floor_within_two_epochs_of_small_messages():
    mark = NotsentMark(FLOOR, 4, CEILING)
    mark.committed(1, 256 * 1024)
    asked = commits(mark, 2 * EPOCH_COMMITS, 1024)
    assert asked == [FLOOR] and mark.mark == FLOOR
    # A large message now and then holds it up: one per epoch is enough.
    mark.committed(1, 256 * 1024)
    for _ in range(4):
        commits(mark, EPOCH_COMMITS - 1, 1024)
        mark.committed(1, 256 * 1024)
        assert mark.mark == 1 << 20


def test_the_mark_is_bounded_by_the_ceiling_and_zero_messages_keeps_the_floor():
    capped = NotsentMark(FLOOR, 4, 1 << 20)
    assert capped.committed(1, 1 << 20) == 1 << 20 and capped.mark == 1 << 20
    fixed = NotsentMark(FLOOR, 0, CEILING)
    assert commits(fixed, 10, 1 << 20) == [] and fixed.mark == FLOOR
    assert NotsentMark(FLOOR, 4, CEILING).committed(0, 0) == 0  # a commit of nothing whole (never, but harmless)


@pytest.mark.parametrize("floor, messages, ceiling", [(0, 4, CEILING), (FLOOR, -1, CEILING), (FLOOR, 4, FLOOR - 1)])
def test_a_bad_rule_is_refused(floor, messages, ceiling):
    with pytest.raises(ValueError):
        NotsentMark(floor, messages, ceiling)
