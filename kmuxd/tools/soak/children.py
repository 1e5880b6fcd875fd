"""The soak's children and the daemon seen from outside: handles with bounded waits.

* :class:`BackendsProcess`: the chaos backends (:mod:`.backends`), one line
  per command and answer over its stdin and stdout;
* :class:`ClientProcess`: one client process (:mod:`.client`) and the
  session records it wrote;
* :class:`Monitor`: a thread sampling the daemon's RSS and open descriptors
  from ``/proc``;
* :func:`cli_groups`: ``kmux-cli groups -j``, run as an operator would.

Every wait is bounded (the constants below); a child that does not stop in
time is killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ..backend import LineReader

__all__ = ["SoakError", "BackendsProcess", "ClientProcess", "Monitor", "cli_groups", "proc_rss_kib", "proc_fds",
           "wait_for", "wait_settled", "COMMAND_TIMEOUT", "START_TIMEOUT"]

#: Seconds between the monitor's RSS/descriptor samples.
MONITOR_INTERVAL = 1.0
#: Seconds the backends may take to start (and kmuxd, and its groups to connect).
START_TIMEOUT = 15.0
#: Seconds a client process may run past its deadline (its last graceful session).
CLIENT_FINISH_GRACE = 45.0
#: A count is settled when it has not moved for this long (seconds).
SETTLE_QUIET = 0.5
#: Seconds one backend command or one control request may take.
COMMAND_TIMEOUT = 10.0
POLL = 0.05


class SoakError(RuntimeError):
    """The soak could not run (a child did not start, a wait for set-up timed out)."""


class BackendsProcess:
    """``python -m kmuxd.tools.soak.backends`` as a child: ports, commands, report."""

    def __init__(self, spec: dict[str, Any], log_path: Path) -> None:
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kmuxd.tools.soak.backends", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, start_new_session=True,
        )
        self._lines = LineReader(self.proc.stdout.fileno())
        self._lock = threading.Lock()
        self.ports: dict[tuple[str, int], int] = {}
        while True:
            line = self._readline(START_TIMEOUT)
            if line == "ready":
                return
            words = line.split()
            if len(words) != 4 or words[0] != "listening":
                raise SoakError(f"the backends said {line!r} while starting")
            self.ports[(words[1], int(words[2]))] = int(words[3])

    def _readline(self, timeout: float) -> str:
        try:
            line = self._lines.readline(timeout)
        except TimeoutError:
            raise SoakError(f"the backends did not answer within {timeout} s") from None
        if line is None:
            raise SoakError(f"the backends exited (status {self.proc.poll()}); see backends.log")
        return line

    def command(self, line: str) -> str:
        with self._lock:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
            return self._readline(COMMAND_TIMEOUT)

    def report(self) -> dict[str, Any]:
        answer = self.command("report")
        if not answer.startswith("report "):
            raise SoakError(f"the backends answered {answer[:200]!r} to report")
        return json.loads(answer[len("report "):])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
                self.proc.wait(COMMAND_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(COMMAND_TIMEOUT)
        self._log.close()


class ClientProcess:
    def __init__(self, proc: int, spec: dict[str, Any], run_dir: Path) -> None:
        self.number = proc
        self.result = Path(spec["result"])
        self._log = open(run_dir / f"client-{proc}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "kmuxd.tools.soak.client", json.dumps(spec)],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                     start_new_session=True)

    def wait(self, deadline: float) -> str | None:
        """Wait until ``deadline`` (monotonic); a problem description, or None if it finished."""
        try:
            rc = self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(COMMAND_TIMEOUT)
            return f"client process {self.number} still running {CLIENT_FINISH_GRACE} s after the deadline; killed"
        finally:
            self._log.close()
        return None if rc == 0 else f"client process {self.number} exited with status {rc}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(COMMAND_TIMEOUT)

    def sessions(self) -> tuple[list[dict[str, Any]], bool]:
        """Its session records, and whether it wrote its final line."""
        sessions, done = [], False
        try:
            text = self.result.read_text()
        except OSError:
            return [], False
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if rec.get("done"):
                done = True
            elif "session" in rec:
                sessions.append(rec)
        return sessions, done


# -- the daemon from outside ---------------------------------------------------------


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def proc_fds(pid: int) -> Counter:
    """Open descriptors by kind (``socket``, ``pipe``, ``anon_inode:[eventpoll]``, or a path)."""
    kinds: Counter = Counter()
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            target = os.readlink(f"{base}/{name}")
        except OSError:
            continue  # closed meanwhile
        kinds[target.split(":[")[0] if target.startswith(("socket:", "pipe:")) else target] += 1
    return kinds


def wait_for(pred: Callable[[], Any], timeout: float, interval: float = POLL) -> Any:
    """``pred()`` once truthy, else its last value after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_settled(read: Callable[[], Any], timeout: float) -> tuple[Any, bool]:
    """``read()`` once it has not changed for :data:`SETTLE_QUIET` s; (value, settled)."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(POLL)
        value = read()
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= SETTLE_QUIET:
            return value, True
    return last, False


def cli_groups(control: str) -> list[dict[str, Any]]:
    """``kmux-cli --control PATH groups -j``, the operator's view, parsed."""
    script = Path(sys.executable).with_name("kmux-cli")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "kmuxd.cli.main"]
    done = subprocess.run([*cmd, "--control", control, "groups", "-j"], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT)
    if done.returncode != 0:
        raise SoakError(f"kmux-cli groups -j exited {done.returncode}: {done.stderr.strip()}")
    return json.loads(done.stdout)


class Monitor:
    """A thread sampling the daemon's RSS and descriptors every :data:`MONITOR_INTERVAL` s."""

    def __init__(self, pid: int, warmup: float) -> None:
        self.pid = pid
        self.warmup = warmup
        self.t0 = time.monotonic()
        self.rss_after_warmup: int | None = None
        self.peak_rss = self.peak_fds = 0
        self.samples: list[tuple[float, int, int]] = []
        self.died_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL):
            t = time.monotonic() - self.t0
            try:
                rss, fds = proc_rss_kib(self.pid), sum(proc_fds(self.pid).values())
            except OSError:
                self.died_at = t
                return
            self.samples.append((round(t, 1), rss, fds))
            self.peak_rss, self.peak_fds = max(self.peak_rss, rss), max(self.peak_fds, fds)
            if self.rss_after_warmup is None and t >= self.warmup:
                self.rss_after_warmup = rss

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(MONITOR_INTERVAL * 5)
