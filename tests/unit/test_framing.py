"""Framing rules, the zero-copy decoder and the outgoing check. No sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmux.errors import BadFrame, ConfigInvalid, MessageTooBig, RemoteBadHeader, RemoteFrameTooBig
from kmux.framing import (
    NEED_MORE,
    PRESETS,
    VARINT_MAX_BYTES,
    DecoderStatistics,
    FrameDecoder,
    Framing,
    Reassembler,
)

from ._frames import frame, varint

CUSTOM = [
    Framing("custom", "fixed", 0, 1, "big", 1),  # 1-byte length of the rest
    Framing("custom", "fixed", 2, 2, "little", 0),  # u16le total length after 2 bytes of magic
    Framing("custom", "fixed", 3, 4, "little", 7),  # u32le length of the rest
    Framing("custom", "fixed", 0, 8, "big", 8),  # u64be length of the rest
    Framing("custom", "fixed", 1, 8, "little", -3),  # counts 3 bytes more than there are
    Framing("custom", "fixed", 2, 3, "little", 5),  # u24le after 2 bytes of magic
    Framing("custom", "fixed", 0, 5, "big", 5),  # the sizes with no struct code
    Framing("custom", "fixed", 1, 6, "little", 7),
    Framing("custom", "fixed", 0, 7, "big", 0),
    Framing("custom", "fixed", 0, 4, "big", 4, 0x00FFFFFF),  # a type byte, then a u24 length
    Framing("custom", "fixed", 0, 2, "little", 2, 0x0FFF),  # 4 flag bits above a 12-bit length
    Framing("custom", "records", 0, 2, "big", 2, 0x7FFF, 0x8000),  # 16-bit record marks
    Framing("custom", "records", 1, 3, "little", 0, 0x0FFFFF, 0x800000),  # a masked mark after a byte
]
ALL = [*PRESETS.values(), *CUSTOM]
IDS = [f"{f.name}-{f.kind}-{f.length_offset}-{f.length_size}-{f.length_order}-{f.length_adjust}-{f.length_mask:#x}"
       if f.kind != "varint" else "varint" for f in ALL]


# -- presets: exact bytes ------------------------------------------------


def test_u32be_is_thrift_framed():
    assert frame(PRESETS["u32be"], b"ping") == b"\x00\x00\x00\x04ping"
    assert PRESETS["u32be"].length_at(b"\x00\x00\x00\x04ping", 0, 8) == 8


def test_u16be_is_dns_over_tcp():
    assert frame(PRESETS["u16be"], b"abc") == b"\x00\x03abc"
    assert PRESETS["u16be"].length_at(b"\x00\x03abc", 0, 5) == 5


def test_memcached_binary_reads_total_body_at_offset_8():
    header = bytes([0x80, 0x01, 0, 3, 0, 0, 0, 0]) + struct.pack(">I", 5) + bytes(12)
    message = header + b"k" * 5
    assert len(header) == 24
    assert PRESETS["memcached-binary"].length_at(message, 0, len(message)) == 29
    assert PRESETS["memcached-binary"].min_header == 12


@pytest.mark.parametrize(
    ("value", "prefix"),
    [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"), (300, b"\xac\x02"), (2**21, b"\x80\x80\x80\x01")],
)
def test_varint_prefix_plus_its_own_length(value, prefix):
    assert varint(value) == prefix
    buf = prefix + b"x" * 3
    assert PRESETS["varint"].length_at(buf, 0, len(buf)) == value + len(prefix)


def test_varint_ten_bytes_is_the_limit():
    ten = b"\x80" * 9 + b"\x00"  # non-minimal zero: legal, 10 bytes
    assert PRESETS["varint"].length_at(ten, 0, 10) == 10
    with pytest.raises(RemoteBadHeader):
        PRESETS["varint"].length_at(b"\x80" * 10 + b"\x01", 0, 11)
    # Ten continuation bytes are already hopeless; no need to wait for the 11th.
    with pytest.raises(RemoteBadHeader):
        PRESETS["varint"].length_at(b"\x80" * VARINT_MAX_BYTES, 0, VARINT_MAX_BYTES)
    assert PRESETS["varint"].length_at(b"\x80" * 9, 0, 9) == NEED_MORE


@pytest.mark.parametrize("framing", ALL, ids=IDS)
def test_every_framing_finds_its_own_length(framing):
    field_max = framing.length_mask - 64 if framing.kind != "varint" else 1 << 30
    for size in (0, 1, 200, 70000):
        if size > field_max:
            continue
        message = frame(framing, b"p" * size)
        assert framing.length_at(message, 0, len(message)) == len(message)
        # ... also at an offset inside a bigger buffer
        buf = b"junk" + message + b"tail"
        assert framing.length_at(buf, 4, len(buf)) == len(message)


@pytest.mark.parametrize("framing", ALL, ids=IDS)
def test_partial_header_needs_more(framing):
    message = frame(framing, b"hello")
    header = 1 if framing.kind == "varint" else framing.min_header
    for cut in range(header):
        assert framing.length_at(message, 0, cut) == NEED_MORE


def test_little_endian_differs_from_big_endian():
    buf = b"\x01\x02" + b"x" * 600
    big = Framing.from_spec({"length_size": 2, "length_order": "big"})
    little = Framing.from_spec({"length_size": 2, "length_order": "little"})
    assert big.length_at(buf, 0, len(buf)) == 0x0102
    assert little.length_at(buf, 0, len(buf)) == 0x0201


def test_negative_and_positive_adjust():
    buf = b"\x00\x0a" + bytes(20)
    assert Framing.from_spec({"length_size": 2, "length_adjust": 2}).length_at(buf, 0, 22) == 12
    assert Framing.from_spec({"length_size": 2, "length_adjust": -2}).length_at(buf, 0, 22) == 8


def test_total_shorter_than_header_is_a_bad_header():
    framing = Framing.from_spec({"length_offset": 2, "length_size": 2})  # header ends at 4
    with pytest.raises(RemoteBadHeader):
        framing.length_at(b"\x00\x00\x00\x03", 0, 4)
    assert framing.length_at(b"\x00\x00\x00\x04", 0, 4) == 4  # header-only message is fine
    with pytest.raises(RemoteBadHeader):  # negative adjust can push the total below zero
        Framing.from_spec({"length_size": 1, "length_adjust": -5}).length_at(b"\x02", 0, 1)


# -- FrameDecoder ----------------------------------------------------------


def test_split_coalesced_input():
    framing = PRESETS["u32be"]
    messages = [frame(framing, bytes([i]) * i) for i in range(10)]
    buf = b"".join(messages)
    decoder = FrameDecoder(framing, 1000)
    ends, consumed, pending = decoder.split(buf, 0, len(buf))
    assert consumed == len(buf)
    assert pending == NEED_MORE
    starts = [0, *ends[:-1]]
    assert [buf[s:e] for s, e in zip(starts, ends)] == messages


def test_split_reports_the_pending_partial_message():
    framing = PRESETS["u16be"]
    whole = frame(framing, b"one")
    partial = frame(framing, b"twotwo")[:4]
    buf = bytearray(b"XX" + whole + partial)
    ends, consumed, pending = FrameDecoder(framing, 100).split(buf, 2, len(buf))
    assert ends == [2 + len(whole)]
    assert consumed == 2 + len(whole)
    assert pending == 8  # 2-byte header + 6 bytes: the caller knows how much to wait for


def test_split_stops_inside_a_header():
    framing = PRESETS["memcached-binary"]
    whole = frame(framing, b"body")
    buf = whole + whole[:10]
    ends, consumed, pending = FrameDecoder(framing, 100).split(buf, 0, len(buf))
    assert ends == [len(whole)]
    assert consumed == len(whole)
    assert pending == NEED_MORE


def test_split_limit():
    framing = PRESETS["varint"]
    buf = b"".join(frame(framing, b"m" * i) for i in range(5))
    decoder = FrameDecoder(framing, 100)
    ends, consumed, pending = decoder.split(buf, 0, len(buf), limit=2)
    assert ends == [1, 3]
    assert consumed == 3
    assert pending == NEED_MORE
    ends, consumed, _ = decoder.split(buf, consumed, len(buf), limit=2)
    assert ends == [6, 10]
    ends, consumed, _ = decoder.split(buf, consumed, len(buf), limit=2)
    assert ends == [15]
    assert consumed == len(buf)
    assert decoder.statistics().msgs == 5


def test_split_on_empty_range():
    assert FrameDecoder(PRESETS["u32be"], 10).split(b"abc", 3, 3) == ([], 3, NEED_MORE)


def test_split_refuses_a_frame_over_max_message():
    framing = PRESETS["u32be"]
    decoder = FrameDecoder(framing, 100)
    too_big = frame(framing, b"x" * 97)  # 101 bytes
    # Refused on the header alone, before the body arrives.
    with pytest.raises(RemoteFrameTooBig):
        decoder.split(too_big[:4], 0, 4)
    exact = frame(framing, b"x" * 96)
    assert decoder.split(exact, 0, len(exact))[0] == [100]


def test_split_refuses_bad_headers():
    with pytest.raises(RemoteBadHeader):
        FrameDecoder(Framing.from_spec({"length_size": 4}), 100).split(b"\x00\x00\x00\x02zz", 0, 6)
    with pytest.raises(RemoteBadHeader):
        FrameDecoder(PRESETS["varint"], 100).split(b"\xff" * 10 + b"\x01", 0, 11)


def test_decoder_statistics_are_exact():
    framing = PRESETS["u32be"]
    decoder = FrameDecoder(framing, 64)
    assert decoder.statistics() == DecoderStatistics(msgs=0, need_more_hdr=0, msg_too_big=0, bad_hdr_len=0)
    two = frame(framing, b"a") + frame(framing, b"bb")
    decoder.split(two, 0, len(two))  # 2 msgs, ends on a boundary: no need_more_hdr
    decoder.split(two, 0, 3)  # stops inside a header
    decoder.split(two + b"\x00", 0, len(two) + 1)  # 2 msgs, then inside a header
    decoder.split(frame(framing, b"cccc")[:6], 0, 6)  # partial body: header known, not need_more_hdr
    with pytest.raises(RemoteFrameTooBig):
        decoder.split(frame(framing, b"x" * 100), 0, 104)
    assert decoder.statistics() == DecoderStatistics(msgs=4, need_more_hdr=2, msg_too_big=1, bad_hdr_len=0)

    bad = FrameDecoder(Framing.from_spec({"length_size": 2}), 64)
    for _ in range(3):
        with pytest.raises(RemoteBadHeader):
            bad.split(b"\x00\x01", 0, 2)
    assert bad.statistics() == DecoderStatistics(msgs=0, need_more_hdr=0, msg_too_big=0, bad_hdr_len=3)


@pytest.mark.parametrize("framing", ALL, ids=IDS)
def test_reassembler_byte_by_byte(framing):
    messages = [frame(framing, bytes([i % 256]) * i) for i in (0, 1, 7, 100, 255)]
    stream = b"".join(messages)
    reassembler = Reassembler(framing, 1 << 20)
    out = []
    for i in range(len(stream)):
        out += reassembler.feed(stream[i : i + 1])
    assert out == messages
    assert reassembler.buffered == 0


def test_decoder_works_on_memoryview_and_bytearray():
    framing = PRESETS["u32be"]
    buf = bytearray(frame(framing, b"abc") * 3)
    for b in (buf, memoryview(buf), bytes(buf)):
        assert FrameDecoder(framing, 100).split(b, 0, len(buf))[0] == [7, 14, 21]


# Property: any sizes, any chunking, every framing: the same messages come back.

_SIZES = st.lists(st.integers(min_value=0, max_value=300), max_size=20)


@settings(max_examples=60, deadline=None)
@given(
    framing=st.sampled_from(ALL),
    sizes=_SIZES,
    cuts=st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=50),
)
def test_property_any_chunking_round_trips(framing, sizes, cuts):
    if framing.length_size == 1:
        sizes = [min(s, 250) for s in sizes]
    messages = [frame(framing, bytes([(n + i) % 256 for i in range(n)])) for n in sizes]
    stream = b"".join(messages)
    reassembler = Reassembler(framing, 4096)
    out: list[bytes] = []
    pos = i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        out += reassembler.feed(stream[pos : pos + step])
        pos += step
        i += 1
    assert out == messages
    assert reassembler.buffered == 0
    assert reassembler.decoder.statistics().msgs == len(messages)


# -- check_message (outgoing) ---------------------------------------------


@pytest.mark.parametrize("framing", ALL, ids=IDS)
def test_check_message_accepts_exact_frames(framing):
    for size in (0, 1, 50):
        message = frame(framing, b"z" * size)
        framing.check_message(message, 1000)
        framing.check_message(memoryview(message), 1000)
        framing.check_message(b"pre" + message + b"post", 1000, start=3, length=len(message))


@pytest.mark.parametrize("framing", ALL, ids=IDS)
def test_check_message_refuses_long_and_short(framing):
    message = frame(framing, b"z" * 10)
    with pytest.raises(BadFrame, match=f"= {len(message)} bytes.*, but the message has {len(message) + 1} bytes"):
        framing.check_message(message + b"!", 1000)
    with pytest.raises(BadFrame, match=f"= {len(message)} bytes.*, but the message has {len(message) - 1} bytes"):
        framing.check_message(message[:-1], 1000)


@pytest.mark.parametrize("framing", ALL, ids=IDS)
def test_check_message_refuses_a_message_shorter_than_its_header(framing):
    header = 1 if framing.kind == "varint" else framing.min_header
    with pytest.raises(BadFrame, match="too short") as info:
        framing.check_message(b"\x00" * (header - 1), 1000)
    assert info.value.code == "bad_frame"


def test_check_message_refuses_too_big_before_reading_the_header():
    framing = PRESETS["u16be"]
    with pytest.raises(MessageTooBig) as info:
        framing.check_message(frame(framing, b"x" * 99), 100)  # 101 bytes
    assert info.value.code == "message_too_big"
    framing.check_message(frame(framing, b"x" * 98), 100)


def test_check_message_turns_a_bad_header_into_bad_frame():
    with pytest.raises(BadFrame, match="bad length header"):
        PRESETS["varint"].check_message(b"\x80" * 11, 100)
    with pytest.raises(BadFrame, match="bad length header"):
        Framing.from_spec({"length_size": 4}).check_message(b"\x00\x00\x00\x01", 100)


# -- construction, config and wire forms -----------------------------------


def test_from_spec_presets_and_tables():
    for name, preset in PRESETS.items():
        assert Framing.from_spec(name) is preset
    assert Framing.from_spec({"kind": "varint"}) is PRESETS["varint"]
    custom = Framing.from_spec(
        {"kind": "fixed", "length_offset": 3, "length_size": 8, "length_order": "little", "length_adjust": -1}
    )
    assert custom == Framing("custom", "fixed", 3, 8, "little", -1)
    assert Framing.from_spec({}) == Framing("custom", "fixed", 0, 4, "big", 0)


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ("u64be", "groups.echo.framing"),
        (["u32be"], "groups.echo.framing"),
        ({"length_sise": 4}, "groups.echo.framing.length_sise"),
        ({"length_size": 9}, "groups.echo.framing.length_size"),
        ({"length_size": 0}, "groups.echo.framing.length_size"),
        ({"length_size": "4"}, "groups.echo.framing.length_size"),
        ({"length_size": True}, "groups.echo.framing.length_size"),
        ({"length_offset": -1}, "groups.echo.framing.length_offset"),
        ({"length_offset": 70000}, "groups.echo.framing.length_offset"),
        ({"length_adjust": 2**40}, "groups.echo.framing.length_adjust"),
        ({"length_adjust": 1.5}, "groups.echo.framing.length_adjust"),
        ({"length_order": "middle"}, "groups.echo.framing.length_order"),
        ({"kind": "fixd"}, "groups.echo.framing.kind"),
    ],
)
def test_from_spec_errors_name_the_key(spec, path):
    with pytest.raises(ConfigInvalid) as info:
        Framing.from_spec(spec, path="groups.echo.framing")
    assert info.value.path == path
    assert info.value.code == "config_invalid"
    assert str(info.value.message).startswith(path + ": ")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigInvalid, match="diameter, http2-frame, memcached-binary, oncrpc, u16be, u32be, varint"):
        Framing.from_spec("u64be")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "bogus"},
        {"length_size": 9},
        {"length_order": "native"},
        {"length_offset": -1},
        {"length_adjust": -(2**31) - 1},
    ],
)
def test_constructor_validates(kwargs):
    with pytest.raises(ValueError):
        Framing(**kwargs)


@pytest.mark.parametrize("framing", ALL, ids=IDS)
def test_wire_form_round_trips(framing):
    back = Framing.from_wire(framing.to_wire())
    assert back == framing
    assert back.length_at(frame(framing, b"abc"), 0, 100) == len(frame(framing, b"abc"))
    # The wire form of a table is also a valid config (after dropping the name).
    if framing.kind == "fixed":
        spec = {k: v for k, v in framing.to_wire().items() if k != "name"}
        assert Framing.from_spec(spec) == Framing("custom", *list(framing.to_wire().values())[1:])


def test_wire_form_of_varint_matches_the_docs():
    assert PRESETS["varint"].to_wire() == {"kind": "varint", "name": "varint"}
    assert PRESETS["u32be"].to_wire() == {
        "name": "u32be",
        "kind": "fixed",
        "length_offset": 0,
        "length_size": 4,
        "length_order": "big",
        "length_adjust": 4,
    }


def test_bad_frame_says_what_the_header_holds_in_its_own_terms():
    # A user who wrote 9 in a u32be header for a 9-byte message is told what 9 means.
    message = b"\x00\x00\x00\x09hello"
    with pytest.raises(BadFrame) as info:
        PRESETS["u32be"].check_message(message, 1000)
    assert info.value.message == "u32be header length 9 (+4 header bytes = 13 bytes), but the message has 9 bytes"
    custom = Framing.from_spec({"length_offset": 0, "length_size": 2, "length_order": "big", "length_adjust": -2})
    with pytest.raises(BadFrame, match=r"custom header length 9 \(-2 length_adjust = 7 bytes\)"):
        custom.check_message(b"\x00\x09abcdefg", 1000)


@pytest.mark.parametrize("framing", ALL, ids=IDS)
def test_checker_agrees_with_check_message(framing):
    check = framing.checker(100)
    good = frame(framing, b"q" * 20)
    assert check(b"__" + good, 2, len(good)) is None
    for bad in (good + b"!", good[:-1], frame(framing, b"q" * 200)):
        err = check(bad, 0, len(bad))
        with pytest.raises(type(err)) as info:
            framing.check_message(bad, 100)
        assert info.value.message == err.message
