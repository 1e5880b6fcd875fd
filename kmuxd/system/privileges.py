"""Which capabilities a configuration needs, which the process holds, and the drop-in that grants them.

Theory of operation
-------------------
The shipped unit gives kmuxd no capability at all (``CapabilityBoundingSet=``
empty): root without capabilities is an ordinary user that owns a few files.
Some socket options of ``[groups.NAME.socket]`` need one:

=========================  =========================  ==========================================
option                     capability                 when
=========================  =========================  ==========================================
``source_ports``           ``CAP_NET_BIND_SERVICE``   a port below ``net.ipv4.ip_unprivileged_port_start``
``mark``                   ``CAP_NET_ADMIN``          always (``SO_MARK``)
``bind_device``            ``CAP_NET_RAW``            kernels before 5.7 only (``SO_BINDTODEVICE``)
``congestion``             ``CAP_NET_ADMIN``          an algorithm not in ``tcp_allowed_congestion_control``
=========================  =========================  ==========================================

:func:`needs` reads that table against the kernel's facts
(:class:`KernelNet`, from ``/proc/sys``) and returns one :class:`Need` per
option, naming its key path. ``kmuxd --check`` prints them, and, when it runs
as a service (``$INVOCATION_ID``), whether the process holds each one
(:func:`effective_capabilities`, from ``/proc/self/status``). The daemon logs
the missing ones at start.

A missing capability never stops the daemon: the group that needs it fails
its dials with :func:`missing` (``permission_denied``, naming the capability
and the drop-in that grants it, :func:`drop_in`), and every other group goes
on. The decision of what needs what lives here only; the dial path maps an
``EPERM``/``EACCES`` of one option to the capability through
:data:`BY_OPTION`.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from kmux.errors import PermissionDenied

__all__ = [
    "CAPABILITY_BITS", "BY_OPTION", "KernelNet", "Need", "needs", "effective_capabilities", "running_as_service",
    "drop_in", "missing", "DROP_IN_PATH",
]

#: Bit numbers in ``CapEff`` (linux/capability.h).
CAPABILITY_BITS = {"CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13}
#: The capability an option needs when the kernel refuses it with EPERM/EACCES.
BY_OPTION = {
    "source_ports": "CAP_NET_BIND_SERVICE",
    "mark": "CAP_NET_ADMIN",
    "bind_device": "CAP_NET_RAW",
    "congestion": "CAP_NET_ADMIN",
}
#: Where docs/systemd.md puts the drop-in (``systemctl edit kmuxd`` writes override.conf).
DROP_IN_PATH = "/etc/systemd/system/kmuxd.service.d/privileges.conf"
#: Before this kernel, SO_BINDTODEVICE always needed CAP_NET_RAW.
BIND_DEVICE_FREE_SINCE = (5, 7)

_PROC_NET = Path("/proc/sys/net")


@dataclass(frozen=True, slots=True)
class KernelNet:
    """What the running kernel allows without a capability."""

    #: ``net.ipv4.ip_unprivileged_port_start``: lower ports need CAP_NET_BIND_SERVICE.
    unprivileged_port_start: int = 1024
    #: ``net.ipv4.tcp_available_congestion_control``: the algorithms loaded.
    congestion_available: tuple[str, ...] = ()
    #: ``net.ipv4.tcp_allowed_congestion_control``: those any process may set.
    congestion_allowed: tuple[str, ...] = ()
    #: (major, minor) of the kernel release.
    release: tuple[int, int] = (0, 0)

    @classmethod
    def read(cls, root: Path = _PROC_NET) -> "KernelNet":
        """The running kernel's facts; a file that cannot be read counts as its stock value."""
        def words(name: str) -> tuple[str, ...]:
            try:
                return tuple((root / "ipv4" / name).read_text().split())
            except OSError:
                return ()

        try:
            start = int((root / "ipv4" / "ip_unprivileged_port_start").read_text())
        except (OSError, ValueError):
            start = 1024
        m = re.match(r"(\d+)\.(\d+)", platform.release())
        release = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        return cls(start, words("tcp_available_congestion_control"), words("tcp_allowed_congestion_control"), release)


@dataclass(frozen=True, slots=True)
class Need:
    capability: str
    #: The key path that needs it, e.g. ``groups.mc.socket.source_ports``.
    key: str
    why: str


def needs(groups: Iterable[Any], kernel: KernelNet) -> list[Need]:
    """One :class:`Need` per configured option that needs a capability, in group order."""
    out: list[Need] = []
    for g in groups:
        s = g.socket
        p = f"groups.{g.name}.socket"
        if s.source_ports is not None and s.source_ports[0] < kernel.unprivileged_port_start:
            out.append(Need("CAP_NET_BIND_SERVICE", f"{p}.source_ports",
                            f"ports below {kernel.unprivileged_port_start} (net.ipv4.ip_unprivileged_port_start)"))
        if s.mark is not None:
            out.append(Need("CAP_NET_ADMIN", f"{p}.mark", "SO_MARK"))
        if s.bind_device is not None and kernel.release < BIND_DEVICE_FREE_SINCE:
            out.append(Need("CAP_NET_RAW", f"{p}.bind_device", "SO_BINDTODEVICE before Linux 5.7"))
        if s.congestion is not None and s.congestion not in kernel.congestion_allowed:
            out.append(Need("CAP_NET_ADMIN", f"{p}.congestion",
                            f"{s.congestion!r} is not in net.ipv4.tcp_allowed_congestion_control"))
    return out


def effective_capabilities(status: str | None = None) -> set[str]:
    """The capabilities of :data:`CAPABILITY_BITS` in this process's effective set."""
    if status is None:
        status = Path("/proc/self/status").read_text()
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", status, re.M)
    bits = int(m.group(1), 16) if m else 0
    return {name for name, bit in CAPABILITY_BITS.items() if bits >> bit & 1}


def running_as_service(env: Any = None) -> bool:
    """True when systemd started this process as (part of) a unit."""
    return "INVOCATION_ID" in (os.environ if env is None else env)


def drop_in(capabilities: Iterable[str]) -> str:
    """The ``[Service]`` drop-in that grants ``capabilities`` (and only them) to kmuxd.service."""
    caps = " ".join(sorted(set(capabilities)))
    return f"[Service]\nCapabilityBoundingSet={caps}\nAmbientCapabilities={caps}\n"


def missing(capability: str, key: str, action: str) -> PermissionDenied:
    """The ``permission_denied`` a dial fails with when the kernel refused ``action`` for want of ``capability``."""
    return PermissionDenied(
        f"{action} ({key}) needs {capability}, which kmuxd does not have: grant it in {DROP_IN_PATH} with "
        f"CapabilityBoundingSet={capability} and AmbientCapabilities={capability}, then systemctl restart kmuxd "
        f"(docs/systemd.md, \"Privileges\")",
        capability=capability, key=key,
    )


@dataclass(frozen=True, slots=True)
class CapabilityReport:
    """``kmuxd --check``'s view: what the configuration needs and, in a service, what it holds."""

    needs: tuple[Need, ...]
    #: None when not run by systemd (an operator's shell holds whatever root holds).
    held: frozenset[str] | None = None
    lacking: tuple[str, ...] = field(default=())

    @classmethod
    def of(cls, groups: Iterable[Any], kernel: KernelNet | None = None, *, status: str | None = None,
           env: Any = None) -> "CapabilityReport":
        found = tuple(needs(groups, kernel or KernelNet.read()))
        if not running_as_service(env):
            return cls(found)
        held = frozenset(effective_capabilities(status))
        lacking = tuple(sorted({n.capability for n in found} - held))
        return cls(found, held, lacking)

    def lines(self) -> list[str]:
        """Human lines for ``kmuxd --check`` (none when no capability is needed)."""
        if not self.needs:
            return []
        out = []
        for n in self.needs:
            state = "" if self.held is None else (": held" if n.capability in self.held else ": MISSING")
            out.append(f"capability {n.capability} for {n.key} ({n.why}){state}")
        if self.lacking:
            out.append(f"warning: the groups that need {', '.join(self.lacking)} will fail their dials with "
                       f"permission_denied; add to {DROP_IN_PATH}:")
            out += ["    " + line for line in drop_in(self.lacking).splitlines()]
        elif self.held is None:
            out.append(f"(under systemd these need a drop-in, {DROP_IN_PATH}: "
                       f"{'; '.join(drop_in(n.capability for n in self.needs).splitlines()[1:])})")
        return out
