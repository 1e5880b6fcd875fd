"""Counting the system calls of N round trips, with strace or perf.

:func:`count` runs a command (an :mod:`.appclient` with ``--count N``) under
``strace -f`` and counts the calls its threads made between the two marker
calls (:func:`mark` of :data:`MARK_BEGIN`, then of :data:`MARK_END`): the round
trips, and nothing of start-up, imports or exit. Counts do not depend on how
busy the machine is, so they make robust test bounds (timings under strace
do not mean anything, and are not used).

strace stops the process at every call, so the peer answers sooner than it
would in real time: a client that tries to read before its answer is there
finds it there more often under strace. For the benchmark's figures
:func:`per_round_trip` therefore prefers ``perf stat`` (the kernel counts
syscall tracepoints, the process is not stopped): it counts two whole runs,
of N and 3N round trips, and divides the difference by 2N, so start-up
cancels out. Without a usable perf (not root, or no tracepoints) it falls
back to strace and says so.

A call that failed is counted under its name and again under
``name:ERRNO`` (``recvmsg:EAGAIN``): an ``EAGAIN`` receive is work that
found nothing. Calls strace reports as interrupted and resumed are counted
once. ``all`` counts every call.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from .procs import find_binary

__all__ = ["available", "count", "mark", "per_round_trip", "perf_usable", "SyscallCounts", "MARK_BEGIN", "MARK_END"]

#: The marker system calls around the counted round trips: a ``stat`` of paths that do not exist.
MARK_BEGIN = "/kmux-bench-syscalls-begin"
MARK_END = "/kmux-bench-syscalls-end"


def mark(path: str) -> None:
    """A system call strace shows with ``path`` in it, and nothing else."""
    try:
        os.stat(path)
    except OSError:
        pass

#: Most seconds a counted run may take (strace slows a process many times).
RUN_TIMEOUT = 120.0
#: The calls perf counts, one tracepoint each (every other call is in ``all``).
PERF_CALLS = ("sendto", "sendmsg", "recvfrom", "recvmsg", "poll", "ppoll", "select", "pselect6", "epoll_wait",
              "epoll_pwait", "epoll_ctl", "setsockopt", "futex")
#: Receives counted again when they fail with EAGAIN (perf: a filter on the exit tracepoint).
PERF_EAGAIN = ("recvfrom", "recvmsg")
_EAGAIN = 11
#: ``PID name(args) = result`` or ``PID <... name resumed>... = result``.
_LINE = re.compile(r"^(?:\[pid\s+)?\d+\]?\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()")
_ERRNO = re.compile(r"= -1 (E[A-Z0-9]+)")


class SyscallCounts(dict):
    """``{syscall: calls}`` of the counted round trips; :meth:`per` divides by their number.
    ``stdout``: what the counted program printed."""

    stdout = ""

    def per(self, n: int) -> dict[str, float]:
        return {name: calls / n for name, calls in sorted(self.items())}

    def calls(self, *names: str) -> int:
        """Calls of any of ``names`` (``recv*`` matches every name that starts with ``recv``)."""
        return sum(v for k, v in self.items() if ":" not in k and any(
            k.startswith(n[:-1]) if n.endswith("*") else k == n for n in names))

    def failed(self, errno_name: str, *names: str) -> int:
        """Calls of ``names`` (any call if none) that failed with ``errno_name`` (``EAGAIN``)."""
        return sum(v for k, v in self.items() if k.endswith(":" + errno_name)
                   and (not names or k.partition(":")[0] in names))


def available() -> str | None:
    """None if strace can count here, else why not."""
    if find_binary("strace") is None:
        return "strace is not installed"
    return None


def count(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT) -> SyscallCounts:
    """Run ``argv`` under ``strace -f``; the calls between the markers. RuntimeError if the run failed."""
    strace = find_binary("strace")
    if strace is None:
        raise RuntimeError("strace is not installed")
    with tempfile.TemporaryDirectory(prefix="kmux-strace-") as d:
        out = Path(d) / "trace"
        proc = subprocess.run([strace, "-f", "-qq", "-o", str(out), *argv], capture_output=True, text=True,
                              timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:4])}... exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
        counts = parse(out.read_text(errors="replace"))
        counts.stdout = proc.stdout
        return counts


def parse(trace: str) -> SyscallCounts:
    counts: Counter[str] = Counter()
    inside = False
    for line in trace.splitlines():
        if MARK_BEGIN in line:
            inside = True
            continue
        if MARK_END in line:
            if not inside:
                break
            return SyscallCounts(counts)
        if not inside:
            continue
        m = _LINE.match(line)
        if m is None or line.endswith("<unfinished ...>"):
            continue  # a signal, an exit line; or counted when it resumes
        name = m.group(1) or m.group(2)
        counts[name] += 1
        err = _ERRNO.search(line)
        if err:
            counts[f"{name}:{err.group(1)}"] += 1
    raise RuntimeError("the trace does not hold both marker calls")


# -- perf: whole runs, by difference --------------------------------------------------------------

_perf_checked: str | None | bool = False


def perf_usable() -> str | None:
    """None if ``perf stat`` can count syscall tracepoints here, else why not (checked once)."""
    global _perf_checked
    if _perf_checked is False:
        perf = find_binary("perf")
        if perf is None:
            _perf_checked = "perf is not installed"
        else:
            probe = subprocess.run([perf, "stat", "-x,", "-e", "syscalls:sys_enter_getpid", "--", "true"],
                                   capture_output=True, text=True)
            ok = probe.returncode == 0 and "syscalls:sys_enter_getpid" in probe.stderr \
                and "<not supported>" not in probe.stderr
            _perf_checked = None if ok else f"perf cannot count syscall tracepoints here: {probe.stderr.strip()[-200:]}"
    return _perf_checked  # type: ignore[return-value]


def count_perf(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT) -> SyscallCounts:
    """Every call ``argv`` made, counted by perf (not only between the markers)."""
    events = ["-e", "raw_syscalls:sys_enter"]
    for name in PERF_CALLS:
        events += ["-e", f"syscalls:sys_enter_{name}"]
    for name in PERF_EAGAIN:
        events += ["-e", f"syscalls:sys_exit_{name}", "--filter", f"ret == -{_EAGAIN}"]
    perf = find_binary("perf") or "perf"
    proc = subprocess.run([perf, "stat", "-x,", *events, "--", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}... under perf exited {proc.returncode}: {proc.stderr[-1500:]}")
    counts = SyscallCounts()
    for line in proc.stderr.splitlines():
        fields = line.split(",")
        if len(fields) < 3 or not fields[0].isdigit():
            continue
        event = fields[2]
        if event == "raw_syscalls:sys_enter":
            counts["all"] = int(fields[0])
        elif event.startswith("syscalls:sys_enter_"):
            counts[event.removeprefix("syscalls:sys_enter_")] = int(fields[0])
        elif event.startswith("syscalls:sys_exit_"):
            counts[event.removeprefix("syscalls:sys_exit_") + ":EAGAIN"] = int(fields[0])
    counts.stdout = proc.stdout
    return counts


def per_round_trip(argv: list[str], n: int, *, env: dict[str, str] | None = None) -> tuple[dict[str, float], str]:
    """System calls per round trip of ``argv`` (an appclient without ``--count``), and how they were counted.

    perf when usable (two runs, by difference), else strace (between the markers).
    """
    if perf_usable() is None:
        a = count_perf([*argv, "--count", str(n)], env=env)
        b = count_perf([*argv, "--count", str(3 * n)], env=env)
        return {k: max(0.0, (b[k] - a.get(k, 0)) / (2 * n)) for k in sorted(b)}, "perf"
    counts = count(argv + ["--count", str(n)], env=env)
    counts["all"] = sum(v for k, v in counts.items() if ":" not in k)
    return counts.per(n), "strace"
