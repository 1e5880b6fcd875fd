"""The integration tests' TCP server: records every frame per connection, echoes on request, misbehaves on cue.

Theory of operation
-------------------
:class:`RecordingBackend` is one listener on 127.0.0.1 (port 0 by
default, or a fixed port an outage test brings back) served by its own
:class:`~.loop.Loop` thread. Each connection cuts its byte stream into
frames (u32be unless told otherwise) and hands every whole one to
``summarize``; the summaries are recorded in arrival order with the
connection they came on. ``echo`` (True, or a predicate) writes frames
back on their connection. A test can stop reading (every connection, new
ones too), push raw bytes on a connection and close connections with a FIN
or a reset.

Every socket is touched only by the loop's thread: the methods here run
their work there (:meth:`Loop.call`) and return copies, so a test thread
never races the server. Frames that break the framing stop the recording
of that connection (``parse_error``); it is still drained.

Bounds: every wait has a timeout (an AssertionError names what did not
happen); a frame is at most ``max_frame`` bytes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from kmux.framing import Framing

from .loop import U32BE, Conn, Loop
from .protocols import Recording

__all__ = ["RecordingBackend", "ConnInfo", "wait_until"]


@dataclass(frozen=True)
class ConnInfo:
    id: int
    open: bool
    opened_at: float
    closed_at: float | None
    #: why it closed: "eof" (peer FIN), "reset"/"error: ..." (peer RST), "killed"/"closed" (by us),
    #: "shutdown" (the backend closed)
    close_reason: str | None
    frames: int
    buffered: int  # bytes of an incomplete frame held now (or at close)
    pending_out: int  # bytes queued to send, not yet taken by the kernel
    parse_error: str | None


def wait_until(pred: Callable[[], Any], timeout: float, what: str = "condition", interval: float = 0.01) -> Any:
    """Poll ``pred`` until it returns something truthy; AssertionError naming ``what`` after ``timeout`` s.

    The tests' one bounded wait (``tests/integration/helpers.py`` and ``tests/systemd`` use it too).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RecordingBackend:
    """A TCP server on 127.0.0.1 that records frames per connection (module docstring).

    ``echo``: False, True (every frame), or a predicate choosing the frames to echo.
    ``read_pause``: seconds each connection waits after each read before the next (a slow
    server; with a small ``rcvbuf``, each read takes at most that many bytes).
    ``summarize``: what is recorded of each frame (the frame itself by default).
    """

    def __init__(
        self,
        *,
        echo: bool | Callable[[bytes], bool] = False,
        max_frame: int = 1 << 24,
        rcvbuf: int | None = None,
        sndbuf: int | None = None,
        read_pause: float = 0.0,
        summarize: Callable[[bytes], Any] | None = None,
        port: int = 0,
        framing: Framing = U32BE,
    ) -> None:
        self.echo = echo
        self.max_frame = max_frame
        self.sndbuf = sndbuf
        self.read_pause = read_pause
        self.summarize = summarize or (lambda frame: frame)
        self._lock = threading.Lock()
        self._records: list[tuple[int, Any]] = []
        self._record_ids: dict[int, list[int]] = {}  # conn id -> indexes into _records
        self._ids: dict[int, int] = {}  # loop's conn number -> this server's conn id (from 1)
        self._numbers: dict[int, int] = {}  # and back
        self._paused = False
        self._loop = Loop()
        # port: a fixed port brings a server back where a group expects it (outage tests).
        self._listener = self._loop.listen(self._protocol, port=port, framing=framing, max_message=max_frame,
                                           rcvbuf=rcvbuf, sndbuf=sndbuf)
        self.port = self._listener.port
        self._loop.start(name=f"backend:{self.port}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- in the loop's thread -------------------------------------------------------------

    def _protocol(self, conn: Conn) -> Recording:
        cid = len(self._ids) + 1
        with self._lock:
            self._ids[conn.number] = cid
            self._numbers[cid] = conn.number
            self._record_ids[cid] = []
        conn.read_pause = self.read_pause
        if self._paused:
            conn.reading = False
        echo = None if not self.echo else (self.echo if callable(self.echo) else (lambda frame: True))
        return Recording(conn, self._record, echo)

    def _record(self, conn: Conn, frame: bytes) -> None:
        summary = self.summarize(frame)
        cid = self._ids[conn.number]
        with self._lock:
            self._record_ids[cid].append(len(self._records))
            self._records.append((cid, summary))

    def _conn(self, conn_id: int) -> Conn:
        return self._loop.conns[self._numbers[conn_id]]

    def _info(self, c: Conn) -> ConnInfo:
        cid = self._ids[c.number]
        with self._lock:
            frames = len(self._record_ids[cid])
        return ConnInfo(id=cid, open=c.open, opened_at=c.opened_at, closed_at=c.closed_at,
                        close_reason=c.close_reason, frames=frames, buffered=c.buffered, pending_out=len(c.out),
                        parse_error=c.parse_error)

    # -- for the test's threads -----------------------------------------------------------

    def records(self, conn: int | None = None) -> list[tuple[int, Any]]:
        """``(conn_id, record)`` of every frame, in arrival order (per connection)."""
        self._loop.check()
        with self._lock:
            if conn is None:
                return list(self._records)
            return [self._records[i] for i in self._record_ids[conn]]

    def count(self) -> int:
        self._loop.check()
        with self._lock:
            return len(self._records)

    def conns(self) -> list[ConnInfo]:
        return self._loop.call(lambda: [self._info(c) for c in self._loop.conns.values()])

    def conn(self, conn_id: int) -> ConnInfo:
        return self._loop.call(lambda: self._info(self._conn(conn_id)))

    def open_ids(self) -> list[int]:
        return [c.id for c in self.conns() if c.open]

    def peer_port(self, conn_id: int) -> int:
        """The daemon's end (local port) of a connection: a connection record's ``local`` port."""
        return self._loop.call(lambda: self._conn(conn_id).peer[1])

    def open_by_port(self) -> dict[int, int]:
        """``{daemon-side port: conn id}`` of the open connections."""
        return self._loop.call(lambda: {c.peer[1]: self._ids[c.number] for c in self._listener.conns.values()})

    def wait_open(self, n: int, timeout: float = 10.0) -> list[int]:
        """Wait until exactly ``n`` connections are open; returns their ids."""
        return wait_until(lambda: (ids := self.open_ids()) and len(ids) == n and ids, timeout, f"{n} open connections")

    def wait_count(self, n: int, timeout: float = 20.0) -> None:
        wait_until(lambda: self.count() >= n, timeout, f"{n} frames at the backend (have {self.count()})")

    def pause(self) -> None:
        """Stop reading every connection (new ones too) until :meth:`resume`."""
        def run() -> None:
            self._paused = True
            for c in self._listener.conns.values():
                c.pause_reading()

        self._loop.call(run)

    def resume(self) -> None:
        def run() -> None:
            self._paused = False
            for c in self._listener.conns.values():
                c.resume_reading()

        self._loop.call(run)

    def send(self, conn_id: int, data: bytes) -> None:
        """Queue raw bytes to send on a connection (written as the kernel takes them)."""
        def run() -> None:
            c = self._conn(conn_id)
            if not c.open:
                raise AssertionError(f"backend conn {conn_id} is closed")
            c.send(data)

        self._loop.call(run)

    def kill(self, conn_ids: list[int] | None = None, *, rst: bool = True) -> list[int]:
        """Close connections (all open ones by default); ``rst`` sends a reset (SO_LINGER 0)."""
        def run() -> list[int]:
            ids = [self._ids[n] for n in self._listener.conns] if conn_ids is None else conn_ids
            for i in ids:
                self._conn(i).close("rst" if rst else "close", reason="killed" if rst else "closed")
            return ids

        return self._loop.call(run)

    def close(self) -> None:
        """Stop the thread, close every socket (idempotent)."""
        self._loop.close()
