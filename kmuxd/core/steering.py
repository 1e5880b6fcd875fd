"""Receive steering: which client gets the next message parsed from a connection.

Theory of operation (``balance`` mode, KCM's)
---------------------------------------------
A receiver is *ready* when its receiving is on, its socket took the last
message without blocking, and it has no notices waiting. Ready receivers
form a ring. Messages go to the receiver at the front, ``batch`` at a time,
then the ring turns, so wake-ups are amortised over a batch and no receiver
is starved.

* A receiver whose socket is full is marked *blocked* and leaves the ring;
  the message it could not take goes to the next one. It comes back when
  its socket is writable again.
* A receiver that switches receiving off leaves the ring; messages already
  queued for it are handed back by the client and steered again.
* With no receiver ready, :meth:`take` returns ``None`` and the caller
  stops parsing (push-back through TCP). Nothing is dropped here.

No I/O; receivers are opaque objects.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["BalanceSteering", "SteeringStatistics"]


@dataclass(frozen=True, slots=True)
class SteeringStatistics:
    #: Receivers that can take a message now.
    ready: int
    #: Receivers with receiving on (ready or blocked).
    receiving: int


class BalanceSteering:
    """Round robin over ready receivers, ``batch`` messages per turn."""

    __slots__ = ("batch", "_ring", "_receiving", "_blocked", "_left")

    def __init__(self, batch: int) -> None:
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.batch = batch
        self._ring: deque[Any] = deque()
        self._receiving: set[Any] = set()
        self._blocked: set[Any] = set()
        self._left = 0  # messages the ring's front may still take this turn

    def remove(self, receiver: Any) -> None:
        self._receiving.discard(receiver)
        self._blocked.discard(receiver)
        self._leave_ring(receiver)

    def receive_on(self, receiver: Any) -> bool:
        """Returns True if the receiver became ready (wake paused parsers)."""
        if receiver in self._receiving:
            return False
        self._receiving.add(receiver)
        if receiver not in self._blocked:
            self._ring.append(receiver)
            return True
        return False

    def receive_off(self, receiver: Any) -> None:
        self._receiving.discard(receiver)
        self._leave_ring(receiver)

    def blocked(self, receiver: Any) -> None:
        """The receiver could not take a message (socket full, notices pending)."""
        self._blocked.add(receiver)
        self._leave_ring(receiver)

    def unblocked(self, receiver: Any) -> bool:
        """The receiver can take messages again. True if it became ready."""
        self._blocked.discard(receiver)
        if receiver in self._receiving and receiver not in self._ring:
            self._ring.append(receiver)
            return True
        return False

    def take(self) -> tuple[Any, int] | tuple[None, int]:
        """The receiver for the next messages and how many it may take now."""
        ring = self._ring
        if not ring:
            return None, 0
        if self._left <= 0:
            ring.rotate(-1)
            self._left = self.batch
        return ring[0], self._left

    def used(self, n: int) -> None:
        """The front receiver took ``n`` of the messages :meth:`take` offered."""
        self._left -= n

    def _leave_ring(self, receiver: Any) -> None:
        ring = self._ring
        if ring and ring[0] is receiver:
            ring.popleft()
            self._left = self.batch
        else:
            try:
                ring.remove(receiver)
            except ValueError:
                pass

    def statistics(self) -> SteeringStatistics:
        return SteeringStatistics(ready=len(self._ring), receiving=len(self._receiving))
