"""A small, fast loopback TCP backend for the demo and the benchmark.

    python -m kmuxd.tools.backend --port 0 --framing u32be --mode echo|sink [--report FILE]

It stands in for "the group's service": it accepts TCP connections on
127.0.0.1, cuts each byte stream into messages with the group's framing
(:class:`kmux.framing.FrameDecoder`, the same rule kmuxd uses) and counts
messages and bytes per connection. ``echo`` writes every complete frame back
on the connection it came from; ``sink`` only counts.

Why it is built this way
------------------------
The benchmark measures kmuxd against apps writing straight to this process,
so the backend must never be the bottleneck. It follows the data-path rules
in PERF-NOTES: wait for readiness once (``selectors``), then drain each
socket with non-blocking ``recv_into`` a buffer allocated once, until
``BlockingIOError``; never one system call per message. Counting a run of
equal-sized frames (the benchmark's case) is done in C: the length field of
every frame in the run is checked with a strided slice comparison, so a
256 KiB read of 64-byte frames costs a handful of operations, not 4096
Python calls. Anything irregular falls back to ``FrameDecoder.split``.

Interface for callers
---------------------
* stdout: ``listening PORT`` once the socket listens (use ``--port 0`` and
  read the port); then one line per control command.
* stdin (optional control channel, one command per line): ``mark`` answers
  ``mark MSGS BYTES MONOTONIC CPU_SECONDS``, a snapshot of the totals, so a
  caller can measure exactly the window it wants.
* SIGTERM/SIGINT: drain what is readable, then print (or write to
  ``--report``) a JSON summary ``{connections: [{peer, msgs, bytes}],
  total_msgs, total_bytes}`` and exit 0.

Error handling: a connection whose stream breaks the framing (bad header,
frame over ``--max-message``) is counted as an error and closed; the other
connections go on.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kmux.errors import KmuxError
from kmux.framing import NEED_MORE, FrameDecoder, Framing

__all__ = ["Backend", "BackendProcess", "LineReader", "main"]

#: Bytes read per recv_into; the buffer has room for one max_message more,
#: so a partial frame always fits after compaction.
READ_BUFFER = 256 * 1024
#: recv_into calls on one connection per wake-up, so one busy connection
#: cannot starve the others (or the control channel).
MAX_READS_PER_WAKE = 64
#: Echo mode stops reading a connection while this many bytes wait to be
#: written back: TCP then pushes back on the sender, memory stays bounded.
ECHO_BACKLOG_LIMIT = 4 * 1024 * 1024
#: Seconds the event loop sleeps at most, so a stop request is seen promptly.
POLL_INTERVAL = 0.1
#: Rounds of the final drain after SIGTERM (each a non-blocking pass).
FINAL_DRAIN_ROUNDS = 50
#: A run must hold at least this many frames to take the strided fast path.
FAST_PATH_MIN_FRAMES = 4
#: Default largest frame accepted from a peer.
DEFAULT_MAX_MESSAGE = 1024 * 1024
LISTEN_BACKLOG = 1024


class _Conn:
    """One accepted TCP connection: its buffer, decoder and counters."""

    __slots__ = ("sock", "peer", "buf", "view", "head", "tail", "decoder", "msgs", "bytes", "out", "reading", "error")

    def __init__(self, sock: socket.socket, peer: Any, framing: Framing, max_message: int) -> None:
        self.sock = sock
        self.peer = peer
        self.buf = bytearray(READ_BUFFER + max_message)
        self.view = memoryview(self.buf)
        self.head = 0  # first byte not yet cut into a frame
        self.tail = 0  # end of received bytes
        self.decoder = FrameDecoder(framing, max_message)
        self.msgs = 0
        self.bytes = 0
        self.out = bytearray()  # echo mode: bytes waiting to be written back
        self.reading = True
        self.error: str | None = None


class Backend:
    """The event loop: one listener, many connections, an optional control pipe."""

    def __init__(self, framing: Framing, mode: str, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        if mode not in ("echo", "sink"):
            raise ValueError(f"mode must be 'echo' or 'sink', not {mode!r}")
        self.framing = framing
        self.mode = mode
        self.max_message = max_message
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.conns: list[_Conn] = []  # every connection ever accepted, for the report
        self.stop_requested = False
        self.errors = 0
        self._control_buf = b""
        # Strided fast path: only for a fixed length field (its bytes are the
        # same in every frame of equal size).
        self._field = (
            (framing.length_offset, framing.length_size) if framing.kind == "fixed" else None
        )

    # -- set-up ----------------------------------------------------------------

    def listen(self, port: int, host: str = "127.0.0.1") -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        self.listener = sock
        self.sel.register(sock, selectors.EVENT_READ, None)
        return sock.getsockname()[1]

    def watch_control(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.sel.register(fd, selectors.EVENT_READ, "control")

    # -- the loop ----------------------------------------------------------------

    def run(self) -> None:
        """Serve until :attr:`stop_requested`, then drain what is readable."""
        while not self.stop_requested:
            self._turn(POLL_INTERVAL)
        for _ in range(FINAL_DRAIN_ROUNDS):
            if not self._turn(0):
                break

    def _turn(self, timeout: float) -> bool:
        """One wait plus everything it found ready. True if anything was."""
        events = self.sel.select(timeout)
        for key, mask in events:
            data = key.data
            if data is None:
                self._accept()
            elif data == "control":
                self._control(key.fd)
            else:
                if mask & selectors.EVENT_WRITE:
                    self._write(data)
                if mask & selectors.EVENT_READ and data.reading:
                    self._read(data)
        return bool(events)

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    print(f"backend: accept: {exc}", file=sys.stderr)
                    return
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, peer, self.framing, self.max_message)
            self.conns.append(conn)
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, c: _Conn) -> None:
        recv_into = c.sock.recv_into
        size = len(c.buf)
        for _ in range(MAX_READS_PER_WAKE):
            try:
                n = recv_into(c.view[c.tail :])
            except BlockingIOError:
                return
            except OSError as exc:
                self._close(c, f"recv: {exc}")
                return
            if n == 0:
                self._close(c, None)
                return
            c.tail += n
            c.bytes += n
            try:
                consumed = self._count(c)
            except KmuxError as exc:
                self.errors += 1
                self._close(c, f"{exc.code}: {exc.message}")
                return
            if self.mode == "echo" and consumed > c.head:
                c.out += c.view[c.head : consumed]
            c.head = consumed
            if c.head == c.tail:
                c.head = c.tail = 0
            elif size - c.tail < READ_BUFFER:
                # Keep the partial frame; it is shorter than max_message.
                keep = c.tail - c.head
                c.buf[0:keep] = c.view[c.head : c.tail]
                c.head, c.tail = 0, keep
            if c.out:
                self._write(c)
                if len(c.out) > ECHO_BACKLOG_LIMIT:
                    c.reading = False  # resumed by _write once the peer reads
                    self._want(c, write=True)
                    return

    def _count(self, c: _Conn) -> int:
        """Count complete frames in ``buf[head:tail]``; return where they end."""
        buf, pos, end = c.buf, c.head, c.tail
        field = self._field
        if field is not None:
            length = self.framing.length_at(buf, pos, end)
            if length != NEED_MORE and 0 < length <= self.max_message:
                run = (end - pos) // length
                if run >= FAST_PATH_MIN_FRAMES:
                    offset, fsize = field
                    stop = pos + run * length
                    same = True
                    for j in range(pos + offset, pos + offset + fsize):
                        # Every frame's j-th header byte, in one C-level slice.
                        if buf[j:stop:length] != buf[j : j + 1] * run:
                            same = False
                            break
                    if same:
                        c.msgs += run
                        pos = stop
        ends, consumed, _ = c.decoder.split(buf, pos, end)
        c.msgs += len(ends)
        return consumed

    def _write(self, c: _Conn) -> None:
        while c.out:
            try:
                n = c.sock.send(c.out)
            except BlockingIOError:
                self._want(c, write=True)
                return
            except OSError as exc:
                self._close(c, f"send: {exc}")
                return
            del c.out[:n]
        c.reading = True
        self._want(c, write=False)

    def _want(self, c: _Conn, write: bool) -> None:
        if c.sock.fileno() < 0:
            return
        # Not reading: don't ask for EVENT_READ, or select would spin on it.
        events = (selectors.EVENT_READ if c.reading else 0) | (selectors.EVENT_WRITE if write else 0)
        if self.sel.get_key(c.sock).events != events:
            self.sel.modify(c.sock, events, c)

    def _close(self, c: _Conn, error: str | None) -> None:
        if c.sock.fileno() < 0:
            return
        c.error = error
        if error:
            print(f"backend: connection from port {c.peer[1]} closed: {error}", file=sys.stderr)
        self.sel.unregister(c.sock)
        c.sock.close()
        c.out.clear()

    def _control(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        if not chunk:  # the caller closed our stdin: stop watching it
            self.sel.unregister(fd)
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
                self.stop_requested = True
            elif cmd:
                _say(f"error unknown command {cmd!r}")

    # -- results -------------------------------------------------------------------

    def totals(self) -> tuple[int, int]:
        return sum(c.msgs for c in self.conns), sum(c.bytes for c in self.conns)

    def report(self) -> dict[str, Any]:
        msgs, nbytes = self.totals()
        return {
            "mode": self.mode,
            "framing": self.framing.name,
            "connections": [
                {"peer": f"{c.peer[0]}:{c.peer[1]}", "peer_port": c.peer[1], "msgs": c.msgs, "bytes": c.bytes,
                 "error": c.error}
                for c in self.conns
            ],
            "total_msgs": msgs,
            "total_bytes": nbytes,
            "errors": self.errors,
        }

    def close(self) -> None:
        for c in self.conns:
            if c.sock.fileno() >= 0:
                c.sock.close()
        if self.listener is not None:
            self.listener.close()
        self.sel.close()


# -- the caller's side: run the backend as a child process --------------------

#: Seconds a starting backend may take to print "listening PORT".
START_TIMEOUT = 10.0
#: Seconds a stopping backend may take to drain and write its report.
STOP_TIMEOUT = 10.0
#: Seconds to wait for the answer to one control command.
CONTROL_TIMEOUT = 5.0


class LineReader:
    """Read whole lines from a pipe with a timeout (select + os.read).

    A buffered file object's ``readline`` cannot be combined with ``select``
    (data may sit in its buffer, unseen by select), so this keeps its own.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = b""
        self.eof = False

    def readline(self, timeout: float) -> str | None:
        """The next line without its newline; None at EOF; TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if self.eof:
                if self._buf:
                    line, self._buf = self._buf, b""
                    return line.decode(errors="replace")
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                raise TimeoutError(f"no line within {timeout} s")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.eof = True
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")


class BackendProcess:
    """``python -m kmuxd.tools.backend`` as a child: start, mark, stop, report.

    The child gets its own session (process group) so a Ctrl-C in the
    caller's terminal reaches only the caller, which then stops the child in
    order: the report must be written after everything upstream has stopped.
    """

    def __init__(self, mode: str, framing: str = "u32be", *, report: str | Path, stderr=None,
                 max_message: int = DEFAULT_MAX_MESSAGE, cpu: int | None = None) -> None:
        self.report_path = Path(report)
        self.report_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "kmuxd.tools.backend", "--port", "0", "--framing", framing, "--mode", mode,
               "--max-message", str(max_message), "--report", str(self.report_path), "--control"]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None,
        )
        self.lines = LineReader(self.proc.stdout.fileno())
        self.port = 0
        try:
            line = self.lines.readline(START_TIMEOUT)
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"the backend did not start within {START_TIMEOUT} s") from None
        if not line or not line.startswith("listening "):
            self.kill()
            raise RuntimeError(f"the backend failed to start (said {line!r}); see its stderr")
        self.port = int(line.split()[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def mark(self) -> tuple[int, int, float, float]:
        """Snapshot of the totals: (msgs, bytes, monotonic time, backend CPU seconds)."""
        self.proc.stdin.write(b"mark\n")
        self.proc.stdin.flush()
        line = self.lines.readline(CONTROL_TIMEOUT)
        if not line or not line.startswith("mark "):
            raise RuntimeError(f"unexpected answer from the backend: {line!r}")
        _, msgs, nbytes, t, cpu = line.split()
        return int(msgs), int(nbytes), float(t), float(cpu)

    def stop(self) -> dict[str, Any]:
        """SIGTERM, wait (kill on timeout) and return the JSON report."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError(f"the backend did not stop within {STOP_TIMEOUT} s; killed") from None
        try:
            return json.loads(self.report_path.read_text())
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"no backend report at {self.report_path}: {exc}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def stop_children(*children: Any) -> None:
    """Clean-up for the demo and the benchmark: whatever happened, nothing we
    started outlives us. Children have ``proc``, ``stop()`` and ``kill()``;
    None entries (never started) are skipped."""
    for child in children:
        if child is not None and child.proc.poll() is None:
            try:
                child.stop()
            except RuntimeError:
                pass
            child.kill()


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

    backend = Backend(framing, args.mode, args.max_message)

    def request_stop(signum, frame) -> None:
        backend.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        port = backend.listen(args.port)
        if args.control:
            backend.watch_control(sys.stdin.fileno())
        _say(f"listening {port}")
        backend.run()
        summary = json.dumps(backend.report())
        if args.report:
            tmp = args.report + ".tmp"
            with open(tmp, "w") as f:
                f.write(summary + "\n")
            os.replace(tmp, args.report)  # readers never see half a report
        else:
            _say(summary)
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
