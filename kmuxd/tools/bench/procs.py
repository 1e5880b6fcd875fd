"""Measuring processes from outside, and running the bench's child processes.

Everything the benchmark knows about a proxy (kmuxd or a peer) comes from
``/proc``: CPU time is ``utime + stime`` of ``/proc/PID/stat`` (all threads of
the process), memory is ``VmRSS``/``VmHWM`` of ``/proc/PID/status``. The peak
(``VmHWM``) is reset before each cell by writing ``5`` to
``/proc/PID/clear_refs`` (Linux ≥ 4.0, owner or root), so each cell's peak is
its own; when the kernel refuses, the peak is the process's lifetime peak
and :func:`reset_peak_rss` says so.

Children run in their own session (a Ctrl-C reaches only the bench, which
then stops them in order) and die with the bench if it is killed outright
(:mod:`kmuxd.tools.lifeline`), with their output in files under the run
directory. :class:`Child` is the one wrapper; :class:`LoadGen` speaks the
load generator's line protocol (``ready``, ``go ...``, one JSON result).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..backend import LineReader
from ..lifeline import preexec

#: Clock ticks per second of /proc's CPU times.
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Open files the bench asks for (10,000 idle clients, with room to spare);
#: the daemon child inherits it.
WANT_NOFILE = 65536
#: Seconds a child may take to say it is ready / to stop.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
#: Seconds past a cell's end a load generator may take to print its result.
RESULT_TIMEOUT = 30.0
#: Directories holding binaries a non-root PATH may lack.
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


# -- /proc ------------------------------------------------------------------------------


def _schedstat_works() -> bool:
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat") as f:
            return int(f.read().split()[0]) > 0
    except (OSError, IndexError, ValueError):
        return False


#: Where CPU times come from: each thread's ``schedstat`` (the scheduler's
#: nanosecond on-CPU time) when the kernel has it, else ``stat``'s utime +
#: stime in clock ticks. A figure is only as fine as its clock (workloads.cpu_per).
CPU_CLOCK = "schedstat" if _schedstat_works() else "ticks"
#: The smallest CPU time the clock can tell from zero, in seconds.
CPU_RESOLUTION_S = 1e-6 if CPU_CLOCK == "schedstat" else 1 / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """On-CPU time of a process's threads (:data:`CPU_CLOCK`); 0.0 if it is gone.

    schedstat counts live threads only: a thread that exited took its time
    with it (the daemons measured here keep theirs)."""
    if CPU_CLOCK == "schedstat":
        total = 0
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return 0.0
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                continue  # the thread exited meanwhile
        return total / 1e9
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def process_tree(pid: int) -> list[int]:
    """A process and its children (the load generator forks one per flood client)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid, *(int(c) for c in f.read().split())]
    except (OSError, ValueError):
        return [pid]


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM); 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS; False if the kernel refused (peak is then lifetime)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def system_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    steal = fields[7] if len(fields) > 7 else 0
    return (sum(fields[:8]) - idle - steal) / CLK_TCK, steal / CLK_TCK


def busy_cpus(seconds: float) -> float:
    """CPUs' worth of work the machine did over the next ``seconds`` (2.0 = both cores busy)."""
    a = system_cpu()[0]
    time.sleep(seconds)
    return (system_cpu()[0] - a) / seconds


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (what ``taskset -a -p`` does)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass  # the thread just ended


def raise_nofile(want: int = WANT_NOFILE) -> int:
    """Raise RLIMIT_NOFILE for us and our children; root may raise the hard limit too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": model,
            "kernel": platform.release(), "python": platform.python_version()}


# -- finding and building things ------------------------------------------------------------


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    return None


def build_c(source: Path, out: Path) -> tuple[Path | None, str]:
    """Compile one C file with the system compiler: (binary, "") or (None, why not)."""
    cc = os.environ.get("CC") or find_binary("cc") or find_binary("gcc")
    if cc is None:
        return None, "no C compiler (install gcc)"
    proc = subprocess.run([cc, "-O2", "-o", str(out), str(source)], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"{Path(cc).name} failed on {source.name}: {proc.stderr.strip()[:400]}"
    return out, ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- children -------------------------------------------------------------------------------


class Child:
    """A subprocess with its stderr (and stdout unless piped) in ``log``; stop() always ends it."""

    def __init__(self, name: str, argv: list[str], log: Path, *, pipe_stdout: bool = False,
                 pipe_stdin: bool = False, cpu: int | None = None) -> None:
        self.name = name
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if pipe_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe_stdout else self._log, stderr=self._log, start_new_session=True,
            preexec_fn=preexec(cpu),
        )
        self.lines = LineReader(self.proc.stdout.fileno()) if pipe_stdout else None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self, timeout: float) -> str:
        try:
            line = self.lines.readline(timeout)
        except TimeoutError:
            raise RuntimeError(f"{self.name}: no answer within {timeout} s\n{self.log_tail()}") from None
        if line is None:
            raise RuntimeError(f"{self.name} exited (status {self.proc.poll()})\n{self.log_tail()}")
        return line

    def expect(self, prefix: str, timeout: float = START_TIMEOUT) -> str:
        line = self.readline(timeout)
        if not line.startswith(prefix):
            raise RuntimeError(f"{self.name}: expected {prefix!r}, got {line!r}\n{self.log_tail()}")
        return line

    def log_tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to its process group; SIGKILL if it is not gone within STOP_TIMEOUT."""
        if not self._signal(signal.SIGTERM):
            self.kill()
        self._close()

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        self._close()

    def _signal(self, sig: int) -> bool:
        """Signal the child's session (its own children too) and wait; False if it outlived the wait."""
        if self.proc.poll() is not None:
            return True
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._log.close()


class LoadGen(Child):
    """One run of a load generator: connect, ``go``, one JSON result.

    The C load generator (``loadgen.c``), or the Python app client
    (:mod:`.appclient`, :meth:`python`), which speaks the same protocol.
    """

    def __init__(self, binary: Path, mode: str, args: list[str], log: Path, *, cpu: int | None = None,
                 argv: list[str] | None = None) -> None:
        super().__init__(f"loadgen {mode}", argv or [str(binary), mode, *map(str, args)], log, pipe_stdout=True,
                         pipe_stdin=True, cpu=cpu)

    @classmethod
    def python(cls, args: list[Any], log: Path, *, cpu: int | None = None) -> "LoadGen":
        """The Python app client (``python -m kmuxd.tools.bench.appclient ARGS``)."""
        return cls(Path(sys.executable), "appclient", [], log, cpu=cpu, argv=appclient_argv(args))

    def wait_ready(self) -> None:
        self.expect("ready")

    def go(self, start: float, stop: float, ws: float, we: float) -> None:
        self.proc.stdin.write(f"go {start:.6f} {stop:.6f} {ws:.6f} {we:.6f}\n".encode())
        self.proc.stdin.flush()

    def result(self, timeout: float = RESULT_TIMEOUT) -> dict[str, Any]:
        line = self.readline(timeout)
        try:
            out = json.loads(line)
        except ValueError:
            raise RuntimeError(f"{self.name}: not a result: {line!r}\n{self.log_tail()}") from None
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        out["exit_status"] = self.proc.poll()
        if out["exit_status"] != 0:
            out["error"] = self.log_tail()
        self.stop()
        return out


def appclient_argv(args: list[Any]) -> list[str]:
    return [sys.executable, "-m", "kmuxd.tools.bench.appclient", *map(str, args)]


def sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)
