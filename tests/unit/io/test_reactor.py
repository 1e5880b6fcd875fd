"""The event core's pass boundary, its error boundary, its trio fallback; a slot's dial loop.

kmuxd/io/reactor.py and kmuxd/io/slot.py with real sockets; the trio tests
run a real trio loop (no daemon).
"""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest
import trio

from kmux.errors import InternalError
from kmuxd.core.states import SlotState
from kmuxd.io.reactor import EPOLLIN, Reactor, _TrioView

from .world import FakeClock, RecordingLog, World


class Ready:
    """A reactor Handler whose socket is always readable (never drained): every pass reports it."""

    def __init__(self, sock: socket.socket, boom: bool = False) -> None:
        self.sock = sock
        self.boom = boom
        self.handled = 0
        self.crashed: list[BaseException] = []

    def handle(self, events: int) -> None:
        self.handled += 1
        if self.boom:
            raise RuntimeError("a bug in this handler's path")

    def crash(self, exc: BaseException) -> None:
        self.crashed.append(exc)


@pytest.fixture
def readable():
    a, b = socket.socketpair()
    b.send(b"x")
    yield a
    a.close()
    b.close()


def test_work_deferred_outside_a_pass_is_a_bug():
    reactor = Reactor(RecordingLog(), FakeClock())
    ran = []
    with pytest.raises(InternalError):
        reactor.call_soon(lambda: ran.append(1))
    # Entered through call(), the same work runs before call() returns.
    reactor.call(reactor.call_soon, lambda: ran.append(2))
    assert ran == [2]
    reactor.close()


def test_call_finishes_the_pass_even_when_the_work_raises():
    reactor = Reactor(RecordingLog(), FakeClock())
    ran = []

    def work() -> None:
        reactor.call_soon(lambda: ran.append("deferred"))
        raise ValueError("the operator's request was refused")

    with pytest.raises(ValueError):
        reactor.call(work)
    assert ran == ["deferred"]
    reactor.call(reactor.call_soon, lambda: ran.append("next"))  # still usable: not stuck in a pass
    assert ran == ["deferred", "next"]
    reactor.close()


def test_a_crashing_handler_is_ended_and_the_pass_goes_on(readable):
    a, b = socket.socketpair()
    b.send(b"y")
    log = RecordingLog()
    reactor = Reactor(log, FakeClock())
    bad, good = Ready(readable, boom=True), Ready(a)
    reactor.register(readable.fileno(), bad, EPOLLIN)
    reactor.register(a.fileno(), good, EPOLLIN)
    assert reactor.serve_ready()
    assert good.handled == 1 and len(bad.crashed) == 1
    assert reactor.statistics().crashes == 1 and log.events("handler_crashed")
    reactor.close()
    a.close()
    b.close()


class AskingAgain:
    """A handler with input above its socket (TLS plaintext inside OpenSSL): it asks
    to be served again ``times`` times, each from inside a pass."""

    def __init__(self, reactor: Reactor, fd: int, times: int) -> None:
        self.reactor, self.fd, self.left = reactor, fd, times
        self.handled: list[int] = []

    def handle(self, events: int) -> None:
        self.handled.append(events)
        if self.left:
            self.left -= 1
            self.reactor.serve_again(self.fd, self)

    def crash(self, exc: BaseException) -> None:
        raise AssertionError(exc)


def test_serve_again_serves_a_handler_once_per_pass_without_a_readiness_event():
    a, b = socket.socketpair()  # nothing to read: epoll never reports a
    reactor = Reactor(RecordingLog(), FakeClock())
    h = AskingAgain(reactor, a.fileno(), times=2)
    reactor.register(a.fileno(), h, EPOLLIN)
    assert not reactor.serve_ready()  # nothing ready, nobody asked: the reactor may sleep
    reactor.call(reactor.serve_again, a.fileno(), h)
    assert reactor.serve_ready() and h.handled == [EPOLLIN]  # as if readable
    assert reactor.serve_ready() and h.handled == [EPOLLIN] * 2  # it asked again during that pass
    assert reactor.serve_ready() and h.handled == [EPOLLIN] * 3
    assert not reactor.serve_ready()  # it stopped asking
    # A handler that ended (unregistered) before its turn is not served.
    h.left = 1
    reactor.call(reactor.serve_again, a.fileno(), h)
    reactor.unregister(a.fileno())
    reactor.serve_ready()
    assert len(h.handled) == 3
    reactor.close()
    a.close()
    b.close()


def test_the_trio_view_reads_a_run_queue_and_refuses_anything_else():
    runq: list = []
    view = _TrioView.of_runner(SimpleNamespace(runq=runq))
    assert view is not None and not view.has_work()
    runq.append("a task")
    assert view.has_work()
    assert _TrioView.of_runner(object()) is None  # a trio laid out otherwise: no shortcut


async def test_the_trio_view_of_this_trio_works():
    assert _TrioView.of_current_run() is not None


async def _passes_between_trio_turns(trio_view) -> tuple[list[int], Reactor, RecordingLog]:
    a, b = socket.socketpair()
    b.send(b"x")
    log = RecordingLog()
    reactor = Reactor(log, trio.current_time, trio_view=trio_view)
    busy = Ready(a)
    reactor.register(a.fileno(), busy, EPOLLIN)
    seen: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        for _ in range(5):
            await trio.lowlevel.checkpoint()  # another task: runs only when the reactor yields
            seen.append(busy.handled)
        nursery.cancel_scope.cancel()
    reactor.close()
    a.close()
    b.close()
    return seen, reactor, log


async def test_without_a_view_of_trio_the_reactor_yields_after_every_pass():
    """The fallback when trio's run queue is not readable: a checkpoint after every
    pass, so other tasks run even while the reactor always has work."""
    seen, reactor, log = await _passes_between_trio_turns(lambda: None)
    assert log.events("reactor_yields_every_pass")
    # One pass, then trio runs every runnable task once (in an order it shuffles):
    # between two turns of this task the reactor ran at most two passes.
    steps = [b - a for a, b in zip(seen, seen[1:])]
    assert seen[-1] > 0 and all(step <= 2 for step in steps), seen
    assert reactor.statistics().idle_waits == 0


async def test_with_a_view_of_trio_the_reactor_runs_passes_until_trio_has_work():
    seen, _, log = await _passes_between_trio_turns(_TrioView.of_current_run)
    assert not log.events("reactor_yields_every_pass")
    # The reactor yields when the view shows a runnable task, or after YIELD_INTERVAL
    # (a task made runnable in the reactor's own trio batch is not in the queue yet):
    # this task gets every one of its turns.
    assert len(seen) == 5 and seen == sorted(seen) and seen[-1] > 0


class Reading:
    """A reactor Handler that reads what arrives and notes when (time.monotonic)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.at: list[float] = []

    def handle(self, events: int) -> None:
        self.sock.recv(64)
        self.at.append(time.monotonic())

    def crash(self, exc: BaseException) -> None:
        raise AssertionError(exc)


def _send_later(sock: socket.socket, delay: float) -> threading.Thread:
    """Send from a plain thread, so that nothing of trio's (no timer, no wake-up) announces it."""
    t = threading.Thread(target=lambda: (time.sleep(delay), sock.send(b"x")))
    t.start()
    return t


async def test_asleep_in_its_epoll_the_reactor_wakes_for_its_sockets_and_for_all_of_trios_work():
    """The direct wait (trio's epoll inside ours): sleeping in its own epoll, the
    reactor must still wake for its sockets, trio's timers, trio's sockets, and a
    task trio took into the batch behind the reactor's. Each would otherwise wait for
    trio's next deadline (here fail_after's: the test would fail)."""
    log = RecordingLog()
    reactor = Reactor(log, trio.current_time)
    ours, ours_peer = socket.socketpair()
    handler = Reading(ours)
    reactor.register(ours.fileno(), handler, EPOLLIN)
    plain, theirs_peer = socket.socketpair()
    theirs = trio.socket.from_stdlib_socket(plain)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            assert not log.events("reactor_waits_through_trio") and not log.events("reactor_yields_every_pass")
            # Its own socket, while it sleeps.
            sent = time.monotonic()
            _send_later(ours_peer, 0.05).join()
            while not handler.at:
                await trio.sleep(0.01)
            assert handler.at[0] - sent < 1
            # trio's timers: nothing else would wake the loop in time.
            start = time.monotonic()
            for _ in range(20):
                await trio.sleep(0.005)
            assert time.monotonic() - start < 1
            # trio's sockets: announced only by trio's epoll.
            start = time.monotonic()
            thread = _send_later(theirs_peer, 0.05)
            assert await theirs.recv(8) == b"x"
            thread.join()
            assert time.monotonic() - start < 1
            # Tasks that only checkpoint: each turn may land in the reactor's batch.
            start = time.monotonic()
            for _ in range(200):
                await trio.lowlevel.checkpoint()
            assert time.monotonic() - start < 1
            assert reactor.statistics().idle_waits > 0
            nursery.cancel_scope.cancel()
    reactor.close()
    for s in (ours, ours_peer, theirs, theirs_peer):
        s.close()


async def test_a_trio_whose_epoll_is_not_usable_is_waited_through():
    """The portable loop: a view with a run queue but no epoll or deadlines."""
    log = RecordingLog()
    runq: list = []
    reactor = Reactor(log, trio.current_time, trio_view=lambda: _TrioView.of_runner(SimpleNamespace(runq=runq)))
    ours, ours_peer = socket.socketpair()
    handler = Reading(ours)
    reactor.register(ours.fileno(), handler, EPOLLIN)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            assert log.events("reactor_waits_through_trio")
            ours_peer.send(b"x")
            while not handler.at:
                await trio.sleep(0.01)
            assert reactor.statistics().idle_waits > 0
            nursery.cancel_scope.cancel()
    reactor.close()
    ours.close()
    ours_peer.close()


async def test_a_slot_dials_carries_and_dials_again_when_its_connection_is_lost():
    """The dial loop (Slot.run) with a real loopback listener and the reactor running."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    w = World(endpoints=[f"127.0.0.1:{port}"], reconnect_initial=0.01)
    w.reactor.clock = w.group.clock = trio.current_time  # a running trio's clock, for trio.sleep
    for slot in w.group.slots:
        slot.clock = trio.current_time
    slot = w.group.slots[0]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(w.reactor.run)
            nursery.start_soon(slot.run)
            first, _ = await listener.accept()
            while slot.sm.state is not SlotState.UP:
                await trio.sleep(0.001)
            live = slot.live
            first.close()  # the server closes: the slot redials
            second, _ = await listener.accept()
            while slot.live is None or slot.live is live:
                await trio.sleep(0.001)
            assert live.sm.closed and slot.statistics().reconnects == 1
            slot.stop()
            nursery.cancel_scope.cancel()
    second.close()
    listener.close()
    w.close()
