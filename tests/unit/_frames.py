"""Build well-framed messages for any Framing (test helper, no sockets)."""

from __future__ import annotations

import struct

from kmux.framing import Framing

_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


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


def frame(framing: Framing, payload: bytes, fill: int = 0xAB) -> bytes:
    """One whole message whose header announces exactly its size."""
    if framing.kind == "varint":
        return varint(len(payload)) + payload
    # The header covers the length field, and for "length of the rest" framings
    # (adjust > 0, e.g. memcached's 24 bytes) everything the adjust accounts for.
    header = max(framing.length_offset + framing.length_size, framing.length_adjust)
    message = bytearray([fill]) * header + payload
    value = len(message) - framing.length_adjust
    order = ">" if framing.length_order == "big" else "<"
    struct.pack_into(order + _CODES[framing.length_size], message, framing.length_offset, value)
    return bytes(message)
