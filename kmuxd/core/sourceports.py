"""Source ports from a configured range (``[groups.NAME.socket] source_ports``).

Theory of operation
-------------------
Some services trust a connection only when it comes from a reserved port
(rsh-style ``[600, 1023]``); some firewalls admit only a narrow range. A
group with ``source_ports = [lo, hi]`` binds every connection it dials to a
port of that range. The kernel cannot pick one for us (``bind(addr, 0)``
takes any ephemeral port), so a :class:`SourcePorts` proposes ports and
the shell tries them, one ``bind`` and ``connect`` each, until one works.

* **One cursor per group.** The next dial starts after the port the last
  one took, so a group's connections spread over the range and a dial does
  not retry the ports its siblings hold (each try is a system call or two).
* **Bounded.** One dial tries each port of the range at most once, and never
  more than :data:`TRIES_MAX` ports: a range of 60,000 taken ports must not
  stall the event core. When every proposal failed the range is exhausted
  for this dial, and the caller says so (a failed dial, with back-off).
* **Which failures move on.** Only "this port is taken" (``EADDRINUSE`` at
  ``bind``, ``EADDRNOTAVAIL`` at ``connect`` when the same four-tuple is in
  use, a TIME_WAIT included) moves to the next port; any other error is the
  dial's failure, decided by the shell.

No I/O: the shell does the binds and connects and reports how each ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

__all__ = ["SourcePorts", "SourcePortsStatistics", "TRIES_MAX"]

#: Most ports one dial tries before it reports the range exhausted.
TRIES_MAX = 4096


@dataclass(frozen=True, slots=True)
class SourcePortsStatistics:
    #: The configured range, inclusive.
    first: int
    last: int
    #: Ports bound by successful dials, over the group's life.
    taken: int
    #: Ports found in use (skipped) during dials.
    busy: int
    #: Dials that found every port they tried in use.
    exhausted: int


class SourcePorts:
    """Proposes the ports of ``[first, last]`` for one dial at a time, round robin."""

    __slots__ = ("first", "last", "_next", "taken", "busy", "exhausted")

    def __init__(self, first: int, last: int, start: int | None = None) -> None:
        if not 0 < first <= last <= 65535:
            raise ValueError(f"need 0 < first <= last <= 65535, not [{first}, {last}]")
        self.first = first
        self.last = last
        self._next = first if start is None else first + (start - first) % self.size
        self.taken = self.busy = self.exhausted = 0

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    @property
    def tries(self) -> int:
        """Ports one dial tries at most."""
        return min(self.size, TRIES_MAX)

    def candidates(self) -> Iterator[int]:
        """The ports to try for one dial, in order, each at most once.

        Report each port's fate with :meth:`in_use` or :meth:`took`; if the
        iterator runs out without a :meth:`took`, call :meth:`gave_up`.
        """
        port = self._next
        for _ in range(self.tries):
            yield port
            port = self.first if port == self.last else port + 1

    def in_use(self, port: int) -> None:
        """``port`` is taken (bind or connect said so): the dial moves on."""
        self.busy += 1

    def took(self, port: int) -> None:
        """A dial bound ``port`` and connected from it: the next dial starts after it."""
        self.taken += 1
        self._next = self.first if port == self.last else port + 1

    def gave_up(self) -> None:
        """Every port this dial tried was in use."""
        self.exhausted += 1

    def describe(self) -> str:
        return f"{self.first}..{self.last}"

    def statistics(self) -> SourcePortsStatistics:
        return SourcePortsStatistics(self.first, self.last, self.taken, self.busy, self.exhausted)
