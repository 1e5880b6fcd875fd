"""What every kmux client shows, whichever transport runs its driver.

The blocking clients (:mod:`kmux._sync`, built by :func:`connect`, here
because that module may run compiled) and the trio clients
(:mod:`kmux.trio`) differ only in how they run a
:class:`~kmux._driver.ClientDriver`; the properties here read the driver
and are the same for all four. :class:`ClientInfo` is what any client
shows (from the handshake's answer and the counters), and
:class:`ReconnectInfo` adds the reconnect accounting of the reconnecting
forms. The README's "Surviving daemon restarts" explains the accounting.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from ._driver import ClientDriver, ClientSettings, ClientStatistics
from ._reconnect import ReconnectCore, ReconnectPolicy, UnknownFate, as_policy
from .errors import DaemonUnavailable

if TYPE_CHECKING:
    from ._sync import Client

__all__ = ["ClientInfo", "ReconnectInfo", "settings", "connect"]


def settings(
    group: str,
    socket_path: str | os.PathLike[str] | None,
    *,
    receive: bool,
    name: str,
    timeout: float | None,
    validate: bool,
    reconnect: bool | ReconnectPolicy,
    require_up: bool,
) -> ClientSettings:
    """``connect()``'s arguments, checked, with the socket path resolved."""
    from . import default_socket_path  # late: kmux/__init__ imports the transports

    path = os.fspath(socket_path) if socket_path is not None else default_socket_path()
    return ClientSettings(group=group, path=path, receive=receive, name=name, timeout=timeout, validate=validate,
                          require_up=require_up, policy=as_policy(reconnect))


def connect(
    group: str,
    socket_path: str | os.PathLike[str] | None = None,
    *,
    receive: bool = True,
    name: str = "",
    timeout: float | None = 5.0,
    validate: bool = True,
    reconnect: bool | ReconnectPolicy = False,
    require_up: bool = False,
) -> "Client":
    """Join ``group`` and return a connected :class:`Client`.

    ``socket_path`` defaults to ``$KMUX_SOCKET`` or ``/run/kmuxd/kmuxd.sock``.
    ``timeout`` bounds the connect and the handshake (TimeoutError) and is
    the default bound of :meth:`Client.set_receive`. ``receive=False``
    joins as a sender only. ``validate=False`` leaves checking each
    message's framing to the daemon. ``require_up=True`` refuses a group
    that has no TCP connection up (:class:`~kmux.errors.GroupUnavailable`).
    A refusal raises its own class (:class:`~kmux.errors.UnknownGroup`,
    ...); an unreachable daemon raises :class:`~kmux.errors.DaemonUnavailable`.

    ``reconnect=True`` (or a :class:`~kmux.ReconnectPolicy`) returns a
    :class:`ReconnectingClient` instead, which survives daemon restarts; the
    connect itself then retries within the policy's bounds.
    """
    from ._sync import Client, ReconnectingClient  # late: kmux._sync builds on this module

    s = settings(group, socket_path, receive=receive, name=name, timeout=timeout, validate=validate,
                 reconnect=reconnect, require_up=require_up)
    client = (ReconnectingClient if s.policy is not None else Client)(s)
    try:
        client._run(client._driver.open())
    except BaseException:
        client.close()
        raise
    return client


def _answered(field: str, doc: str) -> property:
    """A field of the daemon's accepted answer (the current or the latest connection's)."""
    return property(lambda self: getattr(self._driver.session.accepted, field), doc=doc)


def _accounted(read: Callable[[ReconnectCore], Any], doc: str) -> property:
    """A figure of the reconnect accounting."""
    return property(lambda self: read(self._driver.core), doc=doc)


class ClientInfo:
    """A client's identity and limits, as the daemon's answer gave them."""

    _driver: ClientDriver

    client_id = _answered("client_id", "The daemon's id of this connection (a reconnecting client gets a new one).")
    max_message = _answered("max_message", "The group's bound on a message, header included, in bytes.")
    framing = _answered("framing", "The group's framing (a kmux.Framing).")
    steering = _answered("steering", "How the group steers received messages: balance, id or fifo.")
    up = _answered("up", "Whether the group had a TCP connection up when it accepted this connection.")

    @property
    def group(self) -> str:
        return self._driver.settings.group

    @property
    def seq(self) -> int:
        """The seq of the last message sent (notices name messages by it)."""
        return self._driver.seq

    def fileno(self) -> int:
        """The socket's descriptor, for select/poll (a reconnecting client's changes
        on every reconnect). Readable does not promise a message: the packet
        may be a notice or a piece that ``recv`` consumes and keeps waiting."""
        conn = self._driver.conn
        if conn is None or conn.lost is not None:
            raise DaemonUnavailable("not connected")
        return conn.link.fileno()

    def statistics(self) -> ClientStatistics:
        return self._driver.statistics()

    def __repr__(self) -> str:
        d = self._driver
        state = "closed" if d.closed else "connected" if d.connected else "disconnected"
        return f"<kmux.{type(self).__name__} group={self.group!r} {state} seq={d.seq if d.last else 0}>"


class ReconnectInfo:
    """The reconnect accounting of a reconnecting client."""

    _driver: ClientDriver

    accepted_seq = _accounted(lambda core: core.accepted_seq, "Every message up to this seq is accounted for.")
    reconnects = _accounted(lambda core: core.counters.reconnects, "Connections made after the first.")
    resent = _accounted(lambda core: core.counters.resent, "Messages sent again after a lost connection.")
    guaranteed = _accounted(
        lambda core: core.guaranteed, "False while a message of unknown fate may have been dropped from the buffer."
    )

    @property
    def policy(self) -> ReconnectPolicy:
        return self._driver.settings.policy  # type: ignore[return-value]

    @property
    def connected(self) -> bool:
        return self._driver.connected

    @property
    def unknown_fate(self) -> list[UnknownFate]:
        """One record per connection that ended without a shutdown notice while
        messages were unaccounted. The app may clear the list."""
        return self._driver.unknown_fate

    def stats(self) -> dict[str, Any]:
        """Counters: reconnects, resent, resent_unknown, unknown, dropped, accepted_seq, ..."""
        return self._driver.core.stats()  # type: ignore[union-attr]
