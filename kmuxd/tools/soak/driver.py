"""The soak driver: a real kmuxd, chaos backends and client processes, then the accounts.

Theory of operation
-------------------
1. **Set-up.** The chaos backends (:mod:`.backends`) start in one child
   process, two endpoints per group by default; kmuxd starts as another
   (``python -m kmuxd --config``, JSON logs in the run directory) with three
   groups: ``rr-id`` (``id`` steering with rewrite), ``rr-fifo`` (``fifo``)
   and ``oneway`` (``balance``, sinks). Once every connection is up, the
   daemon's open descriptors and RSS are the *baseline*.
2. **Traffic and chaos.** ``--clients`` client processes (:mod:`.client`) at
   a time run sessions, each process for a random lifetime
   (:data:`LIFETIME`), replaced as it exits until the run's deadline
   (``time.monotonic()`` is the same clock in every process on Linux, so each
   process is handed its deadline as a value).
   Meanwhile the backends' connections fail on their seeded plans, and this
   process takes endpoints down and up (:func:`outage_schedule`) and acts as
   an operator (:func:`operation_schedule`: ``reconnect``, ``drain``, and a
   ``reload`` that resizes a group and later sizes it back), all on seeded
   schedules; a thread samples the daemon's RSS and descriptors every
   :data:`MONITOR_INTERVAL` s.
3. **Calm.** For the last ``calm`` seconds no new fault starts and every
   endpoint is up, so the daemon must recover while clients still send.
4. **Accounts.** Once the clients have finished, the driver waits until the
   daemon is quiet (no client, every connection up, nothing queued or in
   flight), until the backends' counts stop moving, and until the
   descriptors are back to the baseline (each wait bounded); then it reads
   ``kmux-cli groups -j``, the backends' report and the clients' session
   records, and hands them to :func:`.checks.evaluate`.

Everything is bounded: process counts and the run time by
:class:`SoakSettings` limits, every wait by a named timeout below, every
child killed if it does not stop in time. The seed is printed first, so a
failing run's fault schedule and traffic plans can be repeated with
``--seed``; thread timing, of course, cannot.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from kmux.control import ControlClient
from kmux.errors import ConfigInvalid, KmuxError

from ..backend import LineReader
from ..demo import DaemonProcess
from .checks import Evidence, evaluate
from .frames import ID_OFFSET, ID_SIZE

__all__ = ["GroupSpec", "GROUPS", "SoakSettings", "Soak", "SoakError", "outage_schedule", "operation_schedule"]

#: Largest message of every soak group (both directions).
MAX_MESSAGE = 65536
#: Seconds between the monitor's RSS/descriptor samples.
MONITOR_INTERVAL = 1.0
#: Seconds the backends and kmuxd may take to start; every group to connect.
START_TIMEOUT = 15.0
#: Seconds a client process may run past its deadline (its last graceful session).
CLIENT_FINISH_GRACE = 45.0
#: Seconds one client process lives (uniform): processes come and go during the run.
LIFETIME = (4.0, 30.0)
#: Client processes started in one run, at most.
MAX_CLIENT_PROCESSES = 2000
#: Seconds the daemon may take to become quiet after the clients left.
QUIET_TIMEOUT = 30.0
#: Seconds the backends' counts and the daemon's descriptors may take to settle.
SETTLE_TIMEOUT = 10.0
#: A count is settled when it has not moved for this long (seconds).
SETTLE_QUIET = 0.5
#: Seconds one backend command or one control request may take.
COMMAND_TIMEOUT = 10.0
#: Seconds between two outages (uniform), and an outage's length (uniform).
OUTAGE_GAP = (1.5, 5.0)
OUTAGE_LENGTH = (0.3, 2.5)
#: Share of outages that take every endpoint of a group down at once.
WHOLE_GROUP_SHARE = 0.25
#: Operator actions the soak knows (see operation_schedule).
OPERATIONS = ("reconnect", "drain", "resize")
#: Seconds between two operator actions (uniform); seconds a resized group stays resized.
OPERATION_GAP = (2.0, 6.0)
RESIZE_HOLD = (1.0, 4.0)
#: The ``timeout`` of a drain request, seconds: a drain may legitimately time out under faults.
DRAIN_TIMEOUT = 3.0
#: Error codes an operator action may meet without anything being wrong.
OPERATION_EXPECTED_ERRORS = frozenset({"drain_timeout", "drain_in_progress"})
POLL = 0.05


class SoakError(RuntimeError):
    """The soak could not run (a child did not start, a wait for set-up timed out)."""


@dataclass(frozen=True)
class GroupSpec:
    name: str
    mode: str  # kmuxd steering
    weight: int  # share of client sessions

    @property
    def backend_kind(self) -> str:
        return "sink" if self.mode == "balance" else "echo"


GROUPS = (GroupSpec("rr-id", "id", 3), GroupSpec("rr-fifo", "fifo", 3), GroupSpec("oneway", "balance", 2))


@dataclass(frozen=True)
class SoakSettings:
    """What one run does; validated when built, errors name the command-line option."""

    duration: float = 120.0
    clients: int = 8
    seed: int = 0
    window: int = 8
    connections: int = 4
    endpoints: int = 2
    request_timeout: float = 1.0
    queue_timeout: float = 0.0
    retry_unanswered: int = 0
    max_requests_per_connection: int = 0
    rss_growth_mib: float = 16.0
    outages: bool = True
    #: operator actions to take (a subset of OPERATIONS)
    operations: tuple[str, ...] = ("reconnect", "drain", "resize")

    #: (least, most) of each numeric setting.
    LIMITS = {
        "duration": (5.0, 3600.0), "clients": (1, 64), "seed": (0, 2**63 - 1), "window": (1, 64),
        "connections": (1, 64), "endpoints": (1, 4), "request_timeout": (0.0, 60.0),
        "queue_timeout": (0.0, 60.0), "retry_unanswered": (0, 10), "max_requests_per_connection": (0, 2**31),
        "rss_growth_mib": (1.0, 4096.0),
    }

    def __post_init__(self) -> None:
        problems = []
        for name, (low, high) in self.LIMITS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                problems.append(ConfigInvalid(f"--{name.replace('_', '-')}", f"must be between {low} and {high}, not {value}"))
        unknown = sorted(set(self.operations) - set(OPERATIONS))
        if unknown:
            problems.append(ConfigInvalid("--operations", f"unknown {', '.join(unknown)}; known: {', '.join(OPERATIONS)}"))
        if problems:
            raise ConfigInvalid.several(problems)

    @property
    def warmup(self) -> float:
        """Seconds of traffic before the RSS 'start' sample and the first outage."""
        return min(10.0, self.duration * 0.1)

    @property
    def calm(self) -> float:
        """Seconds at the end with no new fault and every endpoint up."""
        return min(10.0, max(3.0, self.duration * 0.1))

    def features(self) -> dict[str, Any]:
        """The daemon settings under test, as the report shows them (0 = off)."""
        return {
            "request_timeout": self.request_timeout,
            "queue_timeout": self.queue_timeout,
            "retry_unanswered": self.retry_unanswered,
            "max_requests_per_connection": self.max_requests_per_connection,
        }


@dataclass(frozen=True)
class Outage:
    at: float  # seconds after the clients started
    group: str
    endpoints: tuple[int, ...]
    how: str  # "fin" or "rst": how the live connections are closed
    length: float


def outage_schedule(settings: SoakSettings, rng: random.Random) -> list[Outage]:
    """Endpoint outages between the warm-up and the calm, never two at once on one endpoint."""
    if not settings.outages:
        return []
    out: list[Outage] = []
    busy: dict[tuple[str, int], float] = {}
    t = settings.warmup / 2
    stop = settings.duration - settings.calm
    while True:
        t += rng.uniform(*OUTAGE_GAP)
        if t >= stop:
            return out
        g = rng.choice(GROUPS)
        whole = rng.random() < WHOLE_GROUP_SHARE
        eps = tuple(range(settings.endpoints)) if whole else (rng.randrange(settings.endpoints),)
        length = min(rng.uniform(*OUTAGE_LENGTH), stop - t)
        how = "fin" if g.backend_kind == "sink" else rng.choice(("fin", "rst"))
        if any(busy.get((g.name, e), 0.0) > t for e in eps):
            continue
        for e in eps:
            busy[(g.name, e)] = t + length
        out.append(Outage(round(t, 3), g.name, eps, how, round(length, 3)))


@dataclass(frozen=True)
class Operation:
    """An operator's action through the control socket, as ``kmux-cli`` sends it."""

    at: float  # seconds after the clients started
    op: str  # "reconnect", "drain" or "resize" (a reload with another connection count)
    group: str
    conn: int | None = None  # reconnect (None: every connection) and drain
    connections: int | None = None  # resize


def operation_schedule(settings: SoakSettings, rng: random.Random) -> list[Operation]:
    """``kmux-cli reconnect``/``drain``/``reload`` (resizing a group, then back) between the
    warm-up and the calm; a connection named always exists at that moment."""
    if not settings.operations:
        return []
    ops = [op for op in ("reconnect", "reconnect", "drain", "resize") if op in settings.operations]
    out: list[Operation] = []
    resized: dict[str, tuple[float, float, int]] = {}  # group -> (from, until, connections)
    t = settings.warmup / 2
    stop = settings.duration - settings.calm
    while True:
        t += rng.uniform(*OPERATION_GAP)
        if t >= stop:
            return sorted(out, key=lambda o: o.at)
        g = rng.choice(GROUPS).name
        start, until, n = resized.get(g, (0.0, 0.0, settings.connections))
        size = n if start <= t <= until else settings.connections
        op = rng.choice(ops)
        if op == "resize":
            back = t + rng.uniform(*RESIZE_HOLD)
            if until >= t or back >= stop:
                continue
            n = rng.choice([k for k in range(1, settings.connections + 3) if k != settings.connections])
            resized[g] = (t, back, min(n, settings.connections))  # during the switch, the smaller count holds
            out.append(Operation(round(t, 3), "resize", g, connections=n))
            out.append(Operation(round(back, 3), "resize", g, connections=settings.connections))
        elif op == "reconnect" and rng.random() < 0.3:
            out.append(Operation(round(t, 3), "reconnect", g))
        else:
            out.append(Operation(round(t, 3), op, g, conn=rng.randrange(size)))


def daemon_config(settings: SoakSettings, socket_path: str, ports: dict[tuple[str, int], int],
                  sizes: dict[str, int] | None = None) -> str:
    """The TOML kmuxd runs with: every soak setting explicit (a default changing under us
    must not change what a run means)."""
    lines = ["# Written by kmuxd's soak (python -m kmuxd.tools.soak); safe to delete.", "version = 1", "",
             "[daemon]", f"socket = {json.dumps(socket_path)}", 'socket_mode = "0600"', 'log_format = "json"',
             f"max_clients = {settings.clients * 4 + 16}"]
    for g in GROUPS:
        endpoints = [f"127.0.0.1:{ports[(g.name, e)]}" for e in range(settings.endpoints)]
        lines += ["", f"[groups.{g.name}]", f"endpoints = {json.dumps(endpoints)}",
                  f"connections = {(sizes or {}).get(g.name, settings.connections)}", 'framing = "u32be"', f"steering = {json.dumps(g.mode)}",
                  f"max_message = {MAX_MESSAGE}", "reconnect_initial = 0.05", "reconnect_max = 0.5",
                  "connect_timeout = 2.0", f"queue_timeout = {float(settings.queue_timeout)}",
                  f"max_requests_per_connection = {settings.max_requests_per_connection}"]
        if g.mode != "balance":
            lines += [f"request_timeout = {float(settings.request_timeout)}",
                      f"retry_unanswered = {settings.retry_unanswered}"]
        if g.mode == "id":
            lines += [f"[groups.{g.name}.id]", f"request_offset = {ID_OFFSET}", f"response_offset = {ID_OFFSET}",
                      f"size = {ID_SIZE}", "rewrite = true"]
    return "\n".join(lines) + "\n"


# -- children -------------------------------------------------------------------


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


def _proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _proc_fds(pid: int) -> Counter:
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
                rss, fds = _proc_rss_kib(self.pid), sum(_proc_fds(self.pid).values())
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


# -- the run --------------------------------------------------------------------------


@dataclass
class _Baseline:
    fd_kinds: Counter
    rss_kib: int

    @property
    def fds(self) -> int:
        return sum(self.fd_kinds.values())


class Soak:
    """One run; :meth:`run` returns the result document (see :mod:`.report`)."""

    def __init__(self, settings: SoakSettings, run_dir: Path, say: Callable[[str], None]) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.say = say
        self.rng = random.Random(settings.seed)
        self.outages = outage_schedule(settings, self.rng)
        self.operations = operation_schedule(settings, self.rng)
        self.operation_results: list[dict[str, Any]] = []
        self.sizes = {g.name: settings.connections for g in GROUPS}
        self.backends: BackendsProcess | None = None
        self.daemon: DaemonProcess | None = None
        self.control = ""
        self.clients: list[ClientProcess] = []
        self.problems: list[str] = []

    # -- phases -------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        baseline = self._start()
        monitor = Monitor(self.daemon.pid, self.settings.warmup)
        try:
            self._traffic()
            quiet = self._wait_quiet()
            fds = self._settle(baseline, monitor)
        finally:
            monitor.stop()
        rss = {"before_clients": baseline.rss_kib, "after_warmup": monitor.rss_after_warmup or baseline.rss_kib,
               "end": _proc_rss_kib(self.daemon.pid), "peak": monitor.peak_rss}
        groups = cli_groups(self.control)
        report = self.backends.report()
        finals = self.daemon.stop()
        self.backends.stop()
        evidence = Evidence(
            groups={g.name: g.mode for g in GROUPS}, sessions=self._sessions(), backends=report, cli_groups=groups,
            settings=asdict(self.settings), rss_kib=rss, fds=fds, quiet=quiet, process_problems=self.problems,
            daemon_exit=self.daemon.proc.returncode, operations=self.operation_results,
        )
        totals, checks = evaluate(evidence)
        by_name = {g["name"]: g for g in groups}
        return {
            "ok": all(c.ok for c in checks),
            "seed": self.settings.seed,
            "settings": asdict(self.settings),
            "features": self.settings.features(),
            "seconds": round(time.monotonic() - started, 1),
            "client_processes": len(self.clients),
            "groups": {
                name: {**t.as_dict(),
                       "daemon": {k: by_name.get(name, {}).get(k) for k in DAEMON_COUNTERS},
                       "backend": {k: v for k, v in report.get(name, {}).items() if k != "per_session"}}
                for name, t in totals.items()
            },
            "faults": dict(sum((Counter(b.get("faults", {})) for b in report.values()), Counter())),
            "outages": [asdict(o) for o in self.outages],
            "operations": self.operation_results,
            "rss_kib": rss,
            "fds": fds,
            "rss_samples": monitor.samples,
            "group_final": finals,
            "checks": [asdict(c) for c in checks],
            "run_dir": str(self.run_dir),
        }

    def _start(self) -> _Baseline:
        """Backends, then kmuxd; the baseline once every group is connected."""
        s = self.settings
        spec = {"seed": s.seed, "max_size": MAX_MESSAGE,
                "groups": [{"name": g.name, "kind": g.backend_kind, "endpoints": s.endpoints, "stray": g.mode == "id"}
                           for g in GROUPS]}
        self.backends = BackendsProcess(spec, self.run_dir / "backends.log")
        self._write_config()
        self.daemon = DaemonProcess(self.run_dir / "kmuxd.toml", self.run_dir / "kmuxd.log")
        try:
            ready = self.daemon.wait_ready(START_TIMEOUT)
        except RuntimeError as exc:
            raise SoakError(str(exc)) from None
        self.control = ready["control_socket"]
        pid = self.daemon.pid
        if wait_for(lambda: not self._quiet_problems(), START_TIMEOUT) is False:
            raise SoakError(f"the groups did not connect within {START_TIMEOUT} s: {self._quiet_problems()}")
        kinds, _ = wait_settled(lambda: _proc_fds(pid), SETTLE_TIMEOUT)
        baseline = _Baseline(kinds, _proc_rss_kib(pid))
        self.say(f"kmuxd pid {pid} ready; baseline {baseline.fds} fds, RSS {baseline.rss_kib / 1024:.1f} MiB; "
                 f"{s.clients} client processes at a time for {s.duration:g} s")
        return baseline

    def _traffic(self) -> None:
        """Client processes, each for a random lifetime, replaced until the deadline; outages meanwhile."""
        s = self.settings
        t0 = time.monotonic()
        end = t0 + s.duration
        stop_chaos = threading.Event()
        chaos = threading.Thread(target=self._chaos, args=(t0, stop_chaos), name="chaos", daemon=True)
        chaos.start()
        running: list[ClientProcess] = []
        try:
            while True:
                now = time.monotonic()
                for c in [c for c in running if c.proc.poll() is not None]:
                    running.remove(c)
                    self._reap(c, now)
                if now >= end or len(self.clients) >= MAX_CLIENT_PROCESSES:
                    break
                while len(running) < s.clients and end - now > LIFETIME[0] / 2:
                    stop = min(end, now + self.rng.uniform(*LIFETIME))
                    c = ClientProcess(len(self.clients) + 1, self.client_spec(len(self.clients) + 1, stop), self.run_dir)
                    self.clients.append(c)
                    running.append(c)
                if self.daemon.proc.poll() is not None:
                    raise SoakError(f"kmuxd exited during the run (status {self.daemon.proc.returncode}):\n"
                                    + self.daemon.log_tail())
                time.sleep(POLL * 2)
            for c in running:
                self._reap(c, end + CLIENT_FINISH_GRACE)
        finally:
            stop_chaos.set()
            chaos.join(COMMAND_TIMEOUT)
        self.say(f"{len(self.clients)} client processes done after {time.monotonic() - t0:.1f} s; "
                 "waiting for the daemon to be quiet")
        if self.daemon.proc.poll() is not None:
            raise SoakError(f"kmuxd exited during the run (status {self.daemon.proc.returncode}):\n"
                            + self.daemon.log_tail())

    def _reap(self, c: ClientProcess, deadline: float) -> None:
        problem = c.wait(deadline)
        if problem:
            self.problems.append(problem)

    def _wait_quiet(self) -> dict[str, Any]:
        t = time.monotonic()
        problems = self._quiet_problems()
        deadline = t + QUIET_TIMEOUT
        while problems and time.monotonic() < deadline:
            time.sleep(POLL * 4)
            problems = self._quiet_problems()
        return {"reached": not problems, "seconds": round(time.monotonic() - t, 2), "last": problems}

    def _settle(self, baseline: _Baseline, monitor: Monitor) -> dict[str, Any]:
        """Wait for the backends' counts to stop moving and the descriptors to come back."""
        pid = self.daemon.pid

        def backend_totals() -> tuple:
            return tuple(sorted((k, v["frames"], v["answered"]) for k, v in self.backends.report().items()))

        def fds_back() -> Counter | None:
            kinds = _proc_fds(pid)
            return kinds if sum(kinds.values()) == baseline.fds else None

        wait_settled(backend_totals, SETTLE_TIMEOUT)
        kinds = wait_for(fds_back, SETTLE_TIMEOUT) or _proc_fds(pid)
        fds: dict[str, Any] = {"baseline": baseline.fds, "end": sum(kinds.values()), "peak": monitor.peak_fds}
        if fds["end"] != baseline.fds:
            base = baseline.fd_kinds
            fds["diff"] = {k: kinds[k] - base[k] for k in set(kinds) | set(base) if kinds[k] != base[k]}
        return fds

    def _sessions(self) -> list[dict[str, Any]]:
        sessions = []
        for c in self.clients:
            got, done = c.sessions()
            sessions += got
            if not done:
                self.problems.append(f"client process {c.number} did not write its final record")
        return sessions

    # -- helpers --------------------------------------------------------------------

    def client_spec(self, proc: int, end: float) -> dict[str, Any]:
        s = self.settings
        return {
            "socket": str(self.run_dir / "kmuxd.sock"), "proc": proc, "seed": s.seed, "end": end,
            "groups": [{"name": g.name, "mode": g.mode, "weight": g.weight} for g in GROUPS],
            "window_max": s.window, "max_size": MAX_MESSAGE, "queue_timeout": s.queue_timeout,
            "result": str(self.run_dir / f"clients-{proc}.jsonl"),
        }

    def _stats(self) -> dict[str, Any]:
        with ControlClient(self.control, timeout=COMMAND_TIMEOUT) as c:
            return c.request("stats")

    def _quiet_problems(self) -> list[str]:
        """What still keeps the daemon from being quiet (empty: quiet)."""
        out = []
        for g in self._stats()["groups"]:
            for key, want in (("clients", 0), ("queued_msgs", 0), ("requests_in_flight", 0),
                              ("connections_up", g["connections_total"])):
                if g.get(key, want) != want:
                    out.append(f"{g['name']} {key}={g.get(key)} (want {want})")
        return out

    def _write_config(self) -> None:
        text = daemon_config(self.settings, str(self.run_dir / "kmuxd.sock"), self.backends.ports, self.sizes)
        tmp = self.run_dir / "kmuxd.toml.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.run_dir / "kmuxd.toml")  # a reload never reads half a file

    def _chaos(self, t0: float, stop: threading.Event) -> None:
        """The outages and operator actions, each at its time (or as soon after as the previous allows)."""
        events: list[tuple[float, Any]] = []
        for o in self.outages:
            for e in o.endpoints:
                events.append((o.at, f"down {o.group} {e} {o.how}"))
                events.append((o.at + o.length, f"up {o.group} {e}"))
        events += [(o.at, o) for o in self.operations]
        events.append((self.settings.duration - self.settings.calm, "calm"))
        for at, event in sorted(events, key=lambda ev: ev[0]):
            if stop.wait(max(0.0, t0 + at - time.monotonic())):
                return
            if isinstance(event, Operation):
                self._operate(event)
                continue
            answer = self.backends.command(event)
            if not answer.startswith("ok"):
                self.problems.append(f"backends answered {answer!r} to {event!r}")

    def _operate(self, o: Operation) -> None:
        result = {**asdict(o), "result": "ok"}
        try:
            with ControlClient(self.control, timeout=COMMAND_TIMEOUT + DRAIN_TIMEOUT) as c:
                if o.op == "reconnect":
                    c.request("reconnect", group=o.group, **({} if o.conn is None else {"conn": o.conn}))
                elif o.op == "drain":
                    c.request("drain", group=o.group, conn=o.conn, timeout=DRAIN_TIMEOUT)
                else:
                    self.sizes[o.group] = o.connections
                    self._write_config()
                    answer = c.request("reload")
                    if o.group not in answer.get("resized", []):
                        result["result"] = f"not resized: {answer}"
                        self.problems.append(f"reload to resize {o.group} answered {answer}")
        except KmuxError as exc:
            result["result"] = exc.code
            if exc.code not in OPERATION_EXPECTED_ERRORS:
                self.problems.append(f"{o.op} {o.group} {o.conn if o.conn is not None else ''} failed: {exc}")
        self.operation_results.append(result)

    def cleanup(self) -> None:
        """Whatever happened: nothing started here outlives the run."""
        for c in self.clients:
            c.kill()
        if self.daemon is not None:
            try:
                self.daemon.kill()
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.backends is not None:
            self.backends.stop()


#: Group counters copied into the result (the checks use more).
DAEMON_COUNTERS = ("attached", "unattached", "tx_msgs", "rx_msgs", "tx_retries", "requests_failed",
                   "requests_timed_out", "late_responses", "dropped_responses", "unmatched_responses", "refused",
                   "notices_sent")


def make_run_dir(path: str | None) -> Path:
    """A short directory for the sockets (a Unix socket path has at most 107 bytes)."""
    if path:
        p = Path(path).resolve()
        p.mkdir(parents=True, exist_ok=True)
        return p
    return Path(tempfile.mkdtemp(prefix="kmux-soak-", dir="/tmp"))


def remove_run_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

