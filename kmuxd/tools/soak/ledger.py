"""Per-session accounting of what a soak client sent and what came back (no I/O).

Theory of operation
-------------------
One *session* is one connection of one client to one group, from connect to
close. Its ledger is fed events by the client shell (:mod:`.client`) and
decides, for each, whether it is a legal outcome:

* :meth:`RequestLedger.will_send` registers a request *before* it is sent:
  the receiving thread may see its answer before ``send()`` returns.
* :meth:`RequestLedger.response` takes a received message. It must parse
  (else *torn*), name this session (else a *cross-delivery*), answer a request
  still outstanding (else a *second outcome*, or an answer to a request
  *never sent*), carry back the client's own id (``id`` steering: else
  *wrong id*), and come off its backend connection after every earlier
  answer of this session on that connection (else an *order* violation).
* :meth:`RequestLedger.notice` takes an error notice: it must name an
  outstanding request by ``seq`` (and, with ``id`` steering, by the client's
  id); it ends that request with the notice's code.
* :meth:`RequestLedger.close` ends the session. A graceful close waited for
  every outcome: whatever is still outstanding is *missing*, a failure. An
  abrupt close left on purpose: what is outstanding is *abandoned*, owed
  nothing, and counted apart.

Invariants: every request is, at any time, exactly one of outstanding,
answered (one response or one notice), abandoned or missing; ``problems``
counts every violation, with the first few described in ``examples``.
Callers serialise access (the shell holds one lock per session).

:class:`OneWayLedger` is the same for ``balance`` senders: what was sent (the
backend's count is checked against it later) and any notices or data that
came back (a sender with receiving off expects no data at all).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .frames import BadSoakFrame, parse_frame

__all__ = ["RequestLedger", "OneWayLedger", "EXAMPLES_PER_SESSION", "PROBLEM_KINDS"]

#: Problems described in full per session (all are counted).
EXAMPLES_PER_SESSION = 5
#: Every kind of problem a ledger can record.
PROBLEM_KINDS = (
    "torn",
    "cross_delivery",
    "second_outcome",
    "never_sent",
    "wrong_id",
    "order",
    "notice_without_seq",
    "missing",
    "unexpected_data",
    "client_error",
)


class _Problems:
    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: list[str] = []

    def add(self, kind: str, text: str, n: int = 1) -> None:
        assert kind in PROBLEM_KINDS, kind
        self.counts[kind] += n
        if len(self.examples) < EXAMPLES_PER_SESSION:
            self.examples.append(f"{kind}: {text}")


class _SessionLedger:
    """What every session counts: messages sent, notices by code, problems."""

    mode = ""

    def __init__(self, session: int) -> None:
        self.session = session
        self.sent = 0
        self.sent_bytes = 0
        self.responses = 0
        self.notices: Counter = Counter()
        self.abandoned = 0
        self.missing = 0
        self._problems = _Problems()

    def _count_sent(self, seq: int, size: int) -> None:
        if seq != self.sent + 1:
            raise ValueError(f"session {self.session}: seq {seq} registered after {self.sent}")
        self.sent = seq
        self.sent_bytes += size

    def client_error(self, text: str) -> None:
        """The client library failed in a way the soak did not plan (recorded, never fatal)."""
        self._problems.add("client_error", text)

    @property
    def problems(self) -> Counter:
        return self._problems.counts

    def summary(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "mode": self.mode,
            "sent": self.sent,
            "sent_bytes": self.sent_bytes,
            "responses": self.responses,
            "notices": dict(self.notices),
            "abandoned": self.abandoned,
            "missing": self.missing,
            "problems": dict(self._problems.counts),
            "examples": list(self._problems.examples),
        }


class RequestLedger(_SessionLedger):
    """A request/response session (``id`` or ``fifo`` steering)."""

    def __init__(self, session: int, mode: str) -> None:
        if mode not in ("id", "fifo"):
            raise ValueError(f"a request ledger is for id or fifo steering, not {mode!r}")
        super().__init__(session)
        self.mode = mode
        #: seq -> the client's id for that request
        self.outstanding: dict[int, int] = {}
        self._last_by_conn: dict[int, int] = {}

    # -- events -------------------------------------------------------------

    def will_send(self, seq: int, rid: int, size: int) -> None:
        self._count_sent(seq, size)
        self.outstanding[seq] = rid

    def response(self, message) -> None:
        try:
            frame = parse_frame(message)
        except BadSoakFrame as exc:
            self._problems.add("torn", str(exc))
            return
        if frame.session != self.session:
            self._problems.add(
                "cross_delivery", f"session {self.session} got session {frame.session}'s seq {frame.seq}"
            )
            return
        rid = self._end(frame.seq, "response")
        if rid is None:
            return
        self.responses += 1
        if self.mode == "id" and frame.id != rid:
            self._problems.add("wrong_id", f"seq {frame.seq} came back with id {frame.id}, sent with {rid}")
        last = self._last_by_conn.get(frame.conn, 0)
        if frame.seq < last:
            self._problems.add("order", f"seq {frame.seq} answered on backend conn {frame.conn} after seq {last}")
        else:
            self._last_by_conn[frame.conn] = frame.seq

    def notice(self, code: str, seq: int | None, details: dict[str, Any]) -> None:
        if seq is None:
            self._problems.add("notice_without_seq", f"notice {code}: {details}")
            return
        rid = self._end(seq, f"notice {code}")
        if rid is None:
            return
        self.notices[code] += 1
        if self.mode == "id" and details.get("id") != rid:
            self._problems.add("wrong_id", f"notice {code} for seq {seq} names id {details.get('id')!r}, sent with {rid}")

    def close(self, graceful: bool) -> None:
        """End the session: outstanding requests become missing (graceful) or abandoned."""
        left = len(self.outstanding)
        if graceful and left:
            self.missing += left
            self._problems.add("missing", f"no outcome for {left} request(s), first seqs {sorted(self.outstanding)[:5]}",
                               left)
        elif left:
            self.abandoned += left
        self.outstanding.clear()

    def _end(self, seq: int, what: str) -> int | None:
        rid = self.outstanding.pop(seq, None)
        if rid is not None:
            return rid
        if 1 <= seq <= self.sent:
            self._problems.add("second_outcome", f"{what} for seq {seq}, which already had its outcome")
        else:
            self._problems.add("never_sent", f"{what} for seq {seq}; session sent {self.sent}")
        return None


class OneWayLedger(_SessionLedger):
    """A ``balance`` sender with receiving off: what it sent, and what came back (nothing, or notices)."""

    mode = "balance"

    def will_send(self, seq: int, size: int) -> None:
        self._count_sent(seq, size)

    def notice(self, code: str, seq: int | None, details: dict[str, Any]) -> None:
        if seq is None:
            self._problems.add("notice_without_seq", f"notice {code}: {details}")
        elif not 1 <= seq <= self.sent:
            self._problems.add("never_sent", f"notice {code} for seq {seq}; session sent {self.sent}")
        self.notices[code] += 1

    def data(self, message) -> None:
        self._problems.add("unexpected_data", f"a {len(message)}-byte message reached a sender with receiving off")
