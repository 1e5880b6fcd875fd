"""Fuzz target: the daemon's receive core (:class:`kmuxd.core.inbox.Inbox`), under any
stream and any read sizes.

The test plays the shell (``kmuxd/io/conn.py``): it reads into ``space()``
with reads of random sizes (capped by the room, as ``recv_into`` is), reports
them with ``received()``, and hands over every ready message before reading
again, as the shell does.

Invariants:

* every read has room for at least one byte (``recv_into`` into an empty
  view returns 0, which the shell takes for the peer's EOF);
* the bytes held after a read never exceed ``max_message`` plus that read,
  and after the cut only a partial message shorter than ``max_message`` is
  left;
* the messages handed over and the error raised (``RemoteFrameTooBig``,
  ``RemoteBadHeader``) are the oracle's, whatever the read sizes;
* with ``max_skip``, each message over ``max_message`` is handed over as
  the oracle's :class:`~kmux.framing.Skipped`, in its place (``Inbox.skip``
  after the messages before it), and the bytes held stay within the same
  bounds: a message going by is only its stub.

``read_buffer`` goes down to 4 here, far below the config's floor of 4096,
because the inbox compacts when less than ``read_buffer // 4`` is free: any
``read_buffer >= 4`` keeps that threshold at one byte or more, and small
buffers make every compaction path reachable in a few reads.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kmux.errors import RemoteBadHeader, RemoteFrameTooBig
from kmux.framing import Skipped
from kmuxd.core.inbox import Inbox

from . import oracle
from .profiles import fuzz_settings
from .strategies import skip_cases, stream_cases

#: The smallest read_buffer whose compaction threshold (read_buffer // 4) is at least 1.
READ_BUFFER_MIN = 4


def receive(inbox, stream: bytes, reads: list[int], max_message: int, delivered: list[bytes]) -> None:
    """Play the shell: read ``stream`` into ``inbox`` in reads of the given sizes (cycled),
    appending each message handed over to ``delivered``."""
    pos = i = 0
    while True:
        while inbox.ends or inbox.skip is not None:
            if inbox.ends:
                start = inbox.head
                for end in inbox.ends:
                    delivered.append(bytes(inbox.buf[start:end]))
                    start = end
                inbox.take(len(inbox.ends), start)
            if inbox.skip is not None:  # after the messages before it, as the shell hands it over
                start, stub_end, size = inbox.skip
                delivered.append(Skipped(bytes(inbox.buf[start:stub_end]), size))
                inbox.skip_taken(0.0)
        room = inbox.space()
        assert len(room) >= 1, "a read with no room: recv_into would return 0, taken for EOF"
        if pos == len(stream):
            return
        n = min(reads[i % len(reads)], len(room), len(stream) - pos)
        i += 1
        room[:n] = stream[pos : pos + n]
        pos += n
        inbox.received(n, 0.0)
        assert inbox.tail - inbox.head <= max_message + n
        if inbox.skip is None:  # (one skipped whole waits with what the read brought after it)
            # A message going by holds at most max_message (its stub, a mark cut short).
            held = inbox.tail - inbox.parsed
            assert held < max_message or (inbox.skipping and held <= max_message)


@fuzz_settings
@given(
    case=stream_cases(),
    read_buffer=st.integers(READ_BUFFER_MIN, 4096),
    reads=st.lists(st.one_of(st.integers(1, 8), st.integers(1, 1 << 14)), min_size=1, max_size=30),
)
def test_receive_loop_buffer_and_cursors(case, read_buffer, reads):
    framing, max_message, stream = case
    expected = oracle.decode(framing, stream, max_message)
    inbox = Inbox(framing, max_message, read_buffer)
    delivered: list[bytes] = []
    error = None
    try:
        receive(inbox, stream, reads, max_message, delivered)
    except (RemoteFrameTooBig, RemoteBadHeader) as exc:
        error = type(exc)
    assert error is expected.error
    if error is None:
        assert delivered == expected.messages
        assert inbox.tail - inbox.parsed == expected.partial
    else:
        assert delivered == expected.messages[: len(delivered)]


@fuzz_settings
@given(
    case=skip_cases(),
    read_buffer=st.integers(READ_BUFFER_MIN, 4096),
    reads=st.lists(st.one_of(st.integers(1, 8), st.integers(1, 1 << 14)), min_size=1, max_size=30),
)
def test_receive_loop_skips_what_the_oracle_skips(case, read_buffer, reads):
    framing, max_message, max_skip, keep, stream = case
    expected = oracle.decode(framing, stream, max_message, max_skip, keep)
    inbox = Inbox(framing, max_message, read_buffer, max_skip, keep)
    delivered: list = []
    error = None
    try:
        receive(inbox, stream, reads, max_message, delivered)
    except (RemoteFrameTooBig, RemoteBadHeader) as exc:
        error = type(exc)
    assert error is expected.error
    if error is not None:
        assert delivered == expected.messages[: len(delivered)]
        return
    assert delivered == expected.messages
    held = inbox.tail - inbox.parsed
    if expected.skipping:
        assert inbox.skipping or held < expected.stub
        assert min(expected.partial, expected.stub) <= held <= expected.stub + max(framing.header_end - 1, 0)
    else:
        assert held == expected.partial
