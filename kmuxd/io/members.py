"""What a group needs of its clients and of a paused connection: the shell's typed seams.

Theory of operation
-------------------
A group (:mod:`kmuxd.io.group`) never reaches into an app's session or a
connection: it calls them through these protocols, so the one writes
nothing of the other's and either can be driven alone in a unit test
(``tests/unit/io``). :class:`Client` is an attached app as its group sees
it: a sender to the scheduler (:class:`~kmuxd.core.sendq.Owner`), a
receiver to steering (:class:`~kmuxd.core.steering.Receiver`), and the
calls below; :class:`kmuxd.io.session.AppSession` is the one
implementation. :class:`PausedReader` is a connection that stopped
reading for want of a ready receiver (``balance``).

Invariant: a field here is read by the group and written only by its
owner (``gone``, ``awaiting_answers``, ``pace``).
"""

from __future__ import annotations

from typing import Callable, Protocol

from kmux.errors import KmuxError
from kmux.protocol import Notice

from kmuxd.core.access import AccessPolicy
from kmuxd.core.pacing import Pace
from kmuxd.core.sendq import Owner
from kmuxd.core.states import CloseReason
from kmuxd.core.steering import Receiver

from .statistics import ClientStatistics

__all__ = ["Client", "PausedReader"]


class Client(Owner, Receiver, Protocol):
    """An attached app, as its group sees it (:class:`kmuxd.io.session.AppSession`):
    a sender to the scheduler, a receiver to steering, and these."""

    id: int
    #: Detached: what is still owed to it is dropped (counted).
    gone: bool
    #: Held at its in-flight limit (flight_room): not read until one of its requests is answered or told.
    awaiting_answers: bool
    #: balance: its token bucket (client_rate_contended).
    pace: Pace

    def unpace(self) -> None:
        """It was paced (:meth:`Pacer.hold <kmuxd.io.pacer.Pacer.hold>`) and its bucket has refilled: read it again."""

    @property
    def seq(self) -> int:
        """Its last DATA packet read (the shutdown notice tells it)."""

    def notify(self, notice: Notice) -> None: ...

    def stop_reading(self, notice: Notice) -> None: ...

    def close(self, reason: CloseReason, detail: str | None = None) -> None: ...

    def abort_open(self, err: KmuxError) -> None:
        """Its message in pieces will never complete (its orphaned outbox expired): refuse it."""

    def check_access(self, access: AccessPolicy, group: str) -> None:
        """Detach it (``permission_denied``) if ``access`` no longer admits it (a reload)."""

    def apply_deadlines(self, now: float) -> None:
        """Its own deadlines: a message in pieces, ``client_idle_timeout``, a slow consumer's grace."""

    def expire_queued(self, now: float, timeout: float, refusal: Callable[[], KmuxError]) -> int:
        """Waited ``timeout`` for a connection: refuse what waits unread. Returns how many."""

    def queued_response_bytes(self) -> int: ...

    def statistics(self) -> ClientStatistics: ...


class PausedReader(Protocol):
    """A connection that stopped reading for want of a ready receiver (balance)."""

    def resume_reading(self) -> None: ...
