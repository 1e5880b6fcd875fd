"""An app in a process of its own, driven one command at a time: the peer of the isolation tests.

    python tests/integration/app_peer.py SOCKET [COMM]

The tests need apps that are real processes: with their own uid, gid and
supplementary groups (:func:`tests.integration.as_user.as_user` starts this
program through ``setpriv``), and with their own CPU, so that a flooding or
stalled app competes with the measured one the way it would in production
and not through the test's GIL. Each stdin line is one JSON command
``{"op": ..., ...}``; each gets exactly one JSON line on stdout. Clients are
``kmux.Client`` objects named by small integer handles.

Every request is a :func:`~tests.integration.reqresp.make_req`
frame: ``u32be length | u32 id | u16 client | u32 seq | crc | body``, so each
response names the request it answers, and a response given to the wrong
app, or torn, is seen (an "anomaly").

Bounded: every wait has a timeout, flood threads stop on command or on the
first error, and lists returned are capped at :data:`REPORT_MAX` items.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import kmux  # noqa: E402
from kmux.errors import KmuxError  # noqa: E402
from kmux.protocol import DATA_PREFIX, KIND_NOTICE, decode_notice  # noqa: E402

from tests.integration.helpers import BadTestFrame  # noqa: E402
from tests.integration.reqresp import make_req, parse_resp  # noqa: E402

#: Most items of any list in an answer (anomalies, notices).
REPORT_MAX = 20
#: Seconds a flood's reader keeps reading after its sender stopped.
FLOOD_SETTLE = 5.0


def raw_socket(client: kmux.Client) -> socket.socket:
    """The client's connected socket, as a second socket object on the same descriptor's
    file (``dup``): the test speaks the protocol on it directly, as docs/protocol.md says."""
    return socket.socket(fileno=os.dup(client.fileno()))


def _error(exc: KmuxError) -> dict:
    return {"code": exc.code, "message": exc.message, "details": {k: v for k, v in exc.details.items()}}


class Flood:
    """Send requests as fast as the daemon takes them (or at ``pace``), and read
    the answers in a second thread unless ``read`` is false (a stalled reader).

    The sender writes DATA packets on the client's socket itself, as the
    protocol says (docs/protocol.md), numbering them from ``first_seq``: when
    a send fails because the daemon closed the socket, ``kmux.Client.send``
    marks the whole session closed, and a ``recv`` in another thread then
    drops the packets the daemon sent before closing (its last notice among
    them; see test_limits.py). The reading side must still see them.
    """

    def __init__(self, client: kmux.Client, cid: int, size: int, read: bool, window: int, pace: float,
                 count: int | None, first_seq: int, start_at: float | None = None) -> None:
        self.client, self.cid, self.size = client, cid, size
        #: The client's own socket (a duplicate descriptor of it), for raw sends.
        self.sock = raw_socket(client)
        self.next_seq = first_seq
        #: time.monotonic() (the system's clock) at which to start: floods of several peers at once
        self.start_at = start_at
        self.window, self.pace, self.count = window, pace, count
        self.outstanding: set[int] = set()
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.sent = self.responses = 0
        self.notices: Counter = Counter()
        self.anomalies: list[str] = []
        self.end: dict | None = None
        #: Once stopped: when the reader gives up waiting for the last answers.
        self.settle_by = float("inf")
        self.threads = [threading.Thread(target=self._send, daemon=True)]
        if read:
            self.threads.append(threading.Thread(target=self._read, daemon=True))
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        rng = random.Random(self.cid)
        if self.start_at is not None:
            time.sleep(max(0.0, min(FLOOD_SETTLE, self.start_at - time.monotonic())))
        try:
            while not self.stop.is_set() and (self.count is None or self.sent < self.count):
                if self.window:
                    with self.cond:
                        while len(self.outstanding) >= self.window and not self.stop.is_set():
                            self.cond.wait(0.05)
                seq = self.next_seq
                with self.cond:
                    self.outstanding.add(seq)
                self.sock.send(DATA_PREFIX + make_req(self.cid, seq, seq & 0xFFFFFFFF, self.size, rng))
                self.next_seq += 1
                self.sent += 1
                if self.pace:
                    time.sleep(self.pace)
        except OSError as exc:
            self.end = {"code": "oserror", "message": str(exc)}

    def _read(self) -> None:
        while True:
            if self.stop.is_set() and (not self.outstanding or time.monotonic() > self.settle_by):
                return
            try:
                msg = self.client.recv(timeout=0.05)
            except TimeoutError:
                continue
            except KmuxError as exc:
                if exc.seq is None:  # the session ended (or a session-wide notice)
                    self.end = _error(exc)
                    return
                self.notices[exc.code] += 1
                with self.cond:
                    self.outstanding.discard(exc.seq)
                    self.cond.notify()
                continue
            try:
                _, client, seq = parse_resp(msg)
            except BadTestFrame as exc:
                self.anomalies.append(f"torn: {exc}")
                continue
            with self.cond:
                if client != self.cid or seq not in self.outstanding:
                    self.anomalies.append(f"flood {self.cid} got client {client} seq {seq}")
                    continue
                self.outstanding.discard(seq)
                self.cond.notify()
            self.responses += 1

    def finish(self) -> dict:
        self.settle_by = time.monotonic() + FLOOD_SETTLE
        self.stop.set()
        for t in self.threads:
            t.join(FLOOD_SETTLE + 5)
        return {
            "sent": self.sent, "responses": self.responses, "notices": dict(self.notices),
            "anomalies": self.anomalies[:REPORT_MAX], "anomaly_count": len(self.anomalies),
            "end": self.end, "stuck": any(t.is_alive() for t in self.threads),
        }


class Peer:
    def __init__(self, path: str) -> None:
        self.path = path
        self.clients: dict[int, kmux.Client] = {}
        self.floods: dict[int, Flood] = {}
        self.flood_seq: dict[int, int] = {}
        self.next = 1
        self.rng = random.Random(os.getpid())

    # -- commands --------------------------------------------------------------

    def connect(self, group: str, name: str = "", receive: bool = True) -> dict:
        try:
            client = kmux.connect(group, self.path, name=name, receive=receive, timeout=5.0)
        except KmuxError as exc:
            return {"ok": False, **_error(exc)}
        handle = self.next
        self.next += 1
        self.clients[handle] = client
        return {"ok": True, "client": handle, "client_id": client.client_id}

    def connect_many(self, group: str, count: int) -> dict:
        """Connect ``count`` times, closing each at once: refusal codes and texts counted."""
        codes: Counter = Counter()
        texts: set[str] = set()
        for _ in range(count):
            answer = self.connect(group)
            if answer["ok"]:
                self.disconnect(answer["client"])
                codes["ok"] += 1
            else:
                codes[answer["code"]] += 1
                texts.add(answer["message"])
        return {"codes": dict(codes), "messages": sorted(texts)[:REPORT_MAX]}

    def send(self, client: int, cid: int, count: int, size: int = 64) -> dict:
        """``count`` requests, seq following the client's own count; how many went out."""
        c = self.clients[client]
        sent = 0
        try:
            for _ in range(count):
                seq = c.seq + 1
                c.send(make_req(cid, seq, seq & 0xFFFFFFFF, size, self.rng))
                sent += 1
        except KmuxError as exc:
            return {"sent": sent, "end": _error(exc)}
        return {"sent": sent, "end": None}

    def recv(self, client: int, timeout: float) -> dict:
        try:
            msg = self.clients[client].recv(timeout=timeout)
        except TimeoutError:
            return {"kind": "timeout"}
        except KmuxError as exc:
            return {"kind": "notice", **_error(exc)}
        try:
            rid, cid, seq = parse_resp(msg)
        except BadTestFrame as exc:
            return {"kind": "torn", "message": str(exc)}
        return {"kind": "data", "id": rid, "client": cid, "seq": seq}

    def recv_all(self, client: int, cid: int, timeout: float, expect: int | None = None, limit: int = 100_000) -> dict:
        """Read until ``timeout`` s pass with nothing, the session ends, or
        ``expect`` requests have their outcome (a response or a notice naming it).

        Answers the seqs of the responses (in order), the notices as
        ``[code, seq]``, responses that were not ``cid``'s (``foreign``) and
        how it ended (``None``: still attached).
        """
        responses: list[int] = []
        notices: list[list] = []
        foreign: list[dict] = []
        end = None
        for _ in range(limit):
            if expect is not None and len(responses) + len(notices) >= expect:
                break
            got = self.recv(client, timeout)
            if got["kind"] == "timeout":
                break
            if got["kind"] == "data" and got["client"] == cid:
                responses.append(got["seq"])
            elif got["kind"] in ("data", "torn"):
                foreign.append(got)
            elif got["details"].get("seq") is not None:
                notices.append([got["code"], got["details"]["seq"]])
            else:
                end = got
                if got["code"] == "daemon_shutdown":
                    end = self._read_past_reset(client, cid, responses, notices, foreign) or end
                break
        return {"responses": responses, "notices": notices, "foreign": foreign[:REPORT_MAX], "end": end}

    def _read_past_reset(self, client: int, cid: int, responses: list, notices: list, foreign: list) -> dict | None:
        """What the daemon sent before closing, still queued behind an ``ECONNRESET``.

        A daemon that closes a socket with packets of ours unread makes the
        first ``recv`` fail with ``ECONNRESET``; ``kmux.Client`` then reports
        the end at once, while docs/protocol.md tells apps to keep reading
        until 0. This reads on as the protocol says (the socket is the
        client's own, taken from it), so a test sees the daemon's last word.
        """
        sock = raw_socket(self.clients[client])
        last = None
        for _ in range(REPORT_MAX * 1000):
            try:
                packet = sock.recv(1 << 21, socket.MSG_DONTWAIT)
            except OSError:
                break
            if not packet:
                break
            if packet[0] == KIND_NOTICE:
                notice = decode_notice(packet[1:])
                if notice.seq is not None:
                    notices.append([notice.code, notice.seq])
                else:
                    last = {"kind": "notice", "code": notice.code, "message": notice.message,
                            "details": notice.details, "after_reset": True}
                continue
            try:
                _, owner, seq = parse_resp(packet[1:])
            except BadTestFrame:
                foreign.append({"kind": "torn"})
                continue
            (responses if owner == cid else foreign).append(seq)
        return last

    def lockstep(self, client: int, cid: int, count: int, size: int = 64, timeout: float = 5.0) -> dict:
        """``count`` requests, each sent when the previous one's response came back;
        the round trips in µs, anything received that was not the awaited response,
        and ``sent_at``: ``[seq, time.monotonic() at send]`` of each request (the
        clock is the system's, so a backend can say how long each took to reach it)."""
        c = self.clients[client]
        rng = random.Random(cid)
        latency: list[float] = []
        sent_at: list[list] = []
        anomalies: list[str] = []
        clock = time.perf_counter_ns
        for _ in range(count):
            seq = c.seq + 1
            frame = make_req(cid, seq, seq & 0xFFFFFFFF, size, rng)
            sent_at.append([seq, time.monotonic()])
            start = clock()
            c.send(frame)
            while True:
                try:
                    msg = c.recv(timeout=timeout)
                except (TimeoutError, KmuxError) as exc:
                    return {"latency_us": latency, "sent_at": sent_at, "anomalies": anomalies + [f"seq {seq}: {exc!r}"]}
                try:
                    rid, owner, got = parse_resp(msg)
                except BadTestFrame as exc:
                    anomalies.append(f"torn: {exc}")
                    continue
                if (owner, got, rid) == (cid, seq, seq & 0xFFFFFFFF):
                    break
                anomalies.append(f"waiting for seq {seq}, got client {owner} seq {got} id {rid}")
            latency.append((clock() - start) / 1000)
        return {"latency_us": latency, "sent_at": sent_at, "anomalies": anomalies[:REPORT_MAX]}

    def flood_start(self, client: int, cid: int, size: int = 64, read: bool = True, window: int = 0,
                    pace: float = 0.0, count: int | None = None, start_at: float | None = None) -> dict:
        """Start a :class:`Flood`; its seqs go on from the client's earlier floods."""
        first = self.flood_seq.get(client, 1)
        self.floods[client] = Flood(self.clients[client], cid, size, read, window, pace, count, first, start_at)
        return {"ok": True}

    def flood_sent(self, client: int) -> dict:
        return {"sent": self.floods[client].sent}

    def flood_stop(self, client: int) -> dict:
        flood = self.floods.pop(client)
        report = flood.finish()
        # Read after the sender thread ended: read before, a seq sent just then was used again
        # by the next flood (a duplicate the test took for the daemon's).
        self.flood_seq[client] = flood.next_seq
        return report

    def disconnect(self, client: int) -> dict:
        self.clients.pop(client).close()
        return {"ok": True}

    def whoami(self) -> dict:
        return {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups())}


def main() -> None:
    path = sys.argv[1]
    if len(sys.argv) > 2:
        with open("/proc/self/comm", "w") as f:
            f.write(sys.argv[2])
    peer = Peer(path)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        if op == "exit":
            break
        try:
            answer = getattr(peer, op)(**command)
        except Exception as exc:  # handed to the test, which fails with it
            answer = {"failed": repr(exc)}
        print(json.dumps(answer), flush=True)
    for client in list(peer.clients.values()):
        client.close()


if __name__ == "__main__":
    main()
