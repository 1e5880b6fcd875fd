"""Reconnect back-off: exponential with full-range jitter, bounded.

One dial per step and no more: a dead endpoint costs at most one connection
attempt per back-off interval per slot, so a restarting server is not hit by
a reconnect storm from every slot at the same instant (the jitter spreads
them). No I/O; the caller sleeps.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays ``initial, 2*initial, 4*initial ... max``, each jittered into [d/2, d]."""

    __slots__ = ("initial", "maximum", "_attempt", "_rng")

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("need 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self._attempt = 0
        self._rng = rng or random.Random()

    @property
    def attempt(self) -> int:
        """Failures in a row since the last success."""
        return self._attempt

    def next_delay(self) -> float:
        """The delay before the next attempt; each call is one more failure."""
        ceiling = min(self.maximum, self.initial * (2 ** min(self._attempt, 62)))
        self._attempt += 1
        return ceiling / 2 + self._rng.random() * ceiling / 2

    def reset(self) -> None:
        self._attempt = 0
