"""The control socket: statistics and operator actions for ``kmux-cli``.

Theory of operation
-------------------
One SEQPACKET packet in (a msgpack map), one packet out, in order, on any
number of connections. :func:`parse_request` validates a request against
:data:`REQUESTS` (the op, its required and optional arguments and their
types) with no I/O, so every malformed request gets a ``bad_request``
answer and never reaches the daemon. :class:`ControlServer` is the thin
shell: accept, read, dispatch to the daemon, answer. Answers carry the
``statistics()`` records as maps; nothing here reads daemon internals.

The socket is root-only (0600) unless ``control_group`` names a group; the
kernel enforces it, so a refused user never reaches this code.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import reprlib
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from kmux.errors import BadRequest, KmuxError

from .server import AcceptingServer, bind_seqpacket

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["ControlRequest", "ControlServer", "parse_request", "REQUESTS", "to_wire"]

#: Largest request packet; requests are tiny.
REQUEST_MAX = 4096
#: Largest answer packet (a stats answer with thousands of clients).
ANSWER_MAX = 16 * 1024 * 1024
#: Default and largest drain timeout a request may ask for, seconds.
DRAIN_TIMEOUT_DEFAULT = 10.0
DRAIN_TIMEOUT_MAX = 600.0

_NUMBER = (int, float)
#: op -> (required {arg: type}, optional {arg: type})
REQUESTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "ping": ({}, {}),
    "stats": ({}, {"group": str}),
    "reconnect": ({"group": str}, {"conn": int}),
    "drain": ({"group": str, "conn": int}, {"timeout": _NUMBER}),
    "reload": ({}, {}),
}


@dataclass(frozen=True, slots=True)
class ControlRequest:
    op: str
    args: dict[str, Any]


def parse_request(packet: bytes) -> ControlRequest:
    """Validate one request packet. Raises BadRequest with the reason."""
    if len(packet) > REQUEST_MAX:
        raise BadRequest(f"request is {len(packet)} bytes, the limit is {REQUEST_MAX}")
    try:
        data = msgpack.unpackb(packet, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadRequest(f"request is not valid msgpack: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("request must be a msgpack map")
    op = data.pop("op", None)
    if not isinstance(op, str) or op not in REQUESTS:  # a list op is unhashable
        # reprlib: a value nested ~1000 deep would overflow the stack in repr().
        raise BadRequest(f"unknown op {reprlib.repr(op)} (ops: {', '.join(sorted(REQUESTS))})")
    required, optional = REQUESTS[op]
    for key, kind in required.items():
        if key not in data:
            raise BadRequest(f"op {op!r} needs {key!r}")
    for key, value in data.items():
        kind = required.get(key) or optional.get(key)
        if kind is None:
            raise BadRequest(f"op {op!r} takes no {key!r}")
        if isinstance(value, bool) or not isinstance(value, kind):
            raise BadRequest(f"{op}.{key} has the wrong type: {reprlib.repr(value)}")
    if op == "drain":
        timeout = data.get("timeout", DRAIN_TIMEOUT_DEFAULT)
        if not 0 < timeout <= DRAIN_TIMEOUT_MAX:
            raise BadRequest(f"drain.timeout must be in (0, {DRAIN_TIMEOUT_MAX}]")
        data["timeout"] = float(timeout)
    return ControlRequest(op, data)


def to_wire(record: Any) -> Any:
    """A statistics record (nested frozen dataclasses) as plain maps."""
    if dataclasses.is_dataclass(record):
        return {f.name: to_wire(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if isinstance(record, (list, tuple)):
        return [to_wire(r) for r in record]
    return record


def encode_answer(answer: dict[str, Any]) -> bytes:
    return msgpack.packb({"ok": True, **answer})


def encode_error(err: KmuxError) -> bytes:
    return msgpack.packb({"ok": False, **err.to_wire()})


def bind_control(path: str, group: str) -> socket.socket:
    """Root only (0600), or 0660 owned by ``group`` when one is configured."""
    sock = bind_seqpacket(path, 0o660 if group else 0o600)
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    return sock


class ControlServer(AcceptingServer):
    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.log = daemon.log.bind(component="control")
        self.requests = 0
        self.errors = 0

    async def _handle(self, sock: socket.socket) -> None:
        """One control connection: requests answered in order until it closes."""
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, ANSWER_MAX)
        except OSError:
            pass
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    packet, _, flags, _ = sock.recvmsg(REQUEST_MAX + 1)
                except BlockingIOError:
                    continue
                if not packet:
                    return
                answer = await self._answer(packet, flags)
                await _send_packet(sock, answer)
        except OSError:
            return
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _answer(self, packet: bytes, flags: int) -> bytes:
        self.requests += 1
        try:
            if flags & int(socket.MSG_TRUNC):
                raise BadRequest(f"request is over {REQUEST_MAX} bytes")
            request = parse_request(packet)
            result = await self.daemon.control(request)
            answer = encode_answer(result)
            if len(answer) > ANSWER_MAX:
                raise BadRequest(f"answer of {len(answer)} bytes is over {ANSWER_MAX}; ask for one group")
            return answer
        except KmuxError as err:
            self.errors += 1
            self.log.info("control_error", error_code=err.code, error=err.message)
            return encode_error(err)


async def _send_packet(sock: socket.socket, packet: bytes) -> None:
    while True:
        try:
            sock.send(packet)
            return
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
