"""systemd integration: readiness and status notifications, socket activation, watchdog.

Everything here is a no-op outside systemd (no ``$NOTIFY_SOCKET``, no
``$LISTEN_FDS``), so the daemon runs the same in a terminal, in tests and as
a service. systemd 252 (Debian 12) has no ``Type=notify-reload``: a reload is
announced with ``RELOADING=1`` plus ``MONOTONIC_USEC`` and ended with
``READY=1``. python-systemd has no ``sd_watchdog_enabled``, so the watchdog
interval comes from ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, if set, must
be ours).
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["Notifier", "activated_sockets", "watchdog_interval", "FD_NAME_APPS", "FD_NAME_CONTROL"]

#: FileDescriptorName= of the apps' socket and of the control socket in kmuxd.socket.
FD_NAME_APPS = "kmuxd"
FD_NAME_CONTROL = "control"

try:
    from systemd import daemon as _sd_daemon
except ImportError:  # pragma: no cover - the package is a dependency; keep running without it
    _sd_daemon = None


class Notifier:
    """``sd_notify`` messages; silent when not started by systemd with Type=notify."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET")) and _sd_daemon is not None
        self.sent: list[str] = []  # the last few, for tests and debugging

    def _send(self, *lines: str) -> None:
        if not self.enabled:
            return
        message = "\n".join(lines)
        _sd_daemon.notify(message)
        self.sent = (self.sent + [message])[-16:]

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")

    def ready(self, status: str) -> None:
        self._send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def stopping(self, status: str) -> None:
        self._send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds systemd allows between WATCHDOG=1 pings, or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None


def activated_sockets() -> dict[str, socket.socket]:
    """Sockets passed by systemd (``ListenSequentialPacket=``), by FileDescriptorName.

    Empty when not socket-activated. The environment is unset so child
    processes do not inherit the descriptors' meaning.
    """
    if _sd_daemon is None or not os.environ.get("LISTEN_FDS"):
        return {}
    out = {}
    for fd, name in _sd_daemon.listen_fds_with_names(unset_environment=True).items():
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        out[name] = sock
    return out
