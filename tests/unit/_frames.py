"""Build well-framed messages for any Framing (test helper, no sockets).

Written from the framing's description, not its code: the length field is
built with ``int.to_bytes``, and every bit outside ``length_mask`` that is
not the last-fragment bit is set, so a decoder that forgot the mask would
read a wrong length.
"""

from __future__ import annotations

from kmux.framing import Framing


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def header_size(framing: Framing) -> int:
    """Bytes before a (fragment's) payload: the length field, and for "length of the rest"
    framings (adjust > 0, e.g. memcached's 24 bytes) everything the adjust accounts for."""
    return max(framing.length_offset + framing.length_size, framing.length_adjust)


def fragment(framing: Framing, payload: bytes, last: bool = False, fill: int = 0xAB) -> bytes:
    """One fixed-framing message, or one fragment of a record, whose header announces exactly its size."""
    message = bytearray([fill]) * header_size(framing) + payload
    value = len(message) - framing.length_adjust
    field_max = (1 << (8 * framing.length_size)) - 1
    mask = framing.length_mask
    assert mask is not None
    if value < 0 or value & ~mask:
        raise ValueError(f"a {len(message)}-byte message cannot be announced by {framing}")
    flags = field_max & ~mask & ~framing.last_fragment_mask
    field = value | flags | (framing.last_fragment_mask if last else 0)
    off = framing.length_offset
    message[off : off + framing.length_size] = field.to_bytes(framing.length_size, framing.length_order)
    return bytes(message)


def frame(framing: Framing, payload: bytes, fill: int = 0xAB, fragments: list[int] | None = None) -> bytes:
    """One whole message whose header announces exactly its size.

    For a ``records`` framing, ``fragments`` gives the payload bytes of each
    fragment but the last (zeros allowed; cut short at the payload's end);
    the last fragment carries the rest. Default: one fragment.
    """
    if framing.kind == "varint":
        return varint(len(payload)) + payload
    if framing.kind == "fixed":
        return fragment(framing, payload, fill=fill)
    out = []
    pos = 0
    for size in fragments or ():
        out.append(fragment(framing, payload[pos : pos + size], fill=fill))
        pos = min(pos + size, len(payload))
    out.append(fragment(framing, payload[pos:], last=True, fill=fill))
    return b"".join(out)
