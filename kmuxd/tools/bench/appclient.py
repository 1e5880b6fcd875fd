"""The benchmark's Python client: one closed-loop client, as a Python app sees its target.

    python -m kmuxd.tools.bench.appclient --api API [--timeout S] (--path SOCK --group G | --port PORT)
                                          --request HEX [--count N]

The C load generator (``loadgen.c``) measures the proxies with clients that
cost next to nothing. Apps are not written in C: this client measures what
a Python app pays and sees, through the ``kmux`` library and through a raw
socket, so the two can be compared side by side in one run.

APIs (``--api``), each one client with one request in flight:

* ``kmux``: :func:`kmux.connect`, ``send``, ``recv`` (``recv(timeout=S)``
  with ``--timeout``);
* ``kmux-trio``: :func:`kmux.trio.connect`, ``await send``, ``await recv``
  (inside ``trio.fail_after(S)`` with ``--timeout``);
* ``raw``: a blocking ``SOCK_SEQPACKET`` socket: the hello (encoded by
  :func:`kmux.protocol.encode_hello`), then the kind byte and the message
  with one ``send``, the answer with one ``recv`` (bytes, kind byte
  included, as an app would get it; ``settimeout(S)`` with ``--timeout``,
  Python's own way: a ``poll`` before each call);
* ``raw-trio``: the same through ``trio.socket`` (``fail_after`` for a timeout);
* ``stream``: TCP (``TCP_NODELAY``) to ``127.0.0.1:PORT`` (``--port``) or a
  Unix stream socket (``--path``): direct to the service, or twemproxy; the
  reply is cut by ``--reply`` (``mcbin``: the 24-byte header's body length;
  ``ascii``: up to ``END\\r\\n``).

Two ways to run:

* timed (the default), the load generator's line protocol: print ``ready``
  once connected; read ``go START STOP WSTART WEND`` (``time.monotonic``
  seconds); run from START to STOP; print one JSON line with what was
  measured in [WSTART, WEND]: ``completed``, the round-trip percentiles
  (``p50_us``...), ``client_cpu_us`` (this process's CPU per round trip,
  ``CLOCK_PROCESS_CPUTIME_ID``, nanosecond resolution) and context switches
  per round trip;
* ``--count N``: N round trips after a warm-up, between two marker system
  calls (:func:`.syscalls.mark`), for :mod:`.syscalls` to count the system
  calls of exactly those round trips. Prints one JSON line.

Invariants: every loop is bounded by the clock or a count; the latency
samples are at most :data:`MAX_SAMPLES` (past that, round trips are counted
but not sampled); a reply that is not the size expected ends the run with
exit status 1 (a notice from kmuxd raises, and ends it the same way).
"""

from __future__ import annotations

import argparse
import array
import json
import resource
import socket
import struct
import sys
import time
from typing import Any, Callable

from .syscalls import MARK_BEGIN, MARK_END, mark

APIS = ("kmux", "kmux-trio", "raw", "raw-trio", "stream")
#: Most latency samples kept (8 bytes each).
MAX_SAMPLES = 4_000_000
#: Round trips before the counted ones (--count): imports, caches and the
#: first allocations are not what an app pays per message.
WARMUP = 200
#: The largest reply read (the benchmark's replies are 64 bytes).
REPLY_BUFFER = 65536
ASCII_END = b"END\r\n"


class Failed(Exception):
    """The target answered something the benchmark did not ask for."""


# -- blocking round trips ---------------------------------------------------------------------------


def blocking_round_trip(a: argparse.Namespace) -> tuple[Callable[[], None], Callable[[], None]]:
    """(one round trip, close) for a blocking API."""
    request = bytes.fromhex(a.request)
    if a.api == "kmux":
        import kmux

        client = kmux.connect(a.group, a.path, name="bench-app")
        send, recv, timeout = client.send, client.recv, a.timeout
        expect = a.reply_size

        def kmux_rt() -> None:
            send(request)
            if len(recv(timeout)) != expect:
                raise Failed("a reply of another size")

        return kmux_rt, client.close
    if a.api == "raw":
        sock = _raw_seqpacket(a)
        packet = b"\x00" + request
        want = 1 + a.reply_size
        if a.timeout is not None:
            sock.settimeout(a.timeout)
        ssend, srecv = sock.send, sock.recv

        def raw_rt() -> None:
            ssend(packet)
            reply = srecv(REPLY_BUFFER)
            if len(reply) != want or reply[0]:
                raise Failed(f"a reply of another size or kind: {reply[:16]!r}")

        return raw_rt, sock.close
    if a.port:
        sock = socket.create_connection(("127.0.0.1", a.port), timeout=5.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5.0)
        sock.connect(a.path)
    sock.settimeout(a.timeout)
    buf = bytearray(REPLY_BUFFER)
    view = memoryview(buf)
    ssend, recv_into = sock.send, sock.recv_into
    ascii_reply = a.reply == "ascii"

    def stream_rt() -> None:
        ssend(request)
        have = 0
        while True:  # bounded: each pass reads at least a byte or raises
            n = recv_into(view[have:])
            if not n:
                raise Failed("the target closed the connection")
            have += n
            if _reply_done(buf, have, ascii_reply):
                return

    return stream_rt, sock.close


def _reply_done(buf: bytearray, have: int, ascii_reply: bool) -> bool:
    if ascii_reply:
        return have >= 5 and buf.endswith(ASCII_END, 0, have)
    return have >= 24 and have >= 24 + struct.unpack_from(">I", buf, 8)[0]


def _raw_seqpacket(a: argparse.Namespace) -> socket.socket:
    from kmux.protocol import Accepted, Hello, decode_answer, encode_hello

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(5.0)
    sock.connect(a.path)
    sock.send(encode_hello(Hello(a.group, name="bench-raw")))
    answer = decode_answer(sock.recv(REPLY_BUFFER))
    if not isinstance(answer, Accepted):
        raise Failed(f"kmuxd refused the hello: {answer}")
    sock.settimeout(None)
    return sock


def run_blocking(a: argparse.Namespace) -> dict[str, Any]:
    rt, close = blocking_round_trip(a)
    try:
        for _ in range(WARMUP):
            rt()
        if a.count:
            mark(MARK_BEGIN)
            for _ in range(a.count):
                rt()
            mark(MARK_END)
            return {"count": a.count}
        start, stop, ws, we = ready_and_go()
        return closed_loop(rt, start, stop, ws, we)
    finally:
        close()


def ready_and_go() -> tuple[float, float, float, float]:
    print("ready", flush=True)
    line = sys.stdin.readline().split()
    if len(line) != 5 or line[0] != "go":
        raise Failed(f"expected 'go START STOP WSTART WEND', got {line!r}")
    start, stop, ws, we = map(float, line[1:])
    delay = start - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    return start, stop, ws, we


def closed_loop(rt: Callable[[], None], start: float, stop: float, ws: float, we: float) -> dict[str, Any]:
    now = time.monotonic
    window = Window(ws, we)
    t = now()
    while t < stop:
        rt()
        t = window.done(t, now())
    return window.result(t)


class Window:
    """The measured window: round trips, their latency samples, and the CPU and context switches
    read at its first and last round trip."""

    def __init__(self, ws: float, we: float) -> None:
        self.ws, self.we = ws, we
        self.samples = array.array("d")
        self.completed = 0
        self.t0 = self.t1 = 0.0
        self.cpu0 = self.cpu1 = 0.0
        self.ru0: Any = None
        self.ru1: Any = None

    def done(self, t: float, t1: float) -> float:
        """A round trip sent at ``t`` was answered at ``t1``; returns ``t1``."""
        if self.ws <= t < self.we:
            self.enter(t)
            if len(self.samples) < MAX_SAMPLES:
                self.samples.append(t1 - t)
            self.completed += 1
        elif t >= self.we:
            self.leave(t)
        return t1

    def enter(self, t: float) -> None:
        if self.ru0 is None:
            self.t0, self.cpu0, self.ru0 = t, time.process_time(), resource.getrusage(resource.RUSAGE_SELF)

    def leave(self, t: float) -> None:
        if self.ru0 is not None and self.ru1 is None:
            self.t1, self.cpu1, self.ru1 = t, time.process_time(), resource.getrusage(resource.RUSAGE_SELF)

    def result(self, t: float) -> dict[str, Any]:
        self.leave(t)
        n = self.completed
        if not n or self.ru1 is None:
            return {"completed": 0, "error": "no round trip completed inside the window"}
        ordered = sorted(self.samples)

        def pct(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6

        switches = (self.ru1.ru_nvcsw - self.ru0.ru_nvcsw) + (self.ru1.ru_nivcsw - self.ru0.ru_nivcsw)
        return {
            "completed": n, "window_s": self.t1 - self.t0, "samples": len(ordered),
            "p50_us": pct(0.50), "p99_us": pct(0.99), "p999_us": pct(0.999), "max_us": ordered[-1] * 1e6,
            "mean_us": sum(ordered) / len(ordered) * 1e6,
            "client_cpu_us": (self.cpu1 - self.cpu0) / n * 1e6,
            "client_user_us": (self.ru1.ru_utime - self.ru0.ru_utime) / n * 1e6,
            "client_sys_us": (self.ru1.ru_stime - self.ru0.ru_stime) / n * 1e6,
            "switches_per_rt": switches / n,
        }


# -- trio round trips -----------------------------------------------------------------------------


async def trio_round_trip(a: argparse.Namespace) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(one async round trip, async close) for a trio API."""
    import trio

    request = bytes.fromhex(a.request)
    timeout = a.timeout
    if a.api == "kmux-trio":
        import kmux.trio

        client = await kmux.trio.connect(a.group, a.path, name="bench-app")
        send, recv = client.send, client.recv
        expect = a.reply_size

        async def kmux_rt() -> None:
            await send(request)
            if timeout is None:
                reply = await recv()
            else:
                with trio.fail_after(timeout):
                    reply = await recv()
            if len(reply) != expect:
                raise Failed("a reply of another size")

        return kmux_rt, client.aclose
    plain = _raw_seqpacket(a)
    sock = trio.socket.from_stdlib_socket(plain)
    packet = b"\x00" + request
    want = 1 + a.reply_size

    async def raw_rt() -> None:
        await sock.send(packet)
        if timeout is None:
            reply = await sock.recv(REPLY_BUFFER)
        else:
            with trio.fail_after(timeout):
                reply = await sock.recv(REPLY_BUFFER)
        if len(reply) != want or reply[0]:
            raise Failed(f"a reply of another size or kind: {reply[:16]!r}")

    async def close() -> None:
        sock.close()

    return raw_rt, close


def run_trio(a: argparse.Namespace) -> dict[str, Any]:
    import trio

    async def main() -> dict[str, Any]:
        rt, close = await trio_round_trip(a)
        try:
            for _ in range(WARMUP):
                await rt()
            if a.count:
                mark(MARK_BEGIN)
                for _ in range(a.count):
                    await rt()
                mark(MARK_END)
                return {"count": a.count}
            start, stop, ws, we = await trio.to_thread.run_sync(ready_and_go)
            now = time.monotonic
            window = Window(ws, we)
            t = now()
            while t < stop:
                await rt()
                t = window.done(t, now())
            return window.result(t)
        finally:
            await close()

    return trio.run(main)


# -- the command ------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kmuxd.tools.bench.appclient", description=__doc__.split("\n\n")[0])
    p.add_argument("--api", choices=APIS, required=True)
    p.add_argument("--path", help="kmuxd's app socket (kmux, kmux-trio, raw, raw-trio); stream: a Unix socket")
    p.add_argument("--group", help="the kmuxd group to join")
    p.add_argument("--port", type=int, help="stream: a TCP port on 127.0.0.1")
    p.add_argument("--reply", choices=("mcbin", "ascii"), default="mcbin", help="stream: how a reply ends")
    p.add_argument("--request", required=True, help="the request, in hex")
    p.add_argument("--reply-size", type=int, default=64, help="kmuxd: the reply's size, header included")
    p.add_argument("--timeout", type=float, default=None, help="bound every receive by this many seconds")
    p.add_argument("--count", type=int, default=0, help="run this many round trips between the marker calls, "
                   "then exit (for strace), instead of the timed protocol")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.api == "stream" and not (a.port or a.path) or a.api != "stream" and not (a.path and a.group):
        parser().error("--api stream needs --port or --path; the others need --path and --group")
    try:
        out = run_trio(a) if a.api.endswith("trio") else run_blocking(a)
    except Exception as exc:  # noqa: BLE001 -- the bench reads the reason from the result line
        print(json.dumps({"completed": 0, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    if "completed" in out:
        # As the C load generator counts them: each round trip's request and reply.
        out["bytes"] = out["completed"] * (len(bytes.fromhex(a.request)) + a.reply_size)
    print(json.dumps(out), flush=True)
    return 0 if not out.get("error") else 1


if __name__ == "__main__":
    sys.exit(main())
