"""One kmux client, written once: the sans-IO driver under the blocking and trio clients.

Theory of operation
-------------------
:class:`ClientDriver` is all a client does, as decisions: the handshake,
sending (pieces included), the read loop, handing messages back, losing a
connection, the reconnect loop with its back-off and re-sends. It composes
:class:`~kmux._session.ClientSession` (one connection) and, when
reconnecting, :class:`~kmux._reconnect.ReconnectCore` (the accounting).
It never touches a socket, a thread or trio.

Every operation (:meth:`ClientDriver.open`, :meth:`~ClientDriver.send`,
:meth:`~ClientDriver.recv`, :meth:`~ClientDriver.set_receive`,
:meth:`~ClientDriver.flush`) is a
generator that *yields requests* (:mod:`kmux._requests`: ``Connect``,
``Send``, ``Recv``, ``Acquire``, ``WaitProgress``, ``Sleep``...) for
whatever may block, and is *sent back* each result, or *thrown* the
exception it raised (``OSError``, ``TimeoutError``, trio's ``Cancelled``).
A transport runs the generator: :mod:`kmux._sync` with blocking calls,
:mod:`kmux.trio` with ``await``. So the rules live here once, and the
transports only move bytes and wait. What cannot block is called directly
on the transport's objects: ``lock.release()``, the link's
``recv_nowait``/``kick``/``close`` (:mod:`kmux._link`), the clock and the
progress notification.

The fast lane
-------------
Most calls send a small message with nothing to repair, or receive one
whole message. For those a generator costs more than the work, so the
transports call two plain methods, with the lock they need taken without
waiting: :meth:`ClientDriver.send_now` and :meth:`ClientDriver.receive_now`.
Each makes one call of the connection's link (``send_packet``,
``recv_into``: :mod:`kmux._link`) per packet and applies the same rules as
the generators, in the same helpers; anything else (no connection in
:attr:`ClientDriver.fast`, a stash, a loss, a hand-back, a large message, a
full socket under trio) returns None and the transport runs the generator,
which applies every rule. The links are the transports' own: the blocking
transport's calls block (a send for room, a receive up to its timeout: the
one blocking call the app asked for), trio's never do. A connection leaves
``fast`` the moment it is found lost; a fast send racing with that fails on
the shut-down socket and falls through to the generator.

A transport that cannot block in a read (trio) must choose, before each
read, between reading first (a wasted ``recv`` when nothing is queued) and
waiting for readiness first (a wasted wait when something is). The driver
keeps the hint, :attr:`ClientDriver.wait_first`: wait first after a send
(the answer to a request is hardly ever back already); read first after a
read that found a packet (a stream already queued); after a read that found
nothing, wait first for the next 2, 4, ... up to :data:`PROBE_SPAN_MAX`
reads (a stream that comes slower than the app reads), then read first
once again.

Rules (each is kept in exactly one place below)
-----------------------------------------------
1. **Peer gone.** ``EPIPE``, ``ECONNRESET``, ``ENOTCONN`` and ``EBADF`` (the
   socket was closed under us), or a read of 0 bytes, mean the connection
   is gone: it is *lost* (rule 3). No other ``OSError`` is.
2. **Cut short.** A message sent in pieces that fails after its first piece
   (an error, or cancellation) cannot be finished, and the connection cannot
   carry anything else mid-message: it is kicked and then lost (rule 3).
   A failure before the first piece costs nothing: SEQPACKET sends are
   atomic.
3. **One way to lose a connection**, with both locks held: drain what the
   socket still holds (messages and notices go to the *stash*, which
   ``recv`` empties first; a ``shutdown`` notice found there gives the
   accounting its ``accepted``), close the socket, then either remember the
   error every later call raises (plain client) or let the reconnect core
   account and queue the re-sends (reconnecting client).
4. **Locks.** ``recv_lock`` is held by whoever reads the socket, ``send_lock``
   by whoever writes a packet (every piece of a message, so pieces never
   interleave with another sender's packets). Replacing the connection needs
   both, always taken receive first. Whoever waits to read and holds
   ``recv_lock`` notifies progress after each packet, so ``set_receive``
   from another thread or task can wait for its marker without reading.
5. **seq** counts messages, once each, when the whole message is out.
6. **EMSGSIZE** (a packet over the socket's send buffer) can only mean the
   buffer shrank after it was sized: before any piece went out, the driver
   sizes it again and splits the message by what it now takes, once; else it
   raises :class:`~kmux.errors.MessageTooBig` with the one wording of
   :meth:`ClientDriver._too_big`.

Cancellation (trio): a request the transport did not complete did not
happen (a :class:`Send` that raises sent nothing); requests issued while an
exception unwinds never block. Hand-backs of messages already taken from
the socket are shielded.
"""

from __future__ import annotations

import errno
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Final, Generator

from ._requests import Acquire, Connect, Recv, Send, SizeSendBuffer, Sleep, TryAcquire, WaitProgress
from ._reconnect import ReconnectBackoff, ReconnectCore, UnknownFate, is_retryable, translate_seq
from ._session import CONCAT_MAX, ClientSession, HandBack, State
from .errors import ClientClosed, DaemonUnavailable, GroupUnavailable, InternalError, KmuxError, MessageTooBig
from ._settings import ClientSettings
from .protocol import DATA_PREFIX

if TYPE_CHECKING:  # the transports' links (the driver calls them, never imports sockets)
    from ._link import SocketLink

__all__ = ["ClientDriver", "ClientSettings", "ClientStatistics", "PEER_GONE", "EMPTY", "NO_MESSAGE"]

#: errnos that mean the connection is gone (rule 1).
PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF})
#: A peer that closed with our packets unread makes the first read fail with
#: ECONNRESET, the packets it sent before are still queued; a dead socket is
#: drained past at most this many such errors.
DRAIN_RESETS_MAX = 3
#: Notices (errors) kept from lost connections until ``recv`` raises them. An
#: app that sends only and never calls ``recv`` would keep them for ever, one
#: socket's worth per lost connection; past this bound the oldest are dropped
#: (counted in ``statistics().errors_dropped``). Messages are never dropped.
STASHED_ERRORS_MAX = 1000
_CUT_SHORT = "the connection was closed: a message sent in pieces was cut short"
#: ``flush`` polls how much of what we sent the daemon has not read yet: first
#: after this many seconds, then twice as long each time, up to FLUSH_POLL_MAX.
#: (The kernel offers no wake-up for "the peer has read it".)
FLUSH_POLL_MIN = 0.001
FLUSH_POLL_MAX = 0.05
#: After reads that found nothing, wait first for at most this many reads
#: before reading first again (see "The fast lane").
PROBE_SPAN_MAX = 64


class _Empty:
    """Type of :data:`EMPTY`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "EMPTY"


#: :meth:`ClientDriver.receive_now` found no message within its timeout.
EMPTY: Final = _Empty()
#: The kind byte of a one-packet message. Final: compiled (kmux._compiled), read
#: from a static rather than from a module's dictionary per message.
_DATA_PREFIX: Final[bytes] = DATA_PREFIX
#: What a receive that timed out raises (TimeoutError), whichever path it took.
NO_MESSAGE = "no message from kmuxd within the timeout"


# -- configuration and records -------------------------------------------------------------


@dataclass(frozen=True)
class ClientStatistics:
    """A client's counters (``client.statistics()``)."""

    #: seq of the last message sent (message seqs, across reconnects)
    seq: int
    #: messages returned by recv
    received: int
    #: messages sent in more than one packet (continued), and received so
    continued_sent: int
    continued_received: int
    #: messages and errors from lost connections waiting for recv
    stashed: int
    #: errors from lost connections dropped unread (STASHED_ERRORS_MAX)
    errors_dropped: int
    connected: bool
    #: the reconnect accounting (zeros for a plain client)
    accepted_seq: int
    reconnects: int
    resent: int
    buffered: int
    guaranteed: bool


class _Conn:
    """One connection: the transport's link and the session's state."""

    __slots__ = ("link", "session", "lost")

    def __init__(self, link: SocketLink, session: ClientSession) -> None:
        self.link = link
        self.session = session
        #: why it is unusable (rules 1 and 2), or None
        self.lost: str | None = None


def unavailable(path: str, exc: OSError) -> DaemonUnavailable:
    """Name the path and the reason: the two things a user can act on."""
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        reason = "no such socket" if exc.errno == errno.ENOENT else "connection refused"
        return DaemonUnavailable(f"no daemon listening at {path} ({reason}; is kmuxd running?)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return DaemonUnavailable(f"permission denied on {path} (is this user in the daemon's allowed groups?)")
    return DaemonUnavailable(f"cannot connect to {path}: {exc.strerror or exc}")


class ClientDriver:
    """The logic of one client; see the module docstring.

    ``send_lock``/``recv_lock``: the transport's locks (``release()`` and
    ``locked()`` are called directly). ``notify_progress()``: wake every
    :class:`WaitProgress`. ``clock()``: the transport's monotonic clock.
    """

    def __init__(self, settings: ClientSettings, *, send_lock: Any, recv_lock: Any,
                 notify_progress: Callable[[], None], clock: Callable[[], float]) -> None:
        s = settings
        self.settings = s
        self.receiving = s.receive
        self.core = ReconnectCore(s.policy) if s.policy is not None else None
        self.send_lock, self.recv_lock = send_lock, recv_lock
        self._notify_progress, self.clock = notify_progress, clock
        self.conn: _Conn | None = None
        self.last: _Conn | None = None  # the current or the latest connection
        #: The connection the fast lane may use (see "The fast lane"), or None.
        self.fast: _Conn | None = None
        #: Whether a transport that cannot block in a read should wait for
        #: readiness before its next one (see "The fast lane").
        self.wait_first = True
        self._probe_span = 1  # reads to wait first after the last read that found nothing
        self._probe_skip = 0  # of which this many are left
        #: Messages the fast lane received while a receive_off was under way:
        #: handed back by the next recv() (or ours if the connection is lost first).
        self._handbacks: deque[bytes] = deque()
        #: messages (bytes) and errors read from lost connections, for recv
        self.stash: deque[Any] = deque()
        self.pending: deque[BaseException] = deque()  # AccountingLost, raised once
        self.closed = False
        self.unknown_fate: list[UnknownFate] = []
        self._backoff: ReconnectBackoff | None = None
        self._next_attempt = 0.0
        self._progress_waiters = 0
        self._received = self._continued_sent = self._continued_received = 0
        self._stashed_errors = self._errors_dropped = 0

    # -- what the clients show ------------------------------------------------------------

    @property
    def session(self) -> ClientSession:
        """The current (or latest) connection's session."""
        conn = self.conn or self.last
        if conn is None:
            raise ClientClosed("the kmux client never connected")
        return conn.session

    @property
    def seq(self) -> int:
        return self.core.seq if self.core is not None else self.session.seq

    @property
    def connected(self) -> bool:
        return self.conn is not None and self.conn.lost is None and not self.closed

    def statistics(self) -> ClientStatistics:
        core = self.core
        return ClientStatistics(
            seq=self.seq if self.last is not None else 0,
            received=self._received,
            continued_sent=self._continued_sent,
            continued_received=self._continued_received + (self.conn.session.continued_received if self.conn else 0),
            stashed=len(self.stash),
            errors_dropped=self._errors_dropped,
            connected=self.connected,
            accepted_seq=core.accepted_seq if core else 0,
            reconnects=core.counters.reconnects if core else 0,
            resent=core.counters.resent if core else 0,
            buffered=core.buffered if core else 0,
            guaranteed=core.guaranteed if core else True,
        )

    @property
    def fast_link(self) -> Any:
        """The fast lane's link (for a transport's readiness wait), or None."""
        conn = self.fast
        return None if conn is None else conn.link

    def send_now(self, message: Any) -> int | None:
        """Send a small message on the fast lane with one ``send_packet``; its seq, or None: run :meth:`send`.

        The caller holds ``send_lock``, or knows no other sender can start
        until this returns (trio: no ``await`` in between). Raises
        BadFrame/MessageTooBig for a message the daemon would refuse. None
        sent nothing: the generator sends it and applies the rules to
        whatever failed.
        """
        conn = self.fast
        if conn is None or len(message) > CONCAT_MAX:
            return None
        session = conn.session
        session.check_data(message)
        link = conn.link
        try:
            link.send_packet(_DATA_PREFIX + message, link.send_flags)
        except OSError:
            return None
        if self.core is not None:
            return self.count_sent(conn, message)
        session.seq += 1  # count_sent, inline for a plain client: this runs per message
        self.wait_first = True
        return session.seq

    def receive_now(self, lock: Any, timeout: float | None, deadline: float | None = None,
                    waited: bool = False) -> Any:
        """The next message, read by the fast lane: one ``recv_into`` of the link per packet.

        The caller took ``lock`` (``recv_lock``) without waiting; it is
        released here, whatever happens (rule 4). The first read waits at
        most ``timeout`` seconds (None: as long as it takes; 0: not at all,
        and trio's links never wait), later ones (after a piece or an
        event) what is left until ``deadline`` on the clock. ``waited``: the
        caller waited for readiness just before (the hint's bookkeeping).
        Returns the message (bytes); :data:`EMPTY` when nothing came within
        the timeout; None when :meth:`recv` must run (no fast lane, a stash,
        a loss, a hand-back). Raises a notice's error as :meth:`recv` does.
        Pieces, events and markers read here are kept by the session as usual.
        """
        try:
            conn = self.fast
            if conn is None or self.stash or self._handbacks:
                return None
            session = conn.session
            if session.markers_pending and session.draining:
                return None
            link = conn.link
            recv_into = link.recv_into
            wait = timeout
            while True:
                try:
                    if wait is link.wait or wait == link.wait or link.set_wait(wait):  # `is`: None == None is a slow compare
                        try:
                            nbytes = recv_into(session.recv_buffer)
                        except BlockingIOError:
                            nbytes = None
                    else:
                        nbytes = link.recv_packet(session.recv_buffer, wait)
                except OSError as e:
                    if e.errno not in PEER_GONE:
                        raise
                    nbytes = 0
                if nbytes is None:
                    if timeout is not None and timeout == 0 and not waited:
                        self._read_missed()
                    return EMPTY
                if not nbytes:
                    self._mark_lost(conn, "peer gone")
                    return None
                if timeout is not None and timeout == 0:  # `is not None` first: compiled, a float compare
                    self._read_found(waited)
                try:  # _classify, inline: this runs per message
                    message = session.received(nbytes)
                except KmuxError as err:
                    raise self._translated(err) from None
                if type(message) is memoryview:
                    self._received += 1
                    return message.tobytes()  # the buffer is reused by the next receive
                if type(message) is HandBack:  # set_receive(False) in another thread or task meanwhile
                    self._handbacks.append(message.message.tobytes())
                    return None
                # A piece, an event or a marker: read on, within what is left (0: one more try).
                waited = False
                if deadline is not None:
                    wait = max(0.0, deadline - self.clock())
        finally:
            lock.release()
            if self._progress_waiters:
                self._notify_progress()

    def _read_missed(self) -> None:
        """A read without waiting found nothing: wait first for the next 2, 4, ... reads."""
        self._probe_span = min(2 * self._probe_span, PROBE_SPAN_MAX)
        self._probe_skip = self._probe_span
        self.wait_first = True

    def _read_found(self, waited: bool) -> None:
        """A read found a packet, with a readiness wait before it or not."""
        if not waited:
            self._probe_span, self._probe_skip, self.wait_first = 1, 0, False
        elif self._probe_skip:
            self._probe_skip -= 1
            self.wait_first = self._probe_skip > 0
        else:
            self.wait_first = False

    def count_sent(self, conn: _Conn, message: Any) -> int:
        """``message`` went out on ``conn``, whole: its seq (rule 5)."""
        session = conn.session
        session.seq += 1  # ClientSession.data_sent, inline: this runs per message
        self.wait_first = True  # the answer, if any, is hardly ever back already
        return session.seq if self.core is None else self.core.message_sent(message)

    def close(self) -> None:
        """Close at once; every later call raises ClientClosed. Not a generator: it never blocks."""
        self.closed = True
        self.fast = None
        conn = self.conn
        if conn is not None:
            conn.session.close()
            conn.link.kick()
            conn.link.close()

    # -- operations (generators; see the module docstring) ------------------------------------

    def open(self) -> Generator[Any, Any, Any]:
        """Connect: once (plain client), or within the reconnect policy."""
        if self.core is None:
            conn = yield from self._open_once(self.settings.timeout)
            self.conn = self.last = conn
            self._refresh_fast()
        else:
            yield from self._with_both_locks(None, self._establish(None))

    def send(self, message: Any) -> Generator[Any, Any, Any]:
        """Send one whole message; returns its seq."""
        while True:
            self._raise_if_unusable()
            seen = self.conn
            if seen is not None and seen.lost is None and not self._resending():
                seq = yield from self._locked(self.send_lock, None, self._send_new(seen, message))
                if seq is not None:
                    self._refresh_fast()
                    return seq
            yield from self._repair(seen, None)

    def recv(self, deadline: float | None) -> Generator[Any, Any, Any]:
        """Wait for one message; what lost connections left comes first."""
        while True:
            if self.stash:
                return self._unstash()
            self._raise_if_unusable()
            conn = self.conn
            if conn is None or conn.lost is not None or self._resending():
                yield from self._repair(conn, deadline)
                continue
            message = yield from self._locked(self.recv_lock, deadline, self._receive_current(conn, deadline))
            if message is not None:
                return message

    def flush(self, deadline: float | None) -> Generator[Any, Any, Any]:
        """Wait until the daemon has read every packet sent so far.

        A send returns once its packet is in the socket; the daemon reads it
        when it can place it (push-back: no connection up, or the group's
        queues full). Packets still unread when the client hangs up are
        dropped by the daemon, and counted (``dropped_unread``), so an app
        that must not lose its last messages flushes before it closes.
        What the daemon has read is accepted (written, or refused with a
        notice naming its seq). TimeoutError past ``deadline``; a daemon that
        ended the session meanwhile raises what ended it (plain client), or
        the reconnecting client re-sends by its accounting and flushes again.
        """
        delay = FLUSH_POLL_MIN
        while True:
            self._raise_if_unusable()
            conn = self.conn
            if conn is None or conn.lost is not None:
                yield from self._repair(conn, deadline)
                continue
            unread = conn.link.unread_bytes()
            if unread == 0:
                if not conn.link.hung_up():
                    return
                # The daemon closed its end: packets it had not read were dropped with it.
                self._mark_lost(conn, "the daemon closed the connection")
                continue
            now = self.clock()
            if deadline is not None and now >= deadline:
                raise TimeoutError(
                    f"the daemon has not read {unread} bytes of this client's packets yet "
                    "(it reads them once it can place them: no connection up, or the group's queues full)"
                )
            until = now + delay
            yield Sleep(until if deadline is None else min(until, deadline))
            delay = min(2 * delay, FLUSH_POLL_MAX)

    def set_receive(self, on: bool, deadline: float | None) -> Generator[Any, Any, Any]:
        """Switch receiving; turning it off returns once the daemon's marker arrived.

        Messages queued before the marker are handed back, by this call or by
        whichever thread or task is reading meanwhile (rule 4). A
        reconnecting client restores the choice on every new connection.
        """
        if not isinstance(on, bool):
            raise TypeError("on must be a bool")
        self._raise_if_unusable()
        self.receiving = on
        conn = self.conn
        if conn is None or conn.lost is not None:
            if self.core is None:
                yield from self._repair(conn, deadline)  # raises what ended the connection
            return  # the next hello carries it
        control = conn.session.receive_control(on)
        sent = yield from self._locked(self.send_lock, deadline, self._send_packet(conn, (control,)))
        try:
            while sent and conn.session.draining and self.conn is conn and conn.lost is None:
                if (yield TryAcquire(self.recv_lock)):
                    message = yield from self._holding(self.recv_lock, self._receive_one(conn, deadline))
                    if message is not None:  # another task switched receiving on meanwhile
                        self.stash.append(message)
                else:
                    self._progress_waiters += 1
                    try:
                        yield WaitProgress(lambda: self._marker_or_free(conn), deadline)
                    finally:
                        self._progress_waiters -= 1
        except TimeoutError:
            raise TimeoutError(
                "set_receive: no receive_off marker from kmuxd within the timeout; later recv calls finish the hand-back"
            ) from None
        if conn.lost is not None and self.core is None:
            yield from self._repair(conn, deadline)  # raises what ended the connection
        elif conn.lost is not None:
            yield from self._with_both_locks(deadline, self._losing(conn))  # the next call reconnects

    # -- locks (rule 4) ----------------------------------------------------------------------

    def _locked(self, lock: Any, deadline: float | None, body: Generator[Any, Any, Any], shield: bool = False) -> Generator[Any, Any, Any]:
        try:
            yield Acquire(lock, deadline, shield)
        except TimeoutError:
            raise TimeoutError("timed out waiting for another thread or task using this kmux client") from None
        return (yield from self._holding(lock, body))

    def _holding(self, lock: Any, body: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
        try:
            return (yield from body)
        finally:
            self.release(lock)

    def release(self, lock: Any) -> None:
        """Release one of the driver's locks; after ``recv_lock``, waiters re-check (rule 4)."""
        lock.release()
        if lock is self.recv_lock and self._progress_waiters:
            self._notify_progress()

    def _with_both_locks(self, deadline: float | None, body: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
        return self._locked(self.recv_lock, deadline, self._locked(self.send_lock, deadline, body))

    def _marker_or_free(self, conn: _Conn) -> bool:
        return not conn.session.draining or self.conn is not conn or conn.lost is not None or not self.recv_lock.locked()

    # -- sending -------------------------------------------------------------------------------

    def _send_new(self, conn: _Conn, message: Any) -> Generator[Any, Any, Any]:
        """send_lock held. The seq, or None if the connection turned out unusable."""
        if self.conn is not conn or conn.lost is not None or self._resending():
            return None
        conn.session.check_data(message)
        if (yield from self._send_message(conn, message)):
            return self.count_sent(conn, message)
        return None

    def _send_packet(self, conn: _Conn, parts: tuple[Any, ...], shield: bool = False) -> Generator[Any, Any, Any]:
        """send_lock held. True if sent; False if the peer is gone (rule 1)."""
        try:
            yield Send(conn.link, parts, None, shield)
        except OSError as e:
            if e.errno not in PEER_GONE:
                raise
            self._mark_lost(conn, "peer gone")
            return False
        return True

    def _send_message(self, conn: _Conn, message: Any, requeue: bool = False, shield: bool = False) -> Generator[Any, Any, Any]:
        """send_lock held: every packet of one message (rules 2 and 6). True if sent, False if the peer is gone."""
        session = conn.session
        packets = session.packets(message, requeue)
        done = 0
        resized = False
        try:
            while done < len(packets):
                try:
                    if not (yield from self._send_packet(conn, packets[done], shield)):
                        return False
                except OSError as e:
                    if e.errno != errno.EMSGSIZE:
                        raise
                    if done or resized:
                        raise self._too_big(session, message, packets[done]) from None
                    resized = True
                    session.max_packet = yield SizeSendBuffer(conn.link, session.accepted.max_message + 1)  # type: ignore[union-attr]
                    packets = session.packets(message, requeue)
                    continue
                done += 1
        except BaseException:
            if done:
                self._mark_lost(conn, _CUT_SHORT)
                conn.link.kick()
            raise
        if done > 1:
            self._continued_sent += 1
        return True

    @staticmethod
    def _too_big(session: ClientSession, message: Any, parts: tuple[Any, ...]) -> MessageTooBig:
        size = sum(len(p) for p in parts)
        return MessageTooBig(
            f"a {size}-byte packet of a {len(message)}-byte message did not fit this socket's send buffer, "
            f"sized for packets of {session.max_packet} bytes (was SO_SNDBUF lowered?)"
        )

    # -- receiving -----------------------------------------------------------------------------

    def _receive_current(self, conn: _Conn, deadline: float | None) -> Generator[Any, Any, Any]:
        """recv_lock held: one packet; the message to return, or None."""
        if self._handbacks and self.conn is conn and conn.lost is None:
            yield from self._hand_back_pending(conn)
        if self.stash or self.conn is not conn or conn.lost is not None:
            return None
        message = yield from self._receive_one(conn, deadline)
        if message is not None:
            self._received += 1
        return message

    def _receive_one(self, conn: _Conn, deadline: float | None) -> Generator[Any, Any, Any]:
        """recv_lock held: receive one packet and act on it (hand back, lose). The message (bytes), or None."""
        session = conn.session
        try:
            got = yield Recv(conn.link, session.recv_buffer, deadline)
        except TimeoutError:
            raise TimeoutError(NO_MESSAGE) from None
        except OSError as e:
            if e.errno not in PEER_GONE:
                raise
            got = None
        if not got:
            self._mark_lost(conn, "peer gone")
            yield from self._locked(self.send_lock, None, self._losing(conn))
            return None
        event = self._classify(conn, got)
        if type(event) is memoryview:
            return event.tobytes()  # the buffer is reused by the next receive
        if type(event) is HandBack:
            sent = yield from self._locked(
                self.send_lock, None, self._send_message(conn, event.message, requeue=True, shield=True), shield=True
            )
            if not sent:
                self.stash.append(bytes(event.message))  # the daemon is gone: the message stays ours
        return None

    def _hand_back_pending(self, conn: _Conn) -> Generator[Any, Any, Any]:
        """recv_lock held: hand back what the fast lane received during a receive_off."""
        while self._handbacks:
            message = self._handbacks[0]
            sent = yield from self._locked(
                self.send_lock, None, self._send_message(conn, message, requeue=True, shield=True), shield=True
            )
            self._handbacks.popleft()
            if not sent:
                self.stash.append(message)  # the daemon is gone: the message stays ours

    def _classify(self, conn: _Conn, nbytes: int) -> Any:
        """The session's verdict on a packet just received; a notice's error raises, translated.
        (:meth:`receive_now` has the same lines inline.)"""
        try:
            return conn.session.received(nbytes)
        except KmuxError as err:
            raise self._translated(err) from None

    def _translated(self, err: KmuxError) -> KmuxError:
        """A notice's error, with the message seq (rule: a named message is settled)."""
        if self.core is not None:
            translate_seq(err, self.core)
            if isinstance(err.seq, int):
                self.core.settle(err.seq)
        return err

    def _unstash(self) -> Any:
        item = self.stash.popleft()
        if isinstance(item, BaseException):
            self._stashed_errors -= 1
            raise item
        self._received += 1
        return item

    def _stash_error(self, err: KmuxError) -> None:
        if self._stashed_errors >= STASHED_ERRORS_MAX:
            oldest = next(item for item in self.stash if isinstance(item, BaseException))
            self.stash.remove(oldest)
            self._stashed_errors -= 1
            self._errors_dropped += 1
        self.stash.append(err)
        self._stashed_errors += 1

    # -- losing and replacing the connection (rule 3) ----------------------------------------------

    def _mark_lost(self, conn: _Conn, why: str) -> None:
        conn.lost = conn.lost or why
        if self.fast is conn:
            self.fast = None

    def _refresh_fast(self) -> None:
        conn = self.conn
        ok = conn is not None and conn.lost is None and not (self.pending or self.closed or self._resending())
        self.fast = conn if ok else None

    def _raise_if_unusable(self) -> None:
        if self.closed:
            raise ClientClosed("the kmux client is closed")
        if self.pending:
            raise self.pending.popleft()

    def _resending(self) -> bool:
        return self.core is not None and bool(self.core.resend_queue)

    def _repair(self, seen: _Conn | None, deadline: float | None) -> Generator[Any, Any, Any]:
        """No lock held: lose ``seen`` if it is lost, then reconnect (or raise what ended it)."""
        yield from self._with_both_locks(deadline, self._repair_locked(seen, deadline))

    def _repair_locked(self, seen: _Conn | None, deadline: float | None) -> Generator[Any, Any, Any]:
        if seen is not None and seen.lost is not None:
            self._lose(seen)
        if self.closed:
            raise ClientClosed("the kmux client is closed")
        if self.core is None:
            if self.conn is None:
                raise self.session.closed_error()
            return
        yield from self._establish(deadline)  # AccountingLost (pending) is raised after it

    def _losing(self, conn: _Conn) -> Generator[Any, Any, Any]:
        """:meth:`_lose` as the body of :meth:`_locked`."""
        self._lose(conn)
        yield from ()

    def _lose(self, conn: _Conn) -> None:
        """Both locks held: drain, close and account for ``conn`` (once). Never blocks."""
        if self.conn is not conn:
            return
        self.conn = self.fast = None
        session = conn.session
        while self._handbacks:  # too late to hand them back: they are ours
            self.stash.append(self._handbacks.popleft())
        try:
            conn.link.kick()  # the daemon stops sending; what it sent stays readable
            self._drain(conn)
        finally:
            conn.link.close()
        self._continued_received += session.continued_received
        accepted = session.shutdown_accepted
        if conn.lost == _CUT_SHORT:
            session.close(ClientClosed, f"{_CUT_SHORT}; connect again")
        else:
            session.eof()
        if self.core is not None:
            recovery = self.core.connection_lost(accepted)
            if recovery.unknown is not None:
                self.unknown_fate.append(recovery.unknown)
            if recovery.lost is not None:
                self.pending.append(recovery.lost)

    def _drain(self, conn: _Conn) -> None:
        """Stash what a lost connection's socket still holds, without waiting."""
        session = conn.session
        resets = 0
        while session.state is State.READY:
            try:
                got = conn.link.recv_nowait(session.recv_buffer)
            except OSError as e:
                if e.errno in (errno.ECONNRESET, errno.EPIPE) and resets < DRAIN_RESETS_MAX:
                    resets += 1
                    continue
                return
            if not got:
                return
            try:
                event = session.received(got)
            except KmuxError as err:
                self._stash_error(self._translated(err))
                continue
            if type(event) is HandBack:
                event = event.message  # too late to hand it back: it is ours
            if type(event) is memoryview:
                self.stash.append(bytes(event))

    def _open_once(self, timeout: float | None) -> Generator[Any, Any, Any]:
        """One connection: connect, hello, answer, size the send buffer."""
        s = self.settings
        session = ClientSession(s.group, receive=self.receiving, name=s.name, validate=s.validate)
        deadline = None if timeout is None else self.clock() + timeout
        try:
            link = yield Connect(s.path, deadline)
        except TimeoutError:
            raise TimeoutError(f"kmuxd at {s.path} did not accept the connection within {timeout} s") from None
        except OSError as e:
            raise unavailable(s.path, e) from None
        try:
            yield Send(link, (session.hello_packet(),), deadline)
            accepted = session.answered((yield Recv(link, session.answer_buffer, deadline)))
            session.max_packet = yield SizeSendBuffer(link, accepted.max_message + 1)
            if session.max_packet <= CONCAT_MAX:  # the fast paths rely on it; the kernel's minimum is larger
                raise InternalError(f"a socket that takes packets of only {session.max_packet} bytes")
            if s.require_up and not accepted.up:
                raise GroupUnavailable(f"group {s.group!r} has no TCP connection up (connect(require_up=True))")
        except TimeoutError:
            link.close()
            raise TimeoutError(f"kmuxd at {s.path} did not answer the hello within {timeout} s") from None
        except OSError as e:
            link.close()
            if e.errno in PEER_GONE:
                raise session.eof() from None
            raise
        except BaseException:
            link.close()
            raise
        return _Conn(link, session)

    def _establish(self, deadline: float | None) -> Generator[Any, Any, Any]:
        """Both locks held: connect (with back-off) until connected, then re-send the queue."""
        core = self.core
        assert core is not None
        while True:
            while self.conn is None:
                if self.closed:
                    raise ClientClosed("the kmux client is closed")
                now = self.clock()
                if self._backoff is None:
                    self._backoff = ReconnectBackoff(core.policy, now)
                    self._next_attempt = now
                if self._next_attempt > now:
                    if deadline is not None and self._next_attempt > deadline:
                        yield Sleep(deadline)
                        raise TimeoutError("no connection to kmuxd within the timeout (still reconnecting)")
                    yield Sleep(self._next_attempt)
                timeout = self.settings.timeout
                if deadline is not None:
                    left = max(0.001, deadline - self.clock())
                    timeout = left if timeout is None else min(timeout, left)
                try:
                    conn = yield from self._open_once(timeout)
                except Exception as exc:
                    if not is_retryable(exc):
                        raise
                    delay = self._backoff.failed(self.clock())
                    if delay is None:
                        b, self._backoff = self._backoff, None
                        cls = GroupUnavailable if isinstance(exc, GroupUnavailable) else DaemonUnavailable
                        raise cls(
                            f"gave up reconnecting to kmuxd at {self.settings.path} after {b.failures} attempt(s) "
                            f"in {self.clock() - b.started:.1f} s: {exc}"
                        ) from exc
                    self._next_attempt = self.clock() + delay
                    continue
                self._backoff = None
                core.connected()
                self.conn = self.last = conn
            if (yield from self._resend(self.conn)):
                self._refresh_fast()
                return

    def _resend(self, conn: _Conn) -> Generator[Any, Any, Any]:
        """Both locks held: the queued re-sends go first. False if the connection was lost meanwhile."""
        core = self.core
        assert core is not None
        while (message := core.next_resend()) is not None:
            if not (yield from self._send_message(conn, message)):
                self._lose(conn)
                return False
            conn.session.data_sent()
            core.resent_one()
        return True
