"""Framing: how to find one message's total length in a byte stream.

Theory of operation
-------------------
A framing is the user-space answer to KCM's BPF parser. Given the first
bytes of a message it says how long the whole message is, header included.
Three kinds:

* ``fixed``: an unsigned ``length_size``-byte integer (1 to 8 bytes, either
  byte order) at ``length_offset``, ANDed with ``length_mask`` (bits outside
  it are flags the framing ignores), plus ``length_adjust``;
* ``varint``: a protobuf base-128 length prefix plus the prefix's own size;
* ``records``: a message is a *record*, a run of *fragments*, each read
  like a ``fixed`` message; the fragment whose field has the
  ``last_fragment_mask`` bit set ends the record (ONC RPC record marking,
  RFC 5531 section 11). Fragment headers stay in the message: a record is
  passed through exactly as it came.

Two uses, one rule:

1. *Outgoing* (:meth:`Framing.checker`): an app hands over one whole
   message; its header must announce exactly its size, or it is refused and
   never written. This is what keeps one buggy app from desynchronising a
   TCP stream that other apps share.
2. *Incoming* (:class:`FrameDecoder`): bytes from a TCP connection are cut
   into messages. The decoder never copies; it returns end offsets into the
   caller's buffer, so the I/O shell can hand slices straight to clients.

Skipping (incoming only, opt-in with ``max_skip``): a well-framed message
over ``max_message`` need not end the stream, since its header says where it
ends. Up to ``max_skip`` the decoder *skips* it: it keeps its first bytes
(the *stub*: its header, and the response id when the caller asks for it
with ``keep``), tells the caller to drop the rest as it arrives (a record's
fragment marks are walked as they pass, until the last fragment), and
reports it once it has gone by (:data:`SKIPPED`), in its place among the
messages. Past ``max_skip`` a length is more likely a stream out of step
than a message: :class:`~kmux.errors.RemoteFrameTooBig`, as before.

Invariants:

* a length is never trusted beyond ``max_message``: a longer message is
  skipped (never held: at most its stub and a fragment mark cut short) or,
  past ``max_skip``, refused; a header (or fragment header) that announces
  fewer bytes than itself is an error;
* a record's total is not known until its last fragment's header arrives,
  so the decoder refuses it as soon as the fragments announced so far,
  plus the smallest fragment that could follow (a bare header), exceed
  ``max_message``: it never holds a partial message of ``max_message``
  bytes or more;
* the decoder's work is linear in the bytes received, whatever their
  chunking: a record's walk resumes where the previous read left it, so a
  server that trickles many small fragments byte by byte costs no rescans;
* nothing here imports ``socket`` or ``trio``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import BadFrame, ConfigInvalid, KmuxError, MessageTooBig, RemoteBadHeader, RemoteFrameTooBig

__all__ = ["Framing", "FrameDecoder", "DecoderStatistics", "PRESETS", "NEED_MORE", "SKIPPING", "SKIPPED",
           "Skipped", "VARINT_MAX_BYTES", "KINDS"]

#: Returned by :meth:`Framing.length_at` when the header is not complete yet.
NEED_MORE = -1
#: :meth:`FrameDecoder.split`'s ``pending`` while it skips a message over
#: ``max_message``, and once it has skipped one whole (see the class).
SKIPPING = -2
SKIPPED = -3
#: A varint longer than this (64-bit values) is a bad header.
VARINT_MAX_BYTES = 10
#: The framing kinds, as ``kind`` names them in config and on the wire.
KINDS = ("fixed", "varint", "records")
#: The largest length field, in bytes.
LENGTH_SIZE_MAX = 8
#: Bound on ``first_fragment_min`` (an id's end: offset up to 65535 plus 8 bytes).
FIRST_FRAGMENT_MIN_MAX = 65535 + 8

_STRUCT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_ORDERS = {"big": ">", "little": "<"}
#: The table keys of each kind (``kind`` itself aside).
_FIELD_KEYS = ("length_offset", "length_size", "length_order", "length_adjust", "length_mask")
_TABLE_KEYS = {
    "fixed": set(_FIELD_KEYS),
    "records": {*_FIELD_KEYS, "last_fragment_mask", "first_fragment_min"},
    "varint": set(),
}


def _field_max(size: int) -> int:
    return (1 << (8 * size)) - 1


def _problem(kind: Any, offset: Any, size: Any, order: Any, adjust: Any, mask: Any, last: Any,
             first_min: Any) -> tuple[str, str] | None:
    """The first thing wrong with these settings, as ``(key, reason)``; None if they make a framing.

    The one place the rules live: the constructor raises ValueError with it,
    the config (:meth:`Framing.from_spec`) raises ConfigInvalid naming the key.
    """
    if kind not in KINDS:
        return "kind", f"must be 'fixed', 'varint' or 'records', not {kind!r}"
    if kind == "varint":
        return None
    for key, value in (("length_offset", offset), ("length_size", size), ("length_adjust", adjust)):
        if not isinstance(value, int) or isinstance(value, bool):
            return key, f"must be an integer, not {value!r}"
    if not 1 <= size <= LENGTH_SIZE_MAX:
        return "length_size", f"must be 1 to {LENGTH_SIZE_MAX} (bytes), not {size!r}"
    if not isinstance(order, str) or order not in _ORDERS:  # an array is unhashable
        return "length_order", f"must be 'big' or 'little', not {order!r}"
    if not 0 <= offset <= 65535:
        return "length_offset", f"must be 0..65535, not {offset}"
    if not -(2**31) <= adjust <= 2**31:
        return "length_adjust", f"out of range: {adjust}"
    top = _field_max(size)
    if mask is not None:
        if not isinstance(mask, int) or isinstance(mask, bool):
            return "length_mask", f"must be an integer, not {mask!r}"
        if not 0 < mask <= top:
            return "length_mask", f"must be a non-zero mask of the {size}-byte field (at most {top:#x}), not {mask:#x}"
    if kind == "fixed":
        if last:
            return "last_fragment_mask", "only for kind = 'records'"
        if first_min:
            return "first_fragment_min", "only for kind = 'records'"
        return None
    if not isinstance(last, int) or isinstance(last, bool):
        return "last_fragment_mask", f"must be an integer, not {last!r}"
    if last <= 0 or last > top or last & (last - 1):
        return "last_fragment_mask", f"must be one bit of the {size}-byte field (e.g. {1 << (8 * size - 1):#x}), not {last:#x}"
    if mask is not None and mask & last:
        return "length_mask", f"must not include the last-fragment bit {last:#x}"
    if not isinstance(first_min, int) or isinstance(first_min, bool):
        return "first_fragment_min", f"must be an integer, not {first_min!r}"
    if not 0 <= first_min <= FIRST_FRAGMENT_MIN_MAX:
        return "first_fragment_min", f"must be 0..{FIRST_FRAGMENT_MIN_MAX}, not {first_min}"
    return None


@dataclass(frozen=True, slots=True)
class Framing:
    """A frozen, self-validating framing description.

    ``kind`` is one of :data:`KINDS`. ``name`` is the preset name, or
    ``"custom"`` for the table form. ``length_mask`` is normalised on
    construction: None means every bit of the field (for ``records``, every
    bit but the last-fragment bit).
    """

    name: str = "u32be"
    kind: str = "fixed"
    length_offset: int = 0
    length_size: int = 4
    length_order: str = "big"
    length_adjust: int = 4
    #: The bits of the length field that hold the length; the others are flags, ignored.
    length_mask: int | None = None
    #: ``records`` only: the one bit of a fragment's field that says "last fragment of the record".
    last_fragment_mask: int = 0
    #: ``records`` only: a record of several fragments must have at least this
    #: many bytes (its header included) in its first one. The daemon sets it
    #: for ``id`` steering, so an id it reads and rewrites never straddles a
    #: fragment header (``kmuxd.system.config``); 0 otherwise.
    first_fragment_min: int = 0
    _length_at: Callable[[Any, int, int], int] = field(init=False, repr=False, compare=False)
    #: For a plain fixed field (a 1, 2, 4 or 8-byte length, unmasked),
    #: ``(unpack_from, length_offset, header_end, length_adjust)`` so a hot
    #: loop can read the length inline; None for every other framing, which
    #: goes through :meth:`checker`.
    fixed_field: tuple | None = field(init=False, repr=False, compare=False, default=None)
    _checkers: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problem = _problem(self.kind, self.length_offset, self.length_size, self.length_order, self.length_adjust,
                           self.length_mask, self.last_fragment_mask, self.first_fragment_min)
        if problem is not None:
            raise ValueError(f"{problem[0]} {problem[1]}")
        object.__setattr__(self, "_checkers", {})
        if self.kind == "varint":
            object.__setattr__(self, "_length_at", _varint_length_at)
            return
        top = _field_max(self.length_size)
        if self.length_mask is None:
            object.__setattr__(self, "length_mask", top & ~self.last_fragment_mask)
        if self.kind == "records":
            object.__setattr__(self, "_length_at", _record_length_at(self))
            return
        object.__setattr__(self, "_length_at", _fixed_length_at(self))
        code = _STRUCT_CODES.get(self.length_size)
        if code is not None and self.length_mask == top:
            unpack_from = struct.Struct(_ORDERS[self.length_order] + code).unpack_from
            object.__setattr__(self, "fixed_field", (unpack_from, self.length_offset, self.header_end, self.length_adjust))

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
        kind = spec.get("kind", "fixed")
        if not isinstance(kind, str) or kind not in KINDS:
            raise ConfigInvalid(f"{path}.kind", f"must be 'fixed', 'varint' or 'records', not {kind!r}")
        allowed = _TABLE_KEYS[kind]
        for key in spec:
            if key == "kind" or key in allowed:
                continue
            if kind == "varint":
                raise ConfigInvalid(f"{path}.{key}", "a varint framing takes no other keys")
            if key in _TABLE_KEYS["records"]:
                raise ConfigInvalid(f"{path}.{key}", "only for kind = 'records'")
            raise ConfigInvalid(f"{path}.{key}", f"unknown key (allowed: {', '.join(sorted(allowed | {'kind'}))})")
        if kind == "varint":
            return PRESETS["varint"]
        size = spec.get("length_size", 4)
        top_bit = 1 << (8 * size - 1) if isinstance(size, int) and 1 <= size <= LENGTH_SIZE_MAX else 0
        kwargs: dict[str, Any] = {
            "length_offset": spec.get("length_offset", 0),
            "length_size": size,
            "length_order": spec.get("length_order", "big"),
            "length_adjust": spec.get("length_adjust", 0),
            "length_mask": spec.get("length_mask"),
            "last_fragment_mask": spec.get("last_fragment_mask", top_bit if kind == "records" else 0),
            "first_fragment_min": spec.get("first_fragment_min", 0),
        }
        problem = _problem(kind, kwargs["length_offset"], size, kwargs["length_order"], kwargs["length_adjust"],
                           kwargs["length_mask"], kwargs["last_fragment_mask"], kwargs["first_fragment_min"])
        if problem is not None:
            raise ConfigInvalid(f"{path}.{problem[0]}", problem[1])
        return cls(name="custom", kind=kind, **kwargs)

    def to_wire(self) -> dict[str, Any]:
        """The form sent to clients in the handshake answer (also valid config).

        ``length_mask`` appears when it is not the whole field (and always
        for ``records``), so the map of an unmasked framing is what a client
        of before masks knew.
        """
        if self.kind == "varint":
            return {"kind": "varint", "name": self.name}
        wire: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "length_offset": self.length_offset,
            "length_size": self.length_size,
            "length_order": self.length_order,
            "length_adjust": self.length_adjust,
        }
        if self.kind == "records" or self.length_mask != _field_max(self.length_size):
            wire["length_mask"] = self.length_mask
        if self.kind == "records":
            wire["last_fragment_mask"] = self.last_fragment_mask
            if self.first_fragment_min:
                wire["first_fragment_min"] = self.first_fragment_min
        return wire

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "Framing":
        """Rebuild :meth:`to_wire`'s map. Raises TypeError, KeyError or ValueError on a bad one."""
        if not isinstance(data, dict):
            raise TypeError(f"a framing must be a map, not {type(data).__name__}")
        kind = data.get("kind", "fixed")
        if kind == "varint":
            return PRESETS["varint"]
        mask = data.get("length_mask")
        return cls(
            name=str(data.get("name", "custom")),
            kind=str(kind),
            length_offset=int(data["length_offset"]),
            length_size=int(data["length_size"]),
            length_order=str(data["length_order"]),
            length_adjust=int(data["length_adjust"]),
            length_mask=None if mask is None else int(mask),
            last_fragment_mask=int(data.get("last_fragment_mask", 0)),
            first_fragment_min=int(data.get("first_fragment_min", 0)),
        )

    # -- the rule ----------------------------------------------------------

    @property
    def header_end(self) -> int:
        """Offset just past the length field (of a record's first fragment); 0 for varint."""
        return 0 if self.kind == "varint" else self.length_offset + self.length_size

    @property
    def min_header(self) -> int:
        """Bytes needed before a length can be known (1 for varint)."""
        return 1 if self.kind == "varint" else self.length_offset + self.length_size

    def length_at(self, buf: Any, start: int, end: int) -> int:
        """Total length of the message starting at ``buf[start]``.

        Returns :data:`NEED_MORE` when ``buf[start:end]`` does not yet hold the
        whole header (for ``records``: every fragment header up to the last
        one's). Raises :class:`~kmux.errors.RemoteBadHeader` when the header
        cannot describe a valid message. More bytes never change an answer
        once given.
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
        on receipt, both with this function. The common case (a length field
        that agrees, or a record of one fragment) is one read and one
        comparison. Built once per ``max_message`` and kept (a few at most).
        """
        checkers = self._checkers
        check = checkers.get(max_message)
        if check is None:
            if len(checkers) >= _CHECKERS_KEPT:
                checkers.clear()
            check = checkers[max_message] = _checker(self, max_message)
        return check

    def describe_mismatch(self, buf: Any, start: int, size: int) -> str:
        """Why the header of ``buf[start:start+size]`` disagrees with ``size``, in the header's own terms."""
        if self.kind == "varint":
            value, prefix = _varint_value(buf, start, start + size)
            if value is None:
                return f"{size}-byte message is too short for its varint length prefix"
            return (f"varint length {value} (+{prefix} prefix bytes = {value + prefix} bytes), "
                    f"but the message has {size} bytes")
        header_end = self.header_end
        if size < header_end:
            return f"{size}-byte message is too short for a {self.name} header ({header_end} bytes)"
        if self.kind == "records":
            return self._describe_record(buf, start, size)
        raw = _field_reader(self)(buf, start + self.length_offset)
        return (f"{self.name} header length {self._says(raw)} = {self._length_of(raw)} bytes), "
                f"but the message has {size} bytes")

    def _length_of(self, raw: int) -> int:
        assert self.length_mask is not None
        return (raw & self.length_mask) + self.length_adjust

    def _says(self, raw: int) -> str:
        """What a length field holds, in its own terms: ``'9 (+4 header bytes'`` (the caller closes it)."""
        assert self.length_mask is not None
        value = raw & self.length_mask
        ignored = raw & ~self.length_mask & ~self.last_fragment_mask
        flags = f" (field {raw:#x}, length_mask {self.length_mask:#x})" if ignored else ""
        adjust = self.length_adjust
        sign = "+" if adjust >= 0 else "-"
        what = "header bytes" if adjust == self.header_end else "length_adjust"
        return f"{value}{flags} ({sign}{abs(adjust)} {what}"

    def _describe_record(self, buf: Any, start: int, size: int) -> str:
        read = _field_reader(self)
        last, header_end = self.last_fragment_mask, self.header_end
        end = start + size
        pos = start
        count = 0
        while end - pos >= header_end:
            raw = read(buf, pos + self.length_offset)
            count += 1
            at = pos - start
            pos += self._length_of(raw)
            if raw & last:
                return (f"{self.name} record: fragment {count} at byte {at} is the last: length "
                        f"{self._says(raw)} = {self._length_of(raw)} bytes), record = {pos - start} bytes, "
                        f"but the message has {size} bytes")
            if pos > end:
                return (f"{self.name} record: fragment {count} at byte {at} is not the last: length "
                        f"{self._says(raw)} = {self._length_of(raw)} bytes), past the message's {size} bytes")
        if pos == end:
            return (f"{self.name} record: its {count} fragment(s) fill the message's {size} bytes, "
                    f"but none has the last-fragment bit ({last:#x})")
        return f"{self.name} record: the message's {size} bytes end inside the header of fragment {count + 1}"


#: Checkers kept per framing (one per max_message; a daemon has one per group).
_CHECKERS_KEPT = 8


def _field_reader(f: Framing) -> Callable[[Any, int], int]:
    """``read(buf, pos)``: the unsigned, unmasked length field at ``buf[pos]``."""
    code = _STRUCT_CODES.get(f.length_size)
    if code is not None:
        unpack_from = struct.Struct(_ORDERS[f.length_order] + code).unpack_from

        def read(buf: Any, pos: int) -> int:
            return unpack_from(buf, pos)[0]

        return read
    size = f.length_size
    order: Any = f.length_order

    def read_odd(buf: Any, pos: int) -> int:  # 3, 5, 6 or 7 bytes: no struct code
        return int.from_bytes(buf[pos : pos + size], order)

    return read_odd


def _short_fragment(frag: int, header_end: int) -> RemoteBadHeader:
    return RemoteBadHeader(f"fragment length {frag} is shorter than the {header_end}-byte fragment header")


def _short_first_fragment(frag: int, first_min: int) -> RemoteBadHeader:
    return RemoteBadHeader(
        f"the record's first fragment has {frag} bytes and more fragments follow, but the group's id "
        f"steering needs its first {first_min} bytes in the first fragment"
    )


def _checker(f: Framing, max_message: int) -> Callable[[Any, int, int], KmuxError | None]:
    length_at = f._length_at

    def refuse(buf: Any, start: int, size: int) -> KmuxError:
        if size > max_message:
            return MessageTooBig(f"message is {size} bytes, the group's max_message is {max_message}")
        try:
            length_at(buf, start, start + size)
        except RemoteBadHeader as exc:
            return BadFrame(f"bad length header: {exc.message}")
        return BadFrame(f.describe_mismatch(buf, start, size))

    def whole(buf: Any, start: int, size: int) -> bool:
        """Whether ``buf[start:start+size]`` is exactly one message, by walking its header(s)."""
        try:
            return length_at(buf, start, start + size) == size
        except RemoteBadHeader:
            return False

    if f.kind == "varint":

        def check_varint(buf: Any, start: int, size: int) -> KmuxError | None:
            if size <= max_message and whole(buf, start, size):
                return None
            return refuse(buf, start, size)

        return check_varint

    fixed = f.fixed_field
    if fixed is not None:
        unpack_from, offset, header_end, adjust = fixed

        def check_fixed(buf: Any, start: int, size: int) -> KmuxError | None:
            if header_end <= size <= max_message and unpack_from(buf, start + offset)[0] + adjust == size:
                return None
            return refuse(buf, start, size)

        return check_fixed

    read = _field_reader(f)
    offset, header_end, adjust = f.length_offset, f.header_end, f.length_adjust
    mask = f.length_mask
    assert mask is not None
    if f.kind == "fixed":

        def check_masked(buf: Any, start: int, size: int) -> KmuxError | None:
            if header_end <= size <= max_message and (read(buf, start + offset) & mask) + adjust == size:
                return None
            return refuse(buf, start, size)

        return check_masked

    last = f.last_fragment_mask

    def check_record(buf: Any, start: int, size: int) -> KmuxError | None:
        if header_end <= size <= max_message:
            raw = read(buf, start + offset)
            if raw & last:  # a record of one fragment, the common case
                if (raw & mask) + adjust == size:
                    return None
            elif whole(buf, start, size):
                return None
        return refuse(buf, start, size)

    return check_record


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
    offset = f.length_offset
    header_end = f.header_end
    adjust = f.length_adjust
    mask = f.length_mask
    assert mask is not None
    code = _STRUCT_CODES.get(f.length_size)
    if code is not None and mask == _field_max(f.length_size):
        # The plain field: one unpack, no mask (the hot path of every
        # fixed-size framing; keep it free of anything it does not need).
        unpack_from = struct.Struct(_ORDERS[f.length_order] + code).unpack_from

        def length_at(buf: Any, start: int, end: int) -> int:
            if end - start < header_end:
                return NEED_MORE
            total = unpack_from(buf, start + offset)[0] + adjust
            if total < header_end:
                raise RemoteBadHeader(f"length {total} is shorter than the {header_end}-byte header")
            return total

        return length_at

    read = _field_reader(f)

    def masked_length_at(buf: Any, start: int, end: int) -> int:
        if end - start < header_end:
            return NEED_MORE
        total = (read(buf, start + offset) & mask) + adjust
        if total < header_end:
            raise RemoteBadHeader(f"length {total} is shorter than the {header_end}-byte header")
        return total

    return masked_length_at


def _record_length_at(f: Framing) -> Callable[[Any, int, int], int]:
    """The record's total, walking its fragment headers from ``start`` (stateless).

    For whole records already in hand (the outgoing check, the send queue's
    walk over committed messages); the receive side resumes its walk across
    reads instead (:class:`RecordDecoder`).
    """
    read = _field_reader(f)
    offset, header_end, adjust = f.length_offset, f.header_end, f.length_adjust
    mask, last, first_min = f.length_mask, f.last_fragment_mask, f.first_fragment_min
    assert mask is not None

    def length_at(buf: Any, start: int, end: int) -> int:
        pos = start
        while end - pos >= header_end:
            raw = read(buf, pos + offset)
            frag = (raw & mask) + adjust
            if frag < header_end:
                raise _short_fragment(frag, header_end)
            if raw & last:
                return pos + frag - start
            if pos == start and frag < first_min:
                raise _short_first_fragment(frag, first_min)
            pos += frag
        return NEED_MORE

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
    # ONC RPC over TCP (RFC 5531 section 11, record marking): a record is
    # fragments, each a 4-byte big-endian mark (high bit: last fragment; low
    # 31 bits: the bytes after the mark) and its bytes. rpcbind, NFS, NIS.
    "oncrpc": Framing("oncrpc", "records", 0, 4, "big", 4, 0x7FFFFFFF, 0x80000000),
    # Diameter (RFC 6733 section 3): a version byte, then a 24-bit Message
    # Length that counts the whole message, its 20-byte header included.
    "diameter": Framing("diameter", "fixed", 1, 3, "big", 0),
    # HTTP/2 frames (RFC 9113 section 4.1): a 24-bit payload length, then
    # type, flags and stream id; the length leaves out the 9-byte header.
    "http2-frame": Framing("http2-frame", "fixed", 0, 3, "big", 9),
}


@dataclass(frozen=True, slots=True)
class DecoderStatistics:
    """Parser counters, named after KCM's psock fields."""

    #: Complete messages cut from the stream (skipped ones aside).
    msgs: int
    #: Times the stream stopped inside a header (KCM ``need_more_hdr``);
    #: for ``records``, inside any fragment's header.
    need_more_hdr: int
    #: Messages whose announced length was over ``max_message`` (for
    #: ``records``: whose fragments announced so far left no room for the
    #: rest): skipped, or refused past ``max_skip``.
    msg_too_big: int
    #: Headers that could not describe a valid message.
    bad_hdr_len: int
    #: Messages over ``max_message`` skipped whole, and their bytes (stubs included).
    skipped: int = 0
    skipped_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Skipped:
    """A message over ``max_message`` that went by unread (:class:`Reassembler`'s report of it)."""

    #: Its first bytes, as the decoder kept them (its header, and ``keep`` bytes).
    stub: bytes
    #: Its whole length, header (and a record's fragment marks) included.
    size: int


class FrameDecoder:
    """Cuts a TCP byte stream into messages, without copying.

    The caller owns the buffer: it appends received bytes, calls
    :meth:`split`, hands out ``buf[prev_end:end]`` for each returned end, and
    keeps ``buf[consumed:]`` (a partial message) for the next call, which
    starts there (the bytes may have moved; they must be the same bytes).
    :meth:`reset` starts a new stream.

    ``FrameDecoder(framing, max_message)`` of a ``records`` framing is a
    :class:`RecordDecoder`, which remembers how far it walked the partial
    record between calls; every other framing's decoder keeps no state
    between calls but its counters, and its skip.

    **Skipping** (``max_skip`` over ``max_message``; the default,
    ``max_skip = max_message``, refuses every message over ``max_message``).
    A message over ``max_message`` and within ``max_skip`` is skipped. Its
    first ``skip_stub`` bytes stay (``max(keep, header, 1)``, never past its
    first fragment, and with a fragment mark cut short never over
    ``max_message``), then :meth:`split` returns at its start (``consumed``)
    with ``pending``:

    * :data:`SKIPPING`: it has not all gone by. The caller drops
      ``buf[consumed + skip_stub : skip_drop_to]`` now, keeps what follows
      (at most a fragment mark cut short) right after the stub, and calls
      again with the next bytes read. The decoder holds nothing else.
    * :data:`SKIPPED`: its last byte has gone by. It was ``skip_total``
      bytes; ``buf[consumed : consumed + skip_stub]`` is its stub,
      ``buf[consumed + skip_stub : skip_drop_to]`` the rest of it (drop it),
      and the next message starts at ``skip_drop_to``: call again from there.

    The messages before it are in ``ends`` as usual: a skipped message keeps
    its place in the stream's order.
    """

    __slots__ = ("framing", "max_message", "max_skip", "skipping", "skip_stub", "skip_total", "skip_drop_to",
                 "_length_at", "_stub", "_skip_left", "_skip_last", "_msgs", "_need_more_hdr", "_too_big",
                 "_bad_hdr", "_skipped", "_skipped_bytes")

    def __new__(cls, framing: Framing, max_message: int, max_skip: int | None = None,
                keep: int = 0) -> "FrameDecoder":
        if cls is FrameDecoder and framing.kind == "records":
            cls = RecordDecoder
        return object.__new__(cls)

    def __init__(self, framing: Framing, max_message: int, max_skip: int | None = None, keep: int = 0) -> None:
        """``max_skip``: skip messages up to this long (None: ``max_message``, skip none);
        ``keep``: bytes of a skipped message's start to keep in its stub (an id's end)."""
        if max_skip is not None and max_skip < max_message:
            raise ValueError(f"max_skip ({max_skip}) must be at least max_message ({max_message})")
        self.framing = framing
        self.max_message = max_message
        self.max_skip = max_message if max_skip is None else max_skip
        self._length_at = framing._length_at
        # A skipped message holds its stub and, for a record, a fragment mark
        # cut short: at most max_message together (the caller's buffer bound).
        room = max_message - (framing.header_end - 1 if framing.kind == "records" else 0)
        self._stub = min(max(keep, framing.header_end, 1), room)
        #: A message over max_message is going by (see the class docstring).
        self.skipping = False
        self.skip_stub = self.skip_total = self.skip_drop_to = 0
        self._skip_left = 0  # bytes to drop before the next fragment mark (or the end)
        self._skip_last = True  # no fragment mark follows them
        self._msgs = 0
        self._need_more_hdr = 0
        self._too_big = 0
        self._bad_hdr = 0
        self._skipped = 0
        self._skipped_bytes = 0

    def reset(self) -> None:
        """A new stream begins (a new TCP connection); counters carry on."""
        self.skipping = False

    def split(self, buf: Any, start: int, end: int, limit: int = 1 << 30) -> tuple[list[int], int, int]:
        """Find complete messages in ``buf[start:end]``.

        Returns ``(ends, consumed, pending)``: the end offset of each complete
        message (at most ``limit`` of them), the offset where unconsumed bytes
        begin, and the total length of the partial message that starts there
        (:data:`NEED_MORE` if its header is incomplete or there is none; for
        a record, until its last fragment's header has come), or
        :data:`SKIPPING`/:data:`SKIPPED` (see the class docstring).
        Raises :class:`RemoteFrameTooBig` / :class:`RemoteBadHeader`; the
        stream is then unusable.
        """
        if self.skipping:
            return [], start, self._skip_on(buf, start, end)
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
                pending = self._oversized(buf, pos, end, total, total, True)
                break
            if pos + total > end:
                pending = total
                break
            pos += total
            ends.append(pos)
        self._msgs += len(ends)
        return ends, pos, pending

    def _oversized(self, buf: Any, pos: int, end: int, announced: int, first: int, last: bool) -> int:
        """The message at ``buf[pos]`` is over max_message: ``announced`` bytes so far
        (``last``: all of them; else another fragment follows), ``first`` in its first
        fragment. Start skipping it, or wait for its stub (NEED_MORE); past max_skip, raise."""
        if (announced if last else announced + self.framing.header_end) > self.max_skip:
            self._too_big += 1
            raise RemoteFrameTooBig(self._too_big_text(announced, last))
        stub = min(self._stub, first)
        if end - pos < stub:
            return NEED_MORE
        self._too_big += 1
        self.skipping = True
        self.skip_stub = stub
        self.skip_total = announced
        self._skip_left = announced - stub
        self._skip_last = last
        return self._skip_on(buf, pos, end)

    def _skip_on(self, buf: Any, start: int, end: int) -> int:
        """Let the skipped message's bytes after its stub at ``buf[start]`` go by."""
        p = start + self.skip_stub
        left = self._skip_left
        while True:
            if end - p < left:
                left -= end - p
                p = end
                break
            p += left
            left = 0
            if self._skip_last:
                break
            left = self._skip_mark(buf, p, end)
            if left == NEED_MORE:
                left = 0
                break
        self._skip_left = left
        self.skip_drop_to = p
        if left or not self._skip_last:
            return SKIPPING
        self.skipping = False
        self._skipped += 1
        self._skipped_bytes += self.skip_total
        return SKIPPED

    def _skip_mark(self, buf: Any, p: int, end: int) -> int:
        """A record's next fragment mark, while skipping (:class:`RecordDecoder`)."""
        raise AssertionError("only a record has fragment marks")

    def _too_big_text(self, announced: int, last: bool) -> str:
        what = "record" if self.framing.kind == "records" else "message"
        name, limit = ("max_message", self.max_message) if self.max_skip == self.max_message else (
            "max_skip", self.max_skip)
        why = "" if name == "max_message" else ": more likely a stream out of step than a message"
        if last:
            return f"remote announced a {announced}-byte {what}, over {name} ({limit}){why}"
        return (f"remote's record is over {name} ({limit}): its fragments so far announce "
                f"{announced} bytes and another fragment follows{why}")

    def statistics(self) -> DecoderStatistics:
        return DecoderStatistics(self._msgs, self._need_more_hdr, self._too_big, self._bad_hdr, self._skipped,
                                 self._skipped_bytes)


class RecordDecoder(FrameDecoder):
    """The decoder of a ``records`` framing: fragment by fragment, resumed across calls.

    State between calls: ``_walked``, the offset (from the partial record's
    start) of the next fragment header not read yet. It is relative, so the
    caller may move the partial record (compaction) between calls.

    Each fragment header is checked as soon as it is complete, in this order:
    a fragment shorter than its own header is a bad header; a last fragment
    ends the record, which must fit ``max_message``; a first fragment that
    is not the last must hold ``first_fragment_min`` bytes (bad header);
    any other fragment must leave room in ``max_message`` for at least one
    more fragment header, else the record is too big. So a record announced
    fragment by fragment is refused (or skipped) at the first header that
    proves it over the limit, having held less than ``max_message`` bytes.
    While it is skipped, its remaining marks are read as they pass (the same
    checks, against ``max_skip``) and their data dropped, until the last.
    """

    __slots__ = ("_walked", "_fields")

    def __init__(self, framing: Framing, max_message: int, max_skip: int | None = None, keep: int = 0) -> None:
        super().__init__(framing, max_message, max_skip, keep)
        self._walked = 0
        self._fields = (_field_reader(framing), framing.length_offset, framing.header_end, framing.length_mask,
                        framing.last_fragment_mask, framing.length_adjust, framing.first_fragment_min)

    def reset(self) -> None:
        super().reset()
        self._walked = 0

    def split(self, buf: Any, start: int, end: int, limit: int = 1 << 30) -> tuple[list[int], int, int]:
        if self.skipping:
            return [], start, self._skip_on(buf, start, end)
        read, offset, header_end, mask, last, adjust, first_min = self._fields
        max_message = self.max_message
        ends: list[int] = []
        pos = start
        walked = self._walked
        pending = NEED_MORE
        while len(ends) < limit:
            mark = pos + walked
            if end - mark < header_end:
                if end > mark:
                    self._need_more_hdr += 1
                break
            raw = read(buf, mark + offset)
            frag = (raw & mask) + adjust
            if frag < header_end:
                self._bad_hdr += 1
                raise _short_fragment(frag, header_end)
            total = walked + frag
            if raw & last:
                if total > max_message:
                    pending = self._oversized(buf, pos, end, total, self._first_fragment(buf, pos, frag, walked), True)
                    walked = 0
                    break
                if pos + total > end:
                    pending = total  # walked stays at this header: read once more next time
                    break
                pos += total
                ends.append(pos)
                walked = 0
                continue
            if walked == 0 and frag < first_min:
                self._bad_hdr += 1
                raise _short_first_fragment(frag, first_min)
            if total + header_end > max_message:
                pending = self._oversized(buf, pos, end, total, self._first_fragment(buf, pos, frag, walked), False)
                walked = 0
                break
            walked = total
        self._walked = walked
        self._msgs += len(ends)
        return ends, pos, pending

    def _first_fragment(self, buf: Any, pos: int, frag: int, walked: int) -> int:
        """The size of the first fragment of the record at ``buf[pos]`` (``frag`` if it is the one just read)."""
        if walked == 0:
            return frag
        read, offset, _, mask, _, adjust, _ = self._fields
        return (read(buf, pos + offset) & mask) + adjust

    def _skip_mark(self, buf: Any, p: int, end: int) -> int:
        read, offset, header_end, mask, last, adjust, _ = self._fields
        if end - p < header_end:
            return NEED_MORE
        raw = read(buf, p + offset)
        frag = (raw & mask) + adjust
        if frag < header_end:
            self._bad_hdr += 1
            raise _short_fragment(frag, header_end)
        total = self.skip_total + frag
        is_last = bool(raw & last)
        if (total if is_last else total + header_end) > self.max_skip:
            raise RemoteFrameTooBig(self._too_big_text(total, is_last))
        self.skip_total = total
        self._skip_last = is_last
        return frag


class Reassembler:
    """Convenience wrapper that owns its buffer: ``feed(bytes) -> [message, ...]``.

    For tests, tools and clients; the daemon uses :class:`FrameDecoder` on
    preallocated buffers instead. With ``max_skip``, a message skipped whole
    comes back in its place as a :class:`Skipped`.
    """

    def __init__(self, framing: Framing, max_message: int, max_skip: int | None = None, keep: int = 0) -> None:
        self.decoder = FrameDecoder(framing, max_message, max_skip, keep)
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Any]:
        buf = self._buf
        buf += data
        decoder = self.decoder
        out: list[Any] = []
        pos = 0
        while True:
            ends, consumed, pending = decoder.split(buf, pos, len(buf))
            for e in ends:
                out.append(bytes(buf[pos:e]))
                pos = e
            if pending == SKIPPED:
                out.append(Skipped(bytes(buf[consumed : consumed + decoder.skip_stub]), decoder.skip_total))
                pos = decoder.skip_drop_to
                continue
            if pending == SKIPPING:
                del buf[consumed + decoder.skip_stub : decoder.skip_drop_to]
            break
        del buf[:pos]
        return out


__all__ += ["Reassembler", "RecordDecoder"]
