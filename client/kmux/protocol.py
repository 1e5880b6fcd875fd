"""The kmux client protocol over a ``SOCK_SEQPACKET`` socket, with no I/O.

Theory of operation (the bytes are specified in ``docs/protocol.md``)
---------------------------------------------------------------------
1. The client's first packet is a msgpack *hello* map naming the group.
2. The daemon's first packet answers it: an *accepted* map (the group's
   limits and framing) or a *refused* map (an error code and text), after
   which the daemon closes the socket.
3. From then on every packet starts with one *kind* byte:

   ======  ===============  =====================================================
   byte    direction        rest of the packet
   ======  ===============  =====================================================
   0x00    both             DATA: exactly one application message, header included
   0x01    client->daemon   CONTROL: a msgpack map, e.g. ``{"op": "receive", "on": false}``
   0x01    daemon->client   NOTICE: a msgpack map, an error for one message or an event
   0x02    client->daemon   REQUEUE: a message the daemon delivered that the client hands back
   0x80    both             DATA_MORE: a piece of a DATA message that goes on in the next packet
   0x82    client->daemon   REQUEUE_MORE: likewise for REQUEUE
   ======  ===============  =====================================================

4. **Continuation** (KCM's SEQPACKET messages span ``sendmsg`` calls until
   ``MSG_EOR``): the high bit of the kind byte, :data:`KIND_MORE`, says
   "this message goes on in the next packet". A message too large for one
   packet (the sender's ``SO_SNDBUF`` bounds a packet: 212992 bytes on a
   stock kernel, doubled) travels as pieces of the same kind with the bit
   set, then a last piece without it. The pieces of one message are
   consecutive packets: nothing else from that sender comes between them.
   A message that fits in one packet is one packet, as before.

The data path never touches msgpack: a DATA packet costs one byte of
header, which also makes a zero-length read unambiguous (it is EOF, never an
empty message). ``seq`` in notices is the message's place in the client's
own order: the n-th DATA packet the client sent after the handshake, from 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import BadPacket, HandshakeInvalid, KmuxError, VersionUnsupported, error_from_code
from .framing import Framing

__all__ = [
    "PROTOCOL_VERSION",
    "HANDSHAKE_MAX",
    "KIND_DATA",
    "KIND_CONTROL",
    "KIND_NOTICE",
    "KIND_REQUEUE",
    "KIND_MORE",
    "KIND_DATA_MORE",
    "KIND_REQUEUE_MORE",
    "DATA_PREFIX",
    "DATA_MORE_PREFIX",
    "REQUEUE_MORE_PREFIX",
    "Hello",
    "Accepted",
    "Refused",
    "Notice",
    "Control",
    "encode_hello",
    "decode_hello",
    "encode_answer",
    "decode_answer",
    "encode_notice",
    "decode_notice",
    "encode_control",
    "decode_control",
]

PROTOCOL_VERSION = 1
#: Largest hello or answer packet, in bytes. A hello over this is refused.
HANDSHAKE_MAX = 4096
#: The largest max_message a group may have (bounded memory, both sides).
MAX_MESSAGE_CEILING = 64 * 1024 * 1024
#: Largest CONTROL or NOTICE body.
CONTROL_MAX = 4096

KIND_DATA = 0x00
KIND_CONTROL = 0x01
KIND_NOTICE = 0x01
KIND_REQUEUE = 0x02
#: The continuation bit: set on every piece of a message but the last.
KIND_MORE = 0x80
KIND_DATA_MORE = KIND_DATA | KIND_MORE
KIND_REQUEUE_MORE = KIND_REQUEUE | KIND_MORE
DATA_PREFIX = b"\x00"
DATA_MORE_PREFIX = b"\x80"
REQUEUE_MORE_PREFIX = b"\x82"
CONTROL_PREFIX = b"\x01"
NOTICE_PREFIX = b"\x01"
REQUEUE_PREFIX = b"\x02"

_NAME_MAX = 128
#: Deepest nesting of lists and maps in a hello, answer, notice or control map (the
#: packet's own map is level 1; the answer's framing map is level 2).
NESTING_MAX = 16


def _unpack_map(packet: bytes, what: str, exc: type[KmuxError]) -> dict[str, Any]:
    try:
        # unpackb bounds every str/bin/array/map by len(packet) itself; callers cap the
        # packet size (HANDSHAKE_MAX, CONTROL_MAX). It takes no max_buffer_size.
        data = msgpack.unpackb(packet, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise exc(f"{what} is not valid msgpack: {e}") from None
    if not isinstance(data, dict):
        raise exc(f"{what} must be a msgpack map, not {type(data).__name__}")
    # strict_map_key lets bin keys through; a mix of str and bytes keys cannot be
    # sorted, and KmuxError.__str__ sorts a notice's details.
    if not all(isinstance(key, str) for key in data):
        raise exc(f"{what} keys must be strings")
    # msgpack nests up to 1024 levels; printing a value that deep overflows Python's
    # stack (RecursionError), and these maps are all but flat.
    if _nests_deeper(data, NESTING_MAX):
        raise exc(f"{what} nests lists or maps deeper than {NESTING_MAX} levels")
    return data


def _nests_deeper(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            if level > limit:
                return True
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


@dataclass(frozen=True, slots=True)
class Hello:
    """The client's first packet."""

    group: str
    receive: bool = True
    name: str = ""
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.group, str) or not 0 < len(self.group) <= _NAME_MAX:
            raise HandshakeInvalid(f"'group' must be a non-empty string of at most {_NAME_MAX} characters")
        if not isinstance(self.receive, bool):
            raise HandshakeInvalid("'receive' must be a boolean")
        if not isinstance(self.name, str) or len(self.name) > _NAME_MAX:
            raise HandshakeInvalid(f"'name' must be a string of at most {_NAME_MAX} characters")


def encode_hello(hello: Hello) -> bytes:
    body = {"kmux": hello.version, "group": hello.group, "receive": hello.receive}
    if hello.name:
        body["name"] = hello.name
    return msgpack.packb(body)


#: First bytes of a msgpack map (fixmap, map16, map32).
_MAP_FIRST_BYTES = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_KIND_NAMES = {KIND_DATA: "DATA", KIND_CONTROL: "CONTROL", KIND_REQUEUE: "REQUEUE",
               KIND_DATA_MORE: "DATA_MORE", KIND_REQUEUE_MORE: "REQUEUE_MORE"}


def decode_hello(packet: bytes) -> Hello:
    """Parse and validate a hello. Raises HandshakeInvalid or VersionUnsupported."""
    if len(packet) > HANDSHAKE_MAX:
        raise HandshakeInvalid(f"hello is {len(packet)} bytes, the limit is {HANDSHAKE_MAX}")
    if packet and packet[0] not in _MAP_FIRST_BYTES:
        kind = _KIND_NAMES.get(packet[0])
        what = f"a {kind} packet (kind byte 0x{packet[0]:02x})" if kind else f"a packet starting with 0x{packet[0]:02x}"
        raise HandshakeInvalid(
            f"the first packet must be the hello, a msgpack map naming the group; this is {what} "
            "(see docs/protocol.md, 'Handshake')"
        )
    try:
        data = _unpack_map(packet, "hello", HandshakeInvalid)
    except HandshakeInvalid as exc:
        # 0x80 and 0x82 (DATA_MORE, REQUEUE_MORE) are msgpack map headers too: a piece
        # of a continued message sent first is a broken map, so name the likely mistake.
        if packet[:1] in (DATA_MORE_PREFIX, REQUEUE_MORE_PREFIX):
            raise HandshakeInvalid(
                f"{exc.message.rstrip('.')}; if this is a {_KIND_NAMES[packet[0]]} packet (kind byte 0x{packet[0]:02x}): "
                "the first packet must be the hello, a msgpack map naming the group (see docs/protocol.md, 'Handshake')"
            ) from None
        raise
    version = data.get("kmux")
    if "op" in data and version is None:
        raise HandshakeInvalid(
            "this is kmuxd's app socket, not its control socket (kmux-cli --control, or daemon.control_socket)"
        )
    if not isinstance(version, int) or isinstance(version, bool):
        raise HandshakeInvalid("hello needs an integer 'kmux' protocol version")
    if version != PROTOCOL_VERSION:
        raise VersionUnsupported(f"protocol version {version} is not supported (this daemon speaks {PROTOCOL_VERSION})")
    unknown = set(data) - {"kmux", "group", "receive", "name"}
    if unknown:
        raise HandshakeInvalid(f"unknown hello keys: {', '.join(sorted(map(str, unknown)))}")
    if "group" not in data:
        raise HandshakeInvalid("hello needs a 'group'")
    return Hello(group=data["group"], receive=data.get("receive", True), name=data.get("name", ""), version=version)


@dataclass(frozen=True, slots=True)
class Accepted:
    """The daemon's yes: the group's limits, so the client can check messages itself."""

    group: str
    client_id: int
    max_message: int
    framing: Framing
    steering: str
    version: int = PROTOCOL_VERSION
    #: Whether the group had a TCP connection up when it accepted us
    #: (``connect(require_up=True)`` refuses to attach otherwise).
    up: bool = True


@dataclass(frozen=True, slots=True)
class Refused:
    """The daemon's no. ``error`` rebuilds the matching exception."""

    code: str
    message: str
    version: int = PROTOCOL_VERSION

    @property
    def error(self) -> KmuxError:
        return error_from_code(self.code, self.message)


def encode_answer(answer: Accepted | Refused) -> bytes:
    if isinstance(answer, Accepted):
        return msgpack.packb(
            {
                "kmux": answer.version,
                "ok": True,
                "group": answer.group,
                "client_id": answer.client_id,
                "max_message": answer.max_message,
                "framing": answer.framing.to_wire(),
                "steering": answer.steering,
                "up": answer.up,
            }
        )
    return msgpack.packb({"kmux": answer.version, "ok": False, "code": answer.code, "error": answer.message})


def decode_answer(packet: bytes) -> Accepted | Refused:
    data = _unpack_map(packet, "handshake answer", HandshakeInvalid)
    if "kmux" not in data and "ok" in data:
        # kmuxd's control socket answers every packet with {"ok": ...} and no protocol version.
        said = data.get("error")
        raise HandshakeInvalid(
            "this looks like kmuxd's control socket, not its app socket: it answered the hello "
            "without a protocol version" + (f" ({str(said)[:200]})" if said else "")
            + "; connect apps to the daemon's app socket ([daemon] socket)"
        )
    try:
        if data["ok"]:
            max_message = int(data["max_message"])
            if not 1 <= max_message <= MAX_MESSAGE_CEILING:
                # A client sizes its receive buffer by it: never trust it unbounded.
                raise HandshakeInvalid(
                    f"malformed handshake answer: max_message {max_message} is outside 1..{MAX_MESSAGE_CEILING}"
                )
            return Accepted(
                group=data["group"],
                client_id=int(data["client_id"]),
                max_message=max_message,
                framing=Framing.from_wire(data["framing"]),
                steering=str(data["steering"]),
                version=int(data["kmux"]),
                up=bool(data.get("up", True)),
            )
        return Refused(code=str(data["code"]), message=str(data.get("error", "")), version=int(data["kmux"]))
    except (KeyError, TypeError, ValueError, OverflowError) as e:  # OverflowError: int(inf)
        raise HandshakeInvalid(f"malformed handshake answer: {e!r}") from None


@dataclass(frozen=True, slots=True)
class Notice:
    """A daemon-to-client notice: an error about one message, or an event.

    Exactly one of ``code`` (an error) or ``event`` is set. ``seq`` names
    the message an error is about.
    """

    code: str | None = None
    message: str = ""
    event: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def seq(self) -> int | None:
        return self.details.get("seq")

    @property
    def error(self) -> KmuxError | None:
        if self.code is None:
            return None
        # Not **details: a detail named "message" would collide with the argument.
        err = error_from_code(self.code, self.message)
        err.details.update(self.details)
        return err

    @classmethod
    def for_error(cls, err: KmuxError) -> "Notice":
        return cls(code=err.code, message=err.message, details=dict(err.details))


def encode_notice(notice: Notice) -> bytes:
    """Whole packet, kind byte included."""
    body: dict[str, Any] = dict(notice.details)
    if notice.code is not None:
        body["code"] = notice.code
        body["error"] = notice.message
    if notice.event is not None:
        body["event"] = notice.event
    return NOTICE_PREFIX + msgpack.packb(body)


def decode_notice(body: bytes | memoryview) -> Notice:
    """Parse a notice body (the bytes after the kind byte)."""
    data = _unpack_map(bytes(body), "notice", BadPacket)
    code = data.pop("code", None)
    message = data.pop("error", "")
    event = data.pop("event", None)
    if not isinstance(code, (str, type(None))) or not isinstance(event, (str, type(None))):
        raise BadPacket("notice 'code' and 'event' must be strings")
    return Notice(code=code, message=str(message), event=event, details=data)


@dataclass(frozen=True, slots=True)
class Control:
    """A client-to-daemon control request."""

    op: str
    args: dict[str, Any] = field(default_factory=dict)


#: Control ops and the argument keys each takes.
CONTROL_OPS: dict[str, frozenset[str]] = {
    # Switch receiving on or off (KCM_RECV_DISABLE). Turning it off is
    # answered by a NOTICE event "receive_off": every DATA packet before
    # that marker was already queued for this client and should be handed
    # back with REQUEUE so it moves to another receiver.
    "receive": frozenset({"on"}),
}


def encode_control(control: Control) -> bytes:
    """Whole packet, kind byte included."""
    return CONTROL_PREFIX + msgpack.packb({"op": control.op, **control.args})


def decode_control(body: bytes | memoryview) -> Control:
    if len(body) > CONTROL_MAX:
        raise BadPacket(f"control packet is {len(body)} bytes, the limit is {CONTROL_MAX}")
    data = _unpack_map(bytes(body), "control packet", BadPacket)
    op = data.pop("op", None)
    if not isinstance(op, str) or op not in CONTROL_OPS:  # a list op is unhashable
        raise BadPacket(f"unknown control op {op!r}")
    unknown = set(data) - CONTROL_OPS[op]
    if unknown:
        raise BadPacket(f"unknown keys for control op {op!r}: {', '.join(sorted(map(str, unknown)))}")
    if op == "receive" and not isinstance(data.get("on"), bool):
        raise BadPacket("control op 'receive' needs a boolean 'on'")
    return Control(op=op, args=data)
