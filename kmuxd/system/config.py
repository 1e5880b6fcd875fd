"""Configuration: TOML in, frozen and validated dataclasses out.

Every check happens at load, before anything starts, and a failure names the
exact key path (``groups.echo.connections``) and the reason. Every limit and
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

__all__ = ["Config", "DaemonConfig", "GroupConfig", "IdConfig", "Endpoint", "load_config", "parse_config", "STEERING_MODES"]

CONFIG_VERSION = 1
STEERING_MODES = ("balance", "id", "fifo")
UNMATCHED_POLICIES = ("drop", "balance")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LOG_FORMATS = ("auto", "console", "json", "journal")
_LOG_LEVELS = ("debug", "info", "warning", "error")
#: Hard ceiling for max_message whatever the kernel allows (bounded memory).
MAX_MESSAGE_CEILING = 64 * 1024 * 1024


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
    #: Seconds a new client may take to send its hello.
    handshake_timeout: float = 5.0
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
    #: Messages taken from one client per turn before the next client's turn.
    client_turn: int = 64
    #: Bytes read from a TCP connection per recv (plus room for max_message).
    read_buffer: int = 262144
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


def _no_unknown(table: dict[str, Any], path: str, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigInvalid(f"{path}.{key}" if path else key, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def seqpacket_message_limit() -> int | None:
    """Largest packet an unprivileged client can send, from net.core.wmem_max.

    The kernel doubles SO_SNDBUF (capped at wmem_max) and refuses a packet
    over sk_sndbuf - 32; we keep 4 KiB of headroom for skb overhead.
    """
    try:
        wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    except (OSError, ValueError):
        return None
    return 2 * wmem_max - 4096


def _socket_path(v: Any, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigInvalid(path, "must be a non-empty path")
    if len(v.encode()) > 107:
        raise ConfigInvalid(path, "Unix socket paths are limited to 107 bytes")
    return v


def _parse_daemon(raw: dict[str, Any]) -> DaemonConfig:
    p = "daemon"
    _no_unknown(raw, p, set(DaemonConfig.__dataclass_fields__))
    kw: dict[str, Any] = {}
    if "socket" in raw:
        kw["socket"] = _socket_path(raw["socket"], f"{p}.socket")
    if "control_socket" in raw:
        kw["control_socket"] = _socket_path(raw["control_socket"], f"{p}.control_socket")
    if "control_group" in raw:
        group = raw["control_group"]
        if not isinstance(group, str):
            raise ConfigInvalid(f"{p}.control_group", f"must be a group name, not {group!r}")
        if group:
            import grp

            try:
                grp.getgrnam(group)
            except KeyError:
                raise ConfigInvalid(f"{p}.control_group", f"no such group {group!r} on this system") from None
        kw["control_group"] = group
    if "socket_mode" in raw:
        mode = raw["socket_mode"]
        if isinstance(mode, str) and re.fullmatch(r"0?[0-7]{3}", mode):
            kw["socket_mode"] = int(mode, 8)
        else:
            raise ConfigInvalid(f"{p}.socket_mode", f"must be an octal string like \"0660\", not {mode!r}")
    if "max_clients" in raw:
        kw["max_clients"] = _int(raw["max_clients"], f"{p}.max_clients", 1, 1_000_000)
    if "handshake_timeout" in raw:
        kw["handshake_timeout"] = _float(raw["handshake_timeout"], f"{p}.handshake_timeout", 0.01, 3600)
    if "shutdown_grace" in raw:
        kw["shutdown_grace"] = _float(raw["shutdown_grace"], f"{p}.shutdown_grace", 0, 3600)
    if "client_notice_limit" in raw:
        kw["client_notice_limit"] = _int(raw["client_notice_limit"], f"{p}.client_notice_limit", 1, 1_000_000)
    if "log_format" in raw:
        kw["log_format"] = _choice(raw["log_format"], f"{p}.log_format", _LOG_FORMATS)
    if "log_level" in raw:
        kw["log_level"] = _choice(raw["log_level"], f"{p}.log_level", _LOG_LEVELS)
    return DaemonConfig(**kw)


_GROUP_NUMBERS: dict[str, tuple[type, Any, Any]] = {
    "connections": (int, 1, 1024),
    "max_message": (int, 16, MAX_MESSAGE_CEILING),
    "assembly_timeout": (float, 0.001, 3600.0),
    "connect_timeout": (float, 0.001, 600.0),
    "reconnect_initial": (float, 0.001, 600.0),
    "reconnect_max": (float, 0.001, 3600.0),
    "write_buffer": (int, 4096, 64 * 1024 * 1024),
    "client_turn": (int, 1, 65536),
    "read_buffer": (int, 4096, 64 * 1024 * 1024),
    "rx_batch": (int, 1, 65536),
    "request_timeout": (float, 0.0, 3600.0),
    "min_connections": (int, 0, 1024),
}


def _parse_group(name: str, raw: Any) -> GroupConfig:
    p = f"groups.{name}"
    if not _GROUP_NAME.match(name):
        raise ConfigInvalid(p, "group names are 1-64 characters of A-Z a-z 0-9 _ . - (not starting with _ . -)")
    raw = _table(raw, p)
    _no_unknown(raw, p, set(GroupConfig.__dataclass_fields__) - {"name"})
    if "endpoints" not in raw:
        raise ConfigInvalid(f"{p}.endpoints", "is required: a list of 'host:port'")
    eps = raw["endpoints"]
    if not isinstance(eps, list) or not eps:
        raise ConfigInvalid(f"{p}.endpoints", "must be a non-empty list of 'host:port'")
    kw: dict[str, Any] = {
        "name": name,
        "endpoints": tuple(Endpoint.parse(e, f"{p}.endpoints[{i}]") for i, e in enumerate(eps)),
    }
    for key, (kind, lo, hi) in _GROUP_NUMBERS.items():
        if key in raw:
            kw[key] = (_int if kind is int else _float)(raw[key], f"{p}.{key}", lo, hi)
    if "framing" in raw:
        kw["framing"] = Framing.from_spec(raw["framing"], f"{p}.framing")
    if "steering" in raw:
        kw["steering"] = _choice(raw["steering"], f"{p}.steering", STEERING_MODES)
    if "unmatched" in raw:
        kw["unmatched"] = _choice(raw["unmatched"], f"{p}.unmatched", UNMATCHED_POLICIES)
    if "id" in raw:
        kw["id"] = _parse_id(raw["id"], f"{p}.id")
    if kw.get("steering") == "id" and "id" not in kw:
        raise ConfigInvalid(f"{p}.id", 'steering = "id" needs an [id] table (request_offset, response_offset, size)')
    if "id" in kw and kw.get("steering") != "id":
        raise ConfigInvalid(f"{p}.id", 'only used with steering = "id"')
    group = GroupConfig(**kw)
    if group.min_connections > group.connections:
        raise ConfigInvalid(f"{p}.min_connections", f"must not exceed connections ({group.connections})")
    if group.reconnect_initial > group.reconnect_max:
        raise ConfigInvalid(f"{p}.reconnect_initial", f"must not exceed reconnect_max ({group.reconnect_max})")
    limit = seqpacket_message_limit()
    if limit is not None and group.max_message + 1 > limit:
        raise ConfigInvalid(
            f"{p}.max_message",
            f"{group.max_message} bytes cannot travel in one SEQPACKET packet here: net.core.wmem_max "
            f"allows at most {limit - 1} (raise net.core.wmem_max or lower max_message)",
        )
    if group.framing.min_header > group.max_message:
        raise ConfigInvalid(f"{p}.framing", f"its header ({group.framing.min_header} bytes) exceeds max_message")
    return group


def _parse_id(raw: Any, p: str) -> IdConfig:
    raw = _table(raw, p)
    _no_unknown(raw, p, set(IdConfig.__dataclass_fields__))
    for key in ("request_offset", "response_offset"):
        if key not in raw:
            raise ConfigInvalid(f"{p}.{key}", "is required")
    size = raw.get("size", 4)
    if size not in (1, 2, 4, 8) or isinstance(size, bool):
        raise ConfigInvalid(f"{p}.size", f"must be 1, 2, 4 or 8, not {size!r}")
    rewrite = raw.get("rewrite", True)
    if not isinstance(rewrite, bool):
        raise ConfigInvalid(f"{p}.rewrite", f"must be true or false, not {rewrite!r}")
    return IdConfig(
        request_offset=_int(raw["request_offset"], f"{p}.request_offset", 0, 65535),
        response_offset=_int(raw["response_offset"], f"{p}.response_offset", 0, 65535),
        size=size,
        rewrite=rewrite,
    )


def parse_config(raw: dict[str, Any], source: str = "<memory>") -> Config:
    """Validate a parsed TOML document. Raises ConfigInvalid naming the key path."""
    _no_unknown(raw, "", {"version", "daemon", "groups"})
    if "version" not in raw:
        raise ConfigInvalid("version", f"is required (this kmuxd reads version {CONFIG_VERSION})")
    if raw["version"] != CONFIG_VERSION:
        raise ConfigInvalid("version", f"must be {CONFIG_VERSION}, not {raw['version']!r}")
    daemon_raw = _table(raw.get("daemon", {}), "daemon")
    daemon = _parse_daemon(daemon_raw)
    if "control_socket" not in daemon_raw:
        daemon = dataclasses.replace(daemon, control_socket=str(Path(daemon.socket).parent / "control.sock"))
    if daemon.control_socket == daemon.socket:
        raise ConfigInvalid("daemon.control_socket", "must differ from daemon.socket")
    groups_raw = _table(raw.get("groups", {}), "groups")
    if not groups_raw:
        raise ConfigInvalid("groups", "at least one group is required")
    groups = {name: _parse_group(name, g) for name, g in groups_raw.items()}
    return Config(daemon=daemon, groups=groups, source=source)


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
