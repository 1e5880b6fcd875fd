"""What ``connect()`` was asked for: the client's settings, frozen and self-validating.

Theory of operation
-------------------
:class:`ClientSettings` is built once per client, before any I/O, by
``kmux._client.settings``; a bad argument raises there, naming the argument
(``HandshakeInvalid`` for the group and name, ``TypeError``/``ValueError``
for the rest). It lives apart from the driver because the driver may run
compiled (``kmux._compiled``), where a field's declared type is enforced on
construction: a ``require_up="yes"`` would fail with mypyc's generic type
error before :meth:`ClientSettings.__post_init__` could name the argument.
Here it is always plain Python. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._reconnect import ReconnectPolicy
from .protocol import Hello

__all__ = ["ClientSettings"]


@dataclass(frozen=True)
class ClientSettings:
    """What ``connect()`` was asked for. Validates itself: a bad argument fails before any I/O."""

    group: str
    path: str
    receive: bool = True
    name: str = ""
    #: bounds each connect and handshake (and set_receive's default wait), seconds
    timeout: float | None = 5.0
    validate: bool = True
    #: refuse to attach to a group without a TCP connection up (``accepted.up``)
    require_up: bool = False
    policy: ReconnectPolicy | None = None

    def __post_init__(self) -> None:
        Hello(group=self.group, receive=self.receive, name=self.name)  # HandshakeInvalid names the key
        if not isinstance(self.path, str) or not self.path:
            raise TypeError("socket_path must be a non-empty path")
        if self.timeout is not None and not (isinstance(self.timeout, (int, float)) and self.timeout >= 0):
            raise ValueError(f"timeout must be None or a number of seconds >= 0, not {self.timeout!r}")
        for key in ("validate", "require_up"):
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"{key} must be a bool")
