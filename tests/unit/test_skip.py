"""The decoder's skip state (sans-IO): a message over ``max_message`` goes by, up to ``max_skip``.

Streams are cut into reads at random points (every split, one byte at a
time included); whatever the cuts, the messages, the skipped ones in their
place, the bytes held and the counters are the same. The fuzz targets
(``tests/fuzz``) check the same against the oracle on random framings.
"""

from __future__ import annotations

import random
import struct

import pytest

from kmux.errors import RemoteBadHeader, RemoteFrameTooBig
from kmux.framing import NEED_MORE, PRESETS, SKIPPED, SKIPPING, FrameDecoder, Framing, Reassembler, Skipped
from kmuxd.core.inbox import Inbox

from ._frames import frame

U32BE, OMC, ONCRPC, VARINT = PRESETS["u32be"], PRESETS["memcached-binary"], PRESETS["oncrpc"], PRESETS["varint"]


def u32(size: int, fill: int = 0x61) -> bytes:
    """A u32be message of ``size`` bytes in all."""
    return struct.pack(">I", size - 4) + bytes([fill]) * (size - 4)


def rec(body: bytes, cuts: list[int]) -> bytes:
    """An ONC RPC record: fragments of these data sizes, then the rest as the last."""
    out, pos = b"", 0
    for n in cuts:
        out += struct.pack(">I", n) + body[pos : pos + n]
        pos += n
    return out + struct.pack(">I", 0x80000000 | (len(body) - pos)) + body[pos:]


def feed_all(reassembler: Reassembler, stream: bytes, rng: random.Random, most: int = 64) -> list:
    """Feed ``stream`` in random reads; between reads only a stub (or a partial message) is held."""
    out: list = []
    pos = 0
    while pos < len(stream):
        n = rng.randint(1, most)
        out += reassembler.feed(stream[pos : pos + n])
        pos += n
        assert reassembler.buffered <= reassembler.decoder.max_message
    return out


@pytest.mark.parametrize("seed", range(40))
def test_fixed_messages_over_the_limit_come_back_skipped_in_their_place(seed):
    rng = random.Random(seed)
    sizes = [10, 300, 64, 65, 5000, 20, 65, 4]
    stream = b"".join(u32(n, i) for i, n in enumerate(sizes))
    out = feed_all(Reassembler(U32BE, 64, 10_000), stream, rng)
    assert out == [u32(n, i) if n <= 64 else Skipped(u32(n, i)[:4], n) for i, n in enumerate(sizes)]


def test_one_byte_reads_and_the_counters():
    stream = u32(10) + u32(300) + u32(20)
    r = Reassembler(U32BE, 64, 1000)
    out = feed_all(r, stream, random.Random(0), most=1)
    assert out == [u32(10), Skipped(u32(300)[:4], 300), u32(20)]
    s = r.decoder.statistics()
    assert (s.msgs, s.msg_too_big, s.skipped, s.skipped_bytes, s.bad_hdr_len) == (2, 1, 1, 300, 0)


def test_the_stub_keeps_the_id_and_waits_for_it():
    # memcached: the length at 8..12, the opaque (the id) at 12..16: keep=16.
    header = struct.pack(">BBHBBHIIQ", 0x81, 0, 0, 0, 0, 0, 200, 0xCAFE, 0)
    big = header + bytes(200)
    d = FrameDecoder(OMC, 64, 1000, keep=16)
    # The length is known at 12 bytes; the stub needs 16: wait, holding them.
    assert d.split(big, 0, 14) == ([], 0, NEED_MORE) and not d.skipping
    assert d.split(big, 0, 40) == ([], 0, SKIPPING)
    assert (d.skip_stub, d.skip_drop_to, d.skip_total) == (16, 40, 224)
    r = Reassembler(OMC, 64, 1000, keep=16)
    (skipped,) = feed_all(r, big, random.Random(1), most=7)
    assert skipped == Skipped(big[:16], 224) and struct.unpack_from(">I", skipped.stub, 12)[0] == 0xCAFE


def test_split_reports_the_drop_and_the_end():
    stream = u32(8) + u32(100) + u32(12)
    d = FrameDecoder(U32BE, 64, 1000)
    # The whole skipped message is in hand: SKIPPED at once, after the message before it.
    ends, consumed, pending = d.split(stream, 0, len(stream))
    assert (ends, consumed, pending) == ([8], 8, SKIPPED)
    assert (d.skip_stub, d.skip_drop_to, d.skip_total, d.skipping) == (4, 108, 100, False)
    assert d.split(stream, 108, len(stream)) == ([120], 120, NEED_MORE)
    # Only part of it: SKIPPING; the caller drops what came after the stub, and calls again.
    d = FrameDecoder(U32BE, 64, 1000)
    assert d.split(stream, 0, 50) == ([8], 8, SKIPPING)
    assert (d.skip_drop_to, d.skipping) == (50, True)
    buf = bytearray(stream[8:12]) + bytearray(stream[50:])  # the stub, then the rest of the stream
    assert d.split(buf, 0, len(buf)) == ([], 0, SKIPPED)
    assert d.skip_drop_to == 4 + 108 - 50 and d.split(buf, d.skip_drop_to, len(buf))[0] == [len(buf)]


@pytest.mark.parametrize("seed", range(40))
def test_a_record_over_the_limit_is_walked_to_its_last_fragment(seed):
    rng = random.Random(seed)
    small = rec(b"x" * 8, [])
    body = bytes(range(256)) * 20
    cuts = [rng.choice([0, 1, 8, 100, 300]) for _ in range(rng.randint(1, 12))]
    cuts[0] = max(cuts[0], 8)  # the first fragment holds the id
    big = rec(body, cuts)
    stream = small + big + small + rec(body[:300], [8, 0, 100]) + small
    out = feed_all(Reassembler(ONCRPC, 200, 100_000, keep=8), stream, rng, most=rng.choice([1, 5, 64, 4096]))
    assert out == [small, Skipped(big[:8], len(big)), small, Skipped(rec(body[:300], [8, 0, 100])[:8], 316), small]


def test_max_skip_is_a_hard_ceiling():
    d = FrameDecoder(U32BE, 64, 1000)
    with pytest.raises(RemoteFrameTooBig, match=r"announced a 1001-byte message, over max_skip \(1000\): more likely"):
        d.split(u32(1001), 0, 8)
    assert d.statistics().msg_too_big == 1 and not d.skipping
    # Skipping off (max_skip = max_message): the old refusal.
    with pytest.raises(RemoteFrameTooBig, match=r"announced a 65-byte message, over max_message \(64\)$"):
        FrameDecoder(U32BE, 64).split(u32(65), 0, 8)


def test_a_record_is_refused_mid_skip_at_the_mark_that_proves_it_past_max_skip():
    big = rec(bytes(5000), [8] + [1000] * 4)
    r = Reassembler(ONCRPC, 200, 3000)
    with pytest.raises(RemoteFrameTooBig, match=r"over max_skip \(3000\): its fragments so far announce 3024 bytes"):
        feed_all(r, big, random.Random(2), most=100)
    assert r.decoder.statistics().msg_too_big == 1  # counted once, when it was proven over max_message


def test_a_bad_mark_mid_skip_is_a_bad_header():
    # Lengths that count the whole fragment, mark included: under 4 cannot be.
    f = Framing.from_spec({"kind": "records", "length_size": 4, "length_adjust": 0})
    stream = struct.pack(">I", 12) + bytes(8) + struct.pack(">I", 300) + bytes(296) + struct.pack(">I", 2)
    r = Reassembler(f, 200, 3000)
    with pytest.raises(RemoteBadHeader, match="fragment length 2 is shorter than the 4-byte fragment header"):
        feed_all(r, stream, random.Random(4), most=50)
    assert r.decoder.skipping and r.decoder.statistics().bad_hdr_len == 1


def test_varint_keeps_a_one_byte_stub():
    f = VARINT
    big = frame(f, bytes(500))
    out = feed_all(Reassembler(f, 64, 1000), big + frame(f, b"ok"), random.Random(3), most=3)
    assert out == [Skipped(big[:1], len(big)), frame(f, b"ok")]


def test_reset_forgets_a_skip_under_way():
    d = FrameDecoder(U32BE, 64, 1000)
    assert d.split(u32(300), 0, 100)[2] == SKIPPING
    d.reset()
    assert not d.skipping and d.split(u32(10), 0, 10) == ([10], 10, NEED_MORE)


def test_max_skip_under_max_message_is_refused():
    with pytest.raises(ValueError, match="max_skip"):
        FrameDecoder(U32BE, 64, 63)


def test_the_stub_never_takes_the_buffer_past_max_message():
    # A record's stub plus a mark cut short fit max_message together.
    d = FrameDecoder(ONCRPC, 16, 100, keep=24)
    assert d.split(rec(bytes(40), []), 0, 44)[2] == SKIPPED and d.skip_stub == 16 - 3
    # A fixed framing's stub is at most max_message, and never past the message.
    d = FrameDecoder(U32BE, 16, 100, keep=24)
    assert d.split(u32(17), 0, 17)[2] == SKIPPED and d.skip_stub == 16


# -- the inbox: the receive core's hand-over ----------------------------------------------------


def play(inbox: Inbox, stream: bytes, rng: random.Random) -> list:
    """Play the shell: random reads; hand over the ready messages, then the skipped one."""
    out: list = []
    pos = 0
    while True:
        while inbox.ends or inbox.skip is not None:
            start = inbox.head
            for end in inbox.ends:
                out.append(bytes(inbox.buf[start:end]))
                start = end
            inbox.take(len(inbox.ends), start)
            if inbox.skip is not None:
                s, stub_end, size = inbox.skip
                out.append(Skipped(bytes(inbox.buf[s:stub_end]), size))
                inbox.skip_taken(0.0)
        if pos == len(stream):
            return out
        room = inbox.space()
        n = min(rng.randint(1, 300), len(room), len(stream) - pos)
        room[:n] = stream[pos : pos + n]
        pos += n
        inbox.received(n, 0.0)
        assert inbox.tail - inbox.head <= inbox.decoder.max_message + n


@pytest.mark.parametrize("seed", range(30))
def test_the_inbox_hands_a_skipped_message_over_in_its_place(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([8, 60, 64, 65, 200, 5000]) for _ in range(30)]
    stream = b"".join(u32(n, i) for i, n in enumerate(sizes))
    inbox = Inbox(U32BE, 64, 4096, 10_000)
    assert play(inbox, stream, rng) == [u32(n, i) if n <= 64 else Skipped(u32(n, i)[:4], n)
                                        for i, n in enumerate(sizes)]


def test_the_assembly_clock_runs_over_a_skip_and_stops_when_it_is_done():
    inbox = Inbox(U32BE, 64, 4096, 10_000)
    stream = u32(1000)
    room = inbox.space()
    room[:100] = stream[:100]
    assert inbox.received(100, 1.0) == 0 and inbox.skipping
    assert inbox.partial_bytes == 4  # only the stub is held
    assert not inbox.expired(1.5, 1.0) and inbox.expired(2.0, 1.0)
    room = inbox.space()
    room[:900] = stream[100:]
    assert inbox.received(900, 1.9) == 1 and inbox.skip == (inbox.head, inbox.head + 4, 1000)
    assert inbox.skip_taken(1.9) == 0 and not inbox.expired(10.0, 1.0)
