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
   process takes endpoints down and up (:func:`.plan.outage_schedule`) and acts as
   an operator (:func:`.plan.operation_schedule`: ``reconnect``, ``drain``, and a
   ``reload`` that resizes a group and later sizes it back), all on seeded
   schedules; a thread samples the daemon's RSS and descriptors every
   :data:`.children.MONITOR_INTERVAL` s.
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

import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from kmux.control import ControlClient
from kmux.errors import KmuxError

from ..demo import DaemonProcess
from .checks import Evidence, evaluate
from .children import (
    CLIENT_FINISH_GRACE,
    COMMAND_TIMEOUT,
    POLL,
    START_TIMEOUT,
    BackendsProcess,
    ClientProcess,
    Monitor,
    SoakError,
    cli_groups,
    proc_fds,
    proc_rss_kib,
    wait_for,
    wait_settled,
)
from .plan import GROUPS, MAX_MESSAGE, Operation, SoakSettings, daemon_config, operation_schedule, outage_schedule

__all__ = ["Soak", "SoakError", "SoakSettings", "make_run_dir", "remove_run_dir"]

#: Seconds one client process lives (uniform): processes come and go during the run.
LIFETIME = (4.0, 30.0)
#: Client processes started in one run, at most.
MAX_CLIENT_PROCESSES = 2000
#: Seconds the daemon may take to become quiet after the clients left.
QUIET_TIMEOUT = 30.0
#: Seconds the backends' counts and the daemon's descriptors may take to settle.
SETTLE_TIMEOUT = 10.0
#: The ``timeout`` of a drain request, seconds: a drain may legitimately time out under faults.
DRAIN_TIMEOUT = 3.0
#: Error codes an operator action may meet without anything being wrong.
OPERATION_EXPECTED_ERRORS = frozenset({"drain_timeout", "drain_in_progress"})


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
               "end": proc_rss_kib(self.daemon.pid), "peak": monitor.peak_rss}
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
        kinds, _ = wait_settled(lambda: proc_fds(pid), SETTLE_TIMEOUT)
        baseline = _Baseline(kinds, proc_rss_kib(pid))
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
            kinds = proc_fds(pid)
            return kinds if sum(kinds.values()) == baseline.fds else None

        wait_settled(backend_totals, SETTLE_TIMEOUT)
        kinds = wait_for(fds_back, SETTLE_TIMEOUT) or proc_fds(pid)
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
DAEMON_COUNTERS = ("clients_joined", "clients_left", "tx_msgs", "rx_msgs", "tx_retries", "requests_failed",
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

