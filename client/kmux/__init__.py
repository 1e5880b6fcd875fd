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

from ._compiled import install_guard as _install_guard

# Before any compiled module is imported: the fast lane's extensions, or all of it from source.
_install_guard()

from . import errors  # noqa: E402
from ._driver import ClientStatistics  # noqa: E402
from ._reconnect import AccountingLost, AccountingWarning, Overflow, ReconnectPolicy, UnknownFate  # noqa: E402
from ._client import connect  # noqa: E402
from ._sync import Client, ReconnectingClient  # noqa: E402
from .errors import *  # noqa: F403 -- the error classes are part of the public surface
from .framing import Framing  # noqa: E402

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
