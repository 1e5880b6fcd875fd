"""Request/response steering (``steering = "id"`` and ``"fifo"``), end to end.

A real kmuxd subprocess, real SEQPACKET clients, real loopback TCP servers.
Every request is a u32be frame laid out as::

    u32be length | id (ID_SIZE bytes) | u16 client | u32 seq | u32 crc | body

``crc`` covers (client, seq, body), not the id: with ``rewrite = true`` the
server sees the daemon's id, and the client must get its own id back. The
servers echo frames unchanged, so a response carries the (rewritten) id at
the request's offset (``request_offset = response_offset = 4``) and names the
request it answers: a response a client did not ask for cannot go unnoticed.

The contract under test (docs/config.md, docs/protocol.md):

* every request a client hands over ends in exactly one outcome: its
  response, or one error notice naming its ``seq`` (``connection_lost``,
  ``request_timeout``; in id mode with the client's ``id``);
* a response goes only to the client whose request it answers (id: by id,
  restored if rewritten; fifo: the oldest outstanding request on the
  connection it came from);
* responses that match nothing are counted and dropped (or balanced);
  late responses (after ``request_timeout``) and responses for clients that
  left are discarded;
* a dead endpoint costs dials on an exponential back-off, nothing else.

The fault servers here (:class:`FaultServer`) are thread-per-connection
echo servers whose connections drop (FIN), reset (RST), stall or answer
late on cue; the property test (:func:`test_random_faults_exactly_one_outcome`)
drives them randomly and writes its totals to ``kmux-fault-counts.json`` in the
test's own temporary directory (pytest ``tmp_path``; the path is printed).
"""

from __future__ import annotations

import json
import math
import random
import select
import socket
import struct
import threading
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

import kmux
from kmux.errors import KmuxError
from kmux.control import ControlClient

from .helpers import BadTestFrame, check_order_per_connection, wait_flat, wait_until

MAX = 65536
ID_OFFSET = 4
COUNTS_FILE = "kmux-fault-counts.json"
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


class FaultServer:
    """A loopback u32be echo server, one thread per connection; ``plan(n)`` scripts the n-th connection."""

    def __init__(self, plan: Callable[[int], Fault | None] = lambda n: None) -> None:
        self.plan = plan
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.accepted = 0
        #: (conn, client, seq) of every whole frame read / whose whole echo was written
        self.received: list[tuple[int, int, int]] = []
        self.answered: list[tuple[int, int, int]] = []
        self.faults: Counter = Counter()
        self.errors: list[str] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept, name=f"fault:{self.port}", daemon=True)
        self._accept_thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def snapshot(self) -> tuple[list, list, Counter]:
        with self._lock:
            return list(self.received), list(self.answered), Counter(self.faults)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._lock:
                n = self.accepted
                self.accepted += 1
            t = threading.Thread(target=self._serve, args=(sock, n), name=f"fault:{self.port}#{n}", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, n: int) -> None:
        try:
            self._serve_inner(sock, n, self.plan(n))
        except Exception as exc:  # the daemon may reset us at any time
            if not isinstance(exc, OSError):
                with self._lock:
                    self.errors.append(f"conn {n}: {exc!r}")
        finally:
            sock.close()

    def _send(self, sock: socket.socket, data: bytes) -> bool:
        try:
            sock.sendall(data)
            return True
        except OSError:
            return False

    def _fin(self, sock: socket.socket) -> None:
        """A graceful close: FIN, then read (and drop) until the daemon closes too, at most 2 s."""
        try:
            sock.shutdown(socket.SHUT_WR)
            end = time.monotonic() + 2.0
            while not self._stop.is_set() and time.monotonic() < end:
                r, _, _ = select.select([sock], [], [], 0.05)
                if r and not sock.recv(1 << 16):
                    return
        except OSError:
            pass

    def _serve_inner(self, sock: socket.socket, n: int, fault: Fault | None) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(5.0)
        buf = bytearray()
        answered = 0
        triggered_at: float | None = None
        held: list[bytes] = []
        while not self._stop.is_set():
            if triggered_at is not None and time.monotonic() - triggered_at >= fault.hold:
                if fault.action == "stall":
                    self._fin(sock)
                    return
                if fault.action == "late" and held is not None:
                    for f in held:
                        if not self._answer(sock, n, f):
                            return
                    held = None  # from now on: a normal echo server
            r, _, _ = select.select([sock], [], [], 0.02)
            if not r:
                continue
            data = sock.recv(1 << 16)
            if not data:
                return
            buf += data
            while len(buf) >= 4:
                size = struct.unpack_from(">I", buf)[0] + 4
                if len(buf) < size:
                    break
                frame = bytes(buf[:size])
                del buf[:size]
                self._record(self.received, n, frame)
                if fault is not None and triggered_at is None and answered >= fault.after:
                    triggered_at = time.monotonic()
                    with self._lock:
                        self.faults[fault.action] += 1
                    act = fault.action
                    if act.endswith("_mid") and not self._send(sock, frame[: len(frame) // 2]):
                        return
                    if act.startswith("fin"):
                        self._fin(sock)
                        return
                    if act.startswith("rst"):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return  # closed by _serve: a reset
                if triggered_at is not None and fault.action == "stall":
                    continue
                if triggered_at is not None and fault.action == "late" and held is not None:
                    held.append(frame)
                    continue
                if not self._answer(sock, n, frame):
                    return
                answered += 1

    def _answer(self, sock: socket.socket, n: int, frame: bytes) -> bool:
        """Echo a frame. Recorded first: the daemon may hand it to its client before this
        thread runs again; forgotten again if the write fails."""
        rec = self._record(self.answered, n, frame)
        if self._send(sock, frame):
            return True
        if rec is not None:
            with self._lock:
                self.answered.remove(rec)
        return False

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
        self._stop.set()
        self._listener.close()
        self._accept_thread.join(5)
        for t in self._threads:
            t.join(5)


@pytest.fixture
def fault_servers():
    started: list[FaultServer] = []

    def start(plan: Callable[[int], Fault | None] = lambda n: None) -> FaultServer:
        s = FaultServer(plan)
        started.append(s)
        return s

    try:
        yield start
    finally:
        for s in started:
            s.close()


def first_n(n: int, fault: Callable[[int], Fault]) -> Callable[[int], Fault | None]:
    """The first ``n`` connections misbehave (``fault(k)``), later ones are healthy."""
    return lambda k: fault(k) if k < n else None


# -- 1. id with rewrite: colliding ids, each answer to its sender with its own id --------------------


def test_id_rewrite_colliding_ids_each_response_to_its_sender(backend_factory, daemon_factory):
    """16 clients all use ids 1..8 at once, through 4 connections to an echo server:
    each response comes back to its sender, with its own id and its own payload."""
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], "id", rewrite=True)})
    backend.wait_open(4)

    ledgers = run_clients(daemon, 16, 48, window=8, mode="id", seed=1)

    assert_exactly_one_outcome(ledgers)
    assert sum(len(led.responses) for led in ledgers) == 16 * 48
    for led in ledgers:
        assert set(led.sent.values()) == set(range(1, 9)), f"client {led.cid} used ids {sorted(set(led.sent.values()))}"
    recs = backend.records()
    assert not [r for _, r in recs if r[0] == "bad"]
    assert len(recs) == 16 * 48, "every request written exactly once"
    assert len({r[:2] for _, r in recs}) == 16 * 48
    # 128 requests in flight with 8 client ids: the wire ids must have been rewritten.
    wire_ids = {r[2] for _, r in recs}
    assert len(wire_ids) > 8, f"ids on the wire: {sorted(wire_ids)[:20]}"
    g = group_stats(daemon)
    assert g.get("unmatched_responses", 0) == 0
    assert g.get("requests_in_flight", 0) == 0


@pytest.mark.parametrize("mode", ["id", "fifo"])
def test_receive_off_keeps_own_responses_and_requeue_is_refused(backend_factory, daemon_factory, mode):
    """In id/fifo modes every response belongs to its requester: switching receiving
    off hands nothing back (no cross-delivery), and a raw REQUEUE is refused."""
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], mode, connections=2)})
    backend.wait_open(2)
    rng = random.Random(11)
    with daemon.connect(name="a") as a, daemon.connect(name="b") as b:
        backend.pause()
        for seq in range(1, 11):
            a.send(make_req(1, seq, seq, 64, rng))
        wait_until(lambda: group_stats(daemon).get("requests_in_flight", 0) == 10, 5, "10 requests in flight")
        backend.resume()
        a.set_receive(False)  # responses arriving now are still a's own
        got = [parse_resp(a.recv(timeout=5)) for _ in range(10)]
        assert sorted(seq for _, _, seq in got) == list(range(1, 11))
        assert all(client == 1 for _, client, _ in got)
        with pytest.raises(TimeoutError):
            b.recv(timeout=0.3)  # nothing of a's reached b
        # A REQUEUE from a program that ignores the mode is refused, not steered.
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        raw.connect(daemon.socket_path)
        import msgpack

        raw.send(msgpack.packb({"kmux": 1, "group": "g"}))
        raw.recv(65536)
        raw.send(b"\x01" + msgpack.packb({"op": "receive", "on": False}))
        raw.send(b"\x02" + make_req(3, 1, 1, 64, rng))
        notices = [msgpack.unpackb(raw.recv(65536)[1:]) for _ in range(2)]
        raw.close()
        assert {"event": "receive_off"} in notices
        assert any(n.get("code") == "bad_packet" and "REQUEUE" in n.get("error", "") for n in notices), notices
        with pytest.raises(TimeoutError):
            b.recv(timeout=0.3)
    assert group_stats(daemon).get("unmatched_responses", 0) == 0


# -- 2. id without rewrite: id_in_use, then free again -----------------------------------------------


def test_id_no_rewrite_second_user_refused_until_first_answered(backend_factory, daemon_factory):
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], "id", rewrite=False, connections=2)})
    backend.wait_open(2)
    a, b = daemon.connect(name="a"), daemon.connect(name="b")
    try:
        rng = random.Random(2)
        backend.pause()  # keeps A's request in flight
        assert a.send(make_req(1, 1, 7, 100, rng)) == 1
        wait_until(lambda: group_stats(daemon).get("requests_in_flight", 1) >= 1, 5, "A's request in flight")

        assert b.send(make_req(2, 1, 7, 100, rng)) == 1  # the same id, another client
        with pytest.raises(KmuxError) as info:
            b.recv(timeout=3)
        assert info.value.code == "id_in_use", info.value
        assert info.value.seq == 1
        assert a.send(make_req(1, 2, 7, 100, rng)) == 2  # the same id, the same client
        with pytest.raises(KmuxError) as info:
            a.recv(timeout=3)
        assert (info.value.code, info.value.seq) == ("id_in_use", 2)
        assert b.send(make_req(2, 2, 8, 100, rng)) == 2  # another id is fine meanwhile

        backend.resume()
        assert parse_resp(a.recv(timeout=5)) == (7, 1, 1)
        assert parse_resp(b.recv(timeout=5)) == (8, 2, 2)
        # Answered: id 7 is free again, for anyone.
        assert b.send(make_req(2, 3, 7, 100, rng)) == 3
        assert parse_resp(b.recv(timeout=5)) == (7, 2, 3)
        assert a.send(make_req(1, 3, 7, 100, rng)) == 3
        assert parse_resp(a.recv(timeout=5)) == (7, 1, 3)
        for c in (a, b):
            with pytest.raises(TimeoutError):
                c.recv(timeout=0.2)
        # The refused requests were never written.
        written = sorted(r[:2] for _, r in backend.records())
        assert written == [(1, 1), (1, 3), (2, 2), (2, 3)]
    finally:
        backend.resume()
        a.close()
        b.close()


def test_id_too_short_for_its_id_is_bad_frame(backend_factory, daemon_factory):
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], "id", rewrite=True, connections=1)})
    backend.wait_open(1)
    with daemon.connect(name="short") as c:
        c.send(struct.pack(">I", 2) + b"ab")  # 6 bytes: the id at 4..8 is not there
        with pytest.raises(KmuxError) as info:
            c.recv(timeout=3)
        assert (info.value.code, info.value.seq) == ("bad_frame", 1)
        c.send(make_req(1, 2, 5, 50, random.Random(0)))  # the session goes on
        assert parse_resp(c.recv(timeout=5)) == (5, 1, 2)
    assert backend.count() == 1


def test_id_rewrite_space_exhausted_is_refused_then_recovers(backend_factory, daemon_factory):
    """size = 1: 256 wire ids. With all in flight a request is refused (ids_exhausted), never written."""
    backend = backend_factory(echo=True, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], "id", rewrite=True, id_size=1, connections=2)})
    backend.wait_open(2)
    rng = random.Random(3)
    with daemon.connect(name="many") as c:
        backend.pause()
        for seq in range(1, 301):
            c.send(make_req(1, seq, 9, 40, rng, id_size=1))
        refused, answered = [], []
        try:
            end = time.monotonic() + 5
            while time.monotonic() < end and len(refused) < 300 - 256:
                try:
                    c.recv(timeout=0.2)
                except KmuxError as exc:
                    assert exc.code == "ids_exhausted", exc
                    refused.append(exc.seq)
                except TimeoutError:
                    pass
        finally:
            backend.resume()
        assert refused, "300 requests with 256 ids: some must be refused"
        assert len(refused) >= 300 - 256
        end = time.monotonic() + 10
        while len(answered) + len(refused) < 300 and time.monotonic() < end:
            try:
                rid, client, seq = parse_resp(c.recv(timeout=0.5), id_size=1)
            except TimeoutError:
                continue
            assert (rid, client) == (9, 1)
            answered.append(seq)
        assert sorted(answered + refused) == list(range(1, 301))
        assert backend.count() == len(answered)


# -- 3. fifo: responses in request order per connection --------------------------------------------


def test_fifo_echo_responses_match_and_keep_order(backend_factory, daemon_factory):
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], "fifo")})
    backend.wait_open(4)

    ledgers = run_clients(daemon, 8, 120, window=8, mode="fifo", seed=3)

    assert_exactly_one_outcome(ledgers)
    assert sum(len(led.responses) for led in ledgers) == 8 * 120
    recs = backend.records()
    check_order_per_connection(recs)
    conn_of = {r[:2]: conn for conn, r in recs}
    assert len(conn_of) == len(recs) == 8 * 120
    used = set(conn_of.values())
    for led in ledgers:
        last: dict[int, int] = {}
        for seq in led.responses:
            conn = conn_of[(led.cid, seq)]
            assert seq > last.get(conn, 0), f"client {led.cid}: seq {seq} answered after {last[conn]} on conn {conn}"
            last[conn] = seq
    assert len(used) > 1, "the requests should have used several connections"
    assert group_stats(daemon).get("unmatched_responses", 0) == 0


# -- 4. fault injection ---------------------------------------------------------------------------

MODES = ["id", "fifo"]


def _check_against_server(ledgers: list[Ledger], server: FaultServer, *, strict: bool) -> None:
    """A request is answered iff the server wrote its whole echo (strict), or at least only then."""
    received, answered, _ = server.snapshot()
    assert not server.errors, server.errors
    dup = [k for k, v in Counter((c, s) for _, c, s in received).items() if v > 1]
    assert not dup, f"requests read whole by the server twice (retried after being written): {dup[:5]}"
    echoed = {(c, s) for _, c, s in answered}
    for led in ledgers:
        for seq in led.sent:
            got = led.outcomes(seq)
            if got == ["response"]:
                assert (led.cid, seq) in echoed, f"client {led.cid} seq {seq}: a response the server never sent"
            elif strict:
                assert (led.cid, seq) not in echoed, f"client {led.cid} seq {seq}: echoed whole before a FIN, yet {got}"


@pytest.mark.parametrize("mode", MODES)
def test_fin_part_way_written_requests_get_connection_lost(fault_servers, daemon_factory, mode):
    """(a) The first connections answer a few frames, then FIN (half of them after half an echo)."""
    server = fault_servers(first_n(4, lambda k: Fault("fin_mid" if k % 2 else "fin", after=3 + k)))
    daemon = daemon_factory({"g": rr_group([server.address], mode)})

    ledgers = run_clients(daemon, 3, 60, window=6, mode=mode, seed=4, pick_id=lambda used: min(set(range(100, 110)) - used))

    codes = assert_exactly_one_outcome(ledgers, {"connection_lost"})
    _check_against_server(ledgers, server, strict=True)
    _, _, faults = server.snapshot()
    assert faults["fin"] + faults["fin_mid"] >= 2, faults
    # Each fault closed a connection after reading a request whole and not answering it.
    assert codes["connection_lost"] >= faults["fin"] + faults["fin_mid"], (codes, faults)
    for led in ledgers:
        for seq, lst in led.notices.items():
            for code, details in lst:
                assert details.get("seq") == seq
                if mode == "id":
                    assert details.get("id") == led.sent[seq]
    g = group_stats(daemon)
    if "requests_failed" in g:
        assert g["requests_failed"] == codes["connection_lost"]


@pytest.mark.parametrize("mode", MODES)
def test_rst_written_requests_get_connection_lost(fault_servers, daemon_factory, mode):
    """(b) The first connections reset (RST) part-way, some after half an echo."""
    server = fault_servers(first_n(4, lambda k: Fault("rst_mid" if k % 2 else "rst", after=2 + 2 * k)))
    daemon = daemon_factory({"g": rr_group([server.address], mode)})

    ledgers = run_clients(daemon, 3, 60, window=6, mode=mode, seed=5)

    codes = assert_exactly_one_outcome(ledgers, {"connection_lost"})
    _check_against_server(ledgers, server, strict=False)
    _, _, faults = server.snapshot()
    assert faults["rst"] + faults["rst_mid"] >= 2, faults
    assert codes["connection_lost"] >= 1
    assert sum(len(led.responses) for led in ledgers) > 0


@pytest.mark.parametrize("mode", MODES)
def test_stalled_server_request_timeout(fault_servers, daemon_factory, mode):
    """(c) Every connection answers two frames, then reads on and answers nothing: request_timeout."""
    timeout = 0.3
    server = fault_servers(lambda k: Fault("stall", after=2, hold=30.0))
    daemon = daemon_factory({"g": rr_group([server.address], mode, request_timeout=timeout)})

    ledgers = run_clients(daemon, 2, 24, window=6, mode=mode, seed=6, deadline=10)

    codes = assert_exactly_one_outcome(ledgers, {"request_timeout"})
    assert codes["request_timeout"] >= 24 * 2 - 4 * 2, codes  # at most 2 answers per connection
    _check_against_server(ledgers, server, strict=True)
    for led in ledgers:
        for seq, lst in led.notices.items():
            waited = led.outcome_at[seq] - led.sent_at[seq]
            assert timeout * 0.9 <= waited <= timeout + 1.5, f"request_timeout after {waited:.3f}s (timeout {timeout})"
            if mode == "id":
                assert lst[0][1].get("id") == led.sent[seq]
    g = group_stats(daemon)
    if "requests_timed_out" in g:
        assert g["requests_timed_out"] == codes["request_timeout"]


@pytest.mark.parametrize("mode", MODES)
def test_late_responses_discarded_and_stream_stays_matched(fault_servers, daemon_factory, mode):
    """(c) One connection: 2 answers, then answers held 0.8 s (request_timeout 0.3 s): the late
    answers are discarded and counted, and later requests on the same stream still match."""
    server = fault_servers(lambda k: Fault("late", after=2, hold=0.8) if k == 0 else None)
    daemon = daemon_factory({"g": rr_group([server.address], mode, connections=1, request_timeout=0.3)})
    wait_until(lambda: server.accepted == 1, 5, "the connection")
    c = RequestClient(daemon, 1, 10, window=10, mode=mode, seed=7, deadline=5)
    try:
        led = c.join()
        assert_exactly_one_outcome([led], {"request_timeout"})
        assert sorted(led.responses) == [1, 2], led.responses
        assert sorted(led.notices) == list(range(3, 11))
        wait_until(lambda: len(server.snapshot()[1]) == 10, 5, "the held answers sent")
        # The same stream, after the late answers: still in step.
        c.count, c.window = 20, 4
        c.thread = threading.Thread(target=c._run, daemon=True)
        c.thread.start()
        led = c.join()
        assert_exactly_one_outcome([led], {"request_timeout"})
        assert sorted(led.responses) == [1, 2, *range(11, 21)], led.responses
        with pytest.raises(TimeoutError):
            c.client.recv(timeout=0.3)
    finally:
        c.close()
    g = group_stats(daemon)
    assert g.get("unmatched_responses", 0) == 0, g
    if "late_responses" in g:
        assert g["late_responses"] == 8, g
    else:  # pragma: no cover - the statistic is optional in the contract
        pytest.fail("no late_responses statistic")


@pytest.fixture
def dead_port():
    """A port bound but not listening: every dial to it is refused (ECONNREFUSED)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def _max_dials(uptime: float, initial: float, maximum: float) -> int:
    """Most dials one back-off schedule allows in ``uptime`` s: the first at once, then after
    delays initial*2^k (capped at ``maximum``), each jittered into [d/2, d]."""
    dials, t, k = 1, 0.0, 0
    while True:
        t += min(maximum, initial * 2**k) / 2
        if t > uptime:
            return dials
        dials, k = dials + 1, k + 1


@pytest.mark.parametrize("mode", MODES)
def test_endpoint_down_at_start_costs_bounded_dials(backend_factory, daemon_factory, dead_port, mode):
    """(d) endpoints = [dead, live]: traffic flows through the live one; the dead endpoint's
    dial failures grow on the exponential back-off (at most ~log2(T/initial)+1 per slot)."""
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    initial, maximum, conns = 0.05, 30.0, 4
    daemon = daemon_factory({"g": rr_group([f"127.0.0.1:{dead_port}", backend.address], mode, connections=conns,
                                           reconnect_initial=initial, reconnect_max=maximum)})
    wait_until(lambda: len(backend.open_ids()) >= conns // 2, 5, "the live endpoint's connections")
    ledgers = run_clients(daemon, 3, 40, window=4, mode=mode, seed=8, deadline=10)
    assert_exactly_one_outcome(ledgers)
    assert sum(len(led.responses) for led in ledgers) == 120
    # The bound is on failures over the daemon's uptime: let the dead endpoint fail for 2 s at least.
    time.sleep(max(0.0, 2.0 - group_stats(daemon)["uptime"]))
    g = group_stats(daemon)
    per_slot = _max_dials(g["uptime"], initial, maximum)
    failures = sum(c["dial_failures"] for c in g["connections"])
    # Slots start on endpoints round robin: conns/2 of them on the dead one (a daemon that
    # moves slots to healthy endpoints only dials less).
    bound = per_slot * (conns // 2)
    assert 1 <= failures <= bound, (
        f"{failures} dial failures in {g['uptime']:.2f}s; at most {per_slot} per slot ({bound} in all) expected: "
        + str([(c["index"], c["endpoint"], c["dial_failures"]) for c in g["connections"]])
    )
    assert g["connections_up"] >= conns // 2
    print(f"dead endpoint: {failures} dial failures in {g['uptime']:.2f}s (bound {bound})")


# -- unmatched responses --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_unmatched_response_counted_logged_dropped(backend_factory, daemon_factory, mode):
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], mode, connections=1)})
    (conn,) = backend.wait_open(1)
    rng = random.Random(9)
    a, b = daemon.connect(name="a"), daemon.connect(name="b")
    try:
        a.send(make_req(1, 1, 5, 64, rng))
        assert parse_resp(a.recv(timeout=5))[1:] == (1, 1)
        # Nothing in flight now: a response from nowhere (fifo: empty queue; id: unknown id).
        backend.send(conn, make_req(77, 1, 0xDEAD, 80, rng))
        wait_until(lambda: group_stats(daemon).get("unmatched_responses") == 1, 5, "unmatched_responses == 1")
        for c in (a, b):
            with pytest.raises(TimeoutError):
                c.recv(timeout=0.3)
        daemon.wait_log("unmatched_response", timeout=5)
        # The stream is still in step.
        b.send(make_req(2, 1, 5, 64, rng))
        assert parse_resp(b.recv(timeout=5))[1:] == (2, 1)
    finally:
        a.close()
        b.close()


def test_unmatched_balance_goes_to_a_receiver(backend_factory, daemon_factory):
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], "fifo", connections=1, unmatched="balance")})
    (conn,) = backend.wait_open(1)
    rng = random.Random(10)
    with daemon.connect(name="rx") as c:
        stray = make_req(77, 1, 0, 80, rng)
        backend.send(conn, stray)
        assert c.recv(timeout=5) == stray
        assert group_stats(daemon).get("unmatched_responses") == 1
        c.send(make_req(1, 1, 0, 64, rng))
        assert parse_resp(c.recv(timeout=5))[1:] == (1, 1)


# -- client death ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_dead_client_responses_discarded_others_untouched(backend_factory, daemon_factory, mode):
    """A client that stops reading holds back nobody (its responses wait in its own queue);
    once it dies, its responses are discarded and the others get exactly theirs, in order."""
    backend = backend_factory(echo=True, summarize=summarize_req, max_frame=MAX)
    daemon = daemon_factory({"g": rr_group([backend.address], mode, connections=1)})
    backend.wait_open(1)
    rng = random.Random(11)
    hog, other = daemon.connect(name="hog"), daemon.connect(name="other")
    try:
        for seq in range(1, 41):  # ~2.4 MB of responses: more than hog's socket holds
            hog.send(make_req(1, seq, seq, 60000, rng))
        for seq in range(1, 21):
            other.send(make_req(2, seq, 1000 + seq, 200, rng))
        backend.wait_count(60, timeout=10)
        hog.close()
        got = []
        end = time.monotonic() + 10
        while len(got) < 20 and time.monotonic() < end:
            try:
                got.append(parse_resp(other.recv(timeout=0.5)))
            except TimeoutError:
                pass
        assert got == [(1000 + s, 2, s) for s in range(1, 21)], got[:5]
        with pytest.raises(TimeoutError):
            other.recv(timeout=0.3)
        g = wait_flat(lambda: group_stats(daemon).get("requests_in_flight", 0), 0.2, 5)
        assert g == 0
        # A newcomer is served normally.
        with daemon.connect(name="new") as c:
            c.send(make_req(3, 1, 4, 64, rng))
            assert parse_resp(c.recv(timeout=5))[1:] == (3, 1)
        gs = group_stats(daemon)
        assert gs.get("unmatched_responses", 0) == 0
        if "dropped_responses" in gs:
            assert gs["dropped_responses"] >= 1
    finally:
        hog.close()
        other.close()


# -- responses read after their connection was failed ---------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_responses_after_write_side_reset_never_reach_anyone(fault_servers, daemon_factory, mode):
    """Connections reset (RST) right after answering a few frames, while clients keep writing:
    the server never sends a frame nobody asked for, so nothing may be unmatched, and with
    unmatched = "balance" nobody may get a response it did not ask for.

    Regression: when the write side saw the reset first (ConnSlot.flush_nowait -> fail ->
    Group.fail_requests: connection_lost for every written request), the reader task, already
    scheduled, went on parsing the answers still in the socket's receive queue; they matched
    nothing, were counted unmatched and balanced to other clients (a second outcome, or another
    client's response). Fixed by ConnSlot._take_arrived_responses (answers that arrived are
    steered before the rest is failed)."""
    server = fault_servers(lambda k: Fault("rst", after=random.Random(k).randint(2, 12)) if k < 400 else None)
    daemon = daemon_factory({"g": rr_group([server.address], mode, unmatched="balance",
                                           reconnect_initial=0.005, reconnect_max=0.01)})

    ledgers = run_clients(daemon, 6, 400, window=8, mode=mode, seed=12, deadline=8,
                          size=lambda r: r.randint(header_size(), 300))

    g = group_stats(daemon)
    anomalies = [a for led in ledgers for a in led.anomalies]
    assert (g["unmatched_responses"], len(anomalies)) == (0, 0), (
        f"{g['unmatched_responses']} unmatched responses; {len(anomalies)} misdelivered, first {anomalies[:3]}"
    )
    assert_exactly_one_outcome(ledgers, {"connection_lost"})


# -- 5. property: random faults, exactly one outcome each ------------------------------------------

RUNS = 20
RUN_MODES = ["id", "fifo", "id-norewrite"]
FAULTS = ["fin", "fin_mid", "rst", "rst_mid", "stall", "late"]


def _random_plan(rng: random.Random) -> Callable[[int], Fault | None]:
    """The first 6 connections: each faulty with probability 0.7; later ones healthy."""
    plans: dict[int, Fault | None] = {}
    for k in range(6):
        plans[k] = Fault(rng.choice(FAULTS), after=rng.randint(0, 30), hold=rng.uniform(0.3, 0.8)) if rng.random() < 0.7 else None
    return lambda k: plans.get(k)


def _rotating_ids(base: int, span: int) -> Callable[[set[int]], int]:
    n = 0

    def pick(used: set[int]) -> int:
        nonlocal n
        while True:
            rid, n = base + n % span, n + 1
            if rid not in used:
                return rid

    return pick


def _one_run(run: int, daemon_factory, fault_servers, detail: dict | None = None) -> dict[str, Any]:
    rng = random.Random(1000 + run)
    mode = RUN_MODES[run % len(RUN_MODES)]
    server = fault_servers(_random_plan(rng))
    kind = "fifo" if mode == "fifo" else "id"
    group = rr_group([server.address], kind, rewrite=(mode != "id-norewrite"), request_timeout=0.25,
                     connections=rng.choice([2, 3, 4]))
    daemon = daemon_factory({"g": group}, name=f"run{run}")
    n_clients = rng.randint(3, 5)
    count = rng.randint(50, 90)
    window = rng.randint(2, 8)
    if mode == "id-norewrite":
        # Ids unique across clients, rotating over 500 per client: a timed-out request keeps
        # its id until its late answer (docs), so reusing it at once would only be refused.
        pick = lambda cid: _rotating_ids(cid * 1000, 500)  # noqa: E731
    else:  # colliding ids across clients
        pick = lambda cid: (lambda used: min(set(range(1, window + 1)) - used))  # noqa: E731
    start = threading.Event()
    clients = [
        RequestClient(daemon, cid, count, window=window, mode=kind, seed=run, start=start, deadline=15,
                      pick_id=pick(cid), size=req_size)
        for cid in range(1, n_clients + 1)
    ]
    try:
        start.set()
        ledgers = [c.join() for c in clients]
    finally:
        for c in clients:
            c.close()
    received, answered, faults = server.snapshot()
    g = group_stats(daemon)
    daemon.stop()
    if detail is not None:  # for debugging a failed run
        detail.update(ledgers=ledgers, server=server, daemon=daemon, group=g)

    # Tally before asserting, so the file shows what happened even on failure.
    echoed = {(c, s) for _, c, s in answered}
    tally = {
        "run": run, "mode": mode, "clients": n_clients, "requests": 0, "responses": 0,
        "notices": Counter(), "refused": Counter(), "mismatches": 0, "missing": 0, "double_outcomes": 0,
        "order_violations": 0, "faults": dict(faults), "server_accepted": server.accepted,
        "unmatched_responses": g.get("unmatched_responses"), "late_responses": g.get("late_responses"),
        "tx_retries": g.get("tx_retries"), "problems": [],
    }
    conn_of = {(c, s): conn for conn, c, s in answered}
    for led in ledgers:
        tally["requests"] += len(led.sent)
        tally["responses"] += len(led.responses)
        tally["notices"].update(led.codes())
        tally["refused"].update(led.refused.values())
        tally["mismatches"] += len(led.anomalies)
        tally["problems"] += led.anomalies[:3]
        missing = led.missing()
        tally["missing"] += len(missing)
        if missing:
            tally["problems"].append(f"client {led.cid}: no outcome for {missing[:5]}")
        for seq in led.sent:
            if len(led.outcomes(seq)) > 1:
                tally["double_outcomes"] += 1
                tally["problems"].append(f"client {led.cid} seq {seq}: {led.outcomes(seq)}")
        for seq in led.responses:
            if (led.cid, seq) not in echoed:
                tally["mismatches"] += 1
                tally["problems"].append(f"client {led.cid} seq {seq}: a response the server never sent")
        if kind == "fifo":  # in request order per connection
            last: dict[int, int] = {}
            for seq in led.responses:
                conn = conn_of.get((led.cid, seq))
                if conn is not None:
                    if seq <= last.get(conn, 0):
                        tally["order_violations"] += 1
                        tally["problems"].append(f"client {led.cid}: seq {seq} after {last[conn]} on conn {conn}")
                    last[conn] = seq
    if server.errors:
        tally["problems"] += server.errors[:3]
    dup = [k for k, v in Counter((c, s) for _, c, s in received).items() if v > 1]
    if dup:
        tally["problems"].append(f"read whole twice by the server: {dup[:5]}")
    bad_codes = set(tally["notices"]) - {"connection_lost", "request_timeout"}
    if bad_codes:
        tally["problems"].append(f"unexpected notice codes {sorted(bad_codes)}")
    bad_refusals = set(tally["refused"]) - ({"id_in_use"} if mode == "id-norewrite" else set())
    if bad_refusals:
        tally["problems"].append(f"unexpected refusals {dict(tally['refused'])}")
    tally["notices"] = dict(tally["notices"])
    tally["refused"] = dict(tally["refused"])
    return tally


def test_random_faults_exactly_one_outcome(daemon_factory, fault_servers, capsys, tmp_path):
    """20 seeded runs (id with rewrite, fifo, id without rewrite), random sizes and windows, the
    server's connections dropping, resetting, stalling or answering late at random points."""
    t0 = time.monotonic()
    runs = [_one_run(run, daemon_factory, fault_servers) for run in range(RUNS)]
    totals = {
        "runs": len(runs),
        "requests": sum(r["requests"] for r in runs),
        "responses": sum(r["responses"] for r in runs),
        "error_notices": sum(sum(r["notices"].values()) for r in runs),
        "refused_id_in_use": sum(sum(r["refused"].values()) for r in runs),
        "by_code": dict(sum((Counter(r["notices"]) for r in runs), Counter())),
        "mismatches": sum(r["mismatches"] for r in runs),
        "missing": sum(r["missing"] for r in runs),
        "double_outcomes": sum(r["double_outcomes"] for r in runs),
        "order_violations": sum(r["order_violations"] for r in runs),
        "faults_injected": dict(sum((Counter(r["faults"]) for r in runs), Counter())),
        "unmatched_responses": sum(r["unmatched_responses"] or 0 for r in runs),
        "late_responses": sum(r["late_responses"] or 0 for r in runs),
        "seconds": round(time.monotonic() - t0, 2),
    }
    counts_file = tmp_path / COUNTS_FILE
    with open(counts_file, "w") as f:
        json.dump({"totals": totals, "runs": runs}, f, indent=1, default=str)
    with capsys.disabled():
        print(f"\nkmux fault property totals ({counts_file}): {json.dumps(totals)}")
    problems = [(r["run"], r["mode"], p) for r in runs for p in r["problems"]]
    assert not problems, f"{len(problems)} problems, first: {problems[:8]}"
    assert totals["requests"] == totals["responses"] + totals["error_notices"] + totals["refused_id_in_use"]
    assert totals["mismatches"] == totals["missing"] == totals["double_outcomes"] == totals["order_violations"] == 0
    assert totals["error_notices"] > 0 and totals["responses"] > 0
