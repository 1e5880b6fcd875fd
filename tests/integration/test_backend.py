"""The one TCP test backend itself (kmuxd.tools.backend): what the demo, the benchmark, the soak and these tests rely on.

Real loopback sockets, a plain blocking client on the other end, each wait
bounded. A backend that silently misbehaved would make every test built on
it prove less, so its promises are checked here: frames recorded whole and
in order (one larger than its buffer too), echo, pause, the three closes,
each fault of a plan, push-back from a peer that does not read, the
counting fast path, an outage and its end, calls from another thread.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import pytest

from kmuxd.tools.backend import CountingBackend, FaultyEcho, FaultySink, Loop, Plan, RecordingBackend
from kmuxd.tools.backend.conn import DRAIN_TIMEOUT, U32BE, WRITE_BACKLOG_LIMIT
from tests.realservers import recv_exact

WAIT = 5.0


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def dial(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_frame(s: socket.socket) -> bytes:
    head = recv_exact(s, 4)
    return head + recv_exact(s, struct.unpack(">I", head)[0])


def wait(pred, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
    return value


@pytest.fixture
def recording():
    started: list[RecordingBackend] = []

    def start(**kw) -> RecordingBackend:
        started.append(RecordingBackend(**kw))
        return started[-1]

    yield start
    for b in started:
        b.close()


# -- the tests' recording server ---------------------------------------------------------------


def test_frames_are_recorded_whole_in_order_per_connection_and_echoed(recording):
    backend = recording(echo=True, summarize=lambda f: f[4:])
    a, b = dial(backend.port), dial(backend.port)
    big = random.Random(1).randbytes(3 * 1024 * 1024)  # larger than a connection's receive buffer
    with a, b:
        sent = [b"one", big, b"three"]
        for payload in sent:
            a.sendall(frame(payload))
        b.sendall(frame(b"other")[:6])  # half a frame ...
        assert [read_frame(a)[4:] for _ in sent] == sent
        b.sendall(frame(b"other")[6:])  # ... then the rest
        assert read_frame(b)[4:] == b"other"
        wait(lambda: backend.count() == 4, "4 frames")
    (ca, cb) = backend.conns()[:2]
    assert [r for _, r in backend.records(ca.id)] == sent and backend.records(cb.id) == [(cb.id, b"other")]
    wait(lambda: backend.open_ids() == [], "both connections closed")
    assert {(c.close_reason, c.buffered, c.parse_error) for c in backend.conns()} == {("eof", 0, None)}


def test_a_frame_over_max_frame_breaks_only_that_connection(recording):
    backend = recording(max_frame=1024)
    bad, good = dial(backend.port), dial(backend.port)
    with bad, good:
        bad.sendall(frame(b"x" * 2000) + frame(b"after"))
        good.sendall(frame(b"fine"))
        wait(lambda: backend.count() == 1, "the good frame")
        bad_info = wait(lambda: next((c for c in backend.conns() if c.parse_error), None), "the parse error")
        assert "2004-byte message, over max_message (1024)" in bad_info.parse_error and bad_info.open
        assert [r for _, r in backend.records()] == [frame(b"fine")]  # nothing recorded after it broke


def test_pause_holds_every_connection_new_ones_too_and_resume_reads_them(recording):
    backend = recording(summarize=lambda f: f[4:])
    old = dial(backend.port)
    backend.wait_open(1)
    backend.pause()
    new = dial(backend.port)
    with old, new:
        old.sendall(frame(b"a"))
        new.sendall(frame(b"b"))
        backend.wait_open(2)
        time.sleep(0.2)
        assert backend.count() == 0
        backend.resume()
        backend.wait_count(2, timeout=WAIT)
        assert sorted(r for _, r in backend.records()) == [b"a", b"b"]


@pytest.mark.parametrize("rst", [True, False], ids=["reset", "close"])
def test_kill_resets_or_closes(recording, rst):
    backend = recording()
    peer = dial(backend.port)
    with peer:
        (cid,) = backend.wait_open(1)
        backend.send(cid, frame(b"last words"))
        assert read_frame(peer) == frame(b"last words")
        assert backend.kill(rst=rst) == [cid]
        if rst:
            with pytest.raises(ConnectionResetError):
                while peer.recv(100):
                    pass
        else:
            assert peer.recv(100) == b""
    assert backend.conn(cid).close_reason == ("killed" if rst else "closed")


def test_a_peer_that_does_not_read_is_pushed_back(recording):
    """Echo to a peer that never reads: the connection stops being read once its queue is full,
    so the server's memory stays bounded and TCP pushes back on the sender."""
    backend = recording(echo=True)
    peer = dial(backend.port)
    peer.setblocking(False)
    chunk = frame(b"z" * 65000)
    sent, last_growth = 0, time.monotonic()
    deadline = last_growth + 30
    with peer:
        while time.monotonic() - last_growth < 0.5:  # until nothing more is taken for half a second
            assert time.monotonic() < deadline, f"never pushed back ({sent} bytes taken)"
            try:
                sent += peer.send(chunk[sent % len(chunk):])  # whole frames, even when a send is cut short
                last_growth = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        (info,) = backend.conns()
        # One read's worth of echo at most beyond the limit (a read is at most a buffer's free space).
        assert WRITE_BACKLOG_LIMIT < info.pending_out <= WRITE_BACKLOG_LIMIT + (1 << 20), info
        time.sleep(0.2)
        assert backend.conns()[0].frames == info.frames, "it kept reading"


# -- faults on a plan --------------------------------------------------------------------------


class _Echo(FaultyEcho):
    def stray(self, k: int) -> bytes:
        return frame(b"stray %d" % k)


@pytest.fixture
def faulty():
    loop = Loop().start()
    yield loop
    loop.close()


def serve(loop: Loop, *plans: Plan, sink: bool = False) -> int:
    kind = FaultySink if sink else _Echo
    listener = loop.call(lambda: loop.listen(lambda conn: kind(conn, iter(plans), random.Random(0))))
    return listener.port


@pytest.mark.parametrize("action", ["fin", "fin_mid", "rst", "rst_mid"])
def test_a_close_strikes_on_the_frame_after_the_plan(faulty, action):
    peer = dial(serve(faulty, Plan(action, after=3)))
    with peer:
        peer.sendall(b"".join(frame(b"%d" % i) for i in range(5)))  # one write: the close may come before a second
        assert [read_frame(peer) for _ in range(3)] == [frame(b"%d" % i) for i in range(3)]
        rest = b""
        try:
            while chunk := peer.recv(100):
                rest += chunk
        except ConnectionResetError:
            assert action.startswith("rst")
        else:
            assert action.startswith("fin")
        assert rest == (frame(b"3")[:2] if action.endswith("_mid") else b"")


def test_stall_reads_on_answers_nothing_then_closes_gracefully(faulty):
    peer = dial(serve(faulty, Plan("stall", after=1, hold=0.3)))
    with peer:
        t0 = time.monotonic()
        peer.sendall(frame(b"a") + frame(b"b") + frame(b"c"))
        assert read_frame(peer) == frame(b"a")
        assert peer.recv(100) == b"" and time.monotonic() - t0 >= 0.3  # FIN after the hold, nothing else


def test_late_holds_every_answer_then_sends_them_and_goes_on(faulty):
    peer = dial(serve(faulty, Plan("late", after=1, hold=0.3)))
    with peer:
        peer.sendall(frame(b"a") + frame(b"b") + frame(b"c"))
        assert read_frame(peer) == frame(b"a")
        t0 = time.monotonic()
        assert [read_frame(peer), read_frame(peer)] == [frame(b"b"), frame(b"c")]
        assert time.monotonic() - t0 >= 0.25
        peer.sendall(frame(b"d"))
        assert read_frame(peer) == frame(b"d")  # the next plan (none left: calm)


def test_trickle_writes_whole_answers_a_few_bytes_at_a_time(faulty):
    peer = dial(serve(faulty, Plan("trickle", after=0, count=2)))
    with peer:
        big = frame(bytes(range(256)) * 4)
        peer.sendall(big + big + frame(b"fast"))
        reads = []
        got = b""
        while len(got) < 2 * len(big) + 8:
            reads.append(peer.recv(65536))
            got += reads[-1]
        assert got == big + big + frame(b"fast")
        assert len(reads) > 10, "the two answers came in one piece"


def test_unmatched_sends_unasked_frames_between_answers(faulty):
    peer = dial(serve(faulty, Plan("unmatched", after=0, count=2, every=2)))
    with peer:
        peer.sendall(b"".join(frame(b"%d" % i) for i in range(5)))
        got = [read_frame(peer)[4:] for _ in range(7)]
    assert got == [b"0", b"stray 1", b"1", b"2", b"stray 2", b"3", b"4"]


def test_a_stalled_sink_pushes_back_then_reads_on(faulty):
    port = serve(faulty, Plan("stall", after=1, hold=0.5), sink=True)
    peer = dial(port)
    with peer:
        peer.setblocking(False)
        peer.sendall(frame(b"first"))
        time.sleep(0.1)
        filled = 0
        try:
            while True:
                filled += peer.send(b"\0" * 65536)
        except BlockingIOError:
            pass
        assert filled > 0
        time.sleep(0.7)  # the hold is over: it reads again
        peer.settimeout(WAIT)
        peer.sendall(b"\0" * 65536)


# -- the counting backend (demo, benchmark) ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["echo", "sink"])
def test_counting_counts_runs_and_odd_frames_alike(mode):
    backend = CountingBackend(U32BE, mode)
    port = backend.listen(0)
    backend.loop.start()
    try:
        frames = [frame(b"x" * 60)] * 1000 + [frame(b"y" * n) for n in range(200)] + [frame(b"z" * 60)] * 500
        data = b"".join(frames)
        peer = dial(port)
        with peer:
            peer.sendall(data)
            if mode == "echo":
                assert recv_exact(peer, len(data)) == data
            wait(lambda: backend.loop.call(backend.totals) == (len(frames), len(data)), "every frame counted")
        report = backend.loop.call(backend.report)
        assert (report["total_msgs"], report["errors"]) == (len(frames), 0)
    finally:
        backend.loop.close()


# -- listeners and the loop ---------------------------------------------------------------------------


def test_an_outage_refuses_dials_and_ends_on_the_same_port(faulty):
    listener = faulty.call(lambda: faulty.listen(lambda conn: _Echo(conn, iter(()), random.Random(0))))
    peer = dial(listener.port)
    with peer:
        wait(lambda: faulty.call(lambda: len(listener.conns)) == 1, "the connection")
        faulty.call(lambda: listener.down("rst"))
        with pytest.raises(ConnectionResetError):
            peer.recv(10)
    with pytest.raises(ConnectionRefusedError):
        dial(listener.port)
    faulty.call(listener.reopen)
    with dial(listener.port) as again:
        again.sendall(frame(b"back"))
        assert read_frame(again) == frame(b"back")


def test_a_call_from_another_thread_returns_or_raises(faulty):
    assert faulty.call(lambda: threading.current_thread().name) == "backend"
    with pytest.raises(ZeroDivisionError):
        faulty.call(lambda: 1 / 0)


def test_a_graceful_close_gives_up_on_a_peer_that_never_closes(faulty):
    """fin: read on until the peer closes, at most DRAIN_TIMEOUT."""
    port = serve(faulty, Plan("fin", after=0))
    peer = dial(port)
    with peer:
        peer.sendall(frame(b"x"))
        assert peer.recv(10) == b""  # our FIN
        conn = wait(lambda: faulty.call(lambda: next(iter(faulty.conns.values()), None)), "the connection")
        assert conn.open  # the peer has not closed: it waits
        wait(lambda: not conn.open, "the drain timeout", timeout=DRAIN_TIMEOUT + 2)
        assert conn.close_reason == "fin_drain_timeout"
