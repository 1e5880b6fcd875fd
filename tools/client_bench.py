"""Client library micro-benchmark: what one ``send``/``recv`` costs the app.

The peer is the scripted daemon (tests/integration/scripted.py) in its own
process, so the figures are the client's own per-message cost plus the
system calls, not kmuxd's. Each case runs ``--runs`` times and prints the
median of the client process's CPU time per message (``time.process_time``:
less sensitive than wall time to other work on a shared machine) and of
messages per second. Read ratios between runs on the same machine, never
absolutes.

    .venv/bin/python tools/client_bench.py [--count N] [--runs R] [--large]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

import kmux
import kmux.trio

ROOT = Path(__file__).resolve().parents[1]
SMALL = (60).to_bytes(4, "big") + b"x" * 60  # a 64-byte u32be message


class Clock:
    """Wall and CPU time of a measured loop of ``count`` operations."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def result(self, count: int) -> tuple[float, float]:
        """(CPU microseconds per operation, operations per second)."""
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return cpu / count * 1e6, count / wall


class Peer:
    def __init__(self, *args: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="kcb-", dir="/tmp")
        self.path = os.path.join(self.dir, "peer.sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.scripted", self.path, *args],
                                     cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "ready\n"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def sync_send(count: int) -> tuple[float, float]:
    peer = Peer("--sink")
    try:
        with kmux.connect("bench", peer.path, receive=False) as c:
            clock = Clock()
            for _ in range(count):
                c.send(SMALL)
            return clock.result(count)
    finally:
        peer.close()


def sync_recv(count: int) -> tuple[float, float]:
    peer = Peer("--flood", str(count))
    try:
        with kmux.connect("bench", peer.path) as c:
            c.recv(timeout=10)
            clock = Clock()
            for _ in range(count - 1):
                c.recv(timeout=10)
            return clock.result(count - 1)
    finally:
        peer.close()


def trio_send(count: int) -> tuple[float, float]:
    async def main() -> tuple[float, float]:
        peer = Peer("--sink")
        try:
            c = await kmux.trio.connect("bench", peer.path, receive=False)
            async with c:
                clock = Clock()
                for _ in range(count):
                    await c.send(SMALL)
                return clock.result(count)
        finally:
            peer.close()

    return trio.run(main)


def trio_recv(count: int) -> tuple[float, float]:
    async def main() -> tuple[float, float]:
        peer = Peer("--flood", str(count))
        try:
            c = await kmux.trio.connect("bench", peer.path)
            async with c:
                await c.recv()
                clock = Clock()
                for _ in range(count - 1):
                    await c.recv()
                return clock.result(count - 1)
        finally:
            peer.close()

    return trio.run(main)


def sync_large(count: int, size: int = 1 << 20) -> tuple[float, float]:
    """Round trips of ``size``-byte messages (echoed): CPU µs and round trips per second."""
    peer = Peer("--max-message", str(size))
    message = (size - 4).to_bytes(4, "big") + os.urandom(size - 4)
    try:
        with kmux.connect("bench", peer.path) as c:
            clock = Clock()
            for _ in range(count):
                c.send(message)
                assert c.recv(timeout=10) == message
            return clock.result(count)
    finally:
        peer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--large", action="store_true", help="also 1 MiB echo round trips")
    parser.add_argument("--only", default="", help="comma-separated case names")
    args = parser.parse_args()
    cases = {"sync_send": sync_send, "sync_recv": sync_recv, "trio_send": trio_send, "trio_recv": trio_recv}
    if args.large:
        cases["sync_1MiB_echo"] = lambda n: sync_large(max(1, n // 1000))
    only = set(filter(None, args.only.split(",")))
    for name, fn in cases.items():
        if only and name not in only:
            continue
        results = [fn(args.count) for _ in range(args.runs)]
        cpu = statistics.median(r[0] for r in results)
        rate = statistics.median(r[1] for r in results)
        print(f"{name:16s} CPU {cpu:8.2f} µs/op   {rate:12,.0f} op/s   "
              f"(CPU runs {', '.join(f'{r[0]:.2f}' for r in results)})")


if __name__ == "__main__":
    main()
