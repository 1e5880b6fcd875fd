"""``python -m kmuxd.tools.backend``: the demo's and the benchmark's service, counting what it gets.

    python -m kmuxd.tools.backend --port 0 --framing u32be --mode echo|sink [--report FILE] [--control]

It stands in for "the group's service": it accepts TCP connections on
127.0.0.1, cuts each byte stream into messages with the group's framing
(the same rule kmuxd uses) and counts messages and bytes per connection.
``echo`` writes every complete frame back on the connection it came from;
``sink`` only counts. Both are :class:`~.protocols.Counting` on one
:class:`~.loop.Loop` in this process's main thread, so the benchmark can
measure this process's CPU apart from everything else.

Interface for callers (:class:`~.process.BackendProcess` speaks it)
-------------------------------------------------------------------
* stdout: ``listening PORT`` once the socket listens (use ``--port 0`` and
  read the port); then one line per control command.
* stdin (``--control``, one command per line): ``mark`` answers
  ``mark MSGS BYTES MONOTONIC CPU_SECONDS``, a snapshot of the totals, so a
  caller can measure exactly the window it wants; ``stop`` stops.
* SIGTERM/SIGINT: drain what is readable, then print (or write to
  ``--report``) a JSON summary ``{connections: [{peer, msgs, bytes}],
  total_msgs, total_bytes}`` and exit 0.

Error handling: a connection whose stream breaks the framing (bad header,
frame over ``--max-message``) is counted as an error and closed; the other
connections go on.
"""

from __future__ import annotations

import argparse
import os
import json
import signal
import sys
import time
from typing import Any

from kmux.errors import KmuxError
from kmux.framing import Framing

from .loop import Conn, Loop
from .protocols import Counting

__all__ = ["CountingBackend", "DEFAULT_MAX_MESSAGE", "main"]

#: Default largest frame accepted from a peer.
DEFAULT_MAX_MESSAGE = 1024 * 1024


class CountingBackend:
    """One listener whose connections are counted (and echoed), plus the stdin control channel."""

    def __init__(self, framing: Framing, mode: str, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        if mode not in ("echo", "sink"):
            raise ValueError(f"mode must be 'echo' or 'sink', not {mode!r}")
        self.framing = framing
        self.mode = mode
        self.max_message = max_message
        self.loop = Loop()
        self.counted: list[tuple[Conn, Counting]] = []  # every connection ever accepted, for the report
        self._control_buf = b""

    def listen(self, port: int) -> int:
        listener = self.loop.listen(self._protocol, port=port, framing=self.framing, max_message=self.max_message)
        return listener.port

    def _protocol(self, conn: Conn) -> Counting:
        counting = Counting(conn, echo=self.mode == "echo")
        self.counted.append((conn, counting))
        return counting

    def watch_control(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.loop.watch(fd, lambda: self._control(fd))

    def _control(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        if not chunk:  # the caller closed our stdin: stop watching it
            self.loop.unwatch(fd)
            return
        self._control_buf += chunk
        while b"\n" in self._control_buf:
            line, self._control_buf = self._control_buf.split(b"\n", 1)
            cmd = line.strip().decode(errors="replace")
            if cmd == "mark":
                t = os.times()
                msgs, nbytes = self.totals()
                _say(f"mark {msgs} {nbytes} {time.monotonic():.6f} {t.user + t.system:.4f}")
            elif cmd == "stop":
                self.loop.stop_requested = True
            elif cmd:
                _say(f"error unknown command {cmd!r}")

    def totals(self) -> tuple[int, int]:
        return sum(p.msgs for _, p in self.counted), sum(c.bytes_in for c, _ in self.counted)

    def report(self) -> dict[str, Any]:
        msgs, nbytes = self.totals()
        return {
            "mode": self.mode,
            "framing": self.framing.name,
            "connections": [
                {"peer": f"{c.peer[0]}:{c.peer[1]}", "peer_port": c.peer[1], "msgs": p.msgs, "bytes": c.bytes_in,
                 "error": p.error}
                for c, p in self.counted
            ],
            "total_msgs": msgs,
            "total_bytes": nbytes,
            "errors": sum(p.error is not None for _, p in self.counted),
        }


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kmuxd.tools.backend", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--framing", default="u32be", help="framing preset (u32be, u16be, varint, ...)")
    parser.add_argument("--mode", choices=("echo", "sink"), default="echo")
    parser.add_argument("--max-message", type=int, default=DEFAULT_MAX_MESSAGE, help="largest frame accepted")
    parser.add_argument("--report", help="write the JSON summary here instead of stdout")
    parser.add_argument("--control", action="store_true", help="read 'mark'/'stop' commands on stdin")
    args = parser.parse_args(argv)
    try:
        framing = Framing.from_spec(args.framing)
    except KmuxError as exc:
        parser.error(exc.message)

    backend = CountingBackend(framing, args.mode, args.max_message)

    def request_stop(signum, frame) -> None:
        backend.loop.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        port = backend.listen(args.port)
        if args.control:
            backend.watch_control(sys.stdin.fileno())
        _say(f"listening {port}")
        backend.loop.run()
        for c, p in backend.counted:
            if p.error:
                print(f"backend: connection from port {c.peer[1]} closed: {p.error}", file=sys.stderr)
        summary = json.dumps(backend.report())
        if args.report:
            tmp = args.report + ".tmp"
            with open(tmp, "w") as f:
                f.write(summary + "\n")
            os.replace(tmp, args.report)  # readers never see half a report
        else:
            _say(summary)
    finally:
        backend.loop.close()
    return 0
