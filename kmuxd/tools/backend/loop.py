"""The backend's event loop: one thread, one selector, timers, and calls from other threads.

Theory of operation
-------------------
One :class:`Loop` serves every listener of a process (a test's server, the
benchmark's sink, the soak's dozen endpoints) from one thread: one
``selectors`` wait of at most :data:`POLL_INTERVAL`, then every ready
socket's work (a connection reads or writes, :mod:`.conn`; a listener
accepts), then the timers that are due (:meth:`Loop.call_later`: holds,
pauses, trickles, drain deadlines), then the functions other threads asked
it to run (:meth:`Loop.call`, which hands back their result or exception).
Every socket is touched only by the loop's thread, so nothing needs a lock
but what a test reads while the loop writes (the protocols' records).

It runs in a thread of its own (:meth:`Loop.start`: a test's server, the
soak's backends) or in the caller's (:meth:`Loop.run`: the benchmark's
counting backend, whose CPU is then its process's alone), and stops on
:attr:`Loop.stop_requested` or :meth:`Loop.close`.

Bounds: every wait is at most :data:`POLL_INTERVAL`, every call from
another thread :data:`CALL_TIMEOUT`, the final drain after a stop
:data:`FINAL_DRAIN_ROUNDS` rounds.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import selectors
import socket
import threading
import time
from typing import Any, Callable

from .conn import U32BE, Conn, ConnProtocol, Listener

__all__ = ["Loop", "Listener", "Conn", "ConnProtocol", "Timer", "U32BE"]

#: Seconds the loop waits at most, so a stop or a command is seen promptly.
POLL_INTERVAL = 0.05
#: Seconds a call from another thread may wait for the loop.
CALL_TIMEOUT = 5.0
#: Rounds of the final non-blocking drain after a stop (foreground runs).
FINAL_DRAIN_ROUNDS = 50


class Timer:
    __slots__ = ("deadline", "fn", "cancelled")

    def __init__(self, deadline: float, fn: Callable[[], Any]) -> None:
        self.deadline = deadline
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """Listeners and their connections, served by one thread (module docstring)."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self.listeners: list[Listener] = []
        #: Every connection ever accepted, by number (closed ones stay for the reports).
        self.conns: dict[int, Conn] = {}
        self._numbers = itertools.count(1)
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_seq = itertools.count()
        self._calls: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._watched: dict[int, Callable[[], None]] = {}
        self.stop_requested = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # -- set-up ---------------------------------------------------------------------------

    def listen(self, protocol_factory: Callable[[Conn], ConnProtocol], **kw: Any) -> Listener:
        listener = Listener(self, protocol_factory, **kw)
        self.listeners.append(listener)
        return listener

    def watch(self, fd: int, fn: Callable[[], None]) -> None:
        """Call ``fn()`` in the loop whenever ``fd`` is readable (a control pipe)."""
        self._watched[fd] = fn
        self._sel.register(fd, selectors.EVENT_READ, "watch")

    def unwatch(self, fd: int) -> None:
        if self._watched.pop(fd, None) is not None:
            self._sel.unregister(fd)

    def call_later(self, delay: float, fn: Callable[[], Any]) -> Timer:
        timer = Timer(time.monotonic() + delay, fn)
        heapq.heappush(self._timers, (timer.deadline, next(self._timer_seq), timer))
        return timer

    # -- running ----------------------------------------------------------------------------

    def start(self, name: str = "backend") -> "Loop":
        """Run in a daemon thread; :meth:`call` talks to it, :meth:`close` ends it."""
        self._thread = threading.Thread(target=self._run_caught, name=name, daemon=True)
        self._thread.start()
        return self

    def _run_caught(self) -> None:
        try:
            self.run(final_drain=False)
        except BaseException as exc:  # surfaced by call() and check()
            self.error = exc

    def run(self, final_drain: bool = True) -> None:
        """Serve until :attr:`stop_requested`; then (``final_drain``) read what is still readable."""
        while not self.stop_requested:
            self._turn(POLL_INTERVAL)
        if final_drain:
            for _ in range(FINAL_DRAIN_ROUNDS):
                if not self._turn(0):
                    break

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the backend's loop crashed: {self.error!r}") from self.error

    def call(self, fn: Callable[[], Any], timeout: float = CALL_TIMEOUT) -> Any:
        """Run ``fn()`` in the loop's thread and return its result (or raise what it raised)."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append((True, fn()))
            except BaseException as exc:  # handed back to the caller
                box.append((False, exc))
            done.set()

        self._calls.put(run)
        self.wake()
        if not done.wait(timeout):
            self.check()
            raise AssertionError(f"the backend's loop did not run a command within {timeout} s")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # full: a wake-up is pending anyway; closed: stopping

    def close(self) -> None:
        """Stop the loop (and its thread), close every socket; idempotent."""
        self.stop_requested = True
        if self._thread is not None and self._thread.is_alive():
            self.wake()
            self._thread.join(5)
        for c in list(self.conns.values()):
            if c.closed_at is None:
                c._close("shutdown")
        for listener in self.listeners:
            if listener.sock is not None:
                listener.sock.close()
                listener.sock = None
        self._wake_r.close()
        self._wake_w.close()
        self._sel.close()

    # -- one turn ---------------------------------------------------------------------------

    def _turn(self, timeout: float) -> bool:
        """One wait, then everything it found ready, due timers and queued calls. True if anything was."""
        now = time.monotonic()
        if self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - now))
        events = self._sel.select(timeout)
        for key, mask in events:
            data = key.data
            if isinstance(data, Conn):
                if data.closed_at is None and mask & selectors.EVENT_WRITE:
                    data._write()
                if data.closed_at is None and mask & selectors.EVENT_READ:
                    data._read()
            elif isinstance(data, Listener):
                data._accept()
            elif data == "wake":
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            elif data == "watch":
                self._watched[key.fd]()
        ran = self._run_timers()
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                break
            fn()
            ran = True
        return bool(events) or ran

    def _run_timers(self) -> bool:
        now = time.monotonic()
        ran = False
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.fn()
                ran = True
        return ran
