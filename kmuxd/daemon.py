"""The daemon: one nursery holding every group and the listener.

Start-up order is the readiness contract: groups dial first (each reports
started once every slot has connected or failed once), then the socket
listens, then ``ready`` is logged (and, with the systemd issue, READY=1).
SIGTERM/SIGINT stop gracefully: stop reading clients, let queued messages
drain for at most ``shutdown_grace`` seconds, then cancel everything.
"""

from __future__ import annotations

import os
import signal
import time

import trio

from .config import Config
from .group import Group
from .log import get_logger
from .server import Server, bind_seqpacket

__all__ = ["Daemon", "run"]

#: How often a stopping daemon checks whether queues have drained.
DRAIN_POLL = 0.02


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = get_logger()
        self.groups = {name: Group(g, config.daemon, self.log) for name, g in config.groups.items()}
        self.server = Server(config, self.groups, self.log)
        self.listener = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        t0 = time.monotonic()
        # Bind first: a second daemon on the same socket fails before it
        # dials anything, and apps that connect while groups dial wait in
        # the listen backlog instead of failing.
        self.listener = bind_seqpacket(self.config.daemon.socket, self.config.daemon.socket_mode)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                async with trio.open_nursery() as starting:  # groups dial in parallel
                    for group in self.groups.values():
                        starting.start_soon(nursery.start, group.run)
                await nursery.start(self.server.serve, self.listener)
                self.log.info(
                    "ready",
                    socket=self.config.daemon.socket,
                    groups=len(self.groups),
                    connections_up=sum(g.statistics().connections_up for g in self.groups.values()),
                    startup_ms=round((time.monotonic() - t0) * 1000, 1),
                )
                task_status.started(self)
                async for signum in signals:
                    self.log.info("stopping", signal=signal.Signals(signum).name)
                    await self.stop(nursery)
                    break

    async def stop(self, nursery: trio.Nursery) -> None:
        self.server.stop_accepting()
        trio.lowlevel.notify_closing(self.listener)
        self.listener.close()
        _unlink_socket(self.config.daemon.socket)
        self.server.stop_reading()
        grace = self.config.daemon.shutdown_grace
        with trio.move_on_after(grace):
            while any(g.queued_total() for g in self.groups.values()):
                await trio.sleep(DRAIN_POLL)
        left = sum(g.queued_total() for g in self.groups.values())
        if left:
            self.log.warning("stopped_with_queued_bytes", queued_bytes=left, shutdown_grace=grace)
        for group in self.groups.values():
            s = group.statistics()
            self.log.info("group_final", group=s.name, tx_msgs=s.tx_msgs, tx_bytes=s.tx_bytes,
                          rx_msgs=s.rx_msgs, rx_bytes=s.rx_bytes, tx_retries=s.tx_retries)
        nursery.cancel_scope.cancel()


def _unlink_socket(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def run(config: Config) -> None:
    trio.run(Daemon(config).run)
