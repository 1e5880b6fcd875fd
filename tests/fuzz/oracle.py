"""A second, deliberately naive decoder, written from docs/protocol.md section 3 ("Framing").

The fuzz targets compare :mod:`kmux.framing` against it. It shares no code
with the real decoder: no ``struct``, no cursors, no precomputed closures,
no state kept between reads; it slices, uses ``int.from_bytes``, and reads
every record from its first fragment header each time. Where the two
disagree, one of them misreads the specification.
"""

from __future__ import annotations

from dataclasses import dataclass

from kmux.errors import RemoteBadHeader, RemoteFrameTooBig
from kmux.framing import Framing, Skipped

#: The varint prefix is at most this long (protocol.md: "at most 10 bytes").
VARINT_PREFIX_MAX = 10


def _length_field(framing: Framing, data: bytes, at: int) -> int | None:
    """The whole length field (flags included) of the header at ``data[at]``, None if incomplete."""
    first = at + framing.length_offset
    last = first + framing.length_size
    if len(data) < last:
        return None
    return int.from_bytes(data[first:last], framing.length_order)


def measure(framing: Framing, data: bytes, max_message: int | None = None) -> int | None | type:
    """What the spec says of the message at ``data[0]``: its total length, None if its
    length is not known yet, or the error (RemoteBadHeader, RemoteFrameTooBig; the
    latter only when ``max_message`` is given)."""
    if framing.kind == "varint":
        value = 0
        for i, byte in enumerate(data[:VARINT_PREFIX_MAX]):
            value |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                total = value + i + 1
                return RemoteFrameTooBig if max_message is not None and total > max_message else total
        return RemoteBadHeader if len(data) >= VARINT_PREFIX_MAX else None
    header = framing.length_offset + framing.length_size
    mask = framing.length_mask
    assert mask is not None
    if framing.kind == "fixed":
        field = _length_field(framing, data, 0)
        if field is None:
            return None
        total = (field & mask) + framing.length_adjust
        if total < header:  # a header that announces less than itself can never be valid
            return RemoteBadHeader
        return RemoteFrameTooBig if max_message is not None and total > max_message else total
    # records: walk the fragment headers in order, each checked as the spec lists.
    at = 0
    while True:
        field = _length_field(framing, data, at)
        if field is None:
            return None
        size = (field & mask) + framing.length_adjust
        if size < header:
            return RemoteBadHeader
        is_last = field & framing.last_fragment_mask != 0
        if is_last:
            total = at + size
            return RemoteFrameTooBig if max_message is not None and total > max_message else total
        if at == 0 and size < framing.first_fragment_min:
            return RemoteBadHeader
        at += size
        # Another fragment follows, and it is at least a bare header.
        if max_message is not None and at + header > max_message:
            return RemoteFrameTooBig


def total_length(framing: Framing, data: bytes) -> int | None | type[RemoteBadHeader]:
    """The message length the header(s) at ``data[0]`` announce, None if incomplete, or RemoteBadHeader."""
    result = measure(framing, data)
    assert result is not RemoteFrameTooBig
    return result  # type: ignore[return-value]


def stub_size(framing: Framing, data: bytes, keep: int, max_message: int) -> int:
    """How much of a skipped message at ``data[0]`` stays: its header and ``keep`` bytes
    (at least one byte), never past its first fragment, and with a fragment mark cut short
    (records) never over ``max_message``."""
    header = framing.length_offset + framing.length_size if framing.kind != "varint" else 0
    room = max_message - (header - 1 if framing.kind == "records" else 0)
    stub = min(max(keep, header, 1), room)
    if framing.kind == "records":
        field = _length_field(framing, data, 0)
        assert field is not None and framing.length_mask is not None
        stub = min(stub, (field & framing.length_mask) + framing.length_adjust)
    return stub


@dataclass
class Decoded:
    #: Whole messages, and :class:`Skipped` ones in their place.
    messages: list
    #: Bytes after the last whole message (a partial one), when there is no error.
    partial: int
    #: RemoteBadHeader, RemoteFrameTooBig, or None.
    error: type | None
    #: The partial message is over max_message and being skipped: only its stub is held.
    skipping: bool = False
    #: Its stub's size, then.
    stub: int = 0


def decode(framing: Framing, stream: bytes, max_message: int, max_skip: int | None = None, keep: int = 0) -> Decoded:
    """Cut ``stream`` into messages the way the specification says; with ``max_skip``, a
    message over max_message and within max_skip is skipped (a :class:`Skipped` in its place)."""
    messages: list = []
    pos = 0
    while pos < len(stream):
        data = stream[pos:]
        total = measure(framing, data, max_message)
        if total is RemoteFrameTooBig and max_skip is not None and max_skip > max_message:
            total = measure(framing, data, max_skip)
            if isinstance(total, int) or total is None:
                # Over max_message, within max_skip (as far as its headers have come): skipped.
                stub = stub_size(framing, data, keep, max_message)
                if total is None or pos + total > len(stream):
                    return Decoded(messages, len(data), None, skipping=True, stub=stub)
                messages.append(Skipped(data[:stub], total))
                pos += total
                continue
        if total is RemoteBadHeader or total is RemoteFrameTooBig:
            return Decoded(messages, 0, total)  # type: ignore[arg-type]
        if total is None:
            break
        assert isinstance(total, int)
        if pos + total > len(stream):
            break
        messages.append(stream[pos : pos + total])
        pos += total
    return Decoded(messages, len(stream) - pos, None)
