"""What one soak run does, decided before it starts (no I/O): settings, groups, schedules.

* :class:`SoakSettings`: the run's knobs, validated when built; an error names
  the command-line option (``--clients: must be between 1 and 64, not 0``).
* :data:`GROUPS`: the three groups every run has, and :func:`daemon_config`,
  the kmuxd configuration they become (every setting under test written out,
  so a changed default never changes what a run means).
* :func:`outage_schedule` and :func:`operation_schedule`: the endpoint outages
  and the operator's actions, drawn from the run's seeded RNG, so the same
  ``--seed`` gives the same schedule.

Invariants: an endpoint is never taken down twice at once; every outage and
every resize ends before the run's calm begins; an action naming a
connection names one that exists at that moment.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from kmux.errors import ConfigInvalid

from .frames import ID_OFFSET, ID_SIZE

__all__ = ["GroupSpec", "GROUPS", "SoakSettings", "Outage", "Operation", "OPERATIONS", "MAX_MESSAGE",
           "outage_schedule", "operation_schedule", "daemon_config"]

#: Largest message of every soak group (both directions).
MAX_MESSAGE = 65536
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
