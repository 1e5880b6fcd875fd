"""A kmux app whose system calls a test counts: one scenario between two marker calls, run under strace.

    python tests/integration/syscall_app.py SOCKET GROUP sync|trio SCENARIO N SIZE

The test (``test_client_fast_lane.py``) runs this program under ``strace -f``
with :func:`kmuxd.tools.bench.syscalls.count`, which counts only what
happens between the marker calls (:func:`kmuxd.tools.bench.syscalls.mark`),
so start-up, imports and the warm-up are not counted. Scenarios, each
against an echo group whose messages are ``u32be`` frames of SIZE bytes:

* ``rr``: N round trips, ``recv()`` without a timeout;
* ``rr-timeout``: N round trips, ``recv(timeout=5)`` (trio: ``fail_after(5)``);
* ``waiting``: N requests sent and their N answers queued in the socket
  before the marker; then N receives, each finding its message waiting;
* ``timeout``: a ``recv(timeout=0.3)`` that times out, then a round trip
  whose ``recv(timeout=0.3)`` does not (N is ignored).

Prints one JSON line: ``{"ok": true, ...}`` with what the test checks
besides the counts (how long the timeout took, statistics), or
``{"ok": false, "error": ...}``. Every wait is bounded.
"""

from __future__ import annotations

import array
import fcntl
import json
import sys
import termios
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import kmux  # noqa: E402
from kmuxd.tools.bench.syscalls import MARK_BEGIN, MARK_END, mark  # noqa: E402

#: Round trips before the marker (the first receive sets the socket's timeout).
WARMUP = 20
TIMEOUT = 5.0
SHORT_TIMEOUT = 0.3
#: Seconds to wait for answers to be queued (``waiting``).
QUEUE_WAIT = 10.0


def frame(size: int, i: int) -> bytes:
    body = i.to_bytes(4, "big") * ((size - 4) // 4) + b"x" * ((size - 4) % 4)
    return (size - 4).to_bytes(4, "big") + body


def queued(fd: int) -> int:
    """Bytes of packets queued in the socket (SIOCINQ: every packet's, on SEQPACKET)."""
    out = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, out, True)
    return out[0]


def wait_queued(fd: int, want: int) -> None:
    deadline = time.monotonic() + QUEUE_WAIT
    while queued(fd) < want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {queued(fd)} of {want} bytes of answers queued")
        time.sleep(0.005)


def run_sync(path: str, group: str, scenario: str, n: int, size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with kmux.connect(group, path) as c:
        timeout = None if scenario == "rr" else SHORT_TIMEOUT if scenario == "timeout" else TIMEOUT
        for i in range(WARMUP):
            c.send(frame(size, i))
            assert c.recv(timeout) == frame(size, i)
        if scenario == "waiting":
            for i in range(n):
                c.send(frame(size, i))
            wait_queued(c.fileno(), n * (1 + size))
        mark(MARK_BEGIN)
        if scenario == "timeout":
            t0 = time.monotonic()
            try:
                c.recv(timeout)
                out["timed_out"] = False
            except TimeoutError:
                out["timed_out"] = True
            out["waited"] = time.monotonic() - t0
            c.send(frame(size, 1))
            out["then"] = c.recv(timeout) == frame(size, 1)
        elif scenario == "waiting":
            out["all"] = all(c.recv(timeout) == frame(size, i) for i in range(n))
        else:
            for i in range(n):
                c.send(frame(size, i))
                if c.recv(timeout) != frame(size, i):
                    raise AssertionError(f"round trip {i} got another message")
        mark(MARK_END)
        out["continued_received"] = c.statistics().continued_received
    return out


def run_trio(path: str, group: str, scenario: str, n: int, size: int) -> dict[str, Any]:
    import trio

    import kmux.trio

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        timeout = None if scenario == "rr" else SHORT_TIMEOUT if scenario == "timeout" else TIMEOUT
        c = await kmux.trio.connect(group, path)

        async def recv() -> bytes:
            if timeout is None:
                return await c.recv()
            with trio.fail_after(timeout):
                return await c.recv()

        async with c:
            for i in range(WARMUP):
                await c.send(frame(size, i))
                assert await recv() == frame(size, i)
            if scenario == "waiting":
                for i in range(n):
                    await c.send(frame(size, i))
                wait_queued(c.fileno(), n * (1 + size))
            mark(MARK_BEGIN)
            if scenario == "timeout":
                t0 = time.monotonic()
                try:
                    await recv()
                    out["timed_out"] = False
                except trio.TooSlowError:
                    out["timed_out"] = True
                out["waited"] = time.monotonic() - t0
                await c.send(frame(size, 1))
                out["then"] = await recv() == frame(size, 1)
            elif scenario == "waiting":
                out["all"] = all([await recv() == frame(size, i) for i in range(n)])
            else:
                for i in range(n):
                    await c.send(frame(size, i))
                    if await recv() != frame(size, i):
                        raise AssertionError(f"round trip {i} got another message")
            mark(MARK_END)
            out["continued_received"] = c.statistics().continued_received
        return out

    return trio.run(main)


def main() -> int:
    path, group, transport, scenario, n, size = sys.argv[1:7]
    run = run_trio if transport == "trio" else run_sync
    try:
        out = run(path, group, scenario, int(n), int(size))
    except Exception as exc:  # noqa: BLE001 -- reported to the test, which fails with it
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps({"ok": True, **out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
