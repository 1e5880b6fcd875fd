"""A second, deliberately naive decoder, written from docs/protocol.md section 3 ("Framing").

The fuzz targets compare :mod:`kmux.framing` against it. It shares no code
with the real decoder: no ``struct``, no cursors, no precomputed closures;
it slices and uses ``int.from_bytes``. Where the two disagree, one of them
misreads the specification.
"""

from __future__ import annotations

from dataclasses import dataclass

from kmux.errors import RemoteBadHeader, RemoteFrameTooBig
from kmux.framing import Framing

#: The varint prefix is at most this long (protocol.md: "at most 10 bytes").
VARINT_PREFIX_MAX = 10


def total_length(framing: Framing, data: bytes) -> int | None | type[RemoteBadHeader]:
    """The message length the header at ``data[0]`` announces, None if incomplete, or RemoteBadHeader."""
    if framing.kind == "varint":
        value = 0
        for i, byte in enumerate(data[:VARINT_PREFIX_MAX]):
            value |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                return value + i + 1
        return RemoteBadHeader if len(data) >= VARINT_PREFIX_MAX else None
    header_end = framing.length_offset + framing.length_size
    if len(data) < header_end:
        return None
    field = data[framing.length_offset : header_end]
    total = int.from_bytes(field, framing.length_order) + framing.length_adjust
    # A header that announces less than itself can never be valid.
    return RemoteBadHeader if total < header_end else total


@dataclass
class Decoded:
    messages: list[bytes]
    #: Bytes after the last whole message (a partial one), when there is no error.
    partial: int
    #: RemoteBadHeader, RemoteFrameTooBig, or None.
    error: type | None


def decode(framing: Framing, stream: bytes, max_message: int) -> Decoded:
    """Cut ``stream`` into messages the way the specification says."""
    messages = []
    pos = 0
    while pos < len(stream):
        total = total_length(framing, stream[pos:])
        if total is RemoteBadHeader:
            return Decoded(messages, 0, RemoteBadHeader)
        if total is None:
            break
        if total > max_message:
            return Decoded(messages, 0, RemoteFrameTooBig)
        if pos + total > len(stream):
            break
        messages.append(stream[pos : pos + total])
        pos += total
    return Decoded(messages, len(stream) - pos, None)
