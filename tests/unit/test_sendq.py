"""The send core with no sockets: connection selection, pinning, push-back, salvage."""

from __future__ import annotations

import random
import struct

import pytest

from kmux.framing import PRESETS, Reassembler
from kmuxd.core.sendq import Outbox, TxScheduler

U32 = PRESETS["u32be"]
LENGTH_AT = U32._length_at


def frame(owner: int, seq: int, size: int = 16) -> bytes:
    body = struct.pack(">II", owner, seq) + bytes(size - 12)
    return struct.pack(">I", len(body)) + body


#: Owners the scheduler woke since the test last looked (:func:`woken`).
WOKEN: list = []


def woken() -> list:
    """Owners woken since the last call, in order."""
    out = list(WOKEN)
    WOKEN.clear()
    return out


class Owner:
    """Stands in for a client: the scheduler's :class:`kmuxd.core.sendq.Owner`."""

    def __init__(self, name: int) -> None:
        self.name = name
        self.gone = False
        self.accepted_msgs = 0
        self.written_msgs = 0
        self.written_bytes = 0
        self.given_back = 0

    def wake(self) -> None:
        WOKEN.append(self)

    def count_accepted(self, msgs: int, nbytes: int) -> None:
        self.accepted_msgs += msgs

    def count_written(self, msgs: int, nbytes: int) -> None:
        self.written_msgs += msgs
        self.written_bytes += nbytes

    def count_given_back(self, msgs: int) -> None:
        self.given_back += msgs

    def __repr__(self) -> str:
        return f"Owner({self.name})"


class Conn:
    """Stands in for a connection (a :class:`kmuxd.core.sendq.Carrier`); the scheduler keeps its outbox."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tx: TxScheduler | None = None
        self.wire = bytearray()
        self.accepted = 0
        #: messages of the outbox it carried that reached the kernel
        self.written = 0
        #: the scheduler asked it to write when the pass ends
        self.flush_asked = False

    def count_accepted(self, msgs: int, nbytes: int) -> None:
        self.accepted += msgs

    def count_written(self, msgs: int) -> None:
        self.written += msgs

    def flush_soon(self) -> None:
        self.flush_asked = True

    def take_flush(self) -> bool:
        asked, self.flush_asked = self.flush_asked, False
        return asked

    @property
    def outbox(self) -> Outbox:
        return self.tx.outbox_of(self)

    def __repr__(self) -> str:
        return f"Conn({self.name})"


def make(n_conns: int = 2, capacity: int = 256, reserve: int = 65) -> tuple[TxScheduler, list[Conn]]:
    woken()  # what earlier tests left
    tx = TxScheduler()
    conns = [Conn(f"c{i}") for i in range(n_conns)]
    for c in conns:
        c.tx = tx
        tx.add(c, Outbox(capacity, reserve, LENGTH_AT))
        tx.connected(c)
        assert woken() == []
    return tx, conns


def put(tx: TxScheduler, owner: Owner, conn: Conn, *frames: bytes) -> list:
    """What the shell does after receiving packets into the outbox; returns whom it woke."""
    woken()
    ob = conn.outbox
    tail = ob.tail
    for f in frames:
        assert ob.has_room()
        ob.buf[tail : tail + len(f)] = f
        tail += len(f)
    assert tx.commit(owner, ob, tail, len(frames)) == len(frames)
    if frames:
        assert conn.take_flush()  # it writes them when the pass ends
    return woken()


def give_back(tx: TxScheduler, owner: Owner, conn: Conn) -> list:
    """The owner was routed to ``conn`` but took nothing; returns whom that woke."""
    woken()
    tx.commit(owner, conn.outbox, conn.outbox.tail, 0)
    return woken()


def write(tx: TxScheduler, conn: Conn, limit: int | None = None) -> list:
    """The kernel takes up to ``limit`` bytes of the outbox; returns whom that woke."""
    woken()
    ob = conn.outbox
    n = ob.pending if limit is None else min(limit, ob.pending)
    conn.wire += ob.view[ob.head : ob.head + n]
    tx.written(conn, n)
    return woken()


def test_unpinned_clients_take_available_connections_in_turn():
    tx, (c0, c1) = make()
    a, b, c, d = Owner(1), Owner(2), Owner(3), Owner(4)
    assert tx.route(a) is c0
    put(tx, a, c0, frame(1, 1))
    assert tx.route(b) is c1  # round robin
    put(tx, b, c1, frame(2, 1))
    # c0 has room and has not been refused by the kernel: c's message joins
    # a's in the same batch (one send carries both).
    assert tx.route(c) is c0
    put(tx, c, c0, frame(3, 1))
    tx.blocked(c0)
    tx.blocked(c1)
    assert tx.route(d) is None  # all blocked: d waits
    assert tx.statistics().waiting_clients == 1
    write(tx, c0)
    assert c0.wire == frame(1, 1) + frame(3, 1)


def test_a_full_connection_is_skipped_until_it_writes():
    tx, (c0, c1) = make(2, capacity=32, reserve=16)
    a, b = Owner(1), Owner(2)
    assert tx.route(a) is c0
    put(tx, a, c0, frame(1, 1), frame(1, 2))  # 32 bytes: at capacity
    assert tx.route(b) is c1 and tx.route(Owner(3)) is c1
    give_back(tx, b, c1)
    write(tx, c0)
    assert tx.route(b) in (c0, c1)


def test_a_client_backlog_stays_on_its_connection_until_written():
    tx, (c0, c1) = make()
    a = Owner(1)
    assert tx.route(a) is c0
    put(tx, a, c0, frame(1, 1))
    # c1 is available, but a's backlog pins it to c0: order is kept.
    assert tx.route(a) is c0
    put(tx, a, c0, frame(1, 2))
    write(tx, c0)
    assert a.written_msgs == 2
    assert a not in tx.pins
    # Drained: a is free to take any available connection again (FIFO: c1 first).
    assert tx.route(a) is c1


def test_connection_that_comes_free_is_handed_to_the_longest_waiter():
    tx, (c0,) = make(1)
    a, b, c = Owner(1), Owner(2), Owner(3)
    assert tx.route(a) is c0
    put(tx, a, c0, frame(1, 1))
    tx.blocked(c0)  # the kernel refused the write
    assert tx.route(b) is None
    assert tx.route(c) is None
    assert write(tx, c0) == [b]
    # Reserved for b: a (now unpinned, keen to send more) must wait its turn.
    assert tx.route(a) is None
    assert tx.route(b) is c0
    # b took its turn; the connection goes on to the next waiter, in order.
    assert put(tx, b, c0, frame(2, 1)) == [c]
    assert tx.route(a) is None and tx.route(c) is c0
    assert put(tx, c, c0, frame(3, 1)) == [a]


def test_woken_waiter_with_nothing_to_send_passes_the_connection_on():
    tx, (c0,) = make(1)
    a, b, c = Owner(1), Owner(2), Owner(3)
    tx.route(a)
    put(tx, a, c0, frame(1, 1))
    tx.blocked(c0)
    tx.route(b)
    tx.route(c)
    assert write(tx, c0) == [b]
    assert tx.route(b) is c0
    assert give_back(tx, b, c0) == [c]


def test_waiter_that_leaves_passes_its_reservation_on():
    tx, (c0,) = make(1)
    a, b, c = Owner(1), Owner(2), Owner(3)
    tx.route(a)
    put(tx, a, c0, frame(1, 1))
    tx.blocked(c0)
    tx.route(b)
    tx.route(c)
    assert write(tx, c0) == [b]
    tx.forget(b)
    assert woken() == [c]
    assert tx.route(c) is c0


def test_full_outbox_parks_its_pinned_client_until_room():
    tx, (c0, c1) = make(2, capacity=64, reserve=32)
    a = Owner(1)
    assert tx.route(a) is c0
    put(tx, a, c0, *[frame(1, i, 16) for i in range(4)])  # 64 bytes: at capacity
    assert tx.route(a) is None  # parked, not moved to c1: order first
    assert tx.statistics().waiting_clients == 0
    assert write(tx, c0, 20) == [a]  # room again: woken
    assert tx.route(a) is c0


def test_partial_write_then_compaction_keeps_bytes_and_order():
    tx, (c0,) = make(1, capacity=64, reserve=40)
    a = Owner(1)
    frames = [frame(1, i, 16) for i in range(20)]
    sent = 0
    rng = random.Random(7)
    steps = 0
    while sent < len(frames) or c0.outbox.pending:
        steps += 1
        assert steps < 1000
        if sent < len(frames) and tx.route(a) is c0:
            put(tx, a, c0, frames[sent])
            sent += 1
        write(tx, c0, rng.randint(1, 30))
    assert bytes(c0.wire) == b"".join(frames)
    assert a.written_msgs == 20 and a.written_bytes == 20 * 16


def test_salvage_resends_the_cut_message_from_byte_zero_on_another_connection():
    tx, (c0, c1) = make(2)
    a, b = Owner(1), Owner(2)
    assert tx.route(a) is c0
    put(tx, a, c0, frame(1, 1), frame(1, 2), frame(1, 3))
    # b's message queues on c0 too (pinned there after a's).
    put(tx, b, c0, frame(2, 1))
    assert tx.route(b) is c0
    # Make c1 busy so the orphan must wait for it.
    c = Owner(3)
    assert tx.route(c) is c1
    put(tx, c, c1, frame(3, 1))
    write(tx, c0, 16 + 5)  # frame 1 whole, frame 2 cut after 5 bytes
    salvage = tx.failed(c0)
    assert (salvage.written_msgs, salvage.resend_msgs, salvage.cut_msgs) == (1, 3, 1)
    assert a.written_msgs == 1
    # a and b stay pinned to the orphan and park until it is adopted.
    assert tx.route(a) is None and tx.route(b) is None
    assert tx.statistics().orphaned_msgs == 3
    c1.take_flush()
    wake = write(tx, c1)  # c1 comes free and adopts the orphan
    assert set(wake) == {a, b}
    assert c1.take_flush() and not c0.take_flush()
    assert tx.route(a) is c1  # a's order continues on c1, after its resent messages
    put(tx, a, c1, frame(1, 4))
    write(tx, c1)
    msgs = Reassembler(U32, 1 << 20).feed(bytes(c1.wire))
    ids = [struct.unpack(">II", m[4:12]) for m in msgs]
    assert ids == [(3, 1), (1, 2), (1, 3), (2, 1), (1, 4)]
    assert a.written_msgs == 4 and b.written_msgs == 1


def test_orphan_waits_for_a_reconnect_when_every_connection_is_down():
    tx, (c0,) = make(1)
    a = Owner(1)
    tx.route(a)
    put(tx, a, c0, frame(1, 1))
    salvage = tx.failed(c0)
    assert salvage.resend_msgs == 1 and salvage.cut_msgs == 0
    assert c0.outbox.pending == 0  # the slot got a fresh, empty outbox
    assert tx.route(a) is None
    woken()
    tx.connected(c0)
    assert woken() == [a]  # the reconnected slot adopts it
    assert c0.take_flush()
    write(tx, c0)
    assert a.written_msgs == 1


def test_failed_connection_with_nothing_queued_wakes_parked_clients():
    tx, (c0, c1) = make(2)
    a = Owner(1)
    assert tx.route(a) is c0
    woken()
    salvage = tx.failed(c0)
    assert salvage.resend_msgs == 0 and woken() == []
    assert tx.route(a) is c1


@pytest.mark.parametrize("seed", range(25))
def test_random_schedules_keep_every_message_whole_once_and_in_client_order(seed):
    """Property: any interleaving of routes, partial writes and failures loses,
    tears and reorders nothing (bytes that reached a dead stream count as sent)."""
    rng = random.Random(seed)
    tx, conns = make(3, capacity=128, reserve=48)
    owners = [Owner(i) for i in range(6)]
    next_seq = {o: 0 for o in owners}
    delivered: list[tuple[int, int]] = []
    dead_wires: list[bytes] = []
    up = set(conns)

    def collect(conn: Conn, whole: bool) -> None:
        msgs = Reassembler(U32, 1 << 20)
        data = bytes(conn.wire)
        out = msgs.feed(data)
        if whole:
            assert msgs.buffered == 0, "a live stream must hold only whole messages"
        delivered.extend(struct.unpack(">II", m[4:12]) for m in out)
        conn.wire = bytearray()

    for _ in range(600):
        op = rng.random()
        if op < 0.5:
            o = rng.choice(owners)
            if next_seq[o] >= 40:
                continue
            conn = tx.route(o)
            if conn is not None:
                k = rng.randint(0, 3)
                ob = conn.outbox
                tail = ob.tail
                taken = 0
                for _ in range(k):
                    # The shell checks for room before each receive.
                    if ob.tail - ob.head >= ob.capacity or len(ob.buf) - tail < ob.reserve:
                        break
                    next_seq[o] += 1
                    f = frame(o.name, next_seq[o], rng.choice([12, 16, 40]))
                    ob.buf[tail : tail + len(f)] = f
                    tail += len(f)
                    taken += 1
                tx.commit(o, ob, tail, taken)
        elif op < 0.9:
            live = [c for c in conns if c in up and c.outbox.pending]
            if live:
                c = rng.choice(live)
                n = rng.randint(1, 60)
                if n < c.outbox.pending and rng.random() < 0.5:
                    tx.blocked(c)  # the kernel took only part: others go elsewhere
                write(tx, c, n)  # adopted orphans are simply written later
        elif op < 0.95:
            live = [c for c in conns if c in up]
            if len(live) > 1:
                c = rng.choice(live)
                collect(c, whole=False)  # torn tail allowed only here
                tx.failed(c)
                up.discard(c)
        else:
            down = [c for c in conns if c not in up]
            if down:
                c = down[0]
                up.add(c)
                tx.connected(c)
    # Bring everything up and drain.
    for c in conns:
        if c not in up:
            up.add(c)
            tx.connected(c)
    for _ in range(500):
        busy = [c for c in conns if c.outbox.pending]
        if not busy:
            break
        write(tx, busy[0])
    assert not any(c.outbox.pending for c in conns)
    assert tx.statistics().orphaned_msgs == 0
    for c in conns:
        collect(c, whole=True)
    # Every message arrived; duplicates only from the message cut on a dead
    # stream (its torn copy is not parsed as whole, so none at all here).
    for o in owners:
        seqs = [s for (n, s) in delivered if n == o.name]
        assert sorted(seqs) == list(range(1, next_seq[o] + 1)), (o, seqs)
        assert o.written_msgs == next_seq[o]


def test_runs_know_their_seqs_so_unwritten_messages_can_be_named():
    tx, (c0,) = make(n_conns=1)
    a = Owner(1)
    assert tx.route(a) is c0
    ob = c0.outbox
    f = [frame(1, s) for s in (1, 2, 3)]
    ob.buf[ob.tail : ob.tail + 32] = f[0] + f[1]
    tx.commit(a, ob, ob.tail + 32, 2, first_seq=1)
    assert tx.route(a) is c0
    # seq 3 was refused by the shell; seq 4 starts a new run
    ob.buf[ob.tail : ob.tail + 16] = f[2]
    tx.commit(a, ob, ob.tail + 16, 1, first_seq=4)
    write(tx, c0, 20)  # message 1 written, message 2 cut part-way
    tx.failed(c0, now=5.0)
    (orphan,) = tx.orphans()
    assert orphan.unwritten() == [(a, 2, 1), (a, 4, 1)]
    assert tx.expire_orphans(5.5, 1.0) == []
    expired = tx.expire_orphans(6.0, 1.0)
    assert expired == [orphan] and a not in tx.pins and not tx.has_orphans()
    assert a.given_back == 2  # seqs 2 and 4: accepted, never written


def test_an_open_message_keeps_others_out_and_moves_with_its_outbox():
    tx, (c0, c1) = make(n_conns=2)
    a, b = Owner(1), Owner(2)
    assert tx.route(a) is c0
    ob = tx.open(a, c0)
    whole = frame(1, 1, 40)
    ob.buf[ob.tail : ob.tail + 25] = whole[:25]  # first piece
    ob.grow_open(25)
    # c0 is not available to b while the message is open
    assert tx.route(b) is c1
    give_back(tx, b, c1)
    write(tx, c0, 0)
    tx.failed(c0, now=1.0)  # the connection dies mid-message
    assert tx.outbox_of(c1) is ob and ob.open_owner is a  # adopted whole by the free connection
    assert tx.route(b) is None  # b waits: nobody may land inside the open message
    ob.buf[ob.open_end : ob.open_end + 15] = whole[25:]  # last piece
    ob.grow_open(15)
    start, end = ob.open_end - 40, ob.open_end
    assert bytes(ob.buf[start:end]) == whole
    woken()
    assert tx.commit(a, ob, end, 1, first_seq=1) == 1
    # Whole: the connection is everyone's again, first for b, who waited meanwhile.
    assert woken() == [b] and a.accepted_msgs == 1
    write(tx, c1)
    assert c1.wire == whole


def test_an_open_message_keeps_its_connection_from_every_other_client():
    """Regression: an available connection whose outbox got an open message
    stayed available, so a third client was routed into the open message's bytes."""
    tx, (c0, c1) = make(n_conns=2)
    a, b, c = Owner(1), Owner(2), Owner(3)
    assert tx.route(a) is c0
    ob = tx.open(a, c0)
    ob.buf[ob.tail : ob.tail + 10] = frame(1, 1, 40)[:10]
    ob.grow_open(10)
    assert tx.route(b) is c1
    give_back(tx, b, c1)
    assert tx.route(c) is c1  # never c0 while a's message is open there
    give_back(tx, c, c1)
    tx.blocked(c1)
    d = Owner(4)
    assert tx.route(d) is None  # nothing else is available: it waits
    tx.drop_open(a, ob)  # a's message was refused: c0 is everyone's again, first d's
    assert woken() == [d] and tx.route(d) is c0


def test_a_compaction_behind_a_part_written_message_counts_what_it_passes():
    """Regression (was guarded only by a probabilistic integration test): messages
    that a compaction finds written must be counted as written, exactly once."""
    ob = Outbox(capacity=64, reserve=41, length_at=LENGTH_AT)
    tx = TxScheduler()
    c0 = Conn("c0")
    c0.tx = tx
    tx.add(c0, ob)
    tx.connected(c0)
    a = Owner(1)
    assert tx.route(a) is c0
    put(tx, a, c0, frame(1, 0, 16), frame(1, 1, 16), frame(1, 2, 16), frame(1, 3, 40))  # one run, 88 bytes
    tx.written(c0, 16 + 16 + 5)  # two whole messages and 5 bytes of the third
    # The run is not written whole; what counts the two messages is the
    # compaction that the scheduler's room check does behind them.
    assert c0.written == 2 and a.written_msgs == 2
    # The compaction kept the part-written third message whole at the front.
    assert ob.head == 1 + 5 and bytes(ob.buf[1 : 1 + 16]) == frame(1, 2, 16)
    write(tx, c0)
    assert c0.written == 4 and a.written_msgs == 4  # each message counted once
    assert c0.wire[-40:] == frame(1, 3, 40)
