"""The soak's chaos backends: loopback TCP servers that misbehave on a seeded plan.

    python -m kmuxd.tools.soak.backends SPEC_JSON

One process serves every endpoint of every soak group, each on its own
127.0.0.1 port: *echo* servers for request/response groups (each whole frame
is answered on the connection it came from, with the number of that
connection stamped into it, see :mod:`.frames`) and *sink* servers for
one-way ``balance`` groups (frames are only counted).

Theory of operation
-------------------
The servers are the project's one TCP backend (:mod:`kmuxd.tools.backend`):
one event loop serves every endpoint, and each connection is its faulty
echo or sink protocol, living through a sequence of
:class:`~kmuxd.tools.backend.Plan` s drawn from an RNG seeded with ``(seed,
group, endpoint, connection number)``: each handles ``after`` frames
normally, then strikes with its fault; a connection that survives its fault
(``none``, ``late``, ``trickle``, ``unmatched``) goes on with its next plan,
so faults keep coming on long-lived connections:

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
``report {json}``, ``quit`` (or EOF) stops. The main thread reads the
commands and runs each in the loop's thread (:meth:`Loop.call`).

Records (per group, under one lock): every whole frame read, checked (torn,
read twice by the servers = written twice by the daemon, out of order per
connection and session), counted per session; answers written, unasked
frames written, faults struck, connections and why they closed.

Bounds: the loop's (a poll of at most 50 ms, a graceful close of at most
5 s), :data:`REBIND_TRIES` tries to listen again after an outage, frames up
to ``max_size``; the loop's thread ends on ``quit``.
"""

from __future__ import annotations

import json
import random
import signal
import sys
import threading
from collections import Counter
from typing import Any, Iterator

from kmuxd.tools.backend import CALM, Conn, FaultyEcho, FaultySink, Loop, Plan

from .frames import STRAY_ID_BASE, STRAY_SESSION, BadSoakFrame, make_frame, parse_frame, stamp_conn

__all__ = ["draw_plan", "GroupRecords", "ChaosServer", "ECHO_FAULTS", "SINK_FAULTS", "main"]

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
#: Answers an echo connection trickles.
TRICKLE_FRAMES = (2, 8)
#: An unmatched stretch sends one unasked frame every N answers, this many times: (least, most).
STRAY_EVERY = (3, 20)
STRAY_COUNT = (1, 10)
STRAY_SIZE = 64
#: Tries, :data:`REBIND_INTERVAL` s apart, to listen again on an endpoint's port after an outage.
REBIND_TRIES = 250
REBIND_INTERVAL = 0.02
EXAMPLES = 5


def draw_plan(rng: random.Random, kind: str, stray: bool) -> Plan:
    """The next plan of an ``echo`` or ``sink`` connection (``unmatched`` only if ``stray``)."""
    table = ECHO_FAULTS if kind == "echo" else SINK_FAULTS
    table = tuple((a, w) for a, w in table if stray or a != "unmatched")
    action = rng.choices([a for a, _ in table], [w for _, w in table])[0]
    after = rng.randint(*(ECHO_AFTER if kind == "echo" else SINK_AFTER))
    hold = rng.uniform(*(SINK_TRICKLE if kind == "sink" and action == "trickle" else HOLD))
    count = rng.randint(*(TRICKLE_FRAMES if action == "trickle" else STRAY_COUNT))
    return Plan(action, after, hold, count, rng.randint(*STRAY_EVERY))


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

    def count_fault(self, action: str) -> None:
        with self.lock:
            self.faults[action] += 1

    def closed(self, reason: str, tail: int, stray_at_risk: int) -> None:
        """A connection ended: why, the bytes of an incomplete frame it left, unasked frames it may have lost."""
        with self.lock:
            self.closes[reason] += 1
            self.tail_bytes += tail
            self.stray_at_risk += stray_at_risk

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


class _Chaos:
    """What both kinds of chaos connection record (mixed into the backend's faulty protocols)."""

    server: "ChaosServer"
    conn: Conn

    def _setup(self, server: "ChaosServer") -> None:
        self.server = server
        self.records = server.records
        self.last: dict[int, int] = {}
        self.strays: list[int] = []  # stream offsets where the unasked frames sent end

    def calm(self) -> bool:
        return self.server.calm.is_set()

    def record(self, frame: bytes) -> bool:
        return self.records.read(self.conn.number, frame, self.last) is not None

    def fault(self, plan: Plan) -> None:
        self.records.count_fault(plan.action)

    def bad_stream(self, error: str) -> None:
        with self.records.lock:
            self.records.torn += 1
            self.records._example(f"conn {self.conn.number}: stream broken: {error}")
        self.conn.close(reason="bad_stream")

    def closed(self, reason: str) -> None:
        # Unasked frames never written, or written on a connection we then reset, may never reach the daemon.
        at_risk = len(self.strays) if reason == "rst_by_us" else sum(e > self.conn.sent_total for e in self.strays)
        reason = {"reset": "reset_by_daemon", "shutdown": "stopped"}.get(reason, reason)
        self.records.closed(reason, self.conn.buffered, at_risk)


class _ChaosEcho(_Chaos, FaultyEcho):
    def __init__(self, server: "ChaosServer", conn: Conn, plans: Iterator[Plan], rng: random.Random) -> None:
        self._setup(server)
        FaultyEcho.__init__(self, conn, plans, rng)

    def reply(self, frame: bytes) -> bytes:
        return stamp_conn(frame, self.conn.number)

    def replied(self, frame: bytes, end: int) -> None:
        self.records.count("answered")

    def stray(self, k: int) -> bytes:
        frame = make_frame(STRAY_SESSION, len(self.strays) + 1, STRAY_ID_BASE + (len(self.strays) + 1) % 256,
                           STRAY_SIZE, self.rng)
        return stamp_conn(frame, self.conn.number)

    def strayed(self, end: int) -> None:
        self.strays.append(end)
        self.records.count("stray_sent")


class _ChaosSink(_Chaos, FaultySink):
    def __init__(self, server: "ChaosServer", conn: Conn, plans: Iterator[Plan], rng: random.Random) -> None:
        self._setup(server)
        FaultySink.__init__(self, conn, plans, rng)


class ChaosServer:
    """One endpoint: a listener of the shared loop (closed during an outage) and its connections."""

    def __init__(self, loop: Loop, records: GroupRecords, group: str, endpoint: int, kind: str, *, seed: int,
                 stray: bool, max_size: int, calm: threading.Event) -> None:
        self.loop = loop
        self.records = records
        self.group = group
        self.endpoint = endpoint
        self.kind = kind
        self.seed = seed
        self.stray = stray
        self.calm = calm
        self._rebind_tries = 0
        self.listener = loop.listen(self._protocol, max_message=max_size)
        self.port = self.listener.port

    def _plans(self, rng: random.Random) -> Iterator[Plan]:
        while True:
            yield CALM if self.calm.is_set() else draw_plan(rng, self.kind, self.stray)

    def _protocol(self, conn: Conn) -> _ChaosEcho | _ChaosSink:
        key = f"{self.seed}:{self.group}:{self.endpoint}:{conn.index}"
        plans, rng = self._plans(random.Random(key)), random.Random(key + ":bytes")
        self.records.count("conns")
        kind = _ChaosEcho if self.kind == "echo" else _ChaosSink
        return kind(self, conn, plans, rng)

    def down(self, how: str) -> None:
        """(In the loop.) Refuse dials and close every live connection ``how`` (fin or rst)."""
        self.listener.down(how, reason=f"{how}_by_us")

    def up(self) -> None:
        """(In the loop.) Listen again on the same port, retrying while the kernel still holds it."""
        try:
            self.listener.reopen()
            self._rebind_tries = 0
        except OSError as exc:
            self._rebind_tries += 1
            if self._rebind_tries >= REBIND_TRIES:
                print(f"backends: cannot listen on port {self.port} again: {exc}", file=sys.stderr)
                return
            self.loop.call_later(REBIND_INTERVAL, self.up)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m kmuxd.tools.soak.backends SPEC_JSON (started by the soak driver)", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    calm = threading.Event()
    loop = Loop()
    signal.signal(signal.SIGTERM, lambda *_: setattr(loop, "stop_requested", True))
    records: dict[str, GroupRecords] = {}
    servers: dict[tuple[str, int], ChaosServer] = {}
    for g in spec["groups"]:
        records[g["name"]] = rec = GroupRecords(g["name"])
        for e in range(g["endpoints"]):
            srv = ChaosServer(loop, rec, g["name"], e, g["kind"], seed=spec["seed"], stray=g.get("stray", False),
                              max_size=spec["max_size"], calm=calm)
            servers[(g["name"], e)] = srv
            _say(f"listening {g['name']} {e} {srv.port}")
    loop.start(name="chaos")
    _say("ready")
    try:
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            cmd = words[0]
            if cmd == "quit" or loop.stop_requested:
                break
            if cmd == "calm":
                calm.set()
                _say("ok calm")
            elif cmd == "report":
                _say("report " + json.dumps(loop.call(lambda: {name: rec.report() for name, rec in records.items()})))
            elif cmd in ("down", "up") and len(words) >= 3 and (words[1], int(words[2])) in servers:
                srv = servers[(words[1], int(words[2]))]
                if cmd == "down":
                    how = words[3] if len(words) > 3 and words[3] in ("fin", "rst") else "fin"
                    loop.call(lambda: srv.down(how))
                else:
                    loop.call(srv.up)
                _say(f"ok {cmd}")
            else:
                _say(f"error unknown command {line.strip()!r}")
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
