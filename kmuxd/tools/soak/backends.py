"""The soak's chaos backends: loopback TCP servers that misbehave on a seeded plan.

    python -m kmuxd.tools.soak.backends SPEC_JSON

One process serves every endpoint of every soak group, each on its own
127.0.0.1 port: *echo* servers for request/response groups (each whole frame
is answered on the connection it came from, with the number of that
connection stamped into it, see :mod:`.frames`) and *sink* servers for
one-way ``balance`` groups (frames are only counted).

Theory of operation
-------------------
Each accepted connection lives through a sequence of :class:`Plan` s, drawn
from an RNG seeded with ``(seed, group, endpoint, connection number)``: each
handles ``after`` frames normally, then strikes with its fault; a connection
that survives its fault (``none``, ``late``, ``trickle``, ``unmatched``) goes
on with its next plan, so faults keep coming on long-lived connections:

==============  =====================================================================
``fin``         close gracefully (FIN), leaving the frame just read unanswered; keep
                reading until the daemon closes too (a server's "N requests" limit)
``rst``         reset the connection (RST), the frame just read unanswered
``rst_mid``     write half of the answer, then reset
``stall``       read on, answer nothing for ``hold`` s, then close gracefully
``late``        hold every answer for ``hold`` s, then send them all, then echo normally
``trickle``     write the next ``count`` answers a few bytes at a time
``unmatched``   send ``count`` unasked frames, one every ``every`` answers (with ids the
                daemon never hands out); ``id`` groups only
``none``        nothing: the next plan begins
==============  =====================================================================

Sinks know ``fin``, ``stall`` (stop reading for ``hold`` s: push-back; then
the next plan) and ``trickle`` (read a few bytes at a time for ``hold`` s). A sink never resets:
the daemon promises nothing about bytes the kernel took before a reset
(README, "Failures"), so a reset would make the one-way count unprovable.

Outages come from the driver on stdin: ``down GROUP ENDPOINT fin|rst``
closes the listener (dials are refused) and closes every live connection of
that endpoint that way; ``up GROUP ENDPOINT`` listens again on the same port.
``calm`` stops new faults (for the end of a run), ``report`` prints one line
``report {json}``, ``quit`` (or EOF) stops.

Records (per group, under one lock): every whole frame read, checked (torn,
read twice by the servers = written twice by the daemon, out of order per
connection and session), counted per session; answers written, unasked
frames written, faults struck, connections and why they closed.

Bounds: a poll of :data:`POLL` s in every loop, :data:`DRAIN_TIMEOUT` s for a
graceful close, :data:`SEND_TIMEOUT` s for one answer, frames up to
``max_size``; every thread ends on ``quit``.
"""

from __future__ import annotations

import itertools
import json
import random
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .frames import STRAY_ID_BASE, STRAY_SESSION, BadSoakFrame, make_frame, parse_frame, split_frames, stamp_conn

__all__ = ["Plan", "GroupRecords", "ChaosServer", "ECHO_FAULTS", "SINK_FAULTS", "main"]

#: (fault, weight) for echo connections; ``unmatched`` only where the group has ids.
ECHO_FAULTS = (("none", 30), ("fin", 12), ("rst", 12), ("rst_mid", 8), ("stall", 10), ("late", 10),
               ("trickle", 10), ("unmatched", 8))
SINK_FAULTS = (("none", 40), ("fin", 25), ("stall", 20), ("trickle", 15))
#: Frames an echo / sink connection handles before its fault strikes: (least, most).
ECHO_AFTER = (3, 150)
SINK_AFTER = (20, 600)
#: Seconds a stall or a late hold lasts; seconds a sink trickles.
HOLD = (0.3, 2.5)
SINK_TRICKLE = (0.3, 1.5)
#: Answers an echo connection trickles; bytes per trickled write; seconds between writes.
TRICKLE_FRAMES = (2, 8)
TRICKLE_CHUNK = (1, 64)
TRICKLE_PAUSE = 0.001
#: A trickled answer is sent in at most this many writes, so one large frame
#: takes well under a second (not the daemon's assembly_timeout).
TRICKLE_MAX_WRITES = 200
#: An unmatched stretch sends one unasked frame every N answers, this many times: (least, most).
STRAY_EVERY = (3, 20)
STRAY_COUNT = (1, 10)
STRAY_SIZE = 64
#: Seconds every loop waits at most, so commands and stops are seen promptly.
POLL = 0.02
#: Seconds a graceful close waits for the daemon to close its side.
DRAIN_TIMEOUT = 5.0
#: Seconds one blocking answer may take before the connection is given up.
SEND_TIMEOUT = 10.0
#: Tries (POLL apart) to listen again on an endpoint's port after an outage.
REBIND_TRIES = 250
RECV_SIZE = 1 << 16
EXAMPLES = 5
LISTEN_BACKLOG = 128


@dataclass(frozen=True)
class Plan:
    """One stretch of a connection's life: ``after`` frames handled normally, then ``action``."""

    action: str
    after: int
    hold: float = 0.0
    count: int = 0
    every: int = 1

    @classmethod
    def draw(cls, rng: random.Random, kind: str, stray: bool) -> "Plan":
        table = ECHO_FAULTS if kind == "echo" else SINK_FAULTS
        table = tuple((a, w) for a, w in table if stray or a != "unmatched")
        action = rng.choices([a for a, _ in table], [w for _, w in table])[0]
        after = rng.randint(*(ECHO_AFTER if kind == "echo" else SINK_AFTER))
        hold = rng.uniform(*(SINK_TRICKLE if kind == "sink" and action == "trickle" else HOLD))
        count = rng.randint(*(TRICKLE_FRAMES if action == "trickle" else STRAY_COUNT))
        return cls(action, after, hold, count, rng.randint(*STRAY_EVERY))


#: A plan that never strikes (after ``calm``).
CALM = Plan("none", 1 << 62)


class GroupRecords:
    """Everything the servers of one group saw, under one lock."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.frames = self.bytes = 0
        self.answered = 0
        self.stray_sent = 0
        #: unasked frames sent on connections we then reset: the daemon may never read them
        self.stray_at_risk = 0
        self.torn = self.duplicates = self.order = 0
        self.faults: Counter = Counter()
        self.closes: Counter = Counter()
        self.conns = 0
        self.tail_bytes = 0
        self.examples: list[str] = []
        self._seen: dict[int, bytearray] = {}  # session -> bitmap of seqs read whole
        self.per_session: Counter = Counter()  # session -> distinct seqs read whole

    def _example(self, text: str) -> None:
        if len(self.examples) < EXAMPLES:
            self.examples.append(text)

    def read(self, conn: int, frame: bytes, last: dict[int, int]) -> bytes | None:
        """Record one whole frame read on ``conn`` (``last``: that connection's last seq per session).
        Returns the frame if it is intact."""
        try:
            f = parse_frame(frame)
        except BadSoakFrame as exc:
            with self.lock:
                self.torn += 1
                self._example(f"conn {conn}: torn frame: {exc}")
            return None
        with self.lock:
            self.frames += 1
            self.bytes += f.size
            bitmap = self._seen.get(f.session)
            if bitmap is None:
                bitmap = self._seen[f.session] = bytearray(64)
            byte, bit = divmod(f.seq, 8)
            if byte >= len(bitmap):
                bitmap.extend(bytes(max(byte + 1 - len(bitmap), len(bitmap))))
            if bitmap[byte] & (1 << bit):
                self.duplicates += 1
                self._example(f"conn {conn}: session {f.session} seq {f.seq} read whole a second time")
            else:
                bitmap[byte] |= 1 << bit
                self.per_session[f.session] += 1
                prev = last.get(f.session, 0)
                if f.seq < prev:
                    self.order += 1
                    self._example(f"conn {conn}: session {f.session} seq {f.seq} arrived after seq {prev}")
                else:
                    last[f.session] = f.seq
        return frame

    def count(self, field: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, field, getattr(self, field) + n)

    def report(self) -> dict[str, Any]:
        with self.lock:
            return {
                "frames": self.frames, "bytes": self.bytes, "answered": self.answered,
                "stray_sent": self.stray_sent, "stray_at_risk": self.stray_at_risk, "torn": self.torn, "duplicates": self.duplicates,
                "order": self.order, "faults": dict(self.faults), "closes": dict(self.closes),
                "conns": self.conns, "tail_bytes": self.tail_bytes, "examples": list(self.examples),
                "per_session": {str(k): v for k, v in self.per_session.items()},
            }


class _Connection:
    """One accepted connection, served by its own thread (all socket calls in that thread)."""

    def __init__(self, server: "ChaosServer", sock: socket.socket, number: int, index: int) -> None:
        self.server = server
        self.sock = sock
        self.number = number  # unique in this process: stamped into echo answers
        self.records = server.records
        self.kill: str | None = None  # "fin" or "rst", set by an outage
        self.last: dict[int, int] = {}
        self.strays = 0
        self.buf = bytearray()
        key = f"{server.seed}:{server.group}:{server.endpoint}:{index}"
        self._plans = random.Random(key)
        self.rng = random.Random(key + ":bytes")
        self._next_plan()
        self.thread = threading.Thread(target=self._run, name=f"{server.group}:{server.endpoint}#{number}",
                                       daemon=True)

    # -- shared helpers -------------------------------------------------------

    def _frames(self, data: bytes) -> list[bytes]:
        self.buf += data
        return split_frames(self.buf, self.server.max_size)

    def _record_all(self, frames: list[bytes]) -> list[bytes]:
        return [f for f in frames if self.records.read(self.number, f, self.last) is not None]

    def _next_plan(self) -> None:
        server = self.server
        self.plan = CALM if server.calm.is_set() else Plan.draw(self._plans, server.kind, server.stray)
        self.handled = 0  # frames seen under this plan
        self.struck_at: float | None = None
        self.held: list[bytes] = []  # late: answers held back
        self.done = 0  # trickled answers / unasked frames sent

    def _due(self) -> bool:
        """Count one frame; True if the plan's fault strikes now (a ``none`` plan, or any plan
        after ``calm``, gives way to the next plan instead)."""
        self.handled += 1
        if self.struck_at is not None or self.handled <= self.plan.after:
            return False
        if self.plan.action == "none" or self.server.calm.is_set():
            self._next_plan()
            self.handled = 1
            return False
        self.struck_at = time.monotonic()
        with self.records.lock:
            self.records.faults[self.plan.action] += 1
        return True

    def _reset(self) -> str:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return "rst_by_us"

    def _graceful_close(self) -> str:
        """FIN, then read (and record) what the daemon had already written, until it closes."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return "fin_failed"
        end = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < end and not self.server.stopping.is_set():
            if not select.select([self.sock], [], [], POLL)[0]:
                continue
            try:
                data = self.sock.recv(RECV_SIZE)
            except OSError:
                return "fin_then_reset"
            if not data:
                return "fin_by_us"
            try:
                self._record_all(self._frames(data))
            except BadSoakFrame:
                return "fin_then_bad_stream"
        return "fin_drain_timeout"

    def _recv(self, size: int = RECV_SIZE) -> bytes | None:
        """Bytes, b"" at EOF, None if nothing within POLL."""
        if not select.select([self.sock], [], [], POLL)[0]:
            return None
        return self.sock.recv(size)

    def _run(self) -> None:
        reason = "stopped"
        try:
            reason = self._serve_echo() if self.server.kind == "echo" else self._serve_sink()
        except BadSoakFrame as exc:
            with self.records.lock:
                self.records.torn += 1
                self.records._example(f"conn {self.number}: stream broken: {exc}")
            reason = "bad_stream"
        except ConnectionResetError:
            reason = "reset_by_daemon"
        except OSError as exc:
            reason = f"error {exc.errno}"
        finally:
            self.sock.close()
            with self.records.lock:
                self.records.closes[reason] += 1
                self.records.tail_bytes += len(self.buf)
                if reason == "rst_by_us":
                    self.records.stray_at_risk += self.strays
            self.server.forget(self)

    def _killed(self) -> str | None:
        if self.kill == "rst":
            return self._reset()
        if self.kill == "fin":
            return self._graceful_close()
        return None

    # -- echo -----------------------------------------------------------------

    def _answer(self, frame: bytes, trickle: bool = False) -> None:
        data = stamp_conn(frame, self.number)
        if trickle:
            chunk = max(self.rng.randint(*TRICKLE_CHUNK), len(data) // TRICKLE_MAX_WRITES + 1)
            for i in range(0, len(data), chunk):
                self.sock.sendall(data[i : i + chunk])
                time.sleep(TRICKLE_PAUSE)
        else:
            self.sock.sendall(data)
        self.records.count("answered")

    def _stray(self) -> None:
        self.strays += 1
        k = self.strays
        frame = make_frame(STRAY_SESSION, k, STRAY_ID_BASE + k % 256, STRAY_SIZE, self.rng)
        self.sock.sendall(stamp_conn(frame, self.number))
        self.records.count("stray_sent")

    def _serve_echo(self) -> str:
        self.sock.settimeout(SEND_TIMEOUT)  # for sendall; reads wait in select
        while not self.server.stopping.is_set():
            killed = self._killed()
            if killed:
                return killed
            plan = self.plan
            if self.struck_at is not None and time.monotonic() - self.struck_at >= plan.hold:
                if plan.action == "stall":
                    return self._graceful_close()
                if plan.action == "late":
                    for f in self.held:
                        self._answer(f)
                    self._next_plan()
            data = self._recv()
            if data is None:
                continue
            if not data:  # the daemon closed (a drain): answer what is held, as a server would
                if plan.action == "late" and self.struck_at is not None:
                    for f in self.held:
                        self._answer(f)
                return "eof"
            for frame in self._record_all(self._frames(data)):
                if self._due() and self.plan.action in ("fin", "rst", "rst_mid"):
                    if self.plan.action == "fin":
                        return self._graceful_close()
                    if self.plan.action == "rst_mid":
                        half = stamp_conn(frame, self.number)
                        self.sock.sendall(half[: len(half) // 2])
                    return self._reset()
                plan = self.plan
                if self.struck_at is not None:
                    if plan.action == "stall":
                        continue
                    if plan.action == "late":
                        self.held.append(frame)
                        continue
                    if plan.action == "trickle":
                        self._answer(frame, trickle=True)
                        self.done += 1
                        if self.done >= plan.count:
                            self._next_plan()
                        continue
                    if plan.action == "unmatched" and self.handled % plan.every == 0:
                        self._stray()
                        self.done += 1
                        if self.done >= plan.count:
                            self._next_plan()
                self._answer(frame)
        return "stopped"

    # -- sink -----------------------------------------------------------------

    def _serve_sink(self) -> str:
        while not self.server.stopping.is_set():
            killed = self._killed()
            if killed:
                return killed
            plan = self.plan
            size = RECV_SIZE
            if self.struck_at is not None:
                if time.monotonic() - self.struck_at >= plan.hold:
                    self._next_plan()
                elif plan.action == "stall":
                    time.sleep(POLL)
                    continue
                else:  # trickle
                    size = self.rng.randint(*TRICKLE_CHUNK)
                    time.sleep(TRICKLE_PAUSE)
            data = self._recv(size)
            if data is None:
                continue
            if not data:
                return "eof"
            for _ in self._record_all(self._frames(data)):
                if self._due() and self.plan.action == "fin":
                    return self._graceful_close()
        return "stopped"


class ChaosServer:
    """One endpoint: a listener (closed during an outage) and its connections."""

    _numbers = itertools.count(1)  # connection numbers, unique in the process

    def __init__(self, records: GroupRecords, group: str, endpoint: int, kind: str, *, seed: int, stray: bool,
                 max_size: int, calm: threading.Event, stopping: threading.Event) -> None:
        self.records = records
        self.group = group
        self.endpoint = endpoint
        self.kind = kind
        self.seed = seed
        self.stray = stray
        self.max_size = max_size
        self.calm = calm
        self.stopping = stopping
        self._lock = threading.Lock()
        self._live: set[_Connection] = set()
        self._accepted = 0
        self._want_up = True
        self.listener = self._listen(0)
        self.port = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"{group}:{endpoint}", daemon=True)
        self._thread.start()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        sock.settimeout(POLL)
        return sock

    def down(self, how: str) -> None:
        with self._lock:
            self._want_up = False
            for conn in self._live:
                conn.kill = how

    def up(self) -> None:
        with self._lock:
            self._want_up = True

    def forget(self, conn: _Connection) -> None:
        with self._lock:
            self._live.discard(conn)

    def _accept_loop(self) -> None:
        tries = 0
        while not self.stopping.is_set():
            with self._lock:
                want_up = self._want_up
            if not want_up:
                if self.listener is not None:
                    self.listener.close()
                    self.listener = None
                time.sleep(POLL)
                continue
            if self.listener is None:
                try:
                    self.listener = self._listen(self.port)
                    tries = 0
                except OSError as exc:
                    tries += 1
                    if tries >= REBIND_TRIES:
                        print(f"backends: cannot listen on port {self.port} again: {exc}", file=sys.stderr)
                        return
                    time.sleep(POLL)
                    continue
            try:
                sock, _ = self.listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                continue
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, sock, next(self._numbers), self._accepted)
            self._accepted += 1
            with self._lock:
                if not self._want_up:  # an outage began while this one was in the backlog
                    conn.kill = "rst" if self.kind == "echo" else "fin"
                self._live.add(conn)
            self.records.count("conns")
            conn.thread.start()
        if self.listener is not None:
            self.listener.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        with self._lock:
            live = list(self._live)
        for conn in live:
            conn.thread.join(timeout)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m kmuxd.tools.soak.backends SPEC_JSON (started by the soak driver)", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    calm, stopping = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    records: dict[str, GroupRecords] = {}
    servers: dict[tuple[str, int], ChaosServer] = {}
    for g in spec["groups"]:
        records[g["name"]] = rec = GroupRecords(g["name"])
        for e in range(g["endpoints"]):
            srv = ChaosServer(rec, g["name"], e, g["kind"], seed=spec["seed"], stray=g.get("stray", False),
                              max_size=spec["max_size"], calm=calm, stopping=stopping)
            servers[(g["name"], e)] = srv
            _say(f"listening {g['name']} {e} {srv.port}")
    _say("ready")
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd = words[0]
        if cmd == "quit":
            break
        if cmd == "calm":
            calm.set()
            _say("ok calm")
        elif cmd == "report":
            _say("report " + json.dumps({name: rec.report() for name, rec in records.items()}))
        elif cmd in ("down", "up") and len(words) >= 3 and (words[1], int(words[2])) in servers:
            srv = servers[(words[1], int(words[2]))]
            if cmd == "down":
                srv.down(words[3] if len(words) > 3 and words[3] in ("fin", "rst") else "fin")
            else:
                srv.up()
            _say(f"ok {cmd}")
        else:
            _say(f"error unknown command {line.strip()!r}")
    stopping.set()
    for srv in servers.values():
        srv.join(DRAIN_TIMEOUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
