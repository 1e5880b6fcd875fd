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
* ``--paired`` (``kmux`` and ``kmux-trio``): the same timed protocol, with
  the library and its raw twin (``raw``, ``raw-trio``: same API, same
  timeout) connected in one process, alternating blocks of ``--block``
  round trips (the order flips every pair: library first, then raw first),
  so that both see the same machine at the same moment. Each block's CPU
  (``CLOCK_PROCESS_CPUTIME_ID``) over its round trips is one figure; each
  pair of adjacent blocks inside the window gives one difference, library
  minus raw. The result has the median difference (``extra_cpu_us``), its
  quartiles and extremes, the number of pairs, and each side's CPU per
  round trip. One window per client swings by ±10 µs on a shared machine;
  pairs of blocks a few milliseconds apart do not;
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
#: --paired: round trips per block (a block lasts a few milliseconds).
PAIR_BLOCK = 300
MAX_BLOCK = 100_000
#: --paired: the raw twin of each library API.
RAW_TWIN = {"kmux": "raw", "kmux-trio": "raw-trio"}


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
    if a.paired:
        return run_blocking_paired(a)
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


def _twin(a: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(a), "api": RAW_TWIN[a.api]})


def run_blocking_paired(a: argparse.Namespace) -> dict[str, Any]:
    lib, close_lib = blocking_round_trip(a)
    try:
        raw, close_raw = blocking_round_trip(_twin(a))
        try:
            for _ in range(WARMUP):
                lib()
                raw()
            start, stop, ws, we = ready_and_go()
            pairs = Pairs(ws, we)
            now, cpu, block = time.monotonic, time.process_time_ns, a.block
            t = now()
            while t < stop:
                for side in pairs.order():
                    rt, samples = lib if side == "lib" else raw, array.array("d")
                    c0, r0, t0 = cpu(), resource.getrusage(resource.RUSAGE_SELF), t
                    for _ in range(block):  # bounded: block round trips
                        rt()
                        t1 = now()
                        samples.append(t1 - t)
                        t = t1
                    pairs.block(side, t0, t, cpu() - c0, r0, resource.getrusage(resource.RUSAGE_SELF), samples)
            return pairs.result()
        finally:
            close_raw()
    finally:
        close_lib()


class Pairs:
    """--paired: blocks of the library and of its raw twin, alternating; what they cost, pair by pair.

    A pair counts when both its blocks lie inside the window; its round trips' latencies are kept
    (at most MAX_SAMPLES per side) and its CPU difference is one sample of the paired figure.
    """

    def __init__(self, ws: float, we: float) -> None:
        self.ws, self.we = ws, we
        self.n = 0  # pairs started (in or out of the window)
        self.sides: dict[str, list[tuple[float, float, float, int]]] = {"lib": [], "raw": []}
        self.samples = {"lib": array.array("d"), "raw": array.array("d")}
        self.current: dict[str, tuple[tuple[float, float, float, int], Any]] = {}
        self.diffs: list[float] = []
        self.t0 = self.t1 = 0.0

    def order(self) -> tuple[str, str]:
        """The sides of the next pair: the library first in odd pairs, the raw socket first in even ones."""
        self.n += 1
        self.current = {}
        return ("lib", "raw") if self.n % 2 else ("raw", "lib")

    def block(self, side: str, t0: float, t1: float, cpu_ns: int, r0: Any, r1: Any, samples: Any) -> None:
        """One block of round trips (``samples``: their latencies) from ``t0`` to ``t1``."""
        if not (self.ws <= t0 and t1 <= self.we):
            self.current = {}  # the pair is cut by the window's edge: not counted
            return
        n = len(samples)
        self.current[side] = ((cpu_ns / n / 1e3, (r1.ru_utime - r0.ru_utime) / n * 1e6,
                               (r1.ru_stime - r0.ru_stime) / n * 1e6, n), samples)
        if len(self.current) < 2:
            if not self.diffs:
                self.t0 = t0
            return
        self.t1 = t1
        for k, (figures, kept) in self.current.items():
            self.sides[k].append(figures)
            if len(self.samples[k]) < MAX_SAMPLES:
                self.samples[k].extend(kept)
        self.diffs.append(self.current["lib"][0][0] - self.current["raw"][0][0])
        self.current = {}

    def result(self) -> dict[str, Any]:
        if not self.diffs:
            return {"completed": 0, "error": "no pair of blocks completed inside the window"}
        lib, raw = self.sides["lib"], self.sides["raw"]
        d = sorted(self.diffs)
        out = {
            "completed": sum(b[3] for b in lib) + sum(b[3] for b in raw), "window_s": self.t1 - self.t0,
            "pairs": len(d), "block": lib[0][3],
            "extra_cpu_us": _median(d), "extra_cpu_p25_us": _quantile(d, 0.25), "extra_cpu_p75_us": _quantile(d, 0.75),
            "extra_cpu_min_us": d[0], "extra_cpu_max_us": d[-1],
            "client_cpu_us": _median(sorted(b[0] for b in lib)), "raw_cpu_us": _median(sorted(b[0] for b in raw)),
            "client_user_us": _median(sorted(b[1] for b in lib)), "client_sys_us": _median(sorted(b[2] for b in lib)),
            "raw_user_us": _median(sorted(b[1] for b in raw)), "raw_sys_us": _median(sorted(b[2] for b in raw)),
        }
        out.update(_percentiles(self.samples["lib"]))
        out["raw_p50_us"] = _percentiles(self.samples["raw"])["p50_us"]
        return out


def _median(ordered: list[float]) -> float:
    return _quantile(ordered, 0.5)


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between the two nearest ranks of a sorted list."""
    at = q * (len(ordered) - 1)
    lo = int(at)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (at - lo)


def _percentiles(samples: Any) -> dict[str, float]:
    ordered = sorted(samples)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6

    return {"p50_us": pct(0.50), "p99_us": pct(0.99), "p999_us": pct(0.999), "max_us": ordered[-1] * 1e6,
            "mean_us": sum(ordered) / len(ordered) * 1e6, "samples": len(ordered)}


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
        switches = (self.ru1.ru_nvcsw - self.ru0.ru_nvcsw) + (self.ru1.ru_nivcsw - self.ru0.ru_nivcsw)
        return {
            "completed": n, "window_s": self.t1 - self.t0, **_percentiles(self.samples),
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

    async def paired() -> dict[str, Any]:
        lib, close_lib = await trio_round_trip(a)
        try:
            raw, close_raw = await trio_round_trip(_twin(a))
            try:
                for _ in range(WARMUP):
                    await lib()
                    await raw()
                start, stop, ws, we = await trio.to_thread.run_sync(ready_and_go)
                pairs = Pairs(ws, we)
                now, cpu, block = time.monotonic, time.process_time_ns, a.block
                t = now()
                while t < stop:
                    for side in pairs.order():
                        rt, samples = lib if side == "lib" else raw, array.array("d")
                        c0, r0, t0 = cpu(), resource.getrusage(resource.RUSAGE_SELF), t
                        for _ in range(block):  # bounded: block round trips
                            await rt()
                            t1 = now()
                            samples.append(t1 - t)
                            t = t1
                        pairs.block(side, t0, t, cpu() - c0, r0, resource.getrusage(resource.RUSAGE_SELF), samples)
                return pairs.result()
            finally:
                await close_raw()
        finally:
            await close_lib()

    async def main() -> dict[str, Any]:
        if a.paired:
            return await paired()
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
    p.add_argument("--paired", action="store_true", help="kmux, kmux-trio: alternate blocks with the raw twin "
                   "(raw, raw-trio) in this process; report the paired difference of CPU per round trip")
    p.add_argument("--block", type=int, default=PAIR_BLOCK, help="--paired: round trips per block")
    p.add_argument("--count", type=int, default=0, help="run this many round trips between the marker calls, "
                   "then exit (for strace), instead of the timed protocol")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.api == "stream" and not (a.port or a.path) or a.api != "stream" and not (a.path and a.group):
        parser().error("--api stream needs --port or --path; the others need --path and --group")
    if a.paired and (a.api not in RAW_TWIN or a.count or not 0 < a.block <= MAX_BLOCK):
        parser().error(f"--paired is for --api {' or '.join(RAW_TWIN)}, without --count, "
                       f"with 0 < --block <= {MAX_BLOCK}")
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
