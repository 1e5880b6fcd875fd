"""A bounded latency histogram: log-spaced buckets, fixed memory, no I/O.

Request/response steering records one sample per answered request; the
statistics report p50/p99 from it. Buckets grow by 2^(1/4) (about 19%), so a
percentile is exact to within one bucket, and the memory is the same after
ten samples or ten billion.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["LatencyHistogram"]

#: Smallest and largest latency the buckets resolve, seconds.
MIN_LATENCY: Final = 1e-6
MAX_LATENCY: Final = 100.0
_STEPS_PER_DOUBLING: Final = 4
_BUCKETS: Final = int(math.log2(MAX_LATENCY / MIN_LATENCY) * _STEPS_PER_DOUBLING) + 2


class LatencyHistogram:
    __slots__ = ("_counts", "count")

    def __init__(self) -> None:
        self._counts = [0] * _BUCKETS
        self.count = 0

    def record(self, seconds: float) -> None:
        if seconds <= MIN_LATENCY:
            i = 0
        else:
            i = min(_BUCKETS - 1, 1 + int(math.log2(seconds / MIN_LATENCY) * _STEPS_PER_DOUBLING))
        self._counts[i] += 1
        self.count += 1

    def percentile(self, p: float) -> float | None:
        """Upper bound of the bucket holding the p-th percentile, seconds (None if empty)."""
        if not self.count:
            return None
        rank = max(1, math.ceil(self.count * p / 100))
        seen = 0
        for i, n in enumerate(self._counts):
            seen += n
            if seen >= rank:
                return MIN_LATENCY * 2 ** (i / _STEPS_PER_DOUBLING)
        return MAX_LATENCY
