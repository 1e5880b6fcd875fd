"""kmux: send and receive whole messages through kmuxd.

An app joins a *group*; kmuxd writes each message it sends onto one of the
group's shared TCP connections and hands it the messages that come back.
A message is a whole frame of the group's protocol, header included.

    import kmux

    with kmux.connect("echo") as client:
        client.send(b"\\x00\\x00\\x00\\x04ping")   # u32be framing
        reply = client.recv(timeout=1.0)

The blocking client lives here; the trio client is ``kmux.trio``, a
submodule, so that importing ``kmux`` does not import trio. The wire
protocol itself is in ``kmux.protocol`` (no I/O) and ``docs/protocol.md``.
"""

from __future__ import annotations

import os

from . import errors
from ._driver import ClientStatistics
from ._reconnect import AccountingLost, AccountingWarning, Overflow, ReconnectPolicy, UnknownFate
from ._sync import Client, ReconnectingClient, connect
from .errors import *  # noqa: F403 -- the error classes are part of the public surface
from .framing import Framing

#: Where kmuxd listens unless ``$KMUX_SOCKET`` says otherwise.
DEFAULT_SOCKET = "/run/kmuxd/kmuxd.sock"


def default_socket_path() -> str:
    """``$KMUX_SOCKET`` if set (and not empty), else :data:`DEFAULT_SOCKET`."""
    return os.environ.get("KMUX_SOCKET") or DEFAULT_SOCKET


__all__ = [
    "connect",
    "Client",
    "ReconnectingClient",
    "ReconnectPolicy",
    "ClientStatistics",
    "UnknownFate",
    "Overflow",
    "AccountingLost",
    "AccountingWarning",
    "Framing",
    "DEFAULT_SOCKET",
    "default_socket_path",
    *(name for name in errors.__all__ if name not in ("error_class", "error_from_code")),
]
