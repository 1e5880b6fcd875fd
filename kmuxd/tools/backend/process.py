"""The caller's side of ``python -m kmuxd.tools.backend``: start it, mark, stop, read its report.

Theory of operation
-------------------
The demo and the benchmark run the counting backend (:mod:`.counting`) as a
child process of their own, so that its CPU is measured apart from
theirs: :class:`BackendProcess` starts it on an ephemeral port, reads
``listening PORT`` from its stdout, asks for ``mark`` snapshots of its
totals over its stdin, and stops it with SIGTERM, after which it writes a
JSON report. :class:`LineReader` reads the child's lines with a timeout
(the soak's children use it too); :func:`stop_children` is the clean-up
that leaves nothing running, whatever happened.

Bounds: :data:`START_TIMEOUT`, :data:`STOP_TIMEOUT`, :data:`CONTROL_TIMEOUT`.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..lifeline import preexec
from .counting import DEFAULT_MAX_MESSAGE

__all__ = ["BackendProcess", "LineReader", "stop_children"]

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
    It dies with the caller's thread if the caller is killed outright
    (:mod:`kmuxd.tools.lifeline`): construct it from a thread that outlives it.
    """

    def __init__(self, mode: str, framing: str = "u32be", *, report: str | Path, stderr=None,
                 max_message: int = DEFAULT_MAX_MESSAGE, cpu: int | None = None) -> None:
        self.report_path = Path(report)
        self.report_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "kmuxd.tools.backend", "--port", "0", "--framing", framing, "--mode", mode,
               "--max-message", str(max_message), "--report", str(self.report_path), "--control"]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True,
            preexec_fn=preexec(cpu),
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
