"""The framings of issue 19: any field size, masked lengths, records of fragments, and the
presets for real protocols (ONC RPC, Diameter, HTTP/2), with their specifications' bytes.

No sockets; ``tests/realservers/test_oncrpc.py`` runs the same framings against rpcbind.
"""

from __future__ import annotations

import struct
import tomllib

import pytest

from kmux.errors import BadFrame, ConfigInvalid, MessageTooBig, RemoteBadHeader, RemoteFrameTooBig
from kmux.framing import NEED_MORE, PRESETS, DecoderStatistics, FrameDecoder, Framing, Reassembler, RecordDecoder

from ._frames import frame

ONCRPC = PRESETS["oncrpc"]
LAST = 0x80000000


def mark(length: int, last: bool) -> bytes:
    """An ONC RPC record mark (RFC 5531 section 11), built by hand."""
    return struct.pack(">I", length | (LAST if last else 0))


def rpc_call(xid: int, proc: int, args: bytes, prog: int = 100000, vers: int = 2) -> bytes:
    """The body of an ONC RPC call with AUTH_NONE (RFC 5531 section 9), no mark."""
    return struct.pack(">IIIIII", xid, 0, 2, prog, vers, proc) + struct.pack(">IIII", 0, 0, 0, 0) + args


# -- presets: the specifications' bytes ------------------------------------------------


def test_oncrpc_reads_a_portmapper_call_of_one_fragment():
    body = rpc_call(0x1234, 3, struct.pack(">IIII", 100003, 3, 6, 0))  # PMAPPROC_GETPORT(nfs v3, tcp)
    record = mark(len(body), True) + body
    assert len(record) == 60
    assert ONCRPC.length_at(record, 0, len(record)) == 60
    assert ONCRPC.length_at(record, 0, 3) == NEED_MORE
    assert ONCRPC.checker(1024)(record, 0, len(record)) is None
    # The XID is at offset 4 of the record, where id steering reads it.
    assert record[4:8] == b"\x00\x00\x12\x34"


def test_oncrpc_record_of_three_fragments_comes_out_whole_and_unchanged():
    # The shape rpcbind sends a large PMAPPROC_DUMP reply in (libtirpc cuts at its send size).
    parts = [b"a" * 8996, b"b" * 8996, b"c" * 2156]
    record = (mark(8996, False) + parts[0] + mark(8996, False) + parts[1] + mark(2156, True) + parts[2])
    assert ONCRPC.length_at(record, 0, len(record)) == len(record) == 20160
    # Until the last mark arrives, the total is not known.
    assert ONCRPC.length_at(record, 0, 2 * 9000 + 3) == NEED_MORE
    assert ONCRPC.length_at(record, 0, 2 * 9000 + 4) == 20160
    decoder = FrameDecoder(ONCRPC, 65536)
    assert isinstance(decoder, RecordDecoder)
    assert decoder.split(record + record[:10], 0, len(record) + 10) == ([20160], 20160, NEED_MORE)
    assert ONCRPC.checker(65536)(record, 0, len(record)) is None


def test_diameter_reads_the_24_bit_length_that_counts_the_header():
    # A Device-Watchdog-Request (RFC 6733 section 5.5.1): 20-byte header, Origin-Host, Origin-Realm.
    def avp(code: int, data: bytes) -> bytes:
        raw = struct.pack(">II", code, 0x40 << 24 | (8 + len(data))) + data
        return raw + bytes(-len(raw) % 4)

    avps = avp(264, b"client.example.net") + avp(296, b"example.net")
    header = struct.pack(">I", 1 << 24 | (20 + len(avps))) + struct.pack(">I", 0x80 << 24 | 280)
    header += struct.pack(">III", 0, 0xCAFE0001, 0x5EED0001)  # application, hop-by-hop, end-to-end
    message = header + avps
    assert len(header) == 20
    framing = PRESETS["diameter"]
    assert framing.min_header == 4
    assert framing.length_at(message, 0, 3) == NEED_MORE
    assert framing.length_at(message + b"next", 0, len(message) + 4) == len(message)
    assert framing.checker(4096)(message, 0, len(message)) is None
    assert message[12:16] == struct.pack(">I", 0xCAFE0001)  # the Hop-by-Hop Identifier id steering uses


def test_http2_frame_reads_the_24_bit_payload_length_plus_9():
    # RFC 9113 section 4.1: a server's SETTINGS (MAX_CONCURRENT_STREAMS = 100), then DATA on stream 1.
    settings = bytes.fromhex("000006 04 00 00000000 0003 00000064".replace(" ", ""))
    data = bytes.fromhex("000005 00 01 00000001".replace(" ", "")) + b"hello"
    framing = PRESETS["http2-frame"]
    assert Reassembler(framing, 16384 + 9).feed(settings + data) == [settings, data]
    # The client connection preface is not a frame: it is refused, never written.
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert isinstance(framing.checker(16393)(preface, 0, len(preface)), MessageTooBig | BadFrame)


# -- any field size from 1 to 8 ----------------------------------------------------------


@pytest.mark.parametrize("size", range(1, 9))
@pytest.mark.parametrize("order", ["big", "little"])
def test_every_field_size_reads_its_bytes(size, order):
    framing = Framing.from_spec({"length_offset": 1, "length_size": size, "length_order": order,
                                 "length_adjust": 1 + size})
    message = b"\x7e" + (300 % (1 << (8 * size))).to_bytes(size, order) + b"p" * (300 % (1 << (8 * size)))
    assert framing.length_at(message, 0, len(message)) == len(message)
    assert framing.length_at(message, 0, size) == NEED_MORE
    assert framing.checker(1024)(message, 0, len(message)) is None
    assert (framing.fixed_field is not None) == (size in (1, 2, 4, 8))  # the inline fast path, where struct has a code


# -- masked lengths ---------------------------------------------------------------------


def test_bits_outside_the_mask_are_flags_the_framing_ignores():
    framing = Framing.from_spec({"length_size": 4, "length_mask": 0x00FFFFFF, "length_adjust": 4})
    assert framing.fixed_field is None  # every check goes through the mask
    message = b"\x5a\x00\x00\x03abc"  # type 0x5a in the top byte, length 3
    assert framing.length_at(message, 0, 7) == 7
    assert Reassembler(framing, 64).feed(message * 2) == [message, message]
    assert framing.checker(64)(message, 0, 7) is None
    with pytest.raises(BadFrame) as info:
        framing.check_message(message + b"!", 64)
    assert info.value.message == ("custom header length 3 (field 0x5a000003, length_mask 0xffffff) "
                                  "(+4 header bytes = 7 bytes), but the message has 8 bytes")


def test_the_wire_form_carries_the_mask_only_when_there_is_one():
    plain = Framing.from_spec({"length_size": 3})
    assert "length_mask" not in plain.to_wire()
    masked = Framing.from_spec({"length_size": 3, "length_mask": 0x7FFFFF})
    assert masked.to_wire()["length_mask"] == 0x7FFFFF
    for framing in (plain, masked, ONCRPC, PRESETS["diameter"], PRESETS["http2-frame"]):
        assert Framing.from_wire(framing.to_wire()) == framing
    assert ONCRPC.to_wire() == {"name": "oncrpc", "kind": "records", "length_offset": 0, "length_size": 4,
                                "length_order": "big", "length_adjust": 4, "length_mask": 0x7FFFFFFF,
                                "last_fragment_mask": 0x80000000}


def test_a_toml_file_writes_masks_in_hex():
    doc = tomllib.loads("framing = { kind = 'records', length_mask = 0x7fffffff, "
                        "last_fragment_mask = 0x80000000, length_adjust = 4 }")
    framing = Framing.from_spec(doc["framing"])
    assert (framing.kind, framing.length_mask, framing.last_fragment_mask) == ("records", 0x7FFFFFFF, LAST)
    assert framing.to_wire() == {**ONCRPC.to_wire(), "name": "custom"}
    # The last-fragment bit defaults to the field's top bit, the mask to the bits below it.
    assert Framing.from_spec({"kind": "records", "length_adjust": 4}) == framing


@pytest.mark.parametrize(
    ("spec", "key", "text"),
    [
        ({"length_mask": 0}, "length_mask", "non-zero"),
        ({"length_size": 2, "length_mask": 0x1FFFF}, "length_mask", "at most 0xffff"),
        ({"length_mask": True}, "length_mask", "integer"),
        ({"length_mask": "0x7fffffff"}, "length_mask", "integer"),
        ({"kind": "records", "last_fragment_mask": 0xC0000000}, "last_fragment_mask", "one bit"),
        ({"kind": "records", "last_fragment_mask": 0}, "last_fragment_mask", "one bit"),
        ({"kind": "records", "length_size": 2, "last_fragment_mask": 0x10000}, "last_fragment_mask", "one bit"),
        ({"kind": "records", "length_mask": 0xFFFFFFFF}, "length_mask", "must not include the last-fragment bit"),
        ({"kind": "records", "first_fragment_min": -1}, "first_fragment_min", "0.."),
        ({"last_fragment_mask": LAST}, "last_fragment_mask", "only for kind = 'records'"),
        ({"first_fragment_min": 8}, "first_fragment_min", "only for kind = 'records'"),
        ({"kind": "varint", "length_mask": 1}, "length_mask", "no other keys"),
        ({"kind": "recods"}, "kind", "'records'"),
    ],
)
def test_mask_and_record_settings_name_their_key(spec, key, text):
    with pytest.raises(ConfigInvalid) as info:
        Framing.from_spec(spec, "groups.rpc.framing")
    assert info.value.path == f"groups.rpc.framing.{key}"
    assert text in info.value.message


# -- records ----------------------------------------------------------------------------


def test_zero_length_fragments_are_fragments():
    # libtirpc ends a record that filled its buffer exactly with an empty last fragment.
    record = mark(3, False) + b"abc" + mark(0, False) + mark(2, False) + b"de" + mark(0, True)
    assert ONCRPC.length_at(record, 0, len(record)) == len(record) == 21
    assert Reassembler(ONCRPC, 64).feed(record * 3) == [record] * 3
    assert ONCRPC.checker(64)(record, 0, len(record)) is None


class CountingBuffer(bytearray):
    """A buffer that counts the slices taken of it (a 3-byte field is read by slicing)."""

    slices = 0

    def __getitem__(self, item):
        if isinstance(item, slice):
            CountingBuffer.slices += 1
        return super().__getitem__(item)


def test_a_record_trickled_byte_by_byte_reads_each_fragment_header_once():
    # 2,000 empty fragments and a last one, fed one byte at a time: the decoder resumes
    # its walk where the previous byte left it, instead of walking from the record's
    # start at every byte (which would be 2,000 x 8,000 / 2 header reads).
    framing = Framing.from_spec({"kind": "records", "length_size": 3, "length_adjust": 3})
    record = frame(framing, b"end", fragments=[0] * 2000)
    decoder = FrameDecoder(framing, 1 << 20)
    buf = CountingBuffer(record)
    CountingBuffer.slices = 0
    pos = 0
    for end in range(1, len(buf) + 1):
        ends, pos, _ = decoder.split(buf, pos, end)
    assert ends == [len(record)] and pos == len(record)
    # One read per header, and the last header once more at each read its 3 bytes of data took.
    assert CountingBuffer.slices == 2001 + 3


def test_a_record_over_max_message_is_refused_at_the_header_that_proves_it():
    max_message = 100
    # A non-last fragment ending at 96 leaves room for one more bare mark: 100 bytes, allowed.
    fits = mark(92, False) + b"x" * 92 + mark(0, True)
    assert len(fits) == 100
    assert Reassembler(ONCRPC, max_message).feed(fits) == [fits]
    # Ending at 97, no record can follow within 100 bytes: refused at that mark, before its data.
    over = mark(93, False)
    decoder = FrameDecoder(ONCRPC, max_message)
    with pytest.raises(RemoteFrameTooBig, match="its fragments so far announce 97 bytes and another fragment follows"):
        decoder.split(over, 0, 4)
    # Many small fragments: refused at the first mark past the limit; less than 100 bytes held.
    many = b"".join(mark(10, False) + b"y" * 10 for _ in range(20))
    decoder = FrameDecoder(ONCRPC, max_message)
    held = 0
    with pytest.raises(RemoteFrameTooBig):
        for end in range(1, len(many) + 1):
            held = end
            decoder.split(many, 0, end)
    assert held < max_message
    # A last fragment that ends past the limit: refused at its mark.
    with pytest.raises(RemoteFrameTooBig, match="announced a 101-byte record"):
        FrameDecoder(ONCRPC, max_message).split(mark(50, False) + b"z" * 50 + mark(43, True), 0, 58)
    stats = decoder.statistics()
    # Byte by byte, each of the 7 headers read stopped inside itself 3 times first.
    assert stats == DecoderStatistics(msgs=0, need_more_hdr=7 * 3, msg_too_big=1, bad_hdr_len=0)


def test_a_fragment_shorter_than_its_header_is_a_bad_header():
    counts_itself = Framing.from_spec({"kind": "records", "length_adjust": 0})  # the length includes the mark
    with pytest.raises(RemoteBadHeader, match="fragment length 3 is shorter than the 4-byte fragment header"):
        FrameDecoder(counts_itself, 100).split(mark(8, False) + b"abcd" + mark(3, True), 0, 12)
    err = counts_itself.checker(100)(mark(8, False) + b"abcd" + mark(3, True), 0, 12)
    assert isinstance(err, BadFrame) and "bad length header" in err.message


def test_first_fragment_min_keeps_the_id_in_the_first_fragment():
    framing = Framing.from_spec({"kind": "records", "length_adjust": 4, "first_fragment_min": 8})
    split_xid = mark(2, False) + b"\x00\x01" + mark(2, True) + b"\x02\x03"
    with pytest.raises(RemoteBadHeader, match="first fragment has 6 bytes and more fragments follow"):
        FrameDecoder(framing, 100).split(split_xid, 0, len(split_xid))
    err = framing.checker(100)(split_xid, 0, len(split_xid))
    assert isinstance(err, BadFrame) and "needs its first 8 bytes" in err.message
    # A record of one short fragment is a message like any other (too short for an id: the id table says so).
    short = mark(2, True) + b"\x00\x01"
    assert framing.checker(100)(short, 0, 6) is None
    whole = mark(4, False) + b"\x00\x01\x02\x03" + mark(2, True) + b"ok"
    assert Reassembler(framing, 100).feed(whole) == [whole]


@pytest.mark.parametrize(
    ("message", "text"),
    [
        (mark(3, False) + b"abc" + mark(2, False) + b"de",
         "its 2 fragment(s) fill the message's 13 bytes, but none has the last-fragment bit (0x80000000)"),
        (mark(3, True) + b"abc" + mark(0, True),
         "fragment 1 at byte 0 is the last: length 3 (+4 header bytes = 7 bytes), record = 7 bytes, "
         "but the message has 11 bytes"),
        (mark(3, False) + b"abc" + mark(9, True) + b"de",
         "fragment 2 at byte 7 is the last: length 9 (+4 header bytes = 13 bytes), record = 20 bytes, "
         "but the message has 13 bytes"),
        (mark(30, False) + b"abc", "fragment 1 at byte 0 is not the last: length 30 (+4 header bytes = 34 bytes), "
                                   "past the message's 7 bytes"),
        (mark(3, False) + b"abc" + b"\x80\x00", "the message's 9 bytes end inside the header of fragment 2"),
    ],
)
def test_an_outgoing_record_that_is_not_exactly_one_record_is_refused_in_its_own_terms(message, text):
    err = ONCRPC.checker(1000)(message, 0, len(message))
    assert isinstance(err, BadFrame)
    assert err.message == f"oncrpc record: {text}"


def test_an_outgoing_record_over_max_message_is_message_too_big():
    record = frame(ONCRPC, b"r" * 200, fragments=[50, 50])
    assert isinstance(ONCRPC.checker(len(record) - 1)(record, 0, len(record)), MessageTooBig)
    assert ONCRPC.checker(len(record))(record, 0, len(record)) is None


def test_a_decoder_resumes_only_its_own_stream():
    record = frame(ONCRPC, b"q" * 30, fragments=[10, 10])
    decoder = FrameDecoder(ONCRPC, 100)
    assert decoder.split(record, 0, 20) == ([], 0, NEED_MORE)  # walked into the second fragment
    decoder.reset()  # a new connection: its first bytes are a new record
    other = frame(ONCRPC, b"z" * 5)
    assert decoder.split(other, 0, len(other)) == ([len(other)], len(other), NEED_MORE)


def test_checkers_are_built_once_per_limit():
    assert ONCRPC.checker(100) is ONCRPC.checker(100)
    assert ONCRPC.checker(100) is not ONCRPC.checker(101)


# -- id steering meets the framing (kmuxd.system.config) ----------------------------------


def _group(framing, request_offset: int, response_offset: int, size: int = 4):
    from kmuxd.system.config import parse_config

    doc = {"version": 1, "groups": {"g": {"endpoints": ["127.0.0.1:111"], "framing": framing, "steering": "id",
                                          "id": {"request_offset": request_offset,
                                                 "response_offset": response_offset, "size": size}}}}
    return parse_config(doc).groups["g"]


@pytest.mark.parametrize(
    ("framing", "request_offset", "response_offset", "key"),
    [
        ("u32be", 2, 4, "request_offset"),  # a rewrite would change the length on a shared stream
        ("memcached-binary", 12, 10, "response_offset"),
        ("oncrpc", 0, 4, "request_offset"),  # the first fragment's mark
        ({"length_offset": 1, "length_size": 3}, 0, 4, "request_offset"),  # Diameter's version byte and length
    ],
)
def test_an_id_over_the_length_field_is_a_config_error(framing, request_offset, response_offset, key):
    with pytest.raises(ConfigInvalid) as info:
        _group(framing, request_offset, response_offset)
    assert info.value.path == f"groups.g.id.{key}"
    assert "overlaps the framing's length field" in info.value.message


def test_id_steering_on_records_keeps_the_id_in_the_first_fragment():
    assert _group("oncrpc", 4, 4).framing.first_fragment_min == 8  # the mark and the XID
    assert _group("oncrpc", 4, 12, size=8).framing.first_fragment_min == 20
    framing = _group("oncrpc", 4, 4).framing
    assert framing.name == "oncrpc" and framing.to_wire()["first_fragment_min"] == 8  # the clients check it too
    assert _group("diameter", 12, 12).framing == PRESETS["diameter"]  # fixed framings are left as they are
