"""Fuzz target: the daemon's receive loop, its buffer and cursors, under any stream and any reads.

:class:`RxLoopModel` replays ``ConnSlot._reader`` (``kmuxd/io/conn.py``)
step for step with the socket replaced by a list of read sizes and steering
by "deliver every parsed message" (the real loop waits until every parsed
message is steered before it reads again, so that is what a read sees). It
uses the real buffer size (``RX_BASE + read_buffer + max_message``), the
real :class:`FrameDecoder` and the same compaction rules. If the shell's
receive path moves into a sans-IO core, point this target at the core and
delete the model.

Invariants:

* every read has room for at least one byte (``recv_into`` into an empty
  view returns 0, which the loop takes for the peer's EOF);
* the bytes held after a read never exceed ``max_message`` plus that read,
  and after the cut only a partial message shorter than ``max_message`` is
  left;
* the messages delivered and the error raised (``RemoteFrameTooBig``,
  ``RemoteBadHeader``) are the oracle's, whatever the read sizes.

``read_buffer`` goes down to 4 here, far below the config's floor of 4096,
because the loop compacts when less than ``read_buffer // 4`` is free: any
``read_buffer >= 4`` keeps that threshold at one byte or more, and small
buffers make every compaction path reachable in a few reads.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kmux.errors import RemoteBadHeader, RemoteFrameTooBig
from kmux.framing import FrameDecoder, Framing
from kmuxd.io.conn import RX_BASE

from . import oracle
from .profiles import fuzz_settings
from .strategies import stream_cases

#: The smallest read_buffer whose compaction threshold (read_buffer // 4) is at least 1.
READ_BUFFER_MIN = 4


class RxLoopModel:
    def __init__(self, framing: Framing, max_message: int, read_buffer: int) -> None:
        self.max_message = max_message
        self.read_buffer = read_buffer
        self.rbuf = bytearray(RX_BASE + read_buffer + max_message)
        self.rhead = self.rtail = self.rparsed = RX_BASE
        self.rends: list[int] = []
        self.decoder = FrameDecoder(framing, max_message)
        self.delivered: list[bytes] = []

    def _steer_all(self) -> None:
        for end in self.rends:
            self.delivered.append(bytes(self.rbuf[self.rhead : end]))
            self.rhead = end
        self.rends = []

    def _compact(self) -> None:
        shift = self.rhead - RX_BASE
        if not shift:
            return
        self.rbuf[RX_BASE : self.rtail - shift] = self.rbuf[self.rhead : self.rtail]
        self.rhead = RX_BASE
        self.rtail -= shift
        self.rparsed -= shift
        self.rends = [e - shift for e in self.rends]

    def run(self, stream: bytes, reads: list[int]) -> None:
        """Receive ``stream`` in reads of the given sizes (cycled, capped by the free room)."""
        size = len(self.rbuf)
        pos = i = 0
        while True:
            self._steer_all()
            if self.rhead == self.rtail:
                self.rhead = self.rtail = self.rparsed = RX_BASE
            elif size - self.rtail < self.read_buffer // 4:
                self._compact()
            room = size - self.rtail
            assert room >= 1, "a read with no room: recv_into would return 0, taken for EOF"
            if pos == len(stream):
                return
            n = min(reads[i % len(reads)], room, len(stream) - pos)
            i += 1
            self.rbuf[self.rtail : self.rtail + n] = stream[pos : pos + n]
            self.rtail += n
            pos += n
            assert self.rtail - self.rhead <= self.max_message + n
            ends, consumed, pending = self.decoder.split(self.rbuf, self.rparsed, self.rtail)
            if ends:
                self.rends = ends
                self.rparsed = consumed
            assert self.rtail - self.rparsed < self.max_message
            if consumed < self.rtail and pending > 0 and self.rparsed + pending > size:
                self._compact()


@fuzz_settings
@given(
    case=stream_cases(),
    read_buffer=st.integers(READ_BUFFER_MIN, 4096),
    reads=st.lists(st.one_of(st.integers(1, 8), st.integers(1, 1 << 14)), min_size=1, max_size=30),
)
def test_receive_loop_buffer_and_cursors(case, read_buffer, reads):
    framing, max_message, stream = case
    expected = oracle.decode(framing, stream, max_message)
    model = RxLoopModel(framing, max_message, read_buffer)
    error = None
    try:
        model.run(stream, reads)
    except (RemoteFrameTooBig, RemoteBadHeader) as exc:
        error = type(exc)
    assert error is expected.error
    if error is None:
        assert model.delivered == expected.messages
        assert model.rtail - model.rparsed == expected.partial
    else:
        assert model.delivered == expected.messages[: len(model.delivered)]
