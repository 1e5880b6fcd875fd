"""The one error hierarchy of kmux and kmuxd.

Every error carries a machine-readable ``code`` (a short snake_case string).
The code is what travels: the daemon puts it in handshake refusals and in
per-message notices, the client library turns it back into the same class,
and ``kmux-cli`` prints it. Texts are for humans and may change; codes don't.

The split follows h11: a :class:`LocalError` means a local party did
something wrong (the app's message, the handshake, the configuration), a
:class:`RemoteError` means the far side failed (the remote service sent bad
framing, a connection died, the daemon went away).

A bug is not a wire error. :class:`InternalError` (an illegal state
transition, a broken invariant) is deliberately *not* a :class:`KmuxError`:
no ``except KmuxError`` on the data path may turn a bug into a notice or a
stream failure. The daemon logs it with a traceback and ends the one
session or connection it happened in.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "KmuxError",
    "LocalError",
    "RemoteError",
    "ConfigInvalid",
    "HandshakeInvalid",
    "VersionUnsupported",
    "UnknownGroup",
    "TooManyClients",
    "MessageTooBig",
    "BadFrame",
    "BadPacket",
    "InternalError",
    "IllegalTransition",
    "ClientClosed",
    "BadRequest",
    "IdInUse",
    "IdsExhausted",
    "UnknownConnection",
    "ReloadRefused",
    "DrainTimeout",
    "DrainInProgress",
    "RemoteFrameTooBig",
    "ResponseTooBig",
    "RemoteBadHeader",
    "RemoteAssemblyTimeout",
    "ConnectFailed",
    "ConnectionLost",
    "RequestTimeout",
    "ControlTimeout",
    "DaemonShutdown",
    "DaemonUnavailable",
    "GroupUnavailable",
    "PermissionDenied",
    "TooManyClientsForUser",
    "SlowConsumer",
    "ResponseDropped",
    "IdleTimeout",
    "AncillaryRefused",
    "AttachRefused",
    "error_class",
    "error_from_code",
]


class KmuxError(Exception):
    """Root of every kmux error. ``code`` is stable and machine-readable."""

    code = "error"

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        #: Extra fields that travel with the error, e.g. ``seq`` of a message.
        self.details = details

    @property
    def seq(self) -> int | None:
        """For per-message errors: the message's place in its client's order (1-based)."""
        return self.details.get("seq")

    def __str__(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in sorted(self.details.items()))
        return f"[{self.code}] {self.message}{extra}"

    def to_wire(self) -> dict[str, Any]:
        """The map that carries this error to a client or the CLI."""
        return {"code": self.code, "error": self.message, **self.details}


class LocalError(KmuxError):
    """A local party (app, handshake, configuration) did something wrong."""

    code = "local_error"


class RemoteError(KmuxError):
    """The far side (remote service, network, daemon) failed."""

    code = "remote_error"


# -- local ---------------------------------------------------------------


class ConfigInvalid(LocalError):
    """A configuration file failed validation; ``path`` names the key."""

    code = "config_invalid"

    def __init__(self, path: str, reason: str, problems: list[list[str]] | None = None) -> None:
        if problems:
            super().__init__(reason, path=path, problems=problems)
        else:
            super().__init__(f"{path}: {reason}" if path else reason, path=path)
        self.path = path
        self.reason = reason
        #: Every problem found, as ``[key path, reason]`` pairs (at least this one).
        self.problems: list[list[str]] = problems or [[path, reason]]

    @classmethod
    def several(cls, errors: list["ConfigInvalid"]) -> "ConfigInvalid":
        """One error that carries every problem of a file, in file order."""
        if len(errors) == 1:
            return errors[0]
        problems = [p for e in errors for p in e.problems]
        text = f"{len(problems)} problems: " + "; ".join(f"{p}: {r}" if p else r for p, r in problems)
        return cls(problems[0][0], text, problems)

    def lines(self) -> list[str]:
        """One line per problem, ``key.path: reason``."""
        return [f"{p}: {r}" if p else r for p, r in self.problems]
        self.reason = reason


class HandshakeInvalid(LocalError):
    code = "handshake_invalid"


class VersionUnsupported(LocalError):
    code = "version_unsupported"


class UnknownGroup(LocalError):
    code = "unknown_group"


class TooManyClients(LocalError):
    code = "too_many_clients"


class MessageTooBig(LocalError):
    """An outgoing message is larger than the group's ``max_message``."""

    code = "message_too_big"


class BadFrame(LocalError):
    """An outgoing message's header disagrees with its size (it was not written)."""

    code = "bad_frame"


class BadPacket(LocalError):
    """A packet on the client socket that the protocol does not allow."""

    code = "bad_packet"




class PermissionDenied(LocalError):
    """The group's access policy (``allow_users``/``allow_groups``) does not admit this
    peer, or a control request needs privileges the caller lacks."""

    code = "permission_denied"


class TooManyClientsForUser(TooManyClients):
    """This uid already has ``max_clients_per_uid`` clients attached."""

    code = "too_many_clients_for_user"


class SlowConsumer(LocalError):
    """The client let more than ``client_rx_limit`` bytes of responses wait
    unread (``rx_overflow = "disconnect"``); it is detached."""

    code = "slow_consumer"


class ResponseDropped(LocalError):
    """A response for this client was dropped: its queue was past
    ``client_rx_limit`` (``rx_overflow = "drop"``). ``seq`` names the request."""

    code = "response_dropped"


class IdleTimeout(LocalError):
    """The client sent and received nothing for ``client_idle_timeout``; it is detached."""

    code = "idle_timeout"


class AncillaryRefused(LocalError):
    """A packet carried ancillary data (file descriptors, credentials); kmuxd
    refuses it unread and closes any descriptor at once."""

    code = "ancillary_refused"


class AttachRefused(LocalError):
    """Op ``attach``: the passed descriptor cannot join the group's pool. ``reason``
    says why: ``not_inet``, ``not_stream``, ``not_tcp``, ``listening``,
    ``not_connected``, ``unread_data``, ``no_descriptor``, ``attach_max`` or
    ``socket_error``. The daemon closed its copy at once."""

    code = "attach_refused"


class IdInUse(LocalError):
    """steering = "id" without rewrite: that id is already in flight (it was not written)."""

    code = "id_in_use"


class IdsExhausted(LocalError):
    """steering = "id" with rewrite: every id of the space is in flight (it was not written)."""

    code = "ids_exhausted"


class BadRequest(LocalError):
    """A control-socket request the daemon does not understand."""

    code = "bad_request"


class UnknownConnection(LocalError):
    code = "unknown_connection"


class ReloadRefused(LocalError):
    """A reload asked for a change that needs a restart."""

    code = "reload_refused"


class DrainInProgress(LocalError):
    """A drain was asked for a connection that is already draining."""

    code = "drain_in_progress"


class DrainTimeout(RemoteError):
    """A draining connection did not write its queue in time; it stays in service."""

    code = "drain_timeout"


class ClientClosed(LocalError):
    """The client object was used after ``close()``."""

    code = "client_closed"


# -- remote --------------------------------------------------------------


class RemoteFrameTooBig(RemoteError):
    """The remote service announced a message longer than ``max_message``."""

    code = "remote_frame_too_big"


class ResponseTooBig(RemoteError):
    """The response to the request ``seq`` was over the group's ``max_message``: it
    was skipped, unread, and the connection carries on. ``size`` is its length,
    ``max_message`` the limit."""

    code = "response_too_big"


class RemoteBadHeader(RemoteError):
    """The remote service sent a length header that cannot be valid."""

    code = "remote_bad_header"


class RemoteAssemblyTimeout(RemoteError):
    """A partial incoming message outlasted ``assembly_timeout``."""

    code = "remote_assembly_timeout"


class ConnectFailed(RemoteError):
    code = "connect_failed"


class ConnectionLost(RemoteError):
    """The TCP connection that carried a request died before its answer."""

    code = "connection_lost"


class RequestTimeout(RemoteError):
    code = "request_timeout"


class ControlTimeout(RemoteError):
    """kmuxd's control socket gave no answer in time (kmux-cli, ControlClient)."""

    code = "control_timeout"


class DaemonShutdown(RemoteError):
    code = "daemon_shutdown"


class GroupUnavailable(RemoteError):
    """The group has no connection up: a message waited ``queue_timeout`` for
    one and was not written (``seq`` names it), or ``connect(require_up=True)``
    found none."""

    code = "group_unavailable"


class DaemonUnavailable(RemoteError):
    """The daemon's socket could not be reached (not running, or no permission)."""

    code = "daemon_unavailable"


# -- bugs (not wire errors) -----------------------------------------------


class InternalError(Exception):
    """A bug: a broken invariant of kmux or kmuxd. Not a :class:`KmuxError`, on purpose."""


class IllegalTransition(InternalError):
    """A state machine got an input its table does not allow."""


def _all_subclasses(cls: type[KmuxError]) -> list[type[KmuxError]]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


_BY_CODE: dict[str, type[KmuxError]] = {
    c.code: c for c in [KmuxError, *_all_subclasses(KmuxError)] if c is not ConfigInvalid
}


def error_class(code: str) -> type[KmuxError]:
    """The class for a code; unknown codes (from a newer daemon) map to the root."""
    return _BY_CODE.get(code, KmuxError)


def error_from_code(code: str, message: str = "", **details: Any) -> KmuxError:
    """Rebuild an error that arrived as ``{"code":..., "error":..., **details}``."""
    cls = error_class(code)
    err = cls(message, **details)
    if cls is KmuxError:
        err.code = code  # keep the daemon's code even if this library predates it
    return err
