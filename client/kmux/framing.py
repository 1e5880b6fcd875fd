"""Framing: how to find one message's total length in a byte stream.

Theory of operation
-------------------
A framing is the user-space answer to KCM's BPF parser. Given the first
bytes of a message it says how long the whole message is, header included:

* fixed-field framings read an unsigned ``length_size``-byte integer at
  ``length_offset`` and add ``length_adjust``;
* ``varint`` reads a protobuf base-128 length prefix and adds the prefix's
  own size.

Two uses, one rule:

1. *Outgoing* (:meth:`Framing.check_message`): an app hands over one whole
   message; its header must announce exactly its size, or it is refused and
   never written. This is what keeps one buggy app from desynchronising a
   TCP stream that other apps share.
2. *Incoming* (:class:`FrameDecoder`): bytes from a TCP connection are cut
   into messages. The decoder never copies; it returns end offsets into the
   caller's buffer, so the I/O shell can hand slices straight to clients.

Invariants: a length is never trusted beyond ``max_message``; a header that
announces fewer bytes than the header itself is an error; nothing here
imports ``socket`` or ``trio``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import BadFrame, ConfigInvalid, KmuxError, MessageTooBig, RemoteBadHeader, RemoteFrameTooBig

__all__ = ["Framing", "FrameDecoder", "DecoderStatistics", "PRESETS", "NEED_MORE", "VARINT_MAX_BYTES"]

#: Returned by :meth:`Framing.length_at` when the header is not complete yet.
NEED_MORE = -1
#: A varint longer than this (64-bit values) is a bad header.
VARINT_MAX_BYTES = 10

_STRUCT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_ORDERS = {"big": ">", "little": "<"}


@dataclass(frozen=True, slots=True)
class Framing:
    """A frozen, self-validating framing description.

    ``kind`` is ``"fixed"`` (a length field) or ``"varint"``. ``name`` is the
    preset name, or ``"custom"`` for the table form.
    """

    name: str = "u32be"
    kind: str = "fixed"
    length_offset: int = 0
    length_size: int = 4
    length_order: str = "big"
    length_adjust: int = 4
    _length_at: Callable[[Any, int, int], int] = field(init=False, repr=False, compare=False)
    #: For fixed framings, ``(unpack_from, length_offset, header_end, length_adjust)``
    #: so a hot loop can read the length inline; None for varint.
    fixed_field: tuple | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.kind == "varint":
            object.__setattr__(self, "_length_at", _varint_length_at)
            return
        if self.kind != "fixed":
            raise ValueError(f"framing kind must be 'fixed' or 'varint', not {self.kind!r}")
        if self.length_size not in _STRUCT_CODES:
            raise ValueError(f"length_size must be 1, 2, 4 or 8, not {self.length_size!r}")
        if self.length_order not in _ORDERS:
            raise ValueError(f"length_order must be 'big' or 'little', not {self.length_order!r}")
        if not 0 <= self.length_offset <= 65535:
            raise ValueError(f"length_offset must be 0..65535, not {self.length_offset!r}")
        if not -(2**31) <= self.length_adjust <= 2**31:
            raise ValueError(f"length_adjust out of range: {self.length_adjust!r}")
        object.__setattr__(self, "_length_at", _fixed_length_at(self))
        unpack_from = struct.Struct(_ORDERS[self.length_order] + _STRUCT_CODES[self.length_size]).unpack_from
        header_end = self.length_offset + self.length_size
        object.__setattr__(self, "fixed_field", (unpack_from, self.length_offset, header_end, self.length_adjust))

    # -- construction ------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: Any, path: str = "framing") -> "Framing":
        """Build from a config value: a preset name or a table. Errors name ``path``."""
        if isinstance(spec, str):
            try:
                return PRESETS[spec]
            except KeyError:
                raise ConfigInvalid(
                    path, f"unknown framing preset {spec!r} (known: {', '.join(sorted(PRESETS))})"
                ) from None
        if not isinstance(spec, dict):
            raise ConfigInvalid(path, f"must be a preset name or a table, not {type(spec).__name__}")
        if spec.get("kind") == "varint":
            extra = sorted(set(spec) - {"kind"})
            if extra:
                raise ConfigInvalid(f"{path}.{extra[0]}", "a varint framing takes no other keys")
            return PRESETS["varint"]
        if spec.get("kind", "fixed") != "fixed":
            raise ConfigInvalid(f"{path}.kind", f"must be 'fixed' or 'varint', not {spec['kind']!r}")
        allowed = {"length_offset", "length_size", "length_order", "length_adjust", "kind"}
        for key in spec:
            if key not in allowed:
                raise ConfigInvalid(f"{path}.{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
        kwargs: dict[str, Any] = {}
        for key, default in (("length_offset", 0), ("length_size", 4), ("length_adjust", 0)):
            value = spec.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigInvalid(f"{path}.{key}", f"must be an integer, not {value!r}")
            kwargs[key] = value
        order = spec.get("length_order", "big")
        if not isinstance(order, str) or order not in _ORDERS:  # an array is unhashable
            raise ConfigInvalid(f"{path}.length_order", f"must be 'big' or 'little', not {order!r}")
        if kwargs["length_size"] not in _STRUCT_CODES:
            raise ConfigInvalid(f"{path}.length_size", f"must be 1, 2, 4 or 8, not {kwargs['length_size']!r}")
        if not 0 <= kwargs["length_offset"] <= 65535:
            raise ConfigInvalid(f"{path}.length_offset", f"must be 0..65535, not {kwargs['length_offset']}")
        if not -(2**31) <= kwargs["length_adjust"] <= 2**31:
            raise ConfigInvalid(f"{path}.length_adjust", f"out of range: {kwargs['length_adjust']}")
        return cls(name="custom", kind="fixed", length_order=order, **kwargs)

    def to_wire(self) -> dict[str, Any]:
        """The form sent to clients in the handshake answer (also valid config)."""
        if self.kind == "varint":
            return {"kind": "varint", "name": self.name}
        return {
            "name": self.name,
            "kind": "fixed",
            "length_offset": self.length_offset,
            "length_size": self.length_size,
            "length_order": self.length_order,
            "length_adjust": self.length_adjust,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "Framing":
        if not isinstance(data, dict):
            raise TypeError(f"a framing must be a map, not {type(data).__name__}")
        if data.get("kind") == "varint":
            return PRESETS["varint"]
        return cls(
            name=str(data.get("name", "custom")),
            kind="fixed",
            length_offset=int(data["length_offset"]),
            length_size=int(data["length_size"]),
            length_order=str(data["length_order"]),
            length_adjust=int(data["length_adjust"]),
        )

    # -- the rule ----------------------------------------------------------

    @property
    def min_header(self) -> int:
        """Bytes needed before a length can be known (1 for varint)."""
        return 1 if self.kind == "varint" else self.length_offset + self.length_size

    def length_at(self, buf: Any, start: int, end: int) -> int:
        """Total length of the message starting at ``buf[start]``.

        Returns :data:`NEED_MORE` when ``buf[start:end]`` does not yet hold the
        whole header. Raises :class:`~kmux.errors.RemoteBadHeader` when the
        header cannot describe a valid message.
        """
        return self._length_at(buf, start, end)

    def check_message(self, buf: Any, max_message: int, start: int = 0, length: int | None = None) -> None:
        """Refuse an outgoing message whose header disagrees with its size.

        Raises :class:`~kmux.errors.MessageTooBig` or :class:`~kmux.errors.BadFrame`.
        """
        if length is None:
            length = len(buf) - start
        err = self.checker(max_message)(buf, start, length)
        if err is not None:
            raise err

    def checker(self, max_message: int) -> Callable[[Any, int, int], KmuxError | None]:
        """The outgoing rule as one precompiled function: ``check(buf, start, size)``.

        Returns None when ``buf[start:start+size]`` is one well-framed message
        of at most ``max_message`` bytes, else the error to refuse it with
        (never raises). This is the only place the rule and its texts live:
        the client library checks before sending, the daemon checks again
        on receipt, both with this function. The common case (a fixed length
        field that agrees) is one unpack and one comparison.
        """
        return _checkers(self, max_message)

    def describe_mismatch(self, buf: Any, start: int, size: int) -> str:
        """Why the header of ``buf[start:start+size]`` disagrees with ``size``, in the header's own terms."""
        if self.kind == "varint":
            value, prefix = _varint_value(buf, start, start + size)
            if value is None:
                return f"{size}-byte message is too short for its varint length prefix"
            return (f"varint length {value} (+{prefix} prefix bytes = {value + prefix} bytes), "
                    f"but the message has {size} bytes")
        header_end = self.length_offset + self.length_size
        if size < header_end:
            return f"{size}-byte message is too short for a {self.name} header ({header_end} bytes)"
        raw = struct.unpack_from(_ORDERS[self.length_order] + _STRUCT_CODES[self.length_size], buf,
                                 start + self.length_offset)[0]
        adjust = self.length_adjust
        sign = "+" if adjust >= 0 else "-"
        what = "header bytes" if adjust == header_end else "length_adjust"
        return (f"{self.name} header length {raw} ({sign}{abs(adjust)} {what} = {raw + adjust} bytes), "
                f"but the message has {size} bytes")


def _checkers(f: Framing, max_message: int) -> Callable[[Any, int, int], KmuxError | None]:
    fixed = f.fixed_field
    length_at = f._length_at

    def refuse(buf: Any, start: int, size: int) -> KmuxError:
        if size > max_message:
            return MessageTooBig(f"message is {size} bytes, the group's max_message is {max_message}")
        try:
            length_at(buf, start, start + size)
        except RemoteBadHeader as exc:
            return BadFrame(f"bad length header: {exc.message}")
        return BadFrame(f.describe_mismatch(buf, start, size))

    if fixed is not None:
        unpack_from, offset, header_end, adjust = fixed

        def check_fixed(buf: Any, start: int, size: int) -> KmuxError | None:
            if header_end <= size <= max_message and unpack_from(buf, start + offset)[0] + adjust == size:
                return None
            return refuse(buf, start, size)

        return check_fixed

    def check_varint(buf: Any, start: int, size: int) -> KmuxError | None:
        if size <= max_message:
            try:
                if length_at(buf, start, start + size) == size:
                    return None
            except RemoteBadHeader:
                pass
        return refuse(buf, start, size)

    return check_varint


def _varint_value(buf: Any, start: int, end: int) -> tuple[int | None, int]:
    """(value, prefix length) of a varint at ``buf[start:end]``, or (None, 0) if incomplete."""
    value = shift = 0
    i = start
    while i < end and i - start < VARINT_MAX_BYTES:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i - start
        shift += 7
    return None, 0


def _fixed_length_at(f: Framing) -> Callable[[Any, int, int], int]:
    unpack_from = struct.Struct(_ORDERS[f.length_order] + _STRUCT_CODES[f.length_size]).unpack_from
    offset = f.length_offset
    header_end = f.length_offset + f.length_size
    adjust = f.length_adjust

    def length_at(buf: Any, start: int, end: int) -> int:
        if end - start < header_end:
            return NEED_MORE
        total = unpack_from(buf, start + offset)[0] + adjust
        if total < header_end:
            raise RemoteBadHeader(f"length {total} is shorter than the {header_end}-byte header")
        return total

    return length_at


def _varint_length_at(buf: Any, start: int, end: int) -> int:
    value = 0
    shift = 0
    i = start
    while i < end:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value + (i - start)
        shift += 7
        if i - start >= VARINT_MAX_BYTES:
            raise RemoteBadHeader(f"varint length prefix longer than {VARINT_MAX_BYTES} bytes")
    return NEED_MORE


PRESETS: dict[str, Framing] = {
    # Thrift framed transport: u32be length of the rest.
    "u32be": Framing("u32be", "fixed", 0, 4, "big", 4),
    # DNS over TCP (RFC 1035 4.2.2): u16be length of the rest.
    "u16be": Framing("u16be", "fixed", 0, 2, "big", 2),
    # memcached binary protocol: 24-byte header, total body length at offset 8.
    "memcached-binary": Framing("memcached-binary", "fixed", 8, 4, "big", 24),
    # protobuf-style base-128 length prefix.
    "varint": Framing("varint", "varint", 0, 0, "big", 0),
}


@dataclass(frozen=True, slots=True)
class DecoderStatistics:
    """Parser counters, named after KCM's psock fields."""

    #: Complete messages cut from the stream.
    msgs: int
    #: Times the stream stopped inside a header (KCM ``need_more_hdr``).
    need_more_hdr: int
    #: Messages whose announced length was over ``max_message``.
    msg_too_big: int
    #: Headers that could not describe a valid message.
    bad_hdr_len: int


class FrameDecoder:
    """Cuts a TCP byte stream into messages, without copying.

    The caller owns the buffer: it appends received bytes, calls
    :meth:`split`, hands out ``buf[prev_end:end]`` for each returned end, and
    keeps ``buf[consumed:]`` (a partial message) for the next call.
    """

    __slots__ = ("framing", "max_message", "_length_at", "_msgs", "_need_more_hdr", "_too_big", "_bad_hdr")

    def __init__(self, framing: Framing, max_message: int) -> None:
        self.framing = framing
        self.max_message = max_message
        self._length_at = framing._length_at
        self._msgs = 0
        self._need_more_hdr = 0
        self._too_big = 0
        self._bad_hdr = 0

    def split(self, buf: Any, start: int, end: int, limit: int = 1 << 30) -> tuple[list[int], int, int]:
        """Find complete messages in ``buf[start:end]``.

        Returns ``(ends, consumed, pending)``: the end offset of each complete
        message (at most ``limit`` of them), the offset where unconsumed bytes
        begin, and the total length of the partial message that starts there
        (:data:`NEED_MORE` if its header is incomplete or there is none).
        Raises :class:`RemoteFrameTooBig` / :class:`RemoteBadHeader`; the
        stream is then unusable.
        """
        length_at = self._length_at
        max_message = self.max_message
        ends: list[int] = []
        pos = start
        pending = NEED_MORE
        while pos < end and len(ends) < limit:
            try:
                total = length_at(buf, pos, end)
            except RemoteBadHeader:
                self._bad_hdr += 1
                raise
            if total == NEED_MORE:
                self._need_more_hdr += 1
                break
            if total > max_message:
                self._too_big += 1
                raise RemoteFrameTooBig(f"remote announced a {total}-byte message, max_message is {max_message}")
            if pos + total > end:
                pending = total
                break
            pos += total
            ends.append(pos)
        self._msgs += len(ends)
        return ends, pos, pending

    def statistics(self) -> DecoderStatistics:
        return DecoderStatistics(self._msgs, self._need_more_hdr, self._too_big, self._bad_hdr)


class Reassembler:
    """Convenience wrapper that owns its buffer: ``feed(bytes) -> [message, ...]``.

    For tests, tools and clients; the daemon uses :class:`FrameDecoder` on
    preallocated buffers instead.
    """

    def __init__(self, framing: Framing, max_message: int) -> None:
        self.decoder = FrameDecoder(framing, max_message)
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        ends, consumed, _ = self.decoder.split(self._buf, 0, len(self._buf))
        out = []
        prev = 0
        for e in ends:
            out.append(bytes(self._buf[prev:e]))
            prev = e
        del self._buf[:consumed]
        return out


__all__.append("Reassembler")
