"""A blocking client for kmuxd's control socket (what ``kmux-cli`` speaks).

The control protocol is one msgpack map per SEQPACKET packet each way
(``docs/protocol.md``, "Control socket"). This module is the wire contract
for tools other than ``kmux-cli``: scripts and tests use it to read
statistics or ask for a reload without an event loop.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import msgpack

from .errors import ControlTimeout, DaemonUnavailable, KmuxError, RemoteError, error_from_code

__all__ = ["ControlClient", "DEFAULT_CONTROL", "MAX_ANSWER"]

DEFAULT_CONTROL = "/run/kmuxd/control.sock"
#: An answer larger than this is refused instead of allocated: a stats answer
#: for thousands of clients is a few MiB, so 64 MiB only stops nonsense.
MAX_ANSWER = 64 * 1024 * 1024


class ControlClient:
    """One connection to kmuxd's control socket; one request, one answer packet.

    Blocking and synchronous on purpose: the CLI does one thing at a time,
    and tests or scripts can reuse it without an event loop. The connection
    is opened on the first request and kept (``--watch`` sends many).

    Failures are always :class:`~kmux.errors.KmuxError`: an error answer
    becomes the class for its ``code`` (``error_from_code``); an unreachable
    socket is :class:`DaemonUnavailable` with ``errno`` (a name such as
    ``"ENOENT"``) and ``path`` in ``details``; no answer in time is
    :class:`ControlTimeout`.
    """

    def __init__(self, path: str, timeout: float | None = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except socket.timeout as exc:
            sock.close()
            raise ControlTimeout(f"no answer from kmuxd on {self.path} within {self.timeout:g}s") from exc
        except OSError as exc:
            sock.close()
            raise self._unavailable(exc) from exc
        self._sock = sock

    def attach(self, group: str, sock: "socket.socket | int") -> dict[str, Any]:
        """Hand kmuxd a connected TCP socket (or its descriptor) for ``group``'s pool (op ``attach``).

        Returns the answer: ``conn`` (the connection's number, 1024 and up) and
        ``remote``. The caller keeps its own descriptor; closing it changes
        nothing for kmuxd, but whoever holds it can still read and write the
        connection (docs/config.md, "Attached connections"). A refusal is
        :class:`~kmux.errors.AttachRefused` (``details["reason"]``) or
        :class:`~kmux.errors.PermissionDenied`.
        """
        fd = sock if isinstance(sock, int) else sock.fileno()
        return self.request("attach", _fds=[fd], group=group)

    def unattach(self, group: str, conn: int, *, io_timeout: float | None = None) -> dict[str, Any]:
        """Take an attached connection out of ``group``'s pool (op ``unattach``): kmuxd takes
        nothing new on it, waits up to the group's ``unattach_timeout`` for the answers owed,
        then closes its copy. Returns ``owed``, ``unanswered`` and ``seconds``."""
        return self.request("unattach", io_timeout=io_timeout, group=group, conn=conn)

    def request(self, op: str, *, io_timeout: float | None = None, _fds: list[int] | None = None,
                **args: Any) -> dict[str, Any]:
        """Send ``{"op": op, **args}``, return the answer map (without raising on ``ok``).

        ``io_timeout`` overrides the client's timeout for this request only
        (``drain`` waits on the daemon for up to its own timeout); ``_fds``:
        descriptors passed along with ``SCM_RIGHTS`` (``attach``).
        """
        if self._sock is None:
            self.connect()
        sock = self._sock
        assert sock is not None
        timeout = self.timeout if io_timeout is None else io_timeout
        sock.settimeout(timeout)
        try:
            packet = msgpack.packb({"op": op, **args}, use_bin_type=True)
            if _fds:
                socket.send_fds(sock, [packet], _fds)
            else:
                sock.send(packet)
            answer = self._receive(sock)
        except socket.timeout as exc:
            # The answer may still come; a later request must not read it.
            self.close()
            raise ControlTimeout(f"no answer from kmuxd on {self.path} within {timeout:g}s") from exc
        except OSError as exc:
            self.close()
            raise self._unavailable(exc) from exc
        except KmuxError:
            self.close()
            raise
        if "kmux" in answer and "op" not in answer:
            # Only the apps' socket answers with a "kmux" version: a refused "hello".
            self.close()
            raise DaemonUnavailable(
                f"{self.path} is kmuxd's app socket, not its control socket (see daemon.control_socket)",
                path=self.path, errno="EPROTOTYPE",
            )
        if answer.get("ok") is True:
            return answer
        code = answer.get("code")
        message = answer.get("error")
        details = {
            k: v for k, v in answer.items() if isinstance(k, str) and k not in ("ok", "code", "error", "message")
        }
        raise error_from_code(code if isinstance(code, str) else "error", str(message or ""), **details)

    def _receive(self, sock: socket.socket) -> dict[str, Any]:
        """One whole answer packet: peek its length, allocate exactly that, read it.

        ``MSG_PEEK|MSG_TRUNC`` on a SEQPACKET socket returns the packet's
        full length without consuming it, so the buffer never truncates a
        big answer and never has to be guessed.
        """
        probe = bytearray(1)
        size = sock.recv_into(probe, 1, socket.MSG_PEEK | socket.MSG_TRUNC)
        if size == 0:
            raise DaemonUnavailable(
                "kmuxd closed the control connection", path=self.path, errno="EPIPE"
            )
        if size > MAX_ANSWER:
            sock.recv_into(probe, 1)  # a short read of a packet discards the rest of it
            raise RemoteError(f"answer of {size} bytes exceeds the {MAX_ANSWER} byte limit")
        buf = bytearray(size)
        got = sock.recv_into(buf, size)
        if got != size:
            raise RemoteError(f"short answer: {got} of {size} bytes")
        try:
            answer = msgpack.unpackb(buf, raw=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise RemoteError(f"undecodable answer: {exc}") from exc
        if not isinstance(answer, dict):
            raise RemoteError(f"answer is not a map but {type(answer).__name__}")
        return answer

    def _unavailable(self, exc: OSError) -> DaemonUnavailable:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return DaemonUnavailable(exc.strerror or str(exc), path=self.path, errno=name)
