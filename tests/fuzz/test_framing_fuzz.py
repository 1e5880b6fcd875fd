"""Fuzz targets for :mod:`kmux.framing`: every preset and random table framings.

Invariants, each checked against the naive decoder in :mod:`.oracle`:

* well-framed messages come back exactly, under any chunking;
* on any bytes, the decoder finds the same messages and the same error as
  the oracle, whatever the chunking, and raises nothing but
  ``RemoteFrameTooBig``/``RemoteBadHeader``;
* the bytes it holds never exceed ``max_message`` plus one read;
* ``length_at`` is decided by the header alone: more bytes never change it;
* ``check_message`` accepts exactly the messages the oracle reads as one
  whole message of at most ``max_message``, and raises only
  ``BadFrame``/``MessageTooBig``;
* ``Framing.from_spec`` turns any config value into a framing or a
  ``ConfigInvalid`` naming the key;
* with ``max_skip``, a message over ``max_message`` comes back as the
  oracle's :class:`~kmux.framing.Skipped` (its stub and size) in its place,
  under any chunking, and while it goes by only its stub (and at most a
  fragment mark cut short) is held.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kmux.errors import BadFrame, ConfigInvalid, MessageTooBig, RemoteBadHeader, RemoteFrameTooBig
from kmux.framing import NEED_MORE, FrameDecoder, Framing, Reassembler

from . import oracle
from .profiles import fuzz_settings
from .strategies import (
    FUZZ_MAX_MESSAGE,
    any_framings,
    chunk,
    cuts,
    framed_streams,
    framings,
    msgpack_values,
    skip_cases,
    stream_cases,
)

STREAM_ERRORS = (RemoteFrameTooBig, RemoteBadHeader)


@fuzz_settings
@given(data=st.data(), framing=framings, cut_sizes=cuts)
def test_frames_come_back_under_any_chunking(data, framing, cut_sizes):
    max_message = max(16, framing.min_header, framing.length_adjust) + FUZZ_MAX_MESSAGE
    frames = data.draw(framed_streams(framing, max_message))
    reassembler = Reassembler(framing, max_message)
    out: list[bytes] = []
    for piece in chunk(b"".join(frames), cut_sizes):
        out += reassembler.feed(piece)
    assert out == frames
    assert reassembler.buffered == 0
    assert reassembler.decoder.statistics().msgs == len(frames)


@fuzz_settings
@given(case=stream_cases(any_framings), cut_sizes=cuts)
def test_any_bytes_any_chunking_agree_with_the_oracle(case, cut_sizes):
    framing, max_message, stream = case
    expected = oracle.decode(framing, stream, max_message)
    reassembler = Reassembler(framing, max_message)
    out: list[bytes] = []
    error = None
    for piece in chunk(stream, cut_sizes):
        try:
            out += reassembler.feed(piece)
        except STREAM_ERRORS as exc:
            error = type(exc)
            break
        # Between reads only a partial message is held, shorter than max_message,
        # so a feed never holds more than max_message plus the one read.
        assert reassembler.buffered < max_message
    assert error is expected.error
    if error is None:
        assert out == expected.messages
        assert reassembler.buffered == expected.partial
    else:
        # The failing feed's own messages are not returned; earlier ones were.
        assert out == expected.messages[: len(out)]


@fuzz_settings
@given(case=skip_cases(any_framings), cut_sizes=cuts)
def test_skipping_any_chunking_agrees_with_the_oracle(case, cut_sizes):
    framing, max_message, max_skip, keep, stream = case
    expected = oracle.decode(framing, stream, max_message, max_skip, keep)
    reassembler = Reassembler(framing, max_message, max_skip, keep)
    out: list = []
    error = None
    for piece in chunk(stream, cut_sizes):
        try:
            out += reassembler.feed(piece)
        except STREAM_ERRORS as exc:
            error = type(exc)
            break
        # A message going by holds at most max_message (its stub, a mark cut short).
        assert reassembler.buffered <= max_message
        assert reassembler.decoder.skipping or reassembler.buffered < max_message
    assert error is expected.error
    if error is not None:
        assert out == expected.messages[: len(out)]
        return
    assert out == expected.messages
    if expected.skipping:
        # Only the stub (and a fragment mark cut short) of a message going by.
        header = framing.header_end
        assert min(expected.partial, expected.stub) <= reassembler.buffered <= expected.stub + max(header - 1, 0)
    else:
        assert reassembler.buffered == expected.partial
    stats = reassembler.decoder.statistics()
    skipped = [m for m in out if not isinstance(m, bytes)]
    assert (stats.skipped, stats.skipped_bytes) == (len(skipped), sum(m.size for m in skipped))
    assert stats.msgs == len(out) - len(skipped)


@fuzz_settings
@given(
    case=stream_cases(),
    prefix=st.binary(max_size=24),
    suffix=st.binary(max_size=24),
    limits=st.lists(st.integers(1, 5), min_size=1, max_size=8),
    buffer_type=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_split_with_cursors_and_limits_matches_the_oracle(case, prefix, suffix, limits, buffer_type):
    """The daemon's call: a shared buffer, cursors, bytes before start and after end never read."""
    framing, max_message, stream = case
    expected = oracle.decode(framing, stream, max_message)
    buf = buffer_type(prefix + stream + suffix)
    start, end = len(prefix), len(prefix) + len(stream)
    decoder = FrameDecoder(framing, max_message)
    ends: list[int] = []
    pos, pending, error = start, NEED_MORE, None
    for i in range(len(stream) + 1):  # each call finds >= 1 message or stops; bounded by the stream
        limit = limits[i % len(limits)]
        try:
            found, pos_after, pending = decoder.split(buf, pos, end, limit)
        except STREAM_ERRORS as exc:
            error = type(exc)
            break
        assert len(found) <= limit
        assert found == sorted(found) and all(pos < e <= end for e in found)
        assert pos_after == (found[-1] if found else pos)
        ends += found
        pos = pos_after
        if len(found) < limit:
            break
    assert error is expected.error
    lengths = [b - a for a, b in zip([start, *ends], ends)]
    assert lengths == [len(m) for m in expected.messages[: len(ends)]]
    if error is None:
        assert len(ends) == len(expected.messages)
        assert end - pos == expected.partial
        # pending is the partial message's total once its header is complete.
        partial_total = oracle.total_length(framing, stream[pos - start :]) if expected.partial else None
        assert pending == (partial_total if isinstance(partial_total, int) else NEED_MORE)
    stats = decoder.statistics()
    assert stats.msgs == len(ends)
    assert (stats.bad_hdr_len, stats.msg_too_big) == (
        int(error is RemoteBadHeader),
        int(error is RemoteFrameTooBig),
    )


@fuzz_settings
@given(framing=any_framings, data=st.binary(max_size=80), start=st.integers(0, 8))
def test_length_at_is_decided_by_the_header_alone(framing, data, start):
    buf = bytes(start) + data
    expected = oracle.total_length(framing, data)
    decided = None
    for end in range(start, len(buf) + 1):
        try:
            got: int | type = framing.length_at(buf, start, end)
        except RemoteBadHeader:
            got = RemoteBadHeader
        if decided is not None:
            assert got == decided, "more bytes changed a decided header"
        elif got != NEED_MORE:
            decided = got
            assert got == oracle.total_length(framing, data[: end - start])
    assert decided == expected
    if isinstance(decided, int):
        assert decided >= framing.min_header


@st.composite
def candidate_messages(draw):
    framing = draw(any_framings)
    max_message = draw(st.integers(1, 2 * FUZZ_MAX_MESSAGE))
    frames = draw(framed_streams(framing, FUZZ_MAX_MESSAGE, max_count=2))
    valid = frames[0] if frames else b""
    flipped = bytearray(valid)
    if flipped:
        flipped[draw(st.integers(0, len(flipped) - 1))] ^= draw(st.integers(1, 255))
    message = draw(st.sampled_from([valid, valid + b"!", valid[:-1], bytes(flipped), draw(st.binary(max_size=80))]))
    return framing, max_message, message


@fuzz_settings
@given(case=candidate_messages(), prefix=st.binary(max_size=8), suffix=st.binary(max_size=8))
def test_check_message_accepts_exactly_one_whole_message(case, prefix, suffix):
    framing, max_message, message = case
    announced = oracle.total_length(framing, message)
    should_pass = len(message) <= max_message and announced == len(message)
    verdicts = []
    for buf, start, length in (
        (message, 0, None),
        (memoryview(message), 0, None),
        (bytearray(prefix + message + suffix), len(prefix), len(message)),
    ):
        try:
            framing.check_message(buf, max_message, start, length)
            verdicts.append(None)
        except MessageTooBig:
            verdicts.append(MessageTooBig)
        except BadFrame as exc:
            assert str(exc)
            verdicts.append(BadFrame)
    assert len(set(verdicts)) == 1, verdicts
    if should_pass:
        assert verdicts[0] is None
    elif len(message) > max_message:
        assert verdicts[0] is MessageTooBig
    else:
        assert verdicts[0] is BadFrame


_SPEC_KEYS = ["kind", "length_offset", "length_size", "length_order", "length_adjust", "length_mask",
              "last_fragment_mask", "first_fragment_min", "name", "offset"]
_spec_values = st.one_of(
    st.integers(-(2**40), 2**40),
    st.integers(0, 9),
    st.sampled_from(["big", "little", "fixed", "varint", "records", "u32be", "oncrpc", 1, 2, 3, 4, 8, -4, True,
                     0x7FFFFFFF, 0x80000000, 0xFFFFFF, 2**64, 0]),
    st.lists(st.sampled_from(["big", 4]), max_size=2),  # TOML arrays
    msgpack_values,
)


@fuzz_settings
@given(spec=st.one_of(st.dictionaries(st.sampled_from(_SPEC_KEYS), _spec_values, max_size=6), msgpack_values))
def test_from_spec_builds_a_framing_or_names_the_key(spec):
    try:
        framing = Framing.from_spec(spec, "groups.g.framing")
    except ConfigInvalid as exc:
        assert exc.path.startswith("groups.g.framing")
        assert str(exc)
        return
    assert Framing.from_wire(framing.to_wire()) == framing
    assert framing.min_header >= 1

