"""Request/response test support (``steering = "id"`` and ``"fifo"``): messages, clients, ledgers, a faulty server.

Used by the request/response tests, split by what they test:
``test_request_matching.py`` (each response to its requester),
``test_request_failures.py`` (one outcome per request when a server or a
client fails) and ``test_request_faults_property.py`` (random faults).
Every request is a u32be frame laid out as::

    u32be length | id (ID_SIZE bytes) | u16 client | u32 seq | u32 crc | body

``crc`` covers (client, seq, body), not the id: with ``rewrite = true`` the
server sees the daemon's id, and the client must get its own id back. The
servers echo frames unchanged, so a response carries the (rewritten) id at
the request's offset (``request_offset = response_offset = 4``) and names the
request it answers: a response a client did not ask for cannot go unnoticed.

The fault servers here (:class:`FaultServer`) are echo servers whose
connections drop (FIN), reset (RST), stall or answer late on cue: the
project's one TCP backend (:mod:`kmuxd.tools.backend`) with its faulty
echo protocol (``fault_servers`` in conftest.py starts them).
"""

from __future__ import annotations

import random
import struct
import threading
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from kmux.control import ControlClient
from kmux.errors import KmuxError

from kmuxd.tools.backend import Conn, FaultyEcho, Loop, Plan

from .helpers import BadTestFrame

MAX = 65536
ID_OFFSET = 4
_BLOB = random.Random(4321).randbytes(1 << 17)
_IDENT = struct.Struct(">HII")  # client, seq, crc



# -- test messages ---------------------------------------------------------------------


def header_size(id_size: int = 4) -> int:
    return 4 + id_size + _IDENT.size


def make_req(client: int, seq: int, rid: int, size: int, rng: random.Random, id_size: int = 4) -> bytes:
    """A u32be request of exactly ``size`` bytes carrying ``rid`` at offset 4 and ``(client, seq)``."""
    hsize = header_size(id_size)
    if size < hsize:
        raise ValueError(f"a request needs at least {hsize} bytes")
    n = size - hsize
    off = rng.randrange(0, len(_BLOB) - n + 1)
    body = _BLOB[off : off + n]
    crc = zlib.crc32(body, zlib.crc32(struct.pack(">HI", client, seq)))
    return struct.pack(">I", size - 4) + rid.to_bytes(id_size, "big") + _IDENT.pack(client, seq, crc) + body


def parse_resp(frame: bytes, id_size: int = 4) -> tuple[int, int, int]:
    """``(id, client, seq)`` of a frame built by :func:`make_req`; BadTestFrame if torn or garbled."""
    hsize = header_size(id_size)
    if len(frame) < hsize:
        raise BadTestFrame(f"{len(frame)}-byte frame is too short to be a test request")
    (length,) = struct.unpack_from(">I", frame)
    if length + 4 != len(frame):
        raise BadTestFrame(f"header says {length + 4} bytes, frame has {len(frame)}")
    rid = int.from_bytes(frame[4 : 4 + id_size], "big")
    client, seq, crc = _IDENT.unpack_from(frame, 4 + id_size)
    body = memoryview(frame)[hsize:]
    if zlib.crc32(body, zlib.crc32(struct.pack(">HI", client, seq))) != crc:
        raise BadTestFrame(f"checksum mismatch in a frame naming client {client} seq {seq}")
    return rid, client, seq


def summarize_req(frame: bytes) -> tuple:
    """Backend record: ``(client, seq, wire id)`` or ``("bad", reason)``."""
    try:
        rid, client, seq = parse_resp(frame)
    except BadTestFrame as exc:
        return ("bad", str(exc))
    return (client, seq, rid)


def req_size(rng: random.Random) -> int:
    """Mostly small, some medium, a few large requests."""
    r = rng.random()
    if r < 0.7:
        return rng.randint(header_size(), 600)
    if r < 0.95:
        return rng.randint(601, 8192)
    return rng.randint(8193, 60000)


# -- configuration and statistics ----------------------------------------------------------------


def rr_group(endpoints: list[str], mode: str, *, rewrite: bool = True, id_size: int = 4, **kw: Any) -> dict[str, Any]:
    """A request/response group (``mode``: ``id`` or ``fifo``) with fast reconnects."""
    cfg: dict[str, Any] = {
        "endpoints": endpoints,
        "connections": 4,
        "max_message": MAX,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.2,
        "connect_timeout": 2.0,
        "steering": mode,
    }
    if mode == "id":
        cfg["id"] = {"request_offset": ID_OFFSET, "response_offset": ID_OFFSET, "size": id_size, "rewrite": rewrite}
    cfg.update(kw)
    return cfg


def stats(daemon) -> dict:
    with ControlClient(daemon.control_socket, timeout=5.0) as c:
        return c.request("stats")


def group_stats(daemon, name: str = "g") -> dict:
    (g,) = [g for g in stats(daemon)["groups"] if g["name"] == name]
    return g


# -- clients ---------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What one client sent and what came back."""

    cid: int
    sent: dict[int, int] = field(default_factory=dict)  # seq -> the client's id
    sent_at: dict[int, float] = field(default_factory=dict)
    responses: list[int] = field(default_factory=list)  # seqs, in arrival order
    notices: dict[int, list[tuple[str, dict]]] = field(default_factory=lambda: defaultdict(list))
    outcome_at: dict[int, float] = field(default_factory=dict)
    anomalies: list[str] = field(default_factory=list)  # misdelivered, duplicated, torn, wrong id...
    refused: dict[int, str] = field(default_factory=dict)  # seq -> local refusal code (never written)

    def outcomes(self, seq: int) -> list[str]:
        out = ["response"] * self.responses.count(seq)
        return out + [code for code, _ in self.notices.get(seq, [])]

    def missing(self) -> list[int]:
        return [s for s in self.sent if s not in self.refused and not self.outcomes(s)]

    def codes(self) -> Counter:
        return Counter(code for lst in self.notices.values() for code, _ in lst)


class RequestClient:
    """One sync kmux client in a thread: sends ``count`` requests, at most ``window`` outstanding.

    ``pick_id(outstanding_ids)`` chooses each request's id (id mode);
    ``remote_codes`` are the notice codes that end a request. Everything
    received is checked against what is outstanding and recorded in ``ledger``.
    """

    def __init__(self, daemon, cid: int, count: int, *, window: int, mode: str, seed: int = 0,
                 size: Callable[[random.Random], int] = req_size,
                 pick_id: Callable[[set[int]], int] | None = None, deadline: float = 20.0,
                 pace: float = 0.0, start: threading.Event | None = None) -> None:
        self.client = daemon.connect(name=f"req{cid}")
        self.cid, self.count, self.window, self.mode = cid, count, window, mode
        self.rng = random.Random(seed * 7919 + cid)
        self.size = size
        self.pick_id = pick_id or (lambda used: min(set(range(1, window + 1)) - used))
        self.deadline = deadline
        self.pace = pace
        self.start_event = start
        self.ledger = Ledger(cid)
        self.outstanding: dict[int, int] = {}  # seq -> id
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"req{cid}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            if self.start_event is not None:
                self.start_event.wait(10)
            end = time.monotonic() + self.deadline
            seq = len(self.ledger.sent)  # a second run goes on from there
            while True:
                if seq < self.count and len(self.outstanding) < self.window:
                    seq += 1
                    rid = self.pick_id(set(self.outstanding.values())) if self.mode == "id" else 0
                    frame = make_req(self.cid, seq, rid, self.size(self.rng), self.rng)
                    self.ledger.sent[seq] = rid
                    self.ledger.sent_at[seq] = time.monotonic()
                    self.outstanding[seq] = rid
                    got = self.client.send(frame)
                    assert got == seq, f"client {self.cid}: send returned seq {got}, expected {seq}"
                    if self.pace:
                        time.sleep(self.pace)
                    continue
                if not self.outstanding or time.monotonic() > end:
                    break
                self.receive_one(0.1)
        except BaseException as exc:
            self.error = exc

    def receive_one(self, timeout: float) -> bool:
        try:
            msg = self.client.recv(timeout=timeout)
        except TimeoutError:
            return False
        except KmuxError as exc:
            self._notice(exc)
            return True
        self._response(msg)
        return True

    def _notice(self, exc: KmuxError) -> None:
        led, seq = self.ledger, exc.seq
        if seq is None:
            led.anomalies.append(f"notice without seq: {exc}")
            return
        if exc.code in ("id_in_use", "ids_exhausted", "bad_frame", "message_too_big"):
            led.refused[seq] = exc.code
            self.outstanding.pop(seq, None)
            return
        if seq not in self.outstanding:
            what = "a second outcome" if led.outcomes(seq) else "an unknown request"
            led.anomalies.append(f"client {self.cid}: notice {exc.code} for seq {seq}, {what}")
        elif self.mode == "id" and exc.details.get("id") != self.outstanding[seq]:
            led.anomalies.append(
                f"client {self.cid}: notice {exc.code} seq {seq} names id {exc.details.get('id')!r}, "
                f"the request's id is {self.outstanding[seq]}"
            )
        self.outstanding.pop(seq, None)
        led.notices[seq].append((exc.code, dict(exc.details)))
        led.outcome_at.setdefault(seq, time.monotonic())

    def _response(self, msg: bytes) -> None:
        led = self.ledger
        try:
            rid, client, seq = parse_resp(msg)
        except BadTestFrame as exc:
            led.anomalies.append(f"client {self.cid}: torn or foreign response: {exc}")
            return
        if client != self.cid:
            led.anomalies.append(f"client {self.cid}: got the response to client {client} seq {seq}")
            return
        if seq not in self.outstanding:
            what = "a second outcome" if led.outcomes(seq) else "a request never sent"
            led.anomalies.append(f"client {self.cid}: response to seq {seq} is {what}")
            return
        if self.mode == "id" and rid != self.outstanding[seq]:
            led.anomalies.append(f"client {self.cid}: seq {seq} came back with id {rid}, sent with {self.outstanding[seq]}")
        del self.outstanding[seq]
        led.responses.append(seq)
        led.outcome_at[seq] = time.monotonic()

    def join(self, timeout: float = 30.0) -> Ledger:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"client {self.cid} is stuck"
        if self.error is not None:
            raise AssertionError(f"client {self.cid} failed: {self.error!r}") from self.error
        return self.ledger

    def close(self) -> None:
        self.thread.join(5)
        self.client.close()


def run_clients(daemon, n: int, count: int, *, first: int = 1, **kw: Any) -> list[Ledger]:
    start = threading.Event()
    clients = [RequestClient(daemon, first + i, count, start=start, **kw) for i in range(n)]
    try:
        start.set()
        return [c.join() for c in clients]
    finally:
        for c in clients:
            c.close()


def assert_exactly_one_outcome(ledgers: list[Ledger], allowed: set[str] = frozenset()) -> Counter:
    """Every request: exactly one outcome, no anomaly; notice codes within ``allowed``."""
    anomalies = [a for led in ledgers for a in led.anomalies]
    assert not anomalies, f"{len(anomalies)} misdeliveries/duplicates, first: {anomalies[:5]}"
    for led in ledgers:
        missing = led.missing()
        assert not missing, f"client {led.cid}: no outcome for seqs {missing[:10]} ({len(missing)} in all)"
        for seq in led.sent:
            if seq in led.refused:
                continue
            out = led.outcomes(seq)
            assert len(out) == 1, f"client {led.cid} seq {seq}: outcomes {out}"
    codes = sum((led.codes() for led in ledgers), Counter())
    assert set(codes) <= set(allowed), f"unexpected notice codes {dict(codes)}"
    return codes


# -- a misbehaving echo server -----------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """What a connection does after answering ``after`` frames normally.

    ``fin``/``rst``: close (FIN / reset) on reading the next frame, unanswered;
    ``fin_mid``/``rst_mid``: the same after writing half of its echo;
    ``stall``: read on, answer nothing for ``hold`` s, then FIN;
    ``late``: hold every answer for ``hold`` s, then send them all and echo normally.
    """

    action: str
    after: int
    hold: float = 1.0

    def plan(self) -> Plan:
        return Plan(self.action, self.after, self.hold)


class _FaultEcho(FaultyEcho):
    """One connection of a :class:`FaultServer`: its one fault, then a plain echo."""

    def __init__(self, server: "FaultServer", conn: Conn, fault: Fault | None) -> None:
        self.server = server
        #: (stream offset where its echo ends, its record) of each answer queued
        self.answers: list[tuple[int, tuple[int, int, int]]] = []
        super().__init__(conn, iter([fault.plan()] if fault else []), random.Random(conn.index))

    def record(self, frame: bytes) -> bool:
        if self.conn.closing:
            return False  # read and dropped while it closes
        return self.server._record(self.server.received, self.conn.index, frame) is not None

    def fault(self, plan: Plan) -> None:
        with self.server._lock:
            self.server.faults[plan.action] += 1

    def replied(self, frame: bytes, end: int) -> None:
        # Recorded before it is written: the daemon may hand it to its client before this
        # thread runs again; forgotten at the end if the connection died before it was written.
        rec = self.server._record(self.server.answered, self.conn.index, frame)
        if rec is not None:
            self.answers.append((end, rec))

    def closed(self, reason: str) -> None:
        unsent = [rec for end, rec in self.answers if end > self.conn.sent_total]
        with self.server._lock:
            for rec in unsent:
                self.server.answered.remove(rec)


class FaultServer:
    """A loopback u32be echo server (kmuxd.tools.backend's loop); ``plan(n)`` scripts the n-th connection."""

    def __init__(self, plan: Callable[[int], Fault | None] = lambda n: None) -> None:
        self.plan = plan
        self._lock = threading.Lock()
        #: (conn, client, seq) of every whole frame read / whose whole echo was written
        self.received: list[tuple[int, int, int]] = []
        self.answered: list[tuple[int, int, int]] = []
        self.faults: Counter = Counter()
        self.errors: list[str] = []
        self._loop = Loop()
        self._listener = self._loop.listen(lambda conn: _FaultEcho(self, conn, self.plan(conn.index)),
                                           max_message=1 << 24)
        self.port = self._listener.port
        self._loop.start(name=f"fault:{self.port}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def accepted(self) -> int:
        return self._listener.accepted

    def snapshot(self) -> tuple[list, list, Counter]:
        self._loop.check()
        with self._lock:
            return list(self.received), list(self.answered), Counter(self.faults)

    def _record(self, where: list, n: int, frame: bytes) -> tuple[int, int, int] | None:
        try:
            _, client, seq = parse_resp(frame)
        except BadTestFrame as exc:
            with self._lock:
                self.errors.append(f"conn {n}: {exc}")
            return None
        rec = (n, client, seq)
        with self._lock:
            where.append(rec)
        return rec

    def close(self) -> None:
        self._loop.close()


def first_n(n: int, fault: Callable[[int], Fault]) -> Callable[[int], Fault | None]:
    """The first ``n`` connections misbehave (``fault(k)``), later ones are healthy."""
    return lambda k: fault(k) if k < n else None

