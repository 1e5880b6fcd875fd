"""The receive-path core with no sockets (kmuxd.core.inbox): random reads, takes and compactions.

The shell reads into :meth:`Inbox.space`, reports :meth:`Inbox.received`, hands
messages over from the buffer and reports :meth:`Inbox.take`. Whatever the
chunking of the stream and the order of those calls, every message comes out
whole and in order, the cursors keep their invariants, and a partial message
never holds more than max_message bytes.
"""

from __future__ import annotations

import random
import struct

import pytest

from kmux.errors import RemoteBadHeader, RemoteFrameTooBig
from kmux.framing import PRESETS
from kmuxd.core.inbox import RX_BASE, Inbox

U32 = PRESETS["u32be"]


def frame(n: int, size: int) -> bytes:
    body = struct.pack(">I", n) + bytes((n + i) % 251 for i in range(size - 8))
    return struct.pack(">I", len(body)) + body


def check_invariants(ib: Inbox, max_message: int) -> None:
    assert RX_BASE <= ib.head <= ib.parsed <= ib.tail <= ib.size
    assert ib.ends == sorted(ib.ends) and (not ib.ends or (ib.ends[-1] == ib.parsed and ib.ends[0] > ib.head))
    assert ib.tail - ib.parsed <= max_message


def play(ib: Inbox, stream: bytes, rng: random.Random, read_size, max_message: int) -> list[bytes]:
    """Play the shell at random: read (``read_size(rng)`` bytes at most) or hand over some of
    the ready messages, checking the invariants after each step. Returns the messages."""
    read_buffer = ib.read_buffer
    sent = 0
    got: list[bytes] = []
    now = 0.0
    while sent < len(stream) or ib.ends:
        if ib.ends and (rng.random() < 0.6 or sent >= len(stream)):
            k = rng.randint(1, len(ib.ends))
            pos = ib.head
            for end in ib.ends[:k]:
                got.append(bytes(ib.buf[pos:end]))
                pos = end
            ib.take(k, pos)
        elif not ib.ends and sent < len(stream):
            space = ib.space()
            assert read_buffer >= len(space) >= read_buffer // 4 > 0  # never empty (EOF); one read bounded
            n = min(len(space), read_size(rng), len(stream) - sent)
            space[:n] = stream[sent : sent + n]
            sent += n
            now += 0.01
            ib.received(n, now)
        check_invariants(ib, max_message)
    return got


@pytest.mark.parametrize("seed", range(30))
def test_random_chunking_and_takes_keep_every_message_whole_and_in_order(seed):
    rng = random.Random(seed)
    max_message, read_buffer = 600, 256
    ib = Inbox(U32, max_message, read_buffer)
    stream = b"".join(frame(n, rng.choice([8, 9, 40, 255, 600])) for n in range(300))
    got = play(ib, stream, rng, lambda r: r.randint(1, read_buffer), max_message)
    assert b"".join(got) == stream
    assert [struct.unpack_from(">I", m, 4)[0] for m in got] == list(range(300))


def test_the_assembly_clock_runs_only_while_the_remote_owes_bytes():
    ib = Inbox(U32, 100, 64)
    whole = frame(1, 40)
    space = ib.space()
    space[:10] = whole[:10]
    ib.received(10, now=1.0)
    assert ib.partial_since == 1.0 and not ib.expired(5.9, 5.0) and ib.expired(6.0, 5.0)
    ib.pause_clock()  # our own push-back: not the remote's delay
    assert not ib.expired(100.0, 5.0)
    ib.resume_clock(50.0)
    space = ib.space()
    space[:30] = whole[10:]
    assert ib.received(30, now=51.0) == 1 and ib.partial_since is None


def test_hostile_lengths_are_the_projects_own_errors():
    ib = Inbox(U32, 100, 64)
    space = ib.space()
    space[:4] = struct.pack(">I", 1000)
    with pytest.raises(RemoteFrameTooBig):
        ib.received(4, now=0.0)
    bad = Inbox(PRESETS["u16be"].__class__.from_spec({"length_offset": 0, "length_size": 2, "length_adjust": -5}), 100, 64)
    space = bad.space()
    space[:2] = b"\x00\x01"
    with pytest.raises(RemoteBadHeader):
        bad.received(2, now=0.0)


ONCRPC = PRESETS["oncrpc"]


def record(n: int, fragments: list[int]) -> bytes:
    """An ONC RPC record numbered ``n`` (its XID), its payload cut into fragments of these sizes."""
    from ._frames import frame

    payload = struct.pack(">I", n) + bytes((n + i) % 251 for i in range(sum(fragments) + 3))
    return frame(ONCRPC, payload, fragments=fragments)


@pytest.mark.parametrize("seed", range(20))
def test_records_of_many_fragments_come_out_whole_under_random_reads_and_takes(seed):
    rng = random.Random(seed)
    max_message, read_buffer = 700, 128
    ib = Inbox(ONCRPC, max_message, read_buffer)
    records = [record(n, [rng.choice([0, 1, 5, 60, 200]) for _ in range(rng.randint(0, 3))]) for n in range(200)]
    records = [r for r in records if len(r) <= max_message]
    stream = b"".join(records)
    got = play(ib, stream, rng, lambda r: r.choice([1, 2, 3, 7, read_buffer]), max_message)
    assert got == records  # marks included, byte for byte


def test_the_assembly_clock_bounds_a_whole_record_not_each_fragment():
    ib = Inbox(ONCRPC, 1000, 256)
    whole = record(7, [10, 10, 10])
    fragment = 14  # a 4-byte mark and 10 bytes
    for i, now in enumerate((1.0, 3.0, 5.0)):  # a fragment every 2 s, each within the timeout
        space = ib.space()
        space[:fragment] = whole[i * fragment : (i + 1) * fragment]
        assert ib.received(fragment, now) == 0
    assert ib.partial_since == 1.0  # the record's first byte, not its latest fragment
    assert ib.expired(6.0, 5.0)  # the last fragment never came: 5 s after the first
    space = ib.space()
    rest = len(whole) - 3 * fragment
    space[:rest] = whole[3 * fragment :]
    assert ib.received(rest, 5.5) == 1 and ib.partial_since is None


def test_a_new_connection_starts_a_new_record():
    ib = Inbox(ONCRPC, 1000, 256)
    half = record(1, [20, 20])[:30]  # into the second fragment
    space = ib.space()
    space[: len(half)] = half
    ib.received(len(half), 0.0)
    ib.reset()  # the connection ended; a new one starts on a record boundary
    fresh = record(2, [])
    space = ib.space()
    space[: len(fresh)] = fresh
    assert ib.received(len(fresh), 1.0) == 1
    assert bytes(ib.buf[ib.head : ib.ends[0]]) == fresh
