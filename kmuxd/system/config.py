"""Configuration: TOML in, frozen and validated dataclasses out.

Every check happens at load, before anything starts, and a failure names the
exact key path (``groups.echo.connections``) and the reason. Every problem
of a file is reported at once (:meth:`ConfigInvalid.several`), not only the
first, so an operator fixes a file in one pass. Every limit and
timeout the daemon uses is a named setting here, with its default and unit in
``docs/config.md``. Unknown keys are errors: a typo must never silently fall
back to a default.

A typo is reported once, with the key it most resembles (``stering``:
"did you mean 'steering'?", :mod:`difflib`). The key it stands for is then
*unsure*: its default is not what the operator meant, so the checks that
read it across keys (``[id]`` only with ``steering = "id"``, a required key
"missing") are skipped instead of adding errors that only come from the
typo. The same holds for a key whose value is refused (``steering =
"ids"``). Fixing the typo brings those checks back.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import os
import re
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmux.errors import ConfigInvalid
from kmux.framing import Framing
from kmux.protocol import MAX_MESSAGE_CEILING

from kmuxd.core.access import OPEN, AccessPolicy, Principal
from kmuxd.system.credentials import credential_path, secret_file_warning

__all__ = [
    "Config", "DaemonConfig", "GroupConfig", "IdConfig", "SocketConfig", "Endpoint", "TlsConfig", "HandshakeStep",
    "load_config", "parse_config", "client_context", "credential_path", "STEERING_MODES",
]

CONFIG_VERSION = 1
STEERING_MODES = ("balance", "id", "fifo")
UNMATCHED_POLICIES = ("drop", "balance")
RX_OVERFLOW_POLICIES = ("disconnect", "drop")
#: The largest max_skip: 4 GiB, all a 4-byte length can say.
MAX_SKIP_CEILING = 1 << 32
#: client_rx_limit when not set: this, or twice max_message if that is larger.
CLIENT_RX_LIMIT_DEFAULT = 4 * 1024 * 1024
#: client_rate_contended when not set, messages a second (docs/config.md says how it was chosen).
CLIENT_RATE_CONTENDED_DEFAULT = 5000.0
_GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LOG_FORMATS = ("auto", "console", "json", "journal")
_LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: Any, path: str) -> "Endpoint":
        if not isinstance(text, str):
            raise ConfigInvalid(path, f"must be a 'host:port' string, not {text!r}")
        m = re.fullmatch(r"\[([0-9A-Fa-f:.%a-zA-Z0-9]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
        if not m:
            raise ConfigInvalid(path, f"{text!r} is not 'host:port' or '[v6addr]:port'")
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4))
        if m.group(1):
            try:
                ipaddress.IPv6Address(host.split("%")[0])
            except ValueError:
                raise ConfigInvalid(path, f"{host!r} is not an IPv6 address") from None
        if not 0 < port < 65536:
            raise ConfigInvalid(path, f"port {port} is not in 1..65535")
        return cls(host, port)


@dataclass(frozen=True, slots=True)
class IdConfig:
    """Where the message id sits (``steering = "id"``)."""

    request_offset: int
    response_offset: int
    size: int = 4
    rewrite: bool = True


@dataclass(frozen=True, slots=True)
class SocketConfig:
    """``[groups.NAME.socket]``: options set on each connection before it connects (all optional)."""

    #: Local address to connect from (an address of this host).
    source_address: str | None = None
    #: Inclusive range of local ports to connect from.
    source_ports: tuple[int, int] | None = None
    #: SO_MARK, for policy routing and firewall rules.
    mark: int | None = None
    #: SO_BINDTODEVICE: an interface or a VRF.
    bind_device: str | None = None
    #: IP_TOS / IPV6_TCLASS byte (``dscp = N`` is stored as ``N << 2``).
    tos: int | None = None
    #: TCP_CONGESTION algorithm.
    congestion: str | None = None
    #: TCP_NOTSENT_LOWAT, bytes (None: kmuxd's NOTSENT_LOWAT_DEFAULT): the mark's floor.
    tcp_notsent_lowat: int | None = None
    #: The mark rises to this many of the largest recent message (None:
    #: NOTSENT_LOWAT_MESSAGES_DEFAULT; 0: the mark stays at the floor). See kmuxd.core.notsent.
    tcp_notsent_lowat_messages: int | None = None

    @property
    def notsent_floor(self) -> int:
        """TCP_NOTSENT_LOWAT set on each connection when it is made, bytes."""
        return self.tcp_notsent_lowat if self.tcp_notsent_lowat is not None else NOTSENT_LOWAT_DEFAULT

    @property
    def notsent_messages(self) -> int:
        return (self.tcp_notsent_lowat_messages if self.tcp_notsent_lowat_messages is not None
                else NOTSENT_LOWAT_MESSAGES_DEFAULT)

    @property
    def configured(self) -> bool:
        return self != _NO_SOCKET_OPTIONS


_NO_SOCKET_OPTIONS = SocketConfig()


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    #: SOCK_SEQPACKET socket that apps connect to.
    socket: str = "/run/kmuxd/kmuxd.sock"
    #: File mode of the socket when kmuxd binds it itself.
    socket_mode: int = 0o660
    #: SOCK_SEQPACKET control socket for kmux-cli (stats, reconnect, drain,
    #: reload). Default: control.sock in the directory of ``socket``.
    control_socket: str = "/run/kmuxd/control.sock"
    #: Group allowed to use the control socket (mode 0660); empty: root only (0600).
    control_group: str = ""
    #: Most clients attached at once; more are refused with too_many_clients.
    max_clients: int = 1024
    #: Most clients one uid may have attached at once (too_many_clients_for_user),
    #: so that one user cannot take every slot. 0: only max_clients applies.
    max_clients_per_uid: int = 512
    #: Seconds a new client may take to send its hello.
    handshake_timeout: float = 5.0
    #: client_attached and client_detached log lines per second (a token
    #: bucket, bursts of as many); the rest are counted, and the next line
    #: logged says how many (suppressed=). 0: every line.
    client_log_rate: int = 100
    #: Seconds a stopping daemon spends flushing queued messages.
    shutdown_grace: float = 5.0
    #: Pending notices (errors, events) one client may have unread before
    #: the daemon stops reading its messages.
    client_notice_limit: int = 256
    log_format: str = "auto"
    log_level: str = "info"


@dataclass(frozen=True, slots=True)
class GroupConfig:
    name: str
    endpoints: tuple[Endpoint, ...]
    #: TCP connections the group holds.
    connections: int = 4
    framing: Framing = field(default_factory=lambda: Framing.from_spec("u32be"))
    #: Largest message, bytes, both directions.
    max_message: int = 1048576
    #: A message from TCP over max_message and up to this long is skipped
    #: unread (its request gets response_too_big); a longer one closes the
    #: connection (more likely a stream out of step). max_message: skip none.
    max_skip: int = MAX_MESSAGE_CEILING
    #: Seconds a partial incoming message may take to complete.
    assembly_timeout: float = 5.0
    steering: str = "balance"
    #: Seconds one TCP dial may take.
    connect_timeout: float = 5.0
    #: First and largest reconnect back-off, seconds (doubles, with jitter).
    reconnect_initial: float = 0.1
    reconnect_max: float = 30.0
    #: Bytes of outgoing messages batched per connection before its writer
    #: stops taking more (one extra max_message always fits).
    write_buffer: int = 262144
    #: Messages taken from one client per turn before the next client's turn.
    client_turn: int = 64
    #: id/fifo: requests one client may have unanswered while other clients
    #: are attached; past it, it is not read until one is answered or told. 0: no limit.
    client_max_in_flight: int = 64
    #: id/fifo: the same limit while another client of the group sent a
    #: request within the last contention_window seconds (it is as low as
    #: this so that another client's request waits behind few of its own at
    #: the server). 0: client_max_in_flight applies throughout.
    client_max_in_flight_contended: int = 2
    #: Seconds since another client's last message during which a client
    #: is held to client_max_in_flight_contended (id/fifo) or
    #: client_rate_contended (balance).
    contention_window: float = 1.0
    #: balance: messages a second one client may be accepted while another
    #: client of the group sent within contention_window (bursts of up to
    #: client_burst_contended); past it, it is not read until its bucket has
    #: refilled. 0: no limit.
    client_rate_contended: float = CLIENT_RATE_CONTENDED_DEFAULT
    #: balance: messages one client may be accepted at once under
    #: client_rate_contended (the token bucket's size).
    client_burst_contended: int = 16
    #: Bytes read from a TCP connection per recv, at most (the receive
    #: buffer holds this plus max_message): bounds the responses one
    #: connection brings into one pass of the event core.
    read_buffer: int = 65536
    #: Messages steered to one receiver before moving to the next (balance).
    rx_batch: int = 16
    #: steering = "id": where the id sits in requests and responses.
    id: IdConfig | None = None
    #: id/fifo: what happens to a response that matches no request.
    unmatched: str = "drop"
    #: id/fifo: seconds a request may wait for its response (0: no limit).
    request_timeout: float = 0.0
    #: Connections the group needs to be healthy (fewer: degraded).
    min_connections: int = 1
    # -- outages and recycling ------------------------------------------------
    #: Seconds a message may wait for a connection before it is refused with
    #: group_unavailable (never written later). 0: wait for ever.
    queue_timeout: float = 5.0
    #: Recycle a connection (make-before-break) after this many requests
    #: written on it / this many seconds. 0: never.
    max_requests_per_connection: int = 0
    max_connection_age: float = 0.0
    #: id/fifo: times a written, unanswered request is written again on
    #: another connection when its connection dies or is recycled, before its
    #: client gets connection_lost. Only for idempotent requests.
    retry_unanswered: int = 0
    #: id/fifo: request timeouts in a row on one endpoint that eject it. 0: never.
    eject_after_timeouts: int = 5
    #: Most dials per second to one endpoint, whatever the slot count.
    max_dials_per_second: float = 10.0
    #: TCP keepalive on each connection: idle seconds before the first probe
    #: (0: keepalive off), seconds between probes, probes before the kernel
    #: gives up. tcp_user_timeout: seconds unacknowledged data may wait
    #: before the kernel drops the connection (0: the kernel's default).
    keepalive_idle: int = 60
    keepalive_interval: int = 10
    keepalive_count: int = 3
    tcp_user_timeout: float = 0.0
    # -- clients ----------------------------------------------------------------
    #: Who may attach (allow_users / allow_groups); open when neither is set.
    access: AccessPolicy = OPEN
    # -- attached connections (issue 19: op attach, KCM's SIOCKCMATTACH) ----------
    #: Who may hand the group a TCP connection it made (attach_users /
    #: attach_groups), besides root; None: neither is set, root only.
    attach: AccessPolicy | None = None
    #: Attached connections the group holds at most at once.
    attach_max: int = 16
    #: Seconds an unattach waits for the answers still owed on the connection
    #: before it closes the daemon's copy (the rest get connection_lost).
    unattach_timeout: float = 10.0
    #: Bytes of responses that may wait for one client that is not reading
    #: (id/fifo: its own queue, so the connection's other responses flow).
    client_rx_limit: int = CLIENT_RX_LIMIT_DEFAULT
    #: What happens when that queue is full: detach the client as a slow
    #: consumer, or drop the response with a notice naming its seq.
    rx_overflow: str = "disconnect"
    #: Seconds a client detached as a slow consumer keeps its socket, so that
    #: its slow_consumer notice can still be read once it reads its backlog.
    slow_consumer_grace: float = 5.0
    #: Seconds a client may send and receive nothing before it is detached
    #: (idle_timeout notice). 0: never.
    client_idle_timeout: float = 0.0
    # -- connections ------------------------------------------------------------
    #: [groups.NAME.socket]: source address and ports, mark, device, TOS, congestion.
    socket: SocketConfig = _NO_SOCKET_OPTIONS
    # -- what only the daemon holds (issue 18; the section "TLS and handshake steps" below) --
    #: [groups.NAME.tls]: TLS to the service; None: plaintext.
    tls: "TlsConfig | None" = None
    #: [[groups.NAME.handshake]]: steps every new connection runs before it takes traffic.
    handshake: "tuple[HandshakeStep, ...]" = ()
    #: Seconds the handshake steps may take on a new connection, all together
    #: (not the daemon's handshake_timeout, which bounds an app's hello).
    auth_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Config:
    daemon: DaemonConfig
    groups: dict[str, GroupConfig]
    source: str = "<memory>"
    #: What an operator should fix though the file is valid (a key readable by
    #: others, verify = false): ``kmuxd --check`` prints them, the daemon logs them.
    warnings: tuple[str, ...] = field(default=(), compare=False)


# -- validation helpers ----------------------------------------------------


def _int(v: Any, path: str, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigInvalid(path, f"must be an integer, not {v!r}")
    if not lo <= v <= hi:
        raise ConfigInvalid(path, f"must be between {lo} and {hi}, not {v}")
    return v


def _float(v: Any, path: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigInvalid(path, f"must be a number of seconds, not {v!r}")
    if not lo <= v <= hi:
        raise ConfigInvalid(path, f"must be between {lo} and {hi}, not {v}")
    return float(v)


#: How close a typo must be to a known name to be suggested (difflib's ratio).
SUGGEST_CUTOFF = 0.6


def closest(word: Any, known: Any) -> str | None:
    """The known name ``word`` is most likely a typo of (:mod:`difflib`), or None."""
    if not isinstance(word, str):
        return None
    close = difflib.get_close_matches(word, sorted(known), n=1, cutoff=SUGGEST_CUTOFF)
    return close[0] if close else None


def suggestion(word: Any, known: Any) -> str:
    """ "; did you mean 'x'?" for the known name closest to ``word``, or ""."""
    name = closest(word, known)
    return f"; did you mean {name!r}?" if name else ""


def _choice(v: Any, path: str, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise ConfigInvalid(path, f"must be one of {', '.join(map(repr, choices))}, not {v!r}{suggestion(v, choices)}")
    return v


def _table(v: Any, path: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ConfigInvalid(path, f"must be a table, not {type(v).__name__}")
    return v


class _Problems:
    """Collects every ConfigInvalid of a file instead of stopping at the first."""

    def __init__(self) -> None:
        self.errors: list[ConfigInvalid] = []
        self.warnings: list[str] = []

    def check(self, fn: Any, *args: Any, default: Any = None) -> Any:
        """``fn(*args)``, or ``default`` after recording the ConfigInvalid it raised."""
        try:
            return fn(*args)
        except ConfigInvalid as exc:
            self.errors.append(exc)
            return default

    def add(self, path: str, reason: str) -> None:
        self.errors.append(ConfigInvalid(path, reason))

    def warn(self, path: str, text: str) -> None:
        self.warnings.append(f"{path}: {text}")

    def raise_any(self) -> None:
        if self.errors:
            raise ConfigInvalid.several(self.errors)


def _no_unknown(table: dict[str, Any], path: str, allowed: set[str], problems: _Problems) -> set[str]:
    """Report every unknown key of ``table``; return the allowed keys that typos stand for (unsure keys)."""
    meant: set[str] = set()
    for key in table:
        if key in allowed:
            continue
        name = closest(key, allowed - set(table))
        where = f"{path}.{key}" if path else key
        if name:
            meant.add(name)
            problems.add(where, f"unknown key; did you mean {name!r}?")
        else:
            problems.add(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return meant


def _socket_path(v: Any, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigInvalid(path, "must be a non-empty path")
    if len(v.encode()) > 107:
        raise ConfigInvalid(path, "Unix socket paths are limited to 107 bytes")
    return v


def _unix_group(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise ConfigInvalid(path, f"must be a group name, not {v!r}")
    if v:
        import grp

        try:
            grp.getgrnam(v)
        except KeyError:
            raise ConfigInvalid(path, f"no such group {v!r} on this system") from None
    return v


def _mode(v: Any, path: str) -> int:
    if isinstance(v, str) and re.fullmatch(r"0?[0-7]{3}", v):
        return int(v, 8)
    raise ConfigInvalid(path, f"must be an octal string like \"0660\", not {v!r}")


_DAEMON_SETTINGS: dict[str, Any] = {
    "socket": _socket_path,
    "control_socket": _socket_path,
    "control_group": _unix_group,
    "socket_mode": _mode,
    "max_clients": lambda v, p: _int(v, p, 1, 1_000_000),
    "max_clients_per_uid": lambda v, p: _int(v, p, 0, 1_000_000),
    "handshake_timeout": lambda v, p: _float(v, p, 0.01, 3600),
    "client_log_rate": lambda v, p: _int(v, p, 0, 1_000_000),
    "shutdown_grace": lambda v, p: _float(v, p, 0, 3600),
    "client_notice_limit": lambda v, p: _int(v, p, 1, 1_000_000),
    "log_format": lambda v, p: _choice(v, p, _LOG_FORMATS),
    "log_level": lambda v, p: _choice(v, p, _LOG_LEVELS),
}


def _parse_daemon(raw: dict[str, Any], problems: _Problems) -> tuple[DaemonConfig, set[str]]:
    """The daemon table, and its unsure keys (module docstring)."""
    p = "daemon"
    unsure = _no_unknown(raw, p, set(DaemonConfig.__dataclass_fields__), problems)
    kw: dict[str, Any] = {}
    for key, parse in _DAEMON_SETTINGS.items():
        if key in raw:
            value = problems.check(parse, raw[key], f"{p}.{key}", default=_MISSING)
            if value is _MISSING:
                unsure.add(key)
            else:
                kw[key] = value
    return DaemonConfig(**kw), unsure


_MISSING = object()


def _principals(v: Any, path: str, kind: str) -> tuple[Principal, ...]:
    """Resolve ``allow_users``/``allow_groups``: names or numeric ids, each must exist."""
    import grp
    import pwd

    if not isinstance(v, list):
        raise ConfigInvalid(path, f"must be a list of {kind} names or numeric ids, not {v!r}")
    out: list[Principal] = []
    for i, item in enumerate(v):
        where = f"{path}[{i}]"
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise ConfigInvalid(where, f"must be a {kind} name or a numeric id, not {item!r}")
        if isinstance(item, int) or item.isdigit():
            ident = int(item)
            if not 0 <= ident < 2**32 - 1:
                raise ConfigInvalid(where, f"{ident} is not a valid {kind} id")
            out.append(Principal(ident, str(item)))
            continue
        try:
            ident = pwd.getpwnam(item).pw_uid if kind == "user" else grp.getgrnam(item).gr_gid
        except KeyError:
            raise ConfigInvalid(where, f"no such {kind} {item!r} on this system") from None
        out.append(Principal(ident, item))
    return tuple(out)


_GROUP_NUMBERS: dict[str, tuple[type, Any, Any]] = {
    "connections": (int, 1, 1024),
    "max_message": (int, 16, MAX_MESSAGE_CEILING),
    "max_skip": (int, 16, MAX_SKIP_CEILING),
    "assembly_timeout": (float, 0.001, 3600.0),
    "connect_timeout": (float, 0.001, 600.0),
    "reconnect_initial": (float, 0.001, 600.0),
    "reconnect_max": (float, 0.001, 3600.0),
    "write_buffer": (int, 4096, 64 * 1024 * 1024),
    "client_turn": (int, 1, 65536),
    "client_max_in_flight": (int, 0, 1 << 24),
    "client_max_in_flight_contended": (int, 0, 1 << 24),
    "contention_window": (float, 0.001, 3600.0),
    "client_rate_contended": (float, 0.0, 1e9),
    "client_burst_contended": (int, 1, 65536),
    "read_buffer": (int, 4096, 64 * 1024 * 1024),
    "rx_batch": (int, 1, 65536),
    "request_timeout": (float, 0.0, 3600.0),
    "min_connections": (int, 0, 1024),
    "queue_timeout": (float, 0.0, 3600.0),
    "max_requests_per_connection": (int, 0, 2**31),
    "max_connection_age": (float, 0.0, 30 * 86400.0),
    "retry_unanswered": (int, 0, 10),
    "eject_after_timeouts": (int, 0, 100000),
    "max_dials_per_second": (float, 0.01, 10000.0),
    "keepalive_idle": (int, 0, 32767),
    "keepalive_interval": (int, 1, 32767),
    "keepalive_count": (int, 1, 127),
    "tcp_user_timeout": (float, 0.0, 3600.0),
    "client_rx_limit": (int, 4096, 1 << 40),
    "client_idle_timeout": (float, 0.0, 30 * 86400.0),
    "slow_consumer_grace": (float, 0.0, 3600.0),
    "auth_timeout": (float, 0.001, 600.0),
    "attach_max": (int, 1, 1024),
    "unattach_timeout": (float, 0.001, 600.0),
}
#: Keys of a group table that are not GroupConfig fields of the same name.
_GROUP_KEYS = (set(GroupConfig.__dataclass_fields__) - {"name", "access", "attach"}) | {
    "allow_users", "allow_groups", "attach_users", "attach_groups"}
#: Settings that only make sense with request/response steering.
_REQUEST_ONLY = ("retry_unanswered", "request_timeout", "client_max_in_flight", "client_max_in_flight_contended")
#: Settings that only make sense with balance steering.
_BALANCE_ONLY = ("client_rate_contended", "client_burst_contended")


def _parse_group(name: str, raw: Any, problems: _Problems) -> GroupConfig | None:
    p = f"groups.{name}"
    if not _GROUP_NAME.match(name):
        problems.add(p, "group names are 1-64 characters of A-Z a-z 0-9 _ . - (not starting with _ . -)")
        return None
    raw = problems.check(_table, raw, p)
    if raw is None:
        return None
    before = len(problems.errors)
    unsure = _no_unknown(raw, p, _GROUP_KEYS, problems)
    kw: dict[str, Any] = {"name": name}
    eps = raw.get("endpoints")
    attaching = "attach_users" in raw or "attach_groups" in raw
    if eps is None and attaching:
        # Attached connections only: nothing to dial.
        kw["endpoints"] = ()
        if raw.get("connections", 0) != 0:
            problems.add(f"{p}.connections", "needs endpoints to dial; a group of attached connections "
                                             "only has connections = 0")
        kw["connections"] = 0
    elif eps is None:
        if "endpoints" not in unsure:
            problems.add(f"{p}.endpoints", "is required: a list of 'host:port' "
                                           "(or attach_users/attach_groups for attached connections only)")
    elif not isinstance(eps, list) or not eps:
        problems.add(f"{p}.endpoints", "must be a non-empty list of 'host:port'")
    else:
        kw["endpoints"] = tuple(problems.check(Endpoint.parse, e, f"{p}.endpoints[{i}]") for i, e in enumerate(eps))

    def take(key: str, parse: Any, *args: Any) -> None:
        value = problems.check(parse, raw[key], f"{p}.{key}", *args, default=_MISSING)
        if value is _MISSING:
            unsure.add(key)
        else:
            kw[key] = value

    for key, (kind, lo, hi) in _GROUP_NUMBERS.items():
        if key in raw:
            take(key, _int if kind is int else _float, lo, hi)
    choices = {"steering": STEERING_MODES, "unmatched": UNMATCHED_POLICIES, "rx_overflow": RX_OVERFLOW_POLICIES}
    for key, allowed in choices.items():
        if key in raw:
            take(key, _choice, allowed)
    if "framing" in raw:
        take("framing", Framing.from_spec)
    if "id" in raw:
        take("id", _parse_id)
    if "socket" in raw:
        take("socket", _parse_socket, kw.get("endpoints", ()))
    if "tls" in raw:
        take("tls", _parse_tls, problems)
    if "handshake" in raw:
        framing = kw.get("framing", Framing.from_spec("u32be"))
        max_message = kw.get("max_message", _default("max_message"))
        take("handshake", _parse_steps, framing, max_message, problems)
    users = problems.check(_principals, raw["allow_users"], f"{p}.allow_users", "user") if "allow_users" in raw else None
    groups = problems.check(_principals, raw["allow_groups"], f"{p}.allow_groups", "group") if "allow_groups" in raw else None
    kw["access"] = AccessPolicy(users, groups)
    if attaching:
        a_users = (problems.check(_principals, raw["attach_users"], f"{p}.attach_users", "user")
                   if "attach_users" in raw else None)
        a_groups = (problems.check(_principals, raw["attach_groups"], f"{p}.attach_groups", "group")
                    if "attach_groups" in raw else None)
        kw["attach"] = AccessPolicy(a_users, a_groups)
        if "tls" in raw:
            problems.add(f"{p}.attach_users" if "attach_users" in raw else f"{p}.attach_groups",
                         "cannot be used with [tls]: an attached connection is the attacher's plain TCP "
                         "stream, and the daemon cannot take over a TLS session another process began")
    # Checks across keys, only where the keys they read are what the operator meant.
    steering = None if "steering" in unsure else kw.get("steering", "balance")
    if steering == "id" and "id" not in raw and "id" not in unsure:
        problems.add(f"{p}.id", 'steering = "id" needs an [id] table (request_offset, response_offset, size)')
    if "id" in raw and steering not in ("id", None):
        problems.add(f"{p}.id", 'only used with steering = "id"')
    if steering == "balance":
        for key in _REQUEST_ONLY:
            if raw.get(key):
                problems.add(f"{p}.{key}", 'only used with steering = "id" or "fifo"')
    if steering in ("id", "fifo"):
        for key in _BALANCE_ONLY:
            if raw.get(key):
                problems.add(f"{p}.{key}", 'only used with steering = "balance" (id and fifo count answers '
                                           'instead: client_max_in_flight_contended)')
    if len(problems.errors) > before:
        return None
    if "client_rx_limit" not in kw:
        kw["client_rx_limit"] = max(CLIENT_RX_LIMIT_DEFAULT, 2 * kw.get("max_message", _default("max_message")))
    group = GroupConfig(**kw)
    most = group.connections + (group.attach_max if group.attach is not None else 0)
    if group.min_connections > most:
        problems.add(f"{p}.min_connections", f"must not exceed connections ({group.connections})"
                     + (f" plus attach_max ({group.attach_max})" if group.attach is not None else ""))
    if group.reconnect_initial > group.reconnect_max:
        problems.add(f"{p}.reconnect_initial", f"must not exceed reconnect_max ({group.reconnect_max})")
    if group.max_skip < group.max_message:
        problems.add(f"{p}.max_skip", f"must be at least max_message ({group.max_message}); "
                                      "equal to it skips nothing")
    if group.framing.min_header > group.max_message:
        problems.add(f"{p}.framing", f"its header ({group.framing.min_header} bytes) exceeds max_message")
    if group.id is not None:
        group = _fit_id_to_framing(group, p, problems)
    if group.client_rx_limit < group.max_message:
        problems.add(f"{p}.client_rx_limit", f"must be at least max_message ({group.max_message}): one response must fit")
    return group


def _fit_id_to_framing(group: GroupConfig, p: str, problems: "_Problems") -> GroupConfig:
    """``id`` steering reads (and with rewrite, writes) the id in place: it must never touch
    the length field, or a rewrite would change a message's length on a shared stream.
    A ``records`` framing also gets ``first_fragment_min``: a record of several fragments
    must carry the whole id in its first one (otherwise the id would straddle a fragment
    header), in both directions, checked by the framing itself (and so by the clients)."""
    framing, idc = group.framing, group.id
    assert idc is not None
    if framing.kind == "varint":
        return group
    for key, offset in (("request_offset", idc.request_offset), ("response_offset", idc.response_offset)):
        if offset < framing.header_end and framing.length_offset < offset + idc.size:
            problems.add(f"{p}.id.{key}", f"the {idc.size}-byte id at {offset} overlaps the framing's length field "
                                          f"(bytes {framing.length_offset} to {framing.header_end - 1})")
    if framing.kind != "records":
        return group
    need = max(idc.request_offset, idc.response_offset) + idc.size
    if need <= framing.first_fragment_min:
        return group
    return dataclasses.replace(group, framing=dataclasses.replace(framing, first_fragment_min=need))


def _parse_id(raw: Any, p: str) -> IdConfig:
    raw = _table(raw, p)
    problems = _Problems()
    unsure = _no_unknown(raw, p, set(IdConfig.__dataclass_fields__), problems)
    for key in ("request_offset", "response_offset"):
        if key not in raw and key not in unsure:
            problems.add(f"{p}.{key}", "is required")
    size = raw.get("size", 4)
    if size not in (1, 2, 4, 8) or isinstance(size, bool):
        problems.add(f"{p}.size", f"must be 1, 2, 4 or 8, not {size!r}")
    rewrite = raw.get("rewrite", True)
    if not isinstance(rewrite, bool):
        problems.add(f"{p}.rewrite", f"must be true or false, not {rewrite!r}")
    offsets = {
        key: problems.check(_int, raw[key], f"{p}.{key}", 0, 65535)
        for key in ("request_offset", "response_offset") if key in raw
    }
    problems.raise_any()
    return IdConfig(size=size, rewrite=rewrite, **offsets)


# -- [groups.NAME.socket] (docs/config.md, "Socket options") ---------------------------

#: IFNAMSIZ - 1: the longest interface name.
_IFNAME_MAX = 15
#: TCP_CA_NAME_MAX - 1: the longest congestion control name.
_CONGESTION_NAME_MAX = 15
#: Largest TCP_NOTSENT_LOWAT accepted, bytes.
NOTSENT_LOWAT_MAX = 1 << 30
#: TCP_NOTSENT_LOWAT of a group that sets none, bytes. The kernel's own
#: default (net.ipv4.tcp_notsent_lowat) is no limit: a send buffer of
#: megabytes that reports room once a third of it is free, and is then filled
#: in one burst with whatever the apps' sockets held. Beyond this much unsent,
#: messages wait in kmuxd, where every client gets its turn (docs/config.md).
NOTSENT_LOWAT_DEFAULT = 131072
#: Largest tcp_notsent_lowat_messages accepted.
NOTSENT_LOWAT_MESSAGES_MAX = 64
#: tcp_notsent_lowat_messages of a group that sets none: the mark rises to
#: this many of the largest recent message, so that a message larger than the
#: floor is not cut into pieces that each wait for a nearly drained send
#: buffer (kmuxd.core.notsent; measured in docs/config.md).
NOTSENT_LOWAT_MESSAGES_DEFAULT = 4


def _parse_socket(raw: Any, p: str, endpoints: tuple[Endpoint | None, ...]) -> SocketConfig:
    from kmuxd.system.privileges import KernelNet

    raw = _table(raw, p)
    problems = _Problems()
    _no_unknown(raw, p, set(SocketConfig.__dataclass_fields__) | {"dscp"}, problems)
    kw: dict[str, Any] = {}
    if "source_address" in raw:
        kw["source_address"] = problems.check(_source_address, raw["source_address"], f"{p}.source_address", endpoints)
    if "source_ports" in raw:
        kw["source_ports"] = problems.check(_port_range, raw["source_ports"], f"{p}.source_ports")
    if "mark" in raw:
        kw["mark"] = problems.check(_int, raw["mark"], f"{p}.mark", 1, 0xFFFFFFFF)
    if "bind_device" in raw:
        kw["bind_device"] = problems.check(_ifname, raw["bind_device"], f"{p}.bind_device")
    if "tos" in raw and "dscp" in raw:
        problems.add(f"{p}.dscp", "set tos or dscp, not both (dscp = N is tos = N << 2)")
    elif "tos" in raw:
        kw["tos"] = problems.check(_tos, raw["tos"], f"{p}.tos")
    elif "dscp" in raw:
        dscp = problems.check(_int, raw["dscp"], f"{p}.dscp", 0, 63)
        kw["tos"] = None if dscp is None else dscp << 2
    if "congestion" in raw:
        kw["congestion"] = problems.check(_congestion, raw["congestion"], f"{p}.congestion", KernelNet.read())
    if "tcp_notsent_lowat" in raw:
        kw["tcp_notsent_lowat"] = problems.check(_int, raw["tcp_notsent_lowat"], f"{p}.tcp_notsent_lowat",
                                                 1, NOTSENT_LOWAT_MAX)
    if "tcp_notsent_lowat_messages" in raw:
        kw["tcp_notsent_lowat_messages"] = problems.check(_int, raw["tcp_notsent_lowat_messages"],
                                                          f"{p}.tcp_notsent_lowat_messages", 0,
                                                          NOTSENT_LOWAT_MESSAGES_MAX)
    problems.raise_any()
    return SocketConfig(**kw)


def _source_address(v: Any, path: str, endpoints: tuple[Endpoint | None, ...]) -> str:
    if not isinstance(v, str):
        raise ConfigInvalid(path, f"must be an IPv4 or IPv6 address string, not {v!r}")
    try:
        addr = ipaddress.ip_address(v)
    except ValueError:
        raise ConfigInvalid(path, f"{v!r} is not an IPv4 or IPv6 address") from None
    for ep in endpoints:
        if ep is None:
            continue
        try:
            other = ipaddress.ip_address(ep.host.split("%")[0])
        except ValueError:
            continue  # a host name: resolved at each dial, to addresses of the source's family only
        if other.version != addr.version:
            raise ConfigInvalid(path, f"IPv{addr.version} source {v}, but endpoint {ep} is IPv{other.version}")
    return str(addr)


def _port_range(v: Any, path: str) -> tuple[int, int]:
    if (not isinstance(v, list) or len(v) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) for x in v)):
        raise ConfigInvalid(path, f"must be [first, last], two port numbers, not {v!r}")
    first, last = v
    if not 1 <= first <= last <= 65535:
        raise ConfigInvalid(path, f"must be 1 <= first <= last <= 65535, not {v!r}")
    return first, last


def _ifname(v: Any, path: str) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[^/\s:]{1,%d}" % _IFNAME_MAX, v) or v in (".", ".."):
        raise ConfigInvalid(path, f"must be an interface name (1-{_IFNAME_MAX} characters, no '/', ':' or space), "
                                  f"not {v!r}")
    return v


def _tos(v: Any, path: str) -> int:
    tos = _int(v, path, 0, 255)
    if tos & 3:
        raise ConfigInvalid(path, f"the low two bits of {tos:#04x} are ECN, which TCP sets itself; "
                                  f"use {tos & ~3:#04x} (or dscp = {tos >> 2})")
    return tos


def _congestion(v: Any, path: str, kernel: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[a-z0-9_]{1,%d}" % _CONGESTION_NAME_MAX, v):
        raise ConfigInvalid(path, f"must be a congestion control name such as \"cubic\", not {v!r}")
    if v not in kernel.congestion_available:
        have = " ".join(kernel.congestion_available) or "none readable"
        raise ConfigInvalid(path, f"{v!r} is not available in this kernel (net.ipv4.tcp_available_congestion_control: "
                                  f"{have}); load its module first (modprobe tcp_{v})")
    return v


def parse_config(raw: dict[str, Any], source: str = "<memory>") -> Config:
    """Validate a parsed TOML document. Raises ConfigInvalid naming every problem's key path."""
    problems = _Problems()
    unsure = _no_unknown(raw, "", {"version", "daemon", "groups"}, problems)
    if "version" not in raw:
        if "version" not in unsure:
            problems.add("version", f"is required (this kmuxd reads version {CONFIG_VERSION})")
    elif raw["version"] != CONFIG_VERSION:
        problems.add("version", f"must be {CONFIG_VERSION}, not {raw['version']!r}")
    daemon_raw = problems.check(_table, raw.get("daemon", {}), "daemon", default={})
    daemon, daemon_unsure = _parse_daemon(daemon_raw, problems)
    if "control_socket" not in daemon_raw:
        daemon = dataclasses.replace(daemon, control_socket=str(Path(daemon.socket).parent / "control.sock"))
    if daemon.control_socket == daemon.socket and not daemon_unsure & {"socket", "control_socket"}:
        problems.add("daemon.control_socket", "must differ from daemon.socket")
    groups_raw = problems.check(_table, raw.get("groups", {}), "groups", default={})
    if not groups_raw and not problems.errors and "groups" not in unsure:
        problems.add("groups", "at least one group is required")
    groups = {name: _parse_group(name, g, problems) for name, g in groups_raw.items()}
    problems.raise_any()
    return Config(daemon=daemon, groups=groups, source=source, warnings=tuple(problems.warnings))  # type: ignore[arg-type]


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML file. Raises ConfigInvalid (path "" for file-level errors)."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ConfigInvalid("", f"cannot read {path}: {e.strerror or e}") from None
    try:
        raw = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigInvalid("", f"{path} is not UTF-8: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigInvalid("", f"{path} is not valid TOML: {e}") from None
    return parse_config(raw, source=str(path.absolute()))


def _default(field_name: str) -> Any:
    return GroupConfig.__dataclass_fields__[field_name].default


# -- TLS and handshake steps: [groups.NAME.tls], [[groups.NAME.handshake]] -----------------
#
# Both name files only root should read (a private key, a password inside a
# message). The files are read when the configuration loads: a file that is
# missing, unreadable or malformed is a configuration error naming its key,
# not a failed dial at run time; a TLS context is built from them to prove
# it. Their contents count in the comparison a reload makes (a fingerprint
# for TLS, the message itself for a step, kept out of repr), so a reload
# with a changed certificate or password applies it.

#: TLS versions ``min_version`` accepts.
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
#: Most steps in one group's handshake.
HANDSHAKE_STEPS_MAX = 16
_TLS_KEYS = {"ca", "cert", "key", "server_name", "verify", "min_version"}
_STEP_KEYS = {"send_file", "expect_offset", "expect_hex"}


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """``[groups.NAME.tls]``: TLS to the service (docs/config.md)."""

    #: CA file or directory; None: the system's store.
    ca: str | None = None
    #: Our certificate (chain) and its key, for mutual TLS; the key may sit in ``cert``.
    cert: str | None = None
    key: str | None = None
    #: SNI and the name verified; None: the endpoint's host.
    server_name: str | None = None
    verify: bool = True
    min_version: str = "1.2"
    #: sha256 over the files' contents: a reload with a changed file differs.
    fingerprint: str = ""


@dataclass(frozen=True, slots=True)
class HandshakeStep:
    """One step of ``[[groups.NAME.handshake]]``: send a message, check the reply."""

    #: As written in the file, and where it was found.
    send_file: str
    path: str
    #: The reply must carry ``expect`` at ``expect_offset`` (empty: any reply).
    expect_offset: int
    expect: bytes
    #: The file's contents (a secret: never in a repr or a log line).
    message: bytes = field(repr=False)


def _read_secret(file: Path, path: str, problems: _Problems) -> bytes:
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigInvalid(path, f"cannot read {file}: {exc.strerror or exc}") from None
    warning = secret_file_warning(file)
    if warning is not None:
        problems.warn(path, warning)
    return data


def _file_path(v: Any, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigInvalid(path, f"must be a file path, not {v!r}")
    return v


def _fingerprint_of(paths: list[str], secrets: list[bytes]) -> str:
    """sha256 over file contents (a CA directory: its entries' names, sizes and times)."""
    h = hashlib.sha256()
    for data in secrets:
        h.update(hashlib.sha256(data).digest())
    for name in paths:
        p = Path(name)
        if p.is_dir():
            for entry in sorted(p.iterdir()):
                st = entry.stat()
                h.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        else:
            h.update(p.read_bytes())
    return h.hexdigest()


def client_context(tls: TlsConfig) -> ssl.SSLContext:
    """The OpenSSL client context for a group (raises ``ssl.SSLError``/``OSError`` on a bad file)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = TLS_VERSIONS[tls.min_version]
    # A renegotiation would make a write wait for a read: the data path never does that.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    if tls.verify:
        if tls.ca is None:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        elif os.path.isdir(tls.ca):
            ctx.load_verify_locations(capath=tls.ca)
        else:
            ctx.load_verify_locations(cafile=tls.ca)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert is not None:
        ctx.load_cert_chain(tls.cert, tls.key)
    return ctx


def _parse_tls(raw: Any, p: str, outer: _Problems) -> TlsConfig:
    raw = _table(raw, p)
    problems = _Problems()
    _no_unknown(raw, p, _TLS_KEYS, problems)
    kw: dict[str, Any] = {}
    for key in ("ca", "cert", "key"):
        if key in raw:
            value = problems.check(_file_path, raw[key], f"{p}.{key}")
            if value is not None and not os.path.exists(value):
                problems.add(f"{p}.{key}", f"{value} does not exist")
            elif value is not None:
                kw[key] = value
    if "key" in raw and "cert" not in raw:
        problems.add(f"{p}.key", "needs cert (the certificate the key belongs to)")
    if "server_name" in raw:
        name = raw["server_name"]
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._:-]{1,253}", name):
            problems.add(f"{p}.server_name", f"must be a host name or an address, not {name!r}")
        else:
            kw["server_name"] = name
    if "verify" in raw:
        if not isinstance(raw["verify"], bool):
            problems.add(f"{p}.verify", f"must be true or false, not {raw['verify']!r}")
        else:
            kw["verify"] = raw["verify"]
    if "min_version" in raw:
        version = raw["min_version"]
        if isinstance(version, float):
            version = str(version)  # min_version = 1.3 written as a number
        if version not in TLS_VERSIONS:
            problems.add(f"{p}.min_version", f"must be one of {', '.join(map(repr, TLS_VERSIONS))}, not {raw['min_version']!r}")
        else:
            kw["min_version"] = version
    problems.raise_any()
    secrets = [_read_secret(Path(kw["key"]), f"{p}.key", outer)] if "key" in kw else []
    files = [kw[k] for k in ("ca", "cert") if k in kw]
    tls = TlsConfig(**kw, fingerprint=_fingerprint_of(files, secrets))
    if not tls.verify:
        outer.warn(f"{p}.verify", "is false: the service's certificate is NOT checked, anyone on the path can "
                                  "read and change this group's traffic")
    # Load what the daemon will load, one file at a time, so that an error names its key.
    probe = dataclasses.replace(tls, cert=None, key=None)
    for where, trial in ((f"{p}.ca", probe), (f"{p}.key" if tls.key else f"{p}.cert", tls)):
        try:
            client_context(trial)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigInvalid(where, f"OpenSSL refused it: {exc}") from None
    return tls


def _parse_steps(raw: Any, p: str, framing: Framing, max_message: int, outer: _Problems) -> tuple[HandshakeStep, ...]:
    if not isinstance(raw, list) or not raw or not all(isinstance(t, dict) for t in raw):
        raise ConfigInvalid(p, "must be an array of tables: [[groups.NAME.handshake]] with send_file, "
                               "expect_offset, expect_hex")
    if len(raw) > HANDSHAKE_STEPS_MAX:
        raise ConfigInvalid(p, f"has {len(raw)} steps, at most {HANDSHAKE_STEPS_MAX}")
    problems = _Problems()
    steps = []
    check = framing.checker(max_message)
    for i, table in enumerate(raw):
        sp = f"{p}[{i}]"
        _no_unknown(table, sp, _STEP_KEYS, problems)
        if "send_file" not in table:
            problems.add(f"{sp}.send_file", "is required: the file holding the message this step sends")
            continue
        name = problems.check(_file_path, table["send_file"], f"{sp}.send_file")
        offset = problems.check(_int, table.get("expect_offset", 0), f"{sp}.expect_offset", 0, max_message - 1)
        expect = b""
        if "expect_hex" in table:
            text = table["expect_hex"]
            try:
                expect = bytes.fromhex(text) if isinstance(text, str) else None  # type: ignore[assignment]
            except ValueError:
                expect = None  # type: ignore[assignment]
            if not expect:
                problems.add(f"{sp}.expect_hex", f"must be a non-empty hex string like \"0000\", not {text!r}")
        elif "expect_offset" in table:
            problems.add(f"{sp}.expect_hex", "is required with expect_offset")
        if name is None or offset is None or expect is None:
            continue
        file = problems.check(credential_path, name, f"{sp}.send_file")
        if file is None:
            continue
        message = problems.check(_read_secret, file, f"{sp}.send_file", outer)
        if message is None:
            continue
        err = check(message, 0, len(message))
        if err is not None:
            problems.add(f"{sp}.send_file", f"{file} is not one whole {framing.name} message: {err.message}")
            continue
        steps.append(HandshakeStep(name, str(file), offset, expect, message))
    problems.raise_any()
    return tuple(steps)
