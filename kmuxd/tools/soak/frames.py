"""The soak's messages: self-identifying, checksummed u32be frames (no I/O).

Every message the soak sends, in every group, has one layout::

    offset  0  u32 length     of the rest (u32be framing)
            4  u32 id         the request id (id steering reads and rewrites it)
            8  u32 session    which client session sent it (never 0)
           12  u32 seq        the session's message number, from 1 (the daemon's seq)
           16  u32 conn       0 in a request; the echo server writes the number of
                              the backend connection that answered
           20  u32 crc        crc32 of (session, seq, body)
           24  body           bytes cut from a fixed random blob

Why this shape:

* ``session`` and ``seq`` travel inside the payload, so a response that
  reaches the wrong client (a cross-delivery) or answers the wrong request
  is recognised by the receiver alone, without asking anyone.
* The checksum covers the identity and the body but neither ``id`` (the
  daemon rewrites it on the way out and restores it on the way back) nor
  ``conn`` (the server stamps it), so a torn, interleaved or spliced message
  fails the check wherever it is read.
* ``conn`` lets a client check per-connection order: one backend connection
  answers in the order it read, and the daemon must not reorder responses
  coming off one connection.

Frames whose ``session`` is :data:`STRAY_SESSION` are ones the echo server
sends unasked (unmatched ids); no client ever owns that session.
"""

from __future__ import annotations

import random
import struct
import zlib

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "ID_OFFSET",
    "CONN_OFFSET",
    "STRAY_SESSION",
    "STRAY_ID_BASE",
    "BadSoakFrame",
    "Frame",
    "make_frame",
    "parse_frame",
    "stamp_conn",
    "frame_size",
    "split_frames",
]

HEADER = struct.Struct(">IIIIII")
HEADER_SIZE = HEADER.size  # 24
#: Where the id sits in requests and responses (the group's request/response_offset).
ID_OFFSET = 4
ID_SIZE = 4
CONN_OFFSET = 16
_IDENT = struct.Struct(">II")
_CONN = struct.Struct(">I")
#: The session of frames no client sent (the echo server's unasked answers).
STRAY_SESSION = 0
#: Wire ids of unasked answers. The daemon hands out rewritten ids from 0 upward
#: (kmuxd.core.requests.IdTable), so a soak of any length never reaches these:
#: an unasked answer can match no request.
STRAY_ID_BASE = 0xFFFF_FF00
#: The body blob: bodies are slices of it at a random offset.
_BLOB = random.Random(20261130).randbytes(1 << 17)


class BadSoakFrame(ValueError):
    """A frame that is torn, garbled or not a soak frame at all."""


class Frame:
    """A parsed frame's identity (the body was checked, not kept)."""

    __slots__ = ("id", "session", "seq", "conn", "size")

    def __init__(self, id: int, session: int, seq: int, conn: int, size: int) -> None:
        self.id = id
        self.session = session
        self.seq = seq
        self.conn = conn
        self.size = size

    def __repr__(self) -> str:
        return f"Frame(session={self.session}, seq={self.seq}, id={self.id}, conn={self.conn}, {self.size} B)"


def _crc(session: int, seq: int, body) -> int:
    return zlib.crc32(body, zlib.crc32(_IDENT.pack(session, seq)))


def make_frame(session: int, seq: int, rid: int, size: int, rng: random.Random) -> bytes:
    """A frame of exactly ``size`` bytes (header included) naming ``(session, seq)``."""
    if size < HEADER_SIZE:
        raise ValueError(f"a soak frame needs at least {HEADER_SIZE} bytes, not {size}")
    n = size - HEADER_SIZE
    if n > len(_BLOB):
        raise ValueError(f"a soak frame has at most {len(_BLOB) + HEADER_SIZE} bytes, not {size}")
    off = rng.randrange(0, len(_BLOB) - n + 1)
    body = _BLOB[off : off + n]
    return HEADER.pack(size - 4, rid, session, seq, 0, _crc(session, seq, body)) + body


def parse_frame(frame) -> Frame:
    """Check a whole frame and return its identity; :class:`BadSoakFrame` if it is not intact."""
    size = len(frame)
    if size < HEADER_SIZE:
        raise BadSoakFrame(f"{size}-byte frame is shorter than the {HEADER_SIZE}-byte soak header")
    length, rid, session, seq, conn, crc = HEADER.unpack_from(frame)
    if length + 4 != size:
        raise BadSoakFrame(f"header announces {length + 4} bytes, the frame has {size}")
    if _crc(session, seq, memoryview(frame)[HEADER_SIZE:]) != crc:
        raise BadSoakFrame(f"checksum mismatch in a {size}-byte frame naming session {session} seq {seq}")
    return Frame(rid, session, seq, conn, size)


def stamp_conn(frame: bytes, conn: int) -> bytes:
    """The echo server's answer: the frame with ``conn`` written into its conn field."""
    return frame[:CONN_OFFSET] + _CONN.pack(conn) + frame[CONN_OFFSET + 4 :]


def frame_size(rng: random.Random, max_size: int) -> int:
    """Mostly small, some medium, a few large (up to ``max_size``) frames."""
    r = rng.random()
    if r < 0.7:
        return rng.randint(HEADER_SIZE, 600)
    if r < 0.95:
        return rng.randint(601, min(8192, max_size))
    return rng.randint(min(8193, max_size), max_size)


def split_frames(buf: bytearray, max_size: int) -> list[bytes]:
    """Cut the whole u32be frames off the front of ``buf`` (in place); BadSoakFrame on a length
    over ``max_size`` (the stream cannot be resynchronised after that)."""
    frames = []
    pos = 0
    end = len(buf)
    while end - pos >= 4:
        size = int.from_bytes(buf[pos : pos + 4], "big") + 4
        if size > max_size:
            raise BadSoakFrame(f"a frame header announces {size} bytes, over the largest message {max_size}")
        if end - pos < size:
            break
        frames.append(bytes(buf[pos : pos + size]))
        pos += size
    if pos:
        del buf[:pos]
    return frames
