"""A group's ``[groups.NAME.socket]`` options on each socket it dials, and what the kernel reports back.

Theory of operation
-------------------
The dial path asks :meth:`SocketPlan.connect` for each address it tries,
and gets a non-blocking socket whose connect has begun (``connect_ex``'s
result beside it). Before ``connect``, in this order:

1. ``SO_BINDTODEVICE``, ``SO_MARK``, ``IP_TOS``/``IPV6_TCLASS``,
   ``TCP_CONGESTION``, ``TCP_NOTSENT_LOWAT`` (always: kmuxd's default is
   not the kernel's; this is the floor, which the connection raises while
   its messages are large, :mod:`kmuxd.core.notsent`), then the caller's
   own tuning;
2. the source: ``source_address`` alone is bound with
   ``IP_BIND_ADDRESS_NO_PORT`` (the kernel still picks the port at connect,
   knowing the destination, so ephemeral ports are not used up by binds);
   ``source_ports`` walks the group's :class:`~kmuxd.core.sourceports.SourcePorts`.

Source ports. Each try binds one port with ``SO_REUSEADDR``, so a port
whose last connection lingers in TIME_WAIT is usable again at once. The
kernel then refuses a *four-tuple* in use at ``connect`` (``EADDRNOTAVAIL``)
instead of a *port* in use at ``bind`` (``EADDRINUSE``); both mean "next
port", and the first needs a new socket (a bound socket cannot be rebound).
The walk is synchronous (``bind`` and a non-blocking ``connect`` never wait)
and bounded by the range; when every port is taken the dial fails saying
so. Sibling connections to other endpoints may share a port: only the
four-tuple must be unique.

Error handling: an option the kernel refuses for want of a capability
(``EPERM``/``EACCES``) raises ``permission_denied`` naming the capability
and the systemd drop-in that grants it (:mod:`kmuxd.system.privileges`).
Every other refusal raises :class:`~kmux.errors.ConnectFailed` naming the
option and its key path. Either is a failed dial: the slot backs off and
the rest of the daemon goes on. A socket made here is closed here on any
failure.

An attached socket (op ``attach``, :mod:`kmuxd.io.attach`) was connected by
another process: :meth:`SocketPlan.apply_connected` sets the options that
still apply after ``connect`` (``mark``, ``tos``, ``congestion``,
``tcp_notsent_lowat``); ``bind_device``, ``source_address`` and
``source_ports`` decide the route and the source at bind and connect, so
they cannot apply to it.

:func:`read_socket_options` reads the options back from a live socket for
``kmux-cli group``: what the connection really has, not what was asked.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from kmux.errors import ConnectFailed

from kmuxd.core.sourceports import SourcePorts, SourcePortsStatistics
from kmuxd.system.config import SocketConfig
from kmuxd.system.privileges import BY_OPTION, missing

__all__ = ["SocketPlan", "SocketPlanStatistics", "SocketOptions", "read_socket_options"]

_NONBLOCK = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
#: Errnos that mean "the kernel wants a capability for this".
_PRIVILEGE_ERRNOS = (errno.EPERM, errno.EACCES)
#: The longest TCP_CONGESTION name the kernel returns (TCP_CA_NAME_MAX), and interface name (IFNAMSIZ).
_CA_NAME_MAX = 16
_IFNAMSIZ = 16


@dataclass(frozen=True, slots=True)
class SocketOptions:
    """A live connection's options as the kernel reports them (getsockopt)."""

    #: SO_MARK (0: none).
    mark: int
    #: IP_TOS, or IPV6_TCLASS on IPv6.
    tos: int
    #: TCP_CONGESTION.
    congestion: str
    #: SO_BINDTODEVICE ("": none).
    bind_device: str
    #: TCP_NOTSENT_LOWAT (0: the sysctl net.ipv4.tcp_notsent_lowat applies).
    notsent_lowat: int


@dataclass(frozen=True, slots=True)
class SocketPlanStatistics:
    """A group's configured ``[socket]`` options and its source-port walk."""

    #: The options as configured (unset ones left out; ``dscp`` shows as ``tos``).
    configured: dict
    #: ``source_ports``: ports taken and found busy, dials that found the range exhausted.
    source_ports: SourcePortsStatistics | None


def read_socket_options(sock: socket.socket) -> SocketOptions | None:
    """None when the socket is closed or reset meanwhile (statistics show "-")."""
    try:
        v6 = sock.family == socket.AF_INET6
        tos = (sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS) if v6
               else sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS))
        return SocketOptions(
            mark=sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK),
            tos=tos,
            congestion=_text(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, _CA_NAME_MAX)),
            bind_device=_text(sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, _IFNAMSIZ)),
            notsent_lowat=sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT),
        )
    except OSError:
        return None


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


class SocketPlan:
    """One group's socket options, applied to every socket it dials; holds its source-port cursor."""

    __slots__ = ("group", "cfg", "ports")

    def __init__(self, group: str, cfg: SocketConfig) -> None:
        self.group = group
        self.cfg = cfg
        self.ports = SourcePorts(*cfg.source_ports) if cfg.source_ports is not None else None

    def reconfigured(self, cfg: SocketConfig) -> "SocketPlan":
        """The plan for a reloaded configuration; an unchanged port range keeps its cursor."""
        if cfg == self.cfg:
            return self
        plan = SocketPlan(self.group, cfg)
        if plan.ports is not None and self.ports is not None and cfg.source_ports == self.cfg.source_ports:
            plan.ports = self.ports
        return plan

    def statistics(self) -> SocketPlanStatistics | None:
        """None when the group sets no socket option."""
        if not self.cfg.configured:
            return None
        configured = {k: getattr(self.cfg, k) for k in SocketConfig.__dataclass_fields__}
        configured = {k: list(v) if isinstance(v, tuple) else v for k, v in configured.items() if v is not None}
        return SocketPlanStatistics(configured, self.ports.statistics() if self.ports is not None else None)

    def _key(self, option: str) -> str:
        return f"groups.{self.group}.socket.{option}"

    def addresses(self, infos: Iterable[Any]) -> list[Any]:
        """The resolved addresses this group can dial: those of ``source_address``'s family."""
        infos = list(infos)
        src = self.cfg.source_address
        if src is None:
            return infos
        family = socket.AF_INET6 if ":" in src else socket.AF_INET
        usable = [info for info in infos if info[0] == family]
        if infos and not usable:
            raise ConnectFailed(f"no IPv{4 if family == socket.AF_INET else 6} address to dial from source_address "
                                f"{src} ({self._key('source_address')})")
        return usable

    def connect(self, family: int, type_: int, proto: int, addr: Any,
                tune: Callable[[socket.socket], None]) -> tuple[socket.socket, int]:
        """A new socket with every option set and its connect begun: ``(sock, connect_ex's errno)``."""
        ports = self.ports
        if ports is None:
            sock = self._socket(family, type_, proto, tune)
            try:
                if self.cfg.source_address is not None:
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
                    self._bind(sock, 0)
                return sock, sock.connect_ex(addr)
            except BaseException:
                sock.close()
                raise
        sock: socket.socket | None = None
        try:
            for port in ports.candidates():
                if sock is None:
                    sock = self._socket(family, type_, proto, tune)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if not self._bind(sock, port):
                    ports.in_use(port)
                    continue
                err = sock.connect_ex(addr)
                if err == errno.EADDRNOTAVAIL:  # this four-tuple is in use: a new socket for the next port
                    sock.close()
                    sock = None
                    ports.in_use(port)
                    continue
                ports.took(port)
                return sock, err
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        if sock is not None:
            sock.close()
        ports.gave_up()
        raise ConnectFailed(
            f"source_ports {ports.describe()} exhausted: all {ports.tries} ports tried are in use towards "
            f"{_fmt(addr)} ({self._key('source_ports')}: widen the range, or lower connections)"
        )

    def _socket(self, family: int, type_: int, proto: int, tune: Callable[[socket.socket], None]) -> socket.socket:
        sock = socket.socket(family, type_ | _NONBLOCK, proto)
        try:
            self._apply(sock, family)
            tune(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def apply_connected(self, sock: socket.socket) -> None:
        """The options that still mean something on a socket connected elsewhere (op attach):
        not ``bind_device``, ``source_address`` or ``source_ports``, which take effect only
        at bind and connect (docs/config.md)."""
        self._apply(sock, sock.family, connected=True)

    def _apply(self, sock: socket.socket, family: int, *, connected: bool = False) -> None:
        cfg = self.cfg
        if cfg.bind_device is not None and not connected:
            self._set(sock, "bind_device", socket.SOL_SOCKET, socket.SO_BINDTODEVICE, cfg.bind_device.encode(),
                      f"binding to device {cfg.bind_device!r} (SO_BINDTODEVICE)")
        if cfg.mark is not None:
            self._set(sock, "mark", socket.SOL_SOCKET, socket.SO_MARK, cfg.mark, f"setting SO_MARK {cfg.mark}")
        if cfg.tos is not None:
            level, name = ((socket.IPPROTO_IPV6, socket.IPV6_TCLASS) if family == socket.AF_INET6
                           else (socket.IPPROTO_IP, socket.IP_TOS))
            self._set(sock, "tos", level, name, cfg.tos, f"setting TOS {cfg.tos:#04x}")
        if cfg.congestion is not None:
            self._set(sock, "congestion", socket.IPPROTO_TCP, socket.TCP_CONGESTION, cfg.congestion.encode(),
                      f"setting TCP_CONGESTION {cfg.congestion!r}")
        # Always set: kmuxd's default is not the kernel's (see NOTSENT_LOWAT_DEFAULT in kmuxd.system.config).
        lowat = cfg.notsent_floor  # the connection raises it as messages require (kmuxd.core.notsent)
        self._set(sock, "tcp_notsent_lowat", socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT,
                  lowat, f"setting TCP_NOTSENT_LOWAT {lowat}")

    def _set(self, sock: socket.socket, option: str, level: int, name: int, value: Any, action: str) -> None:
        try:
            sock.setsockopt(level, name, value)
        except OSError as exc:
            cap = BY_OPTION.get(option)
            if cap is not None and exc.errno in _PRIVILEGE_ERRNOS:
                raise missing(cap, self._key(option), action) from None
            reason = "no such device" if exc.errno == errno.ENODEV else exc.strerror
            raise ConnectFailed(f"{action} ({self._key(option)}): {errno.errorcode.get(exc.errno or 0, '?')}: "
                                f"{reason}") from None

    def _bind(self, sock: socket.socket, port: int) -> bool:
        """Bind the source; False when ``port`` is taken (EADDRINUSE), an error for anything else."""
        src = self.cfg.source_address or ("::" if sock.family == socket.AF_INET6 else "0.0.0.0")
        try:
            sock.bind((src, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and port:
                return False
            if exc.errno in _PRIVILEGE_ERRNOS and port:
                raise missing("CAP_NET_BIND_SERVICE", self._key("source_ports"),
                              f"binding source port {port}") from None
            if exc.errno == errno.EADDRNOTAVAIL and self.cfg.source_address is not None:
                raise ConnectFailed(f"source_address {src} is not an address of this host "
                                    f"({self._key('source_address')})") from None
            raise ConnectFailed(f"binding source {_fmt((src, port))}: {errno.errorcode.get(exc.errno or 0, '?')}: "
                                f"{exc.strerror}") from None
        return True


def _fmt(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
