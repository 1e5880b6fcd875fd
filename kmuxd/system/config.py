"""Configuration: TOML in, frozen and validated dataclasses out.

Every check happens at load, before anything starts, and a failure names the
exact key path (``groups.echo.connections``) and the reason. Every problem
of a file is reported at once (:meth:`ConfigInvalid.several`), not only the
first, so an operator fixes a file in one pass. Every limit and
timeout the daemon uses is a named setting here, with its default and unit in
``docs/config.md``. Unknown keys are errors: a typo must never silently fall
back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmux.errors import ConfigInvalid
from kmux.framing import Framing
from kmux.protocol import MAX_MESSAGE_CEILING

from kmuxd.core.access import OPEN, AccessPolicy, Principal

__all__ = ["Config", "DaemonConfig", "GroupConfig", "IdConfig", "Endpoint", "load_config", "parse_config", "STEERING_MODES"]

CONFIG_VERSION = 1
STEERING_MODES = ("balance", "id", "fifo")
UNMATCHED_POLICIES = ("drop", "balance")
RX_OVERFLOW_POLICIES = ("disconnect", "drop")
#: client_rx_limit when not set: this, or twice max_message if that is larger.
CLIENT_RX_LIMIT_DEFAULT = 4 * 1024 * 1024
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
    #: Most unsent bytes the kernel holds for one connection
    #: (TCP_NOTSENT_LOWAT); beyond it messages wait in kmuxd, in turn. 0: no limit.
    tcp_notsent_lowat: int = 131072
    #: Messages taken from one client per turn before the next client's turn.
    client_turn: int = 64
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


@dataclass(frozen=True, slots=True)
class Config:
    daemon: DaemonConfig
    groups: dict[str, GroupConfig]
    source: str = "<memory>"


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


def _choice(v: Any, path: str, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise ConfigInvalid(path, f"must be one of {', '.join(map(repr, choices))}, not {v!r}")
    return v


def _table(v: Any, path: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ConfigInvalid(path, f"must be a table, not {type(v).__name__}")
    return v


class _Problems:
    """Collects every ConfigInvalid of a file instead of stopping at the first."""

    def __init__(self) -> None:
        self.errors: list[ConfigInvalid] = []

    def check(self, fn: Any, *args: Any, default: Any = None) -> Any:
        """``fn(*args)``, or ``default`` after recording the ConfigInvalid it raised."""
        try:
            return fn(*args)
        except ConfigInvalid as exc:
            self.errors.append(exc)
            return default

    def add(self, path: str, reason: str) -> None:
        self.errors.append(ConfigInvalid(path, reason))

    def raise_any(self) -> None:
        if self.errors:
            raise ConfigInvalid.several(self.errors)


def _no_unknown(table: dict[str, Any], path: str, allowed: set[str], problems: _Problems) -> None:
    for key in table:
        if key not in allowed:
            problems.add(f"{path}.{key}" if path else key, f"unknown key (allowed: {', '.join(sorted(allowed))})")


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


def _parse_daemon(raw: dict[str, Any], problems: _Problems) -> DaemonConfig:
    p = "daemon"
    _no_unknown(raw, p, set(DaemonConfig.__dataclass_fields__), problems)
    kw: dict[str, Any] = {}
    for key, parse in _DAEMON_SETTINGS.items():
        if key in raw:
            value = problems.check(parse, raw[key], f"{p}.{key}", default=_MISSING)
            if value is not _MISSING:
                kw[key] = value
    return DaemonConfig(**kw)


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
    "assembly_timeout": (float, 0.001, 3600.0),
    "connect_timeout": (float, 0.001, 600.0),
    "reconnect_initial": (float, 0.001, 600.0),
    "reconnect_max": (float, 0.001, 3600.0),
    "write_buffer": (int, 4096, 64 * 1024 * 1024),
    "tcp_notsent_lowat": (int, 0, 64 * 1024 * 1024),
    "client_turn": (int, 1, 65536),
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
}
#: Keys of a group table that are not GroupConfig fields of the same name.
_GROUP_KEYS = (set(GroupConfig.__dataclass_fields__) - {"name", "access"}) | {"allow_users", "allow_groups"}
#: Settings that only make sense with request/response steering.
_REQUEST_ONLY = ("retry_unanswered", "request_timeout")


def _parse_group(name: str, raw: Any, problems: _Problems) -> GroupConfig | None:
    p = f"groups.{name}"
    if not _GROUP_NAME.match(name):
        problems.add(p, "group names are 1-64 characters of A-Z a-z 0-9 _ . - (not starting with _ . -)")
        return None
    raw = problems.check(_table, raw, p)
    if raw is None:
        return None
    before = len(problems.errors)
    _no_unknown(raw, p, _GROUP_KEYS, problems)
    kw: dict[str, Any] = {"name": name}
    eps = raw.get("endpoints")
    if eps is None:
        problems.add(f"{p}.endpoints", "is required: a list of 'host:port'")
    elif not isinstance(eps, list) or not eps:
        problems.add(f"{p}.endpoints", "must be a non-empty list of 'host:port'")
    else:
        kw["endpoints"] = tuple(problems.check(Endpoint.parse, e, f"{p}.endpoints[{i}]") for i, e in enumerate(eps))
    for key, (kind, lo, hi) in _GROUP_NUMBERS.items():
        if key in raw:
            value = problems.check(_int if kind is int else _float, raw[key], f"{p}.{key}", lo, hi, default=_MISSING)
            if value is not _MISSING:
                kw[key] = value
    choices = {"steering": STEERING_MODES, "unmatched": UNMATCHED_POLICIES, "rx_overflow": RX_OVERFLOW_POLICIES}
    for key, allowed in choices.items():
        if key in raw:
            value = problems.check(_choice, raw[key], f"{p}.{key}", allowed, default=_MISSING)
            if value is not _MISSING:
                kw[key] = value
    if "framing" in raw:
        value = problems.check(Framing.from_spec, raw["framing"], f"{p}.framing", default=_MISSING)
        if value is not _MISSING:
            kw["framing"] = value
    if "id" in raw:
        value = problems.check(_parse_id, raw["id"], f"{p}.id", default=_MISSING)
        if value is not _MISSING:
            kw["id"] = value
    users = problems.check(_principals, raw["allow_users"], f"{p}.allow_users", "user") if "allow_users" in raw else None
    groups = problems.check(_principals, raw["allow_groups"], f"{p}.allow_groups", "group") if "allow_groups" in raw else None
    kw["access"] = AccessPolicy(users, groups)
    steering = kw.get("steering", raw.get("steering", "balance"))
    if steering == "id" and "id" not in raw:
        problems.add(f"{p}.id", 'steering = "id" needs an [id] table (request_offset, response_offset, size)')
    if "id" in raw and steering != "id":
        problems.add(f"{p}.id", 'only used with steering = "id"')
    if steering == "balance":
        for key in _REQUEST_ONLY:
            if raw.get(key):
                problems.add(f"{p}.{key}", 'only used with steering = "id" or "fifo"')
    if len(problems.errors) > before:
        return None
    if "client_rx_limit" not in kw:
        kw["client_rx_limit"] = max(CLIENT_RX_LIMIT_DEFAULT, 2 * kw.get("max_message", _default("max_message")))
    group = GroupConfig(**kw)
    if group.min_connections > group.connections:
        problems.add(f"{p}.min_connections", f"must not exceed connections ({group.connections})")
    if group.reconnect_initial > group.reconnect_max:
        problems.add(f"{p}.reconnect_initial", f"must not exceed reconnect_max ({group.reconnect_max})")
    if group.framing.min_header > group.max_message:
        problems.add(f"{p}.framing", f"its header ({group.framing.min_header} bytes) exceeds max_message")
    if group.client_rx_limit < group.max_message:
        problems.add(f"{p}.client_rx_limit", f"must be at least max_message ({group.max_message}): one response must fit")
    return group


def _parse_id(raw: Any, p: str) -> IdConfig:
    raw = _table(raw, p)
    problems = _Problems()
    _no_unknown(raw, p, set(IdConfig.__dataclass_fields__), problems)
    for key in ("request_offset", "response_offset"):
        if key not in raw:
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


def parse_config(raw: dict[str, Any], source: str = "<memory>") -> Config:
    """Validate a parsed TOML document. Raises ConfigInvalid naming every problem's key path."""
    problems = _Problems()
    _no_unknown(raw, "", {"version", "daemon", "groups"}, problems)
    if "version" not in raw:
        problems.add("version", f"is required (this kmuxd reads version {CONFIG_VERSION})")
    elif raw["version"] != CONFIG_VERSION:
        problems.add("version", f"must be {CONFIG_VERSION}, not {raw['version']!r}")
    daemon_raw = problems.check(_table, raw.get("daemon", {}), "daemon", default={})
    daemon = _parse_daemon(daemon_raw, problems)
    if "control_socket" not in daemon_raw:
        daemon = dataclasses.replace(daemon, control_socket=str(Path(daemon.socket).parent / "control.sock"))
    if daemon.control_socket == daemon.socket:
        problems.add("daemon.control_socket", "must differ from daemon.socket")
    groups_raw = problems.check(_table, raw.get("groups", {}), "groups", default={})
    if not groups_raw and not problems.errors:
        problems.add("groups", "at least one group is required")
    groups = {name: _parse_group(name, g, problems) for name, g in groups_raw.items()}
    problems.raise_any()
    return Config(daemon=daemon, groups=groups, source=source)  # type: ignore[arg-type]


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
