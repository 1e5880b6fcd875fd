"""The event core: every data-path socket in one epoll, served in synchronous passes.

Theory of operation
-------------------
trio's own I/O waits cost one ``epoll_ctl`` (it arms ``EPOLLONESHOT``) and one
task switch per socket per wake-up, and a request/response daemon gets about
one message per wake-up, so that cost was paid per request (see
``docs/benchmark.md``, "Where the CPU goes"). The data path therefore has an
epoll of its own:

* Every data-path socket (the apps' listener, apps mid-handshake, attached
  apps, the groups' TCP connections) is registered **once**, and its
  interest changes only when what we want of it changes: reading paused for
  push-back, writing blocked. A socket in a steady state costs no
  ``epoll_ctl`` at all.
* **Level-triggered**, on purpose: a handler may stop after one bounded
  slice of work (a client's turn, one read of a connection) without having
  to drain to ``EAGAIN``; the next pass reports the socket again. That
  spares the ``EAGAIN`` read per message that edge-triggering needs, and
  makes fairness a matter of passes rather than of bookkeeping. Input
  that waits *above* a socket (TLS plaintext left inside OpenSSL once a
  connection's receive buffer was full) is invisible to epoll: its handler
  asks to be served again (:meth:`Reactor.serve_again`), once per pass,
  and the reactor does not sleep while one waits.
* One trio task runs :meth:`Reactor.run`: it waits until the epoll is
  readable, then handles *every* ready socket in one synchronous pass
  (:meth:`Handler.handle`), then runs the end-of-pass work: every
  connection that got bytes during the pass writes them with one ``send``
  (:meth:`Reactor.flush_later`). Under load one pass carries many clients'
  messages and many responses, so the per-wake-up cost is shared.
* It gives trio the loop back only when trio has something to do (a task
  became runnable, one of its timers came due, one of its sockets is
  ready: the control socket, dials, signals) and at least every
  ``YIELD_INTERVAL`` seconds. A busy daemon runs pass after pass without a
  trio round trip between them.
* **Waiting**, when nothing is ready, happens in *our* epoll, with trio's
  epoll registered inside it and a timeout of trio's next deadline: one
  ``epoll_wait`` per wake-up. (Waiting through trio instead costs, per
  wake-up, trio's ``epoll_ctl`` to re-arm our epoll in its own
  ``EPOLLONESHOT`` set, trio's ``epoll_wait``, a task switch, then our
  ``epoll_wait``: at one client a pass carries one message and this was
  most of a request's cost.) The reactor holds trio's thread while it
  sleeps, so it must wake for everything trio would: trio's sockets
  (its epoll is readable), its timers (the timeout) and other threads and
  signals (trio's wake-up socket sits in trio's epoll). The nesting goes
  one way only (the kernel refuses loops): ours never sits in trio's.
* This reads trio's internals (:class:`_TrioView`: the run queue, the
  epoll, the deadlines), checked once at start-up. A trio laid out
  otherwise, or running a clock that jumps (``MockClock``), gets the
  portable loop: wait through ``trio.lowlevel.wait_readable`` on our epoll
  (and, without a readable run queue, a checkpoint after every pass).
  In the direct wait ``trio.testing.wait_all_tasks_blocked`` never sees
  the reactor blocked; nothing in kmuxd uses it.

trio keeps what it is good at: lifecycles (nurseries), timers
(``request_timeout``, ``queue_timeout``, back-off), signals, the control
socket and cancellation.

**The pass boundary.** Data-path state (outboxes, scheduler, sessions,
connections) is touched only inside a *pass*, and a pass always ends with
its deferred work: wake-ups (:meth:`Reactor.call_soon`), then one write per
connection that got bytes (:meth:`Reactor.flush_later`). The reactor's own
loop runs passes; trio-side work (a timer tick, a dial that connected, an
operator's drain, a reload) enters the data path through
:meth:`Reactor.call`, which runs it as a pass of its own. Deferring work
outside a pass raises :class:`~kmux.errors.InternalError` (a bug): without
an end of pass it would sit unserved until some socket happened to be ready.

**Time** comes from the clock the reactor is given (``time.monotonic`` in
the daemon, a fake one in tests); every object of the shell reads the same
one, so a test can step time without sleeping.

Error handling: each handler is an error boundary. An exception escaping
one handler's :meth:`~Handler.handle` is logged with its traceback and ends
that handler only (:meth:`Handler.crash`): one client or connection with a
bug in its path is closed, the daemon and everyone else go on.
"""

from __future__ import annotations

import select
from dataclasses import dataclass
from typing import Any, Callable, Final, Protocol

import trio

from kmux.errors import InternalError

__all__ = [
    "Reactor", "Handler", "Flushable", "Clock", "ReactorStatistics",
    "EPOLLIN", "EPOLLOUT", "EPOLLRDHUP", "EPOLLHUP", "EPOLLERR",
]

# Final: mypyc keeps each in a C static; a plain module global costs a dict lookup
# at every use, in every compiled module that imports it (the hot path uses them per event).
EPOLLIN: Final = select.EPOLLIN
EPOLLOUT: Final = select.EPOLLOUT
EPOLLRDHUP: Final = select.EPOLLRDHUP
EPOLLHUP: Final = select.EPOLLHUP
EPOLLERR: Final = select.EPOLLERR

#: Most events taken from the epoll per pass.
MAX_EVENTS: Final = 1024
#: Longest run of passes without giving trio the loop, seconds: a task that
#: became runnable in the same trio batch as the reactor, a timer that came
#: due and trio's own sockets wait at most this.
YIELD_INTERVAL: Final = 0.001
#: Longest single sleep in the reactor's own epoll, seconds (trio's timers
#: and sockets wake it sooner; this only bounds a wait with nothing due).
MAX_SLEEP: Final = 60.0
_INF: Final = float("inf")


#: Where the shell reads the time: seconds, monotonic (``time.monotonic``;
#: tests pass a clock they step themselves).
Clock = Callable[[], float]


class Flushable(Protocol):
    """A connection that writes what it was given during a pass when the pass ends."""

    def flush(self) -> None: ...

    def crash(self, exc: BaseException) -> None: ...


class Handler(Protocol):
    """Something registered in the reactor: a socket and what to do when it is ready."""

    def handle(self, events: int) -> None: ...

    def crash(self, exc: BaseException) -> None:
        """An unexpected exception escaped :meth:`handle`: end this handler (it was logged)."""


@dataclass(frozen=True, slots=True)
class ReactorStatistics:
    #: Sockets registered.
    sockets: int
    #: Passes run, events handled, and interest changes (epoll_ctl MOD) since start.
    passes: int
    events: int
    modifies: int
    #: Times the reactor, with nothing left to do, waited and woke for the data
    #: path (in its own epoll; through trio in the portable loop).
    idle_waits: int
    #: Handlers ended by an unexpected exception.
    crashes: int


class Reactor:
    def __init__(self, log: Any, clock: Clock,
                 trio_view: "Callable[[], _TrioView | None] | None" = None) -> None:
        self.log = log
        #: The shell's clock (see the module docstring).
        self.clock = clock
        #: How :meth:`run` learns whether trio has work (tests pass one that finds none).
        self._trio_view = trio_view if trio_view is not None else _TrioView.of_current_run
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._masks: dict[int, int] = {}
        #: connections to write at the end of this pass, each once (insertion order)
        self._flush: dict[Flushable, None] = {}
        self._soon: list[Callable[[], None]] = []
        self._in_pass = False
        #: Handlers to serve next pass as if readable: TLS plaintext that epoll cannot see.
        self._again: list[tuple[int, Handler]] = []
        #: trio's epoll, registered in ours while :meth:`run` waits directly (-1: not).
        self._trio_fd = -1
        #: trio's epoll was reported ready in the last pass: give trio the loop.
        self._trio_ready = False
        self.passes = self.events = self.modifies = self.idle_waits = self.crashes = 0

    # -- registration ------------------------------------------------------------

    def register(self, fd: int, handler: Handler, mask: int) -> None:
        self._epoll.register(fd, mask)
        self._handlers[fd] = handler
        self._masks[fd] = mask

    def replace(self, fd: int, handler: Handler) -> None:
        """Hand a registered socket to another handler (a client past its hello)."""
        self._handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        if self._masks.get(fd) != mask:
            self._epoll.modify(fd, mask)
            self._masks[fd] = mask
            self.modifies += 1

    def unregister(self, fd: int) -> None:
        """Forget ``fd`` (before it is closed). Safe to call twice."""
        if self._handlers.pop(fd, None) is not None:
            del self._masks[fd]
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                # The descriptor was closed first: the kernel already dropped
                # it from the epoll, which is all unregistering is for.
                pass

    # -- the pass boundary --------------------------------------------------------------

    def flush_later(self, conn: Flushable) -> None:
        """``conn`` got bytes this pass: it writes them (``conn.flush()``) when the pass ends, once."""
        if not self._in_pass:
            raise InternalError(f"{conn!r} was given bytes outside a pass: enter through Reactor.call")
        self._flush[conn] = None

    def serve_again(self, fd: int, handler: Handler) -> None:
        """Serve ``handler`` (registered as ``fd``) in the next pass as if its socket were readable.

        For input that waits *above* the socket (TLS plaintext left inside
        the SSLObject once the receive buffer was full): level-triggered
        epoll reports only what waits in the kernel. The reactor does not
        sleep while such a handler waits; each is served once per pass.
        """
        self._again.append((fd, handler))

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` at the end of this pass."""
        if not self._in_pass:
            raise InternalError(f"{fn!r} was deferred outside a pass: enter through Reactor.call")
        self._soon.append(fn)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` (trio-side work on the data path) as a pass of its own.

        Whatever it defers (wake-ups, writes) runs before this returns, even
        if ``fn`` raises. Called from inside a pass, ``fn`` simply becomes
        part of that pass.
        """
        if self._in_pass:
            return fn(*args)
        self._in_pass = True
        try:
            return fn(*args)
        finally:
            try:
                self._finish_pass()
            finally:
                self._in_pass = False

    def serve_ready(self) -> bool:
        """One pass over every socket ready now, without waiting. False if there was nothing to do."""
        return self._serve(self._epoll.poll(0, MAX_EVENTS))

    def _serve(self, events: list[tuple[int, int]]) -> bool:
        """One pass over ``events`` (and what asked to be served again). False if there was nothing to do."""
        if not events and not self._again and not self._soon and not self._flush:
            return False
        self.passes += 1
        self.events += len(events)
        handlers = self._handlers
        again = self._again
        if again:
            self._again = []  # who asks again during this pass is served in the next
        self._in_pass = True
        try:
            for fd, mask in events:
                handler = handlers.get(fd)
                if handler is None:
                    if fd == self._trio_fd:
                        self._trio_ready = True
                        self.events -= 1
                    continue  # closed earlier in this pass
                try:
                    handler.handle(mask)
                except Exception as exc:  # noqa: BLE001 -- the error boundary
                    self._crashed(handler, exc)
            for fd, handler in again:
                if handlers.get(fd) is handler:  # not ended meanwhile
                    try:
                        handler.handle(EPOLLIN)
                    except Exception as exc:  # noqa: BLE001 -- the error boundary
                        self._crashed(handler, exc)
            self._finish_pass()
        finally:
            self._in_pass = False
        return True

    # -- the loop ---------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        trio_view = self._trio_view()
        if trio_view is None:
            self.log.info("reactor_yields_every_pass", reason="trio's run queue is not readable in this trio version")
        elif trio_view.epoll_fd < 0:
            self.log.info("reactor_waits_through_trio", reason="trio's epoll or clock is not usable for a direct wait")
        task_status.started()
        if trio_view is not None and trio_view.epoll_fd >= 0:
            await self._run_direct(trio_view)
        else:
            await self._run_through_trio(trio_view)

    async def _run_direct(self, trio_view: "_TrioView") -> None:
        """The loop that sleeps in our epoll, trio's inside it (see the module docstring)."""
        clock = self.clock
        poll = self._epoll.poll
        trio_fd = trio_view.epoll_fd
        self._epoll.register(trio_fd, EPOLLIN)
        self._trio_fd = trio_fd
        try:
            yielded = clock()
            # Since the last yield, no task of trio's is runnable behind us in
            # the batch trio is running (those are not in its run queue).
            batch_clear = False
            while True:
                if self._again or self._soon or self._flush:
                    timeout = 0.0
                else:
                    timeout = trio_view.sleep_time()
                    if timeout > 0.0 and not batch_clear:
                        if trio_view.batch_waiting():
                            timeout = 0.0
                        else:
                            batch_clear = True
                events = poll(timeout if timeout > 0.0 else 0.0, MAX_EVENTS)
                if len(events) == 1 and events[0][0] == trio_fd and not (self._again or self._soon or self._flush):
                    self._trio_ready = True  # only trio's work (a control request): not a pass of ours
                    served = False
                else:
                    served = self._serve(events)
                    if served and timeout > 0.0:
                        self.idle_waits += 1
                if self._trio_ready or timeout <= 0.0 or (served and clock() - yielded >= YIELD_INTERVAL):
                    self._trio_ready = False
                    await trio.lowlevel.checkpoint()
                    yielded = clock()
                    batch_clear = False
        finally:
            self._trio_fd = -1
            self._trio_ready = False
            try:
                self._epoll.unregister(trio_fd)
            except (OSError, ValueError):
                pass  # our epoll or trio's was closed first

    async def _run_through_trio(self, trio_view: "_TrioView | None") -> None:
        """The portable loop: wait through trio when nothing is ready."""
        fileno = self._epoll.fileno()
        clock = self.clock
        yielded = clock()
        while True:
            if not self.serve_ready():
                self.idle_waits += 1
                await trio.lowlevel.wait_readable(fileno)
                yielded = clock()
                continue
            if trio_view is None or trio_view.has_work() or clock() - yielded >= YIELD_INTERVAL:
                await trio.lowlevel.checkpoint()
                yielded = clock()

    def _finish_pass(self) -> None:
        """Run what the pass deferred: wake-ups, then one write per connection."""
        # Wake-ups may add writes; writes may wake clients (room again), so
        # loop until both are empty (bounded: each round drains them).
        for _ in range(64):
            if not self._soon and not self._flush:
                return
            soon, self._soon = self._soon, []
            for fn in soon:
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001
                    owner = getattr(fn, "__self__", None)
                    if callable(getattr(owner, "crash", None)):
                        self._crashed(owner, exc)  # a handler's own work: end that handler
                    else:
                        self.crashes += 1
                        self.log.exception("reactor_callback_crashed", error=repr(exc))
            flush, self._flush = self._flush, {}
            for conn in flush:
                try:
                    conn.flush()
                except Exception as exc:  # noqa: BLE001
                    self._crashed(conn, exc)

    def _crashed(self, handler: Any, exc: BaseException) -> None:
        self.crashes += 1
        self.log.exception("handler_crashed", handler=repr(handler), error=repr(exc))
        try:
            handler.crash(exc)
        except Exception as again:  # noqa: BLE001
            self.log.exception("handler_crash_failed", handler=repr(handler), error=repr(again))

    def statistics(self) -> ReactorStatistics:
        return ReactorStatistics(
            sockets=len(self._handlers),
            passes=self.passes,
            events=self.events,
            modifies=self.modifies,
            idle_waits=self.idle_waits,
            crashes=self.crashes,
        )

    def close(self) -> None:
        self._epoll.close()


class _TrioView:
    """What the reactor may ask trio's run loop without a task switch.

    trio has no public, cheap way to ask "is anything runnable?" or "when is
    your next timer?", so this reads its runner (``trio._core._run``),
    checked once at start-up: its run queue, its epoll and its deadlines.
    Without a readable run queue the reactor gives trio the loop after every
    pass; without a usable epoll and clock (``epoll_fd`` is -1) it waits
    through trio (:meth:`Reactor._run_through_trio`).
    """

    __slots__ = ("runq", "epoll_fd", "_deadlines", "_clock", "_tasks")

    def __init__(self, runq: Any, epoll_fd: int = -1, deadlines: Any = None, clock: Any = None,
                 tasks: Any = None) -> None:
        self.runq = runq
        self._tasks = tasks
        #: trio's epoll descriptor, for the direct wait (-1: none usable).
        self.epoll_fd = epoll_fd
        self._deadlines = deadlines
        self._clock = clock

    @classmethod
    def of_current_run(cls) -> "_TrioView | None":
        try:
            from trio._core._run import GLOBAL_RUN_CONTEXT

            runner = GLOBAL_RUN_CONTEXT.runner
        except Exception:  # noqa: BLE001 -- any other trio: no shortcut
            return None
        return cls.of_runner(runner)

    @classmethod
    def of_runner(cls, runner: Any) -> "_TrioView | None":
        """A view of ``runner``'s run queue, or None if it does not look as expected
        (and of its epoll and deadlines, if they do)."""
        try:
            view = cls(runner.runq)
            view.has_work()
        except Exception:  # noqa: BLE001 -- a runner laid out otherwise: no shortcut
            return None
        try:
            epoll = runner.io_manager._epoll
            if not isinstance(epoll, select.epoll) or runner.clock_autojump_threshold != float("inf"):
                return view  # an I/O manager of another kind, or a clock that jumps when all tasks block
            direct = cls(runner.runq, epoll.fileno(), runner.deadlines, runner.clock, runner.tasks)
            direct.sleep_time()
            direct.batch_waiting()
            return direct
        except Exception:  # noqa: BLE001 -- laid out otherwise: wait through trio
            return view

    def has_work(self) -> bool:
        """A task is runnable (timers coming due wait for the next YIELD_INTERVAL)."""
        return bool(self.runq)

    def batch_waiting(self) -> bool:
        """A task is runnable but not in the run queue: trio took it into the batch
        it is running, after us. Asked once after each yield, before sleeping
        (O(tasks); a task about to run has its ``_next_send_fn`` set)."""
        for task in self._tasks:
            if task._next_send_fn is not None:
                return True
        return False

    def sleep_time(self) -> float:
        """How long the reactor may sleep without keeping trio from anything, seconds
        (0 or less: trio has a runnable task or a timer due now)."""
        if self.runq:
            return 0.0
        deadline = self._deadlines.next_deadline()
        if deadline == _INF:
            return MAX_SLEEP
        return min(MAX_SLEEP, self._clock.deadline_to_sleep_time(deadline))
