"""The daemon: one nursery holding every group, the apps' listener and the control socket.

Start-up order is the readiness contract: both sockets are bound first (a
second daemon fails before dialling anything; apps that connect early wait
in the backlog), then groups dial in parallel (each reports started once
every slot has connected or failed once), then the sockets are served and
``ready`` is logged (with the systemd issue: READY=1).

Signals: SIGTERM/SIGINT stop gracefully (stop accepting and reading, flush
queued messages for at most ``shutdown_grace``, exit); SIGHUP reloads the
configuration, like the control socket's ``reload``.

Reload: the new file is validated first; if it is invalid, or changes what
needs a restart (the sockets), nothing changes. Otherwise groups are
compared: new ones start, removed ones retire (clients released, queues
flushed), ones that differ only in ``connections`` grow or shrink in place,
ones that differ otherwise are replaced (new clients join the new group,
the old one retires), and unchanged groups are not touched at all.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import time
from dataclasses import dataclass

import msgpack
import trio

from kmux.errors import ConfigInvalid, KmuxError, ReloadRefused, UnknownGroup
from kmux.sockbuf import forget_wmem_max

from kmuxd import __version__
from kmuxd._compiled import status as compiled_status
from kmuxd.system.config import Config, GroupConfig, load_config
from .control import ControlRequest, ControlServer, bind_control, to_wire
from .group import Group
from kmuxd.system.log import get_logger
from kmuxd.system.sd import FD_NAME_APPS, FD_NAME_CONTROL, Notifier, activated_sockets, watchdog_interval
from .reactor import Clock, Reactor
from .listen import bind_seqpacket
from .server import Server
from kmuxd.core.states import ConnState

__all__ = ["Daemon", "DaemonStatistics", "run"]

#: Seconds between STATUS= summaries sent to systemd.
STATUS_INTERVAL = 5.0
#: Self-checks (and so WATCHDOG=1 pings) per WatchdogSec= period.
WATCHDOG_PINGS_PER_INTERVAL = 3
#: Daemon settings a reload cannot change (the sockets are already bound).
RESTART_ONLY = ("socket", "socket_mode", "control_socket", "control_group")


@dataclass(frozen=True, slots=True)
class DaemonStatistics:
    version: str
    pid: int
    #: Seconds since start.
    uptime: float
    config: str
    socket: str
    control_socket: str
    clients: int
    #: Apps mid-handshake now; handshakes accepted and refused since start.
    handshaking: int
    clients_accepted: int
    clients_refused: int
    #: Hello refusals by code (permission_denied, too_many_clients, ...).
    refused_by_code: dict
    groups: int
    reloads: int
    reload_failures: int
    #: Why the last reload was refused, ``[code] message``; None after one that was applied.
    last_reload_error: str | None
    #: ``[key path, reason]`` of every problem the refused file had (config_invalid), else None.
    last_reload_problems: list | None
    #: The event core: sockets, passes, events, interest changes, handler crashes.
    reactor: dict
    #: Whether the data path runs compiled by mypyc, and why (not).
    compiled: dict


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    resized: tuple[str, ...]
    replaced: tuple[str, ...]
    unchanged: tuple[str, ...]
    #: Changed only in settings that apply in place (limits, timeouts, access).
    reconfigured: tuple[str, ...] = ()


#: Group settings that need a new group (its clients reconnect) when they change;
#: every other setting is applied in place by a reload.
REPLACE_ON_CHANGE = ("endpoints", "framing", "steering", "id", "max_message", "max_skip", "write_buffer",
                     "read_buffer")


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """Compare two configurations. Raises ReloadRefused for restart-only changes."""
    for key in RESTART_ONLY:
        if getattr(old.daemon, key) != getattr(new.daemon, key):
            raise ReloadRefused(f"daemon.{key} changed; that needs a restart")
    added, removed, resized, replaced, unchanged, reconfigured = [], [], [], [], [], []
    for name, cfg in new.groups.items():
        before = old.groups.get(name)
        if before is None:
            added.append(name)
        elif before == cfg:
            unchanged.append(name)
        elif any(getattr(before, key) != getattr(cfg, key) for key in REPLACE_ON_CHANGE):
            replaced.append(name)
        elif before.connections != cfg.connections:
            resized.append(name)
        else:
            reconfigured.append(name)
    removed = [name for name in old.groups if name not in new.groups]
    return ReloadPlan(*map(tuple, (added, removed, resized, replaced, unchanged, reconfigured)))


class Daemon:
    def __init__(self, config: Config, clock: Clock = time.monotonic) -> None:
        self.config = config
        #: Every object of the shell reads the time from this clock (through the reactor).
        self.clock = clock
        self.log = get_logger()
        self.reactor = Reactor(self.log.bind(component="reactor"), clock)
        self.groups: dict[str, Group] = {name: self._group(g) for name, g in config.groups.items()}
        self.server = Server(config, self.groups, self.log, self.reactor)
        self.control_server = ControlServer(self)
        self.listener = None
        self.control_listener = None
        self.started_at = clock()
        self.reloads = 0
        self.reload_failures = 0
        self.last_reload_error: str | None = None
        self.last_reload_problems: list[list[str]] | None = None
        self._nursery: trio.Nursery | None = None
        self._reload_lock = trio.Lock()
        self.notifier = Notifier()
        self.socket_activated = False
        self._owned_paths: list[str] = []

    def _group(self, cfg: GroupConfig) -> Group:
        return Group(cfg, self.config.daemon, self.log, self.reactor)

    def _open_sockets(self) -> None:
        """Take the sockets systemd passed, or bind them (then they are ours to unlink)."""
        daemon_cfg = self.config.daemon
        activated = activated_sockets()
        self.socket_activated = bool(activated)
        self.listener = activated.pop(FD_NAME_APPS, None)
        self.control_listener = activated.pop(FD_NAME_CONTROL, None)
        for name, extra in activated.items():
            self.log.warning("unknown_activated_socket", name=name)
            extra.close()
        if self.listener is None:
            self.listener = bind_seqpacket(daemon_cfg.socket, daemon_cfg.socket_mode)
            self._owned_paths.append(daemon_cfg.socket)
        if self.control_listener is None:
            try:
                self.control_listener = bind_control(daemon_cfg.control_socket, daemon_cfg.control_group)
            except OSError:
                self.listener.close()
                self._unlink_owned()
                raise
            self._owned_paths.append(daemon_cfg.control_socket)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        t0 = self.clock()
        daemon_cfg = self.config.daemon
        self.notifier.status("binding sockets")
        self._warn(self.config)
        self._open_sockets()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.reactor.run)
                self.notifier.status(f"dialling {sum(g.cfg.connections for g in self.groups.values())} "
                                     f"connections of {len(self.groups)} group(s)")
                async with trio.open_nursery() as starting:  # groups dial in parallel
                    for group in self.groups.values():
                        starting.start_soon(nursery.start, group.run)
                await nursery.start(self.server.serve, self.listener)
                await nursery.start(self.control_server.serve, self.control_listener)
                startup_ms = round((self.clock() - t0) * 1000, 1)
                self.log.info(
                    "ready",
                    socket=daemon_cfg.socket,
                    control_socket=daemon_cfg.control_socket,
                    socket_activated=self.socket_activated,
                    groups=len(self.groups),
                    connections_up=sum(g.statistics().connections_up for g in self.groups.values()),
                    startup_ms=startup_ms,
                    compiled=compiled_status()["compiled"],
                )
                self.notifier.ready(self.status_line())
                gc.freeze()  # what start-up built lives for ever: the collector skips it
                nursery.start_soon(self._status_loop)
                interval = watchdog_interval()
                if interval:
                    nursery.start_soon(self._watchdog_loop, interval)
                task_status.started(self)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        nursery.start_soon(self._reload_logged)
                        continue
                    self.log.info("stopping", signal=signal.Signals(signum).name)
                    await self.stop(nursery)
                    break

    async def stop(self, nursery: trio.Nursery) -> None:
        grace = self.config.daemon.shutdown_grace
        queued = sum(g.queued_total() for g in self.groups.values())
        self.notifier.stopping(f"stopping: flushing {queued} queued bytes (at most {grace}s)")
        # Stop both accept loops before their listeners close under them.
        self.server.stop_accepting()
        self.control_server.stop_accepting()
        for listener in (self.listener, self.control_listener):
            trio.lowlevel.notify_closing(listener)
            listener.close()
        # A socket systemd holds stays in place, so apps that connect during
        # a restart wait in its backlog; sockets we bound ourselves go.
        self._unlink_owned()
        self.server.stop_reading()
        with trio.move_on_after(grace):
            for group in list(self.groups.values()):
                await group.wait_flushed()
        left = sum(g.queued_total() for g in self.groups.values())
        self.server.close_all()
        if left:
            self.log.warning("stopped_with_queued_bytes", queued_bytes=left, shutdown_grace=grace)
        for group in self.groups.values():
            s = group.statistics()
            self.log.info(
                "group_final", group=s.name, tx_msgs=s.tx_msgs, tx_bytes=s.tx_bytes,
                rx_msgs=s.rx_msgs, rx_bytes=s.rx_bytes, tx_retries=s.tx_retries,
            )
        nursery.cancel_scope.cancel()

    # -- control ---------------------------------------------------------------

    def group(self, name: str) -> Group:
        try:
            return self.groups[name]
        except KeyError:
            raise UnknownGroup(f"no group {name!r} (groups: {', '.join(sorted(self.groups)) or 'none'})") from None

    async def control(self, request: ControlRequest) -> dict:
        """Carry out one validated control request; KmuxError becomes an error answer."""
        args = request.args
        if request.op == "ping":
            return {"version": __version__, "pid": os.getpid()}
        if request.op == "stats":
            groups = [self.group(args["group"])] if "group" in args else list(self.groups.values())
            return {
                "daemon": to_wire(self.statistics()),
                "groups": [_group_record(g) for g in groups],
                "clients": [to_wire(c) for g in groups for c in g.client_statistics()],
            }
        if request.op == "reconnect":
            group = self.group(args["group"])
            if "conn" in args:
                slot = group.slot(args["conn"])
                return {"reconnected": [slot.index] if slot.reconnect() else []}
            # The whole group: a draining slot is being replaced already.
            draining = ConnState.DRAINING.value
            return {"reconnected": [s.index for s in list(group.slots) if s.state_name != draining and s.reconnect()]}
        if request.op == "drain":
            slot = self.group(args["group"]).slot(args["conn"])
            t0 = self.clock()
            msgs, nbytes = await slot.drain(args["timeout"])
            return {"drained_msgs": msgs, "drained_bytes": nbytes, "seconds": round(self.clock() - t0, 3)}
        if request.op == "reload":
            return dataclasses.asdict(await self.reload())
        raise AssertionError(f"op {request.op} validated but not handled")

    def status_line(self, rates: str = "", groups: list | None = None) -> str:
        """The one-line summary for systemd's STATUS= (and ``systemctl status``)."""
        if groups is None:
            groups = [g.statistics() for g in self.groups.values()]
        up = sum(g.connections_up for g in groups)
        total = sum(g.connections_total for g in groups)
        clients = sum(g.clients for g in groups)
        line = f"{len(groups)} group(s), {up}/{total} connections up, {clients} client(s)"
        if rates:
            line = f"{line}, {rates}"
        if self.last_reload_error:
            line = f"{line}; last reload refused: {self._reload_summary()}"
        return line

    def _reload_summary(self) -> str:
        """The refused reload in one short phrase: STATUS= is one line (``kmux-cli status`` lists every problem)."""
        problems = self.last_reload_problems or []
        if len(problems) > 1:
            return f"{len(problems)} problems in {self.config.source} (kmux-cli status lists them)"
        return self.last_reload_error or ""

    async def _status_loop(self) -> None:
        previous = None
        while True:
            await trio.sleep(STATUS_INTERVAL)
            stats = [g.statistics() for g in self.groups.values()]
            tx = sum(g.tx_msgs for g in stats)
            rx = sum(g.rx_msgs for g in stats)
            now = self.clock()
            rates = ""
            if previous is not None:
                t0, tx0, rx0 = previous
                dt = now - t0
                rates = f"{max(0, tx - tx0) / dt:.0f} msg/s out, {max(0, rx - rx0) / dt:.0f} msg/s in"
            previous = (now, tx, rx)
            self.notifier.status(self.status_line(rates, stats))

    async def _watchdog_loop(self, interval: float) -> None:
        """Ping WATCHDOG=1 only after an end-to-end self-check succeeds.

        The check is a ``ping`` request on our own control socket: it passes
        only if the event loop schedules I/O, the accept loop accepts and the
        control dispatch answers, well within the watchdog period. A wedged
        loop (or a SIGSTOPped process) sends nothing, and systemd restarts us.
        """
        # The socket we actually serve (systemd's, under socket activation).
        path = self.control_listener.getsockname() or self.config.daemon.control_socket
        period = interval / WATCHDOG_PINGS_PER_INTERVAL
        while True:
            try:
                with trio.fail_after(period):
                    await _self_ping(path)
            except (OSError, trio.TooSlowError) as exc:
                self.log.error("watchdog_check_failed", error=repr(exc))
            else:
                self.notifier.watchdog()
            await trio.sleep(period)

    def _unlink_owned(self) -> None:
        for path in self._owned_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # removed already (by an operator, or a second stop): the goal is reached
            except OSError as exc:
                # The next start finds it stale and replaces it; say why it stayed.
                self.log.warning("socket_not_removed", path=path, error=exc.strerror)
        self._owned_paths.clear()

    def statistics(self) -> DaemonStatistics:
        return DaemonStatistics(
            version=__version__,
            pid=os.getpid(),
            uptime=self.clock() - self.started_at,
            config=self.config.source,
            socket=self.config.daemon.socket,
            control_socket=self.config.daemon.control_socket,
            clients=sum(len(g.clients) for g in self.groups.values()),
            handshaking=self.server.handshaking,
            clients_accepted=self.server.hellos_accepted,
            clients_refused=self.server.refused,
            refused_by_code=dict(self.server.refused_by_code),
            groups=len(self.groups),
            reloads=self.reloads,
            reload_failures=self.reload_failures,
            last_reload_error=self.last_reload_error,
            last_reload_problems=self.last_reload_problems,
            reactor=dataclasses.asdict(self.reactor.statistics()),
            compiled=compiled_status(),
        )

    # -- reload ------------------------------------------------------------------

    def _warn(self, config: Config) -> None:
        """What the file asks for but should not (tls.verify = false, a key others can read): loud, every load."""
        for warning in config.warnings:
            self.log.warning("config_warning", warning=warning)

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except KmuxError:
            pass  # logged and counted by reload()

    async def reload(self) -> ReloadPlan:
        """Read the configuration file again and apply it (see the module docstring)."""
        async with self._reload_lock:
            self.notifier.reloading()
            forget_wmem_max()  # an operator may have raised net.core.wmem_max for this reload
            try:
                new = load_config(self.config.source)
                plan = plan_reload(self.config, new)
            except (ConfigInvalid, ReloadRefused) as err:
                self.reload_failures += 1
                self.last_reload_error = f"[{err.code}] {err.message}"
                self.last_reload_problems = err.problems if isinstance(err, ConfigInvalid) else None
                self.log.error("reload_refused", error_code=err.code, error=err.message)
                self.notifier.ready(f"reload refused, old configuration kept: {self._reload_summary()}")
                raise
            old_groups = dict(self.groups)
            self.config = new
            self.server.reconfigure(new)
            for group in self.groups.values():
                group.set_daemon_config(new.daemon)
            for name in plan.added + plan.replaced:
                group = self._group(new.groups[name])
                await self._nursery.start(group.run)
                self.groups[name] = group  # new clients of a replaced group join this one
            for name in plan.removed:
                del self.groups[name]
            for name in plan.removed + plan.replaced:
                self._nursery.start_soon(old_groups[name].stop)
            for name in plan.resized:
                surplus = self.groups[name].resize(new.groups[name])
                if surplus:
                    self._nursery.start_soon(self.groups[name].shrink, surplus)
            for name in plan.reconfigured:
                self.groups[name].reconfigure(new.groups[name])
            self.reloads += 1
            self.last_reload_error = None
            self.last_reload_problems = None
            self.log.info("reload_applied", **{k: list(v) for k, v in dataclasses.asdict(plan).items()})
            self._warn(new)
            self.notifier.ready(self.status_line())
            return plan


async def _self_ping(path: str) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_SEQPACKET)
    with sock:
        await sock.connect(path)
        await sock.send(msgpack.packb({"op": "ping"}))
        answer = msgpack.unpackb(await sock.recv(4096))
        if not answer.get("ok"):
            raise OSError(f"control ping answered {answer!r}")


def _group_record(group: Group) -> dict:
    record = to_wire(group.statistics())
    record["connections"] = [to_wire(c) for c in group.connection_statistics()]
    return record


#: Allocations between two young-generation collections. Python's default
#: (700) runs a collection every few requests on the data path, whose objects
#: (request records, views, tuples) die young and hold no cycles; the daemon's
#: long-lived objects are frozen out of the collector once it is ready.
GC_YOUNG_THRESHOLD = 50_000


def run(config: Config) -> None:
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    trio.run(Daemon(config).run)
