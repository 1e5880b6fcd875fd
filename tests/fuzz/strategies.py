"""Strategies shared by the fuzz targets: framings, streams and their chunkings, hostile msgpack.

Framings are every preset plus table framings built the way a config file
builds them (:meth:`Framing.from_spec`): ``fixed`` and ``records``, with
random offset, size (1 to 8 bytes), order, adjust (negative ones included),
length mask, last-fragment bit and first-fragment minimum. Well-framed streams are built with
:func:`tests.unit._frames.frame`, so the header arithmetic under test is
not the one that built the input.

Hostile msgpack covers what a decoder meets from a buggy or malicious peer:
arbitrary bytes, valid msgpack of every shape (maps whose values are maps,
lists, ext types, timestamps, str and bin keys), the same nested far past
msgpack's own stack limit, and containers whose declared length (up to
``2**32 - 1``) is far beyond the bytes that follow.
"""

from __future__ import annotations

import copy

import msgpack
from hypothesis import strategies as st

from kmux.framing import PRESETS, Framing
from kmux.protocol import NESTING_MAX, Accepted, Control, Hello, Notice, Refused

from ..unit._frames import frame, header_size

#: Largest max_message the fuzzers use: small, so a few examples reach every limit.
FUZZ_MAX_MESSAGE = 1024

@st.composite
def _length_mask(draw, size: int, reserved: int = 0) -> int | None:
    """None (the whole field), a run of low bits, or any bits: never ``reserved``'s."""
    top = (1 << (8 * size)) - 1
    how = draw(st.sampled_from(["whole", "low", "any"]))
    if how == "low":
        mask = ((1 << draw(st.integers(1, 8 * size))) - 1) & ~reserved
    elif how == "any":
        mask = draw(st.integers(1, top)) & ~reserved
    else:
        return None
    return mask or None


@st.composite
def table_framings(draw, max_offset: int = 40, max_adjust: int = 64) -> Framing:
    """A random ``[group.framing]`` table, built through ``from_spec`` as the config does:
    ``fixed`` or ``records``, any field size from 1 to 8 bytes, masked or not."""
    kind = draw(st.sampled_from(["fixed", "records"]))
    size = draw(st.integers(1, 8))
    spec = {
        "kind": kind,
        "length_offset": draw(st.integers(0, max_offset)),
        "length_size": size,
        "length_order": draw(st.sampled_from(["big", "little"])),
        "length_adjust": draw(st.integers(-max_adjust, max_adjust)),
    }
    last = 0
    if kind == "records":
        last = 1 << draw(st.integers(0, 8 * size - 1))
        spec["last_fragment_mask"] = last
        if draw(st.booleans()):
            spec["first_fragment_min"] = draw(st.integers(0, 48))
    mask = draw(_length_mask(size, last))
    if mask is not None:
        spec["length_mask"] = mask
    return Framing.from_spec(spec, "groups.fuzz.framing")


#: Every preset and random table framings, negative adjusts included.
framings = st.one_of(st.sampled_from(sorted(PRESETS.values(), key=lambda f: f.name)), table_framings())

#: Any framing the decoder accepts, including far offsets and adjusts (for arbitrary bytes).
any_framings = st.one_of(framings, table_framings(max_offset=65535, max_adjust=2**31))


def max_payload(framing: Framing, max_message: int) -> int:
    """Largest payload :func:`frame` can build for ``framing`` within ``max_message``
    (with an arbitrary ``length_mask``, an upper bound: not every size is representable)."""
    if framing.kind == "varint":
        return max_message - 2  # a prefix of at most 2 bytes below 16384
    header = header_size(framing)
    # The field holds len(message) - adjust under the mask.
    assert framing.length_mask is not None
    fits = framing.length_mask + framing.length_adjust - header
    return max(-1, min(max_message - header, fits))


@st.composite
def framed_streams(draw, framing: Framing, max_message: int, max_count: int = 12) -> list[bytes]:
    """Well-framed messages of random sizes (each at most ``max_message``); records in
    one to five fragments, some of them empty."""
    limit = max_payload(framing, max_message)
    if limit < 0:
        return []
    out = []
    for _ in range(draw(st.integers(0, max_count))):
        payload = draw(st.binary(max_size=min(limit, 300)))
        cuts = draw(st.lists(st.integers(0, 40), max_size=4)) if framing.kind == "records" else None
        if cuts and header_size(framing) + min(cuts[0], len(payload)) < framing.first_fragment_min:
            cuts = None  # too short a first fragment to hold the id: one fragment instead
        try:
            message = frame(framing, payload, fragments=cuts)
        except ValueError:
            continue  # a size the mask cannot express
        if len(message) <= max_message:
            out.append(message)
    return out


def chunk(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split into pieces of the sizes in ``cuts`` (cycled; any size >= 1)."""
    out = []
    pos = i = 0
    while pos < len(data):
        step = cuts[i % len(cuts)] if cuts else len(data)
        out.append(data[pos : pos + step])
        pos += step
        i += 1
    return out


#: Chunk sizes: mostly tiny (every split inside a header), sometimes large.
cuts = st.lists(st.one_of(st.integers(1, 16), st.integers(1, 4096)), min_size=1, max_size=40)


# -- msgpack ------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16)),
    st.builds(msgpack.Timestamp, st.integers(-(2**33), 2**33), st.integers(0, 999_999_999)),
)
_keys = st.one_of(st.text(max_size=12), st.binary(max_size=4), st.sampled_from(["op", "kmux", "code", "event", "on"]))
#: Any msgpack value: nested lists and maps of every scalar type.
msgpack_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(_keys, inner, max_size=5),
    ),
    max_leaves=10,
)

_ARRAY1 = b"\x91"  # fixarray of one element
_MAP1 = b"\x81\xa1k"  # fixmap of one entry, key "k"
#: Container headers declaring far more than follows: str32, bin32, ext32, array32, map32.
HUGE_HEADERS = [b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01",
                b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdd\x7f\xff\xff\xff"]


@st.composite
def deep_nesting(draw, valid_packets) -> bytes:
    """A list or map nested up to far past msgpack's stack limit (1024) and Python's recursion
    limit, alone or as one field of a valid map (msgpack.packb itself refuses to nest that deep)."""
    depth = draw(st.one_of(st.integers(0, 40), st.integers(900, 1030), st.integers(1030, 3000)))
    unit = draw(st.sampled_from([_ARRAY1, _MAP1]))
    leaf = draw(st.sampled_from([b"\xc0", b"\x90", b"\x80", b"\xa1x"]))
    deep = unit * depth + leaf
    if draw(st.booleans()):
        return deep
    fields = msgpack.unpackb(draw(valid_packets), raw=False)
    key = draw(st.sampled_from(sorted({*fields, "error"}, key=repr)))
    fields.pop(key, None)
    count = len(fields) + 1
    header = bytes([0x80 | count]) if count < 16 else b"\xde" + count.to_bytes(2, "big")
    return header + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in fields.items()) + msgpack.packb(key) + deep


@st.composite
def huge_lengths(draw) -> bytes:
    """A container that declares up to ``2**32 - 1`` elements or bytes, at the top or inside a map."""
    header = draw(st.sampled_from(HUGE_HEADERS))
    tail = draw(st.binary(max_size=32))
    inside = draw(st.sampled_from([b"", b"\x81\xa4code", b"\x82\xa2op\xa7receive\xa2on"]))
    return inside + header + tail


@st.composite
def mutated(draw, packets) -> bytes:
    """A valid packet, then truncated, with bytes flipped, or with junk appended."""
    data = bytearray(draw(packets))
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["truncate", "flip", "append", "insert"]))
        if how == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif how == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif how == "append":
            data += draw(st.binary(min_size=1, max_size=8))
        elif how == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.sampled_from(HUGE_HEADERS))
    return bytes(data)


#: Field values a decoder might trip on: wrong types, extremes, NaN, containers.
odd_values = st.one_of(
    st.sampled_from([0, -1, 2**64 - 1, -(2**63), True, False, None, "", b"", 1.5, float("inf"), float("nan"),
                     [], {}, ["x"], {"k": 1}, "big", "u32be", "varint"]),
    msgpack_values,
)


@st.composite
def fields_replaced(draw, valid_packets) -> bytes:
    """A valid map with one to three fields (at any depth) replaced by odd values, removed, or added."""
    data = msgpack.unpackb(draw(valid_packets), raw=False)
    for _ in range(draw(st.integers(1, 3))):
        target = data
        # Sometimes go one level down (the answer's framing map).
        inner = [k for k, v in target.items() if isinstance(v, dict)]
        if inner and draw(st.booleans()):
            target = target[draw(st.sampled_from(sorted(inner, key=repr)))]
        key = draw(st.sampled_from(sorted({*target, "stray"}, key=repr)))
        if key in target and draw(st.integers(0, 3)) == 0:
            del target[key]
        else:
            # A copy: sampled values are shared between examples, and the next round may edit this one.
            target[key] = copy.deepcopy(draw(odd_values))
    return msgpack.packb(data)


def shaped_maps(keys: list[str], values: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """Maps with a decoder's own ``keys`` (plus stray str and bin keys), holding ``values``."""
    key = st.one_of(st.sampled_from(keys), st.text(max_size=6), st.binary(max_size=3))
    return st.dictionaries(key, values, max_size=len(keys) + 1).map(msgpack.packb)


def hostile_msgpack(valid_packets) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, any msgpack, deep nesting, huge lengths, and mutations of ``valid_packets``
    (``valid_packets`` must be msgpack maps with string keys)."""
    return st.one_of(
        st.binary(max_size=64),
        msgpack_values.map(msgpack.packb),
        st.dictionaries(_keys, msgpack_values, max_size=6).map(msgpack.packb),
        deep_nesting(valid_packets),
        huge_lengths(),
        mutated(valid_packets),
        fields_replaced(valid_packets),
    )


# -- streams for the decoders ---------------------------------------------------


@st.composite
def stream_cases(draw, framing_strategy=framings) -> tuple[Framing, int, bytes]:
    """``(framing, max_message, stream)``: well-framed, cut short, broken, or arbitrary bytes,
    with a limit far above the messages or close around one of them.

    ``max_message`` respects the config's rules (at least 16 and at least the
    framing's header), so every partial message fits the daemon's buffer.
    """
    framing = draw(framing_strategy)
    floor = max(16, framing.min_header)
    max_message = draw(st.integers(floor, floor + FUZZ_MAX_MESSAGE))
    frames = draw(framed_streams(framing, max_message))
    stream = b"".join(frames)
    how = draw(st.sampled_from(["framed", "truncated", "garbage_tail", "flipped", "arbitrary"]))
    if how == "truncated":
        stream = stream[: draw(st.integers(0, len(stream)))]
    elif how == "garbage_tail":
        stream += draw(st.binary(min_size=1, max_size=64))
    elif how == "flipped" and stream:
        data = bytearray(stream)
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        stream = bytes(data)
    elif how == "arbitrary":
        stream = draw(st.binary(max_size=2048))
    if frames and draw(st.booleans()):
        # Tighten the limit around one message: a record then crosses it
        # fragment by fragment, with its last header or before.
        near = len(draw(st.sampled_from(frames))) - draw(st.integers(-2, 9))
        max_message = max(floor, near)
    return framing, max_message, stream


@st.composite
def skip_cases(draw, framing_strategy=framings) -> tuple[Framing, int, int, int, bytes]:
    """``(framing, max_message, max_skip, keep, stream)``: well-framed messages (some cut
    short, or followed by garbage) with ``max_message`` below some of them, a ceiling for
    skipping (mostly between the limit and a few KiB above it, so some messages over the
    limit are skipped and some are past the ceiling; sometimes ``max_message`` itself:
    skip nothing), and a stub wish (an id's end: up to 24 bytes). One case in four is a
    :func:`stream_cases` case instead (arbitrary bytes among them)."""
    if draw(st.integers(0, 3)) == 0:
        framing, max_message, stream = draw(stream_cases(framing_strategy))
    else:
        framing = draw(framing_strategy)
        floor = max(16, framing.min_header)
        frames = draw(framed_streams(framing, floor + FUZZ_MAX_MESSAGE))
        stream = b"".join(frames)
        max_message = floor + draw(st.integers(0, FUZZ_MAX_MESSAGE))
        if frames:
            max_message = max(floor, len(draw(st.sampled_from(frames))) - draw(st.integers(1, 64)))
        how = draw(st.sampled_from(["framed", "framed", "truncated", "garbage_tail"]))
        if how == "truncated":
            stream = stream[: draw(st.integers(0, len(stream)))]
        elif how == "garbage_tail":
            stream += draw(st.binary(min_size=1, max_size=64))
    above = draw(st.integers(0, 9))
    max_skip = max_message + (0 if above == 0 else draw(st.integers(1, 64) if above < 4 else st.integers(64, 4096)))
    keep = draw(st.integers(0, 24))
    return framing, max_message, max_skip, keep, stream


# -- valid protocol values ---------------------------------------------------------------

_names = st.text(max_size=128)
hellos = st.builds(Hello, group=st.text(min_size=1, max_size=128), receive=st.booleans(), name=_names)
accepteds = st.builds(
    Accepted,
    group=_names,
    client_id=st.integers(0, 2**63),
    max_message=st.integers(16, 64 * 1024 * 1024),
    framing=any_framings,
    steering=st.one_of(st.sampled_from(["balance", "id", "fifo"]), st.text(max_size=12)),
    up=st.booleans(),
)
refuseds = st.builds(Refused, code=st.text(max_size=40), message=st.text(max_size=200))

# Values that survive a msgpack round trip unchanged (lists, not tuples; no NaN).
_plain = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
              st.text(max_size=20), st.binary(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8,
)


def _depth(value) -> int:
    if isinstance(value, dict):
        value = list(value.values())
    return 1 + max(map(_depth, value), default=0) if isinstance(value, list) else 0


# Within the protocol's nesting limit: the details map sits inside the notice map.
_details = st.dictionaries(
    st.text(max_size=12).filter(lambda k: k not in ("code", "error", "event")), _plain, max_size=5
).filter(lambda d: _depth(d) < NESTING_MAX)
notices = st.one_of(
    st.builds(Notice, code=st.text(max_size=30), message=st.text(max_size=100), details=_details),
    st.builds(Notice, event=st.text(max_size=30), details=_details),
)
controls = st.builds(lambda on: Control("receive", {"on": on}), st.booleans())
