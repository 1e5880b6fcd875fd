"""The request lifecycle and response matching, with no sockets (kmuxd.core.router).

The property test drives a model of a group (connections, their outboxes and
a server per connection that answers in its own time) with random schedules
of accepts, writes, answers, late answers, connection losses, retries,
timeouts, expiries and departing clients, and checks the router's promises:
every request ends in exactly one outcome, a response reaches only the client
whose request it answered, fifo answers keep their connection's order, and a
retried request is never answered twice.
"""

from __future__ import annotations

import random
import struct
from collections import Counter, deque
from dataclasses import dataclass, field

import pytest

from kmux.errors import IdInUse, IllegalTransition, InternalError, KmuxError
from kmuxd.core.router import (
    DONE,
    PENDING,
    TIMED_OUT,
    TRANSITIONS,
    WRITTEN,
    IdTable,
    Request,
    ResponseRouter,
)

# A request/response: u32 length, u32 id, u16 client, u32 seq (the client's own numbering).
HDR = struct.Struct(">IIHI")


@dataclass(eq=False)
class Owner:
    name: int
    gone: bool = False
    outcomes: Counter = field(default_factory=Counter)  # seq -> number of outcomes


def make(client: int, seq: int, rid: int) -> bytearray:
    return bytearray(HDR.pack(HDR.size - 4, rid, client, seq))


def test_table_covers_exactly_the_documented_transitions():
    assert len(TRANSITIONS) == 12
    req = Request(Owner(1), 1, 0.0)
    with pytest.raises(IllegalTransition) as info:
        req.fire(1)  # answer is fine from pending...
        req.fire(1)  # ...but not twice
    assert isinstance(info.value, InternalError) and not isinstance(info.value, KmuxError)


def test_id_without_rewrite_refuses_an_id_in_flight_until_done():
    router = ResponseRouter("id", IdTable(4, 4, 4, rewrite=False))
    a, b = Owner(1), Owner(2)
    buf = make(1, 1, 77)
    req = router.accept(a, 1, 0.0, buf, 0, len(buf))
    with pytest.raises(IdInUse):
        router.accept(b, 1, 0.0, make(2, 1, 77), 0, len(buf))
    flight = router.flight("c0")
    router.written(req, flight)
    assert router.match(flight, (), make(0, 0, 77), 0, len(buf)) is req
    assert router.answered(req, 0.001)
    router.accept(b, 1, 0.0, make(2, 1, 77), 0, len(buf))  # free again


def test_timed_out_id_stays_reserved_and_its_late_answer_is_discarded():
    router = ResponseRouter("id", IdTable(4, 4, 4, rewrite=True))
    a = Owner(1)
    buf = make(1, 1, 5)
    req = router.accept(a, 1, 0.0, buf, 0, len(buf))
    flight = router.flight("c0")
    router.written(req, flight)
    assert router.expire(10.0, 1.0) == [req]
    assert req.state == TIMED_OUT
    late = bytearray(buf)  # the server echoes the wire id
    assert router.match(flight, (), late, 0, len(late)) is req
    assert router.answered(req, 11.0) is False
    assert router.statistics().late == 1 and req.state == DONE
    assert router.match(flight, (), late, 0, len(late)) is None  # released now


def test_retry_gets_a_fresh_wire_id_and_runs_out():
    router = ResponseRouter("id", IdTable(4, 4, 4, rewrite=True), retry_unanswered=1)
    a = Owner(1)
    buf = make(1, 1, 5)
    req = router.accept(a, 1, 0.0, buf, 0, len(buf))
    first_wire = bytes(req.wire_id)
    f1 = router.flight("c0")
    router.written(req, f1)
    notify, retry = router.lost(f1)
    assert notify == [] and retry == [req] and req.state == PENDING
    assert req.wire_id != first_wire and req.payload[4:8] == req.wire_id
    f2 = router.flight("c1")
    router.written(req, f2)
    notify, retry = router.lost(f2)
    assert notify == [req] and retry == []
    s = router.statistics()
    assert (s.retried, s.retries_exhausted, s.failed) == (1, 1, 1)


class Model:
    """A group of connections whose servers answer on their own schedule."""

    def __init__(self, rng: random.Random, mode: str, rewrite: bool, retries: int, conns: int = 3) -> None:
        self.rng = rng
        self.mode = mode
        ids = IdTable(4, 4, 4, rewrite) if mode == "id" else None
        self.router = ResponseRouter(mode, ids, retry_unanswered=retries)
        self.owners = [Owner(i) for i in range(4)]
        self.seq = Counter()
        self.now = 0.0
        self.flights = [self.router.flight(i) for i in range(conns)]
        self.pending: list[deque[Request]] = [deque() for _ in range(conns)]  # outbox.requests
        self.server: list[deque[tuple[Request, bytearray]]] = [deque() for _ in range(conns)]
        self.stale: list[bytearray] = []  # answers a dead connection's server still "sends" late
        self.retry_queue: deque[Request] = deque()
        self.bytes_of: dict[Request, bytearray] = {}
        self.delivered: dict[Request, int] = Counter()
        self.outcome: Counter = Counter()  # request -> outcomes
        self.fifo_answered: list[list[Request]] = [[] for _ in range(conns)]
        self.fifo_written: list[list[Request]] = [[] for _ in range(conns)]

    def record(self, req: Request, what: str) -> None:
        self.outcome[req] += 1
        assert self.outcome[req] == 1, f"{req} got a second outcome ({what})"

    def step(self) -> None:
        rng = self.rng
        action = rng.choices(
            ["accept", "write", "answer", "late", "lose", "tick", "leave", "expire", "feed"],
            [30, 25, 25, 3, 3, 6, 1, 2, 5],
        )[0]
        getattr(self, action)()

    def accept(self) -> None:
        owner = self.rng.choice(self.owners)
        if owner.gone:
            return
        self.seq[owner.name] += 1
        seq = self.seq[owner.name]
        buf = make(owner.name, seq, self.rng.randrange(8))  # colliding client ids
        try:
            req = self.router.accept(owner, seq, self.now, buf, 0, len(buf))
        except KmuxError:
            return  # refused: never written, told by the shell (not a router outcome)
        self.bytes_of[req] = buf
        self.pending[self.rng.randrange(len(self.pending))].append(req)

    def write(self) -> None:
        c = self.rng.randrange(len(self.pending))
        if self.pending[c]:
            req = self.pending[c].popleft()
            self.router.written(req, self.flights[c])
            if req.state in (WRITTEN, TIMED_OUT):
                self.server[c].append((req, bytearray(self.bytes_of[req])))
                self.fifo_written[c].append(req)

    def answer(self) -> None:
        c = self.rng.randrange(len(self.server))
        if not self.server[c]:
            return
        # fifo servers answer in order; id servers in any order
        i = 0 if self.mode == "fifo" else self.rng.randrange(len(self.server[c]))
        req_sent, wire = self.server[c][i]
        del self.server[c][i]
        self.deliver(c, wire, req_sent)

    def deliver(self, c: int, wire: bytearray, sent: Request | None) -> None:
        router = self.router
        req = router.match(self.flights[c], self.pending[c], wire, 0, len(wire))
        if req is None:
            return
        if self.mode == "fifo":
            assert req is sent, "fifo matched a response to another request"
            self.fifo_answered[c].append(req)
        else:
            assert req.wire_id == bytes(wire[4:8]), "id match with the wrong wire id"
        was = req.state
        if router.answered(req, self.now):
            if router.ids is not None:
                router.ids.restore(req, wire, 0)
            client, seq = struct.unpack_from(">HI", wire, 8)
            assert (client, seq) == (req.owner.name, req.seq), "response reached the wrong request"
            assert wire[4:8] == req.orig_id or self.mode == "fifo"
            self.record(req, "response")
        elif was != TIMED_OUT:
            assert req.owner.gone
            self.record(req, "dropped")

    def late(self) -> None:
        if self.stale and self.mode == "id":
            wire = self.stale.pop(self.rng.randrange(len(self.stale)))
            c = self.rng.randrange(len(self.flights))
            req = self.router.match(self.flights[c], (), wire, 0, len(wire))
            # A late answer to a lost connection's request may only match a
            # request that reuses the wire id *now*; with rewrite ids are
            # reused as late as possible, and a retried request never shares
            # its first copy's wire id.
            if req is not None:
                assert req.wire_id == bytes(wire[4:8])
                self.deliver_matched_late(req, wire)

    def deliver_matched_late(self, req: Request, wire: bytearray) -> None:
        # Only in id mode without rewrite can an old id legitimately match a
        # newer request (the client reused it): the model skips that case.
        pass

    def lose(self) -> None:
        c = self.rng.randrange(len(self.flights))
        self.stale.extend(w for _, w in self.server[c])
        self.server[c].clear()
        in_flight = [r for r in self.bytes_of if r.flight is self.flights[c] and r.state == WRITTEN and r.owner.gone]
        notify, retry = self.router.lost(self.flights[c])
        for req in in_flight:
            self.record(req, "dropped")
        for req in notify:
            self.record(req, "connection_lost")
        for req in retry:
            self.bytes_of[req] = req.payload
            self.retry_queue.append(req)
        self.flights[c] = self.router.flight(c)
        # the unwritten outbox moves whole to another connection (salvage)
        other = (c + 1) % len(self.pending)
        self.pending[other].extend(self.pending[c])
        self.pending[c].clear()
        self.fifo_answered[c] = []
        self.fifo_written[c] = []

    def feed(self) -> None:
        if self.retry_queue:
            req = self.retry_queue.popleft()
            self.pending[self.rng.randrange(len(self.pending))].append(req)

    def tick(self) -> None:
        self.now += self.rng.random() * 0.5
        gone = [r for r in self.router.live if r.owner.gone and self.now - r.t0 >= 1.0]
        for req in self.router.expire(self.now, 1.0):
            self.record(req, "request_timeout")
        for req in gone:
            self.record(req, "dropped")

    def leave(self) -> None:
        owner = self.rng.choice(self.owners)
        owner.gone = True

    def expire(self) -> None:
        c = self.rng.randrange(len(self.pending))
        if self.pending[c]:
            req = self.pending[c].pop()
            was = req.state
            if self.router.refused(req):
                self.record(req, "group_unavailable")
            elif was != TIMED_OUT:
                assert req.owner.gone
                self.record(req, "dropped")

    def finish(self) -> None:
        # Drain: write everything, answer everything, then account.
        for _ in range(10_000):
            if not any(self.pending) and not any(self.server) and not self.retry_queue:
                break
            self.feed()
            for c in range(len(self.pending)):
                while self.pending[c]:
                    self.pending[c].appendleft(self.pending[c].popleft())
                    self.write()
                    break
            self.answer()
        for req in list(self.router.live):
            assert False, f"{req} still live after the drain"
        for req in self.bytes_of:
            assert self.outcome[req] == 1, f"{req}: {self.outcome[req]} outcomes"
        s = self.router.statistics()
        assert s.in_flight == 0


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("mode,rewrite,retries", [("id", True, 0), ("id", True, 2), ("id", False, 0), ("fifo", False, 0), ("fifo", False, 1)])
def test_random_schedules_keep_every_promise(seed, mode, rewrite, retries):
    rng = random.Random(seed * 1000 + retries)
    model = Model(rng, mode, rewrite, retries)
    for _ in range(400):
        model.step()
        # client_max_in_flight counts, per owner, exactly its live requests.
        live = Counter(r.owner for r in model.router.live)
        assert model.router.owed == dict(live)
    model.finish()
    assert model.router.owed == {}
    if mode == "fifo":
        for answered, written in zip(model.fifo_answered, model.fifo_written):
            order = [r for r in written if r in set(answered)]
            assert answered == order, "fifo answers out of written order"
