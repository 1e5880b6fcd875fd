"""The requests a ClientDriver makes of its transport, and how a transport answers them.

The driver (:mod:`kmux._driver`) yields one of these for everything that may
block; the transport performs it and sends back the result, or throws in
the exception it raised. A transport is an object with one method per
request, named by the request's ``method``; :func:`dispatch_table` maps the
request types to those methods once, so running a request costs a dict
lookup and a call.

Contract, for every transport:

* A request that raised did not happen. In particular a :class:`Send` that
  raises (an ``OSError``, a timeout, a cancellation) sent nothing: SEQPACKET
  sends are atomic, and the transports never give up on a send half done.
* ``deadline`` is a time on the transport's clock (``time.monotonic`` or
  ``trio.current_time``); past it the request raises a bare TimeoutError,
  which the driver words. None waits as long as it takes.
* ``shield``: the request must not be cancelled (trio); the blocking
  transport has nothing to shield.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = [
    "Connect",
    "Send",
    "Recv",
    "SizeSendBuffer",
    "Acquire",
    "TryAcquire",
    "WaitProgress",
    "Sleep",
    "REQUESTS",
    "dispatch_table",
]


class Connect:
    """Open a socket to ``path`` (``deadline``: TimeoutError); returns the transport's link."""

    method = "connect"
    __slots__ = ("path", "deadline")

    def __init__(self, path: str, deadline: float | None) -> None:
        self.path, self.deadline = path, deadline


class Send:
    """Send one packet (``parts``: buffers gathered by one ``sendmsg``); blocks for room.

    Raises OSError; if it raises, nothing was sent. ``shield``: not cancellable.
    """

    method = "send"
    __slots__ = ("link", "parts", "deadline", "shield")

    def __init__(self, link: Any, parts: tuple[Any, ...], deadline: float | None, shield: bool = False) -> None:
        self.link, self.parts, self.deadline, self.shield = link, parts, deadline, shield


class Recv:
    """Wait for one packet and receive it into ``buffer`` (kind byte first); returns ``(nbytes, truncated)``."""

    method = "recv"
    __slots__ = ("link", "buffer", "deadline")

    def __init__(self, link: Any, buffer: Any, deadline: float | None) -> None:
        self.link, self.buffer, self.deadline = link, buffer, deadline


class SizeSendBuffer:
    """``kmux.sockbuf.size_send_buffer(link's socket, want)``: returns the largest packet it takes."""

    method = "size_send_buffer"
    __slots__ = ("link", "want")

    def __init__(self, link: Any, want: int) -> None:
        self.link, self.want = link, want


class Acquire:
    """Take ``lock`` (one the transport gave the driver); TimeoutError at ``deadline``."""

    method = "acquire"
    __slots__ = ("lock", "deadline", "shield")

    def __init__(self, lock: Any, deadline: float | None, shield: bool = False) -> None:
        self.lock, self.deadline, self.shield = lock, deadline, shield


class TryAcquire:
    """Take ``lock`` if it is free; returns whether it was taken."""

    method = "try_acquire"
    __slots__ = ("lock",)

    def __init__(self, lock: Any) -> None:
        self.lock = lock


class WaitProgress:
    """Wait until ``done()`` is true, re-checking it at each progress notification; TimeoutError at ``deadline``."""

    method = "wait_progress"
    __slots__ = ("done", "deadline")

    def __init__(self, done: Callable[[], bool], deadline: float | None) -> None:
        self.done, self.deadline = done, deadline


class Sleep:
    """Sleep until the clock reads ``until``."""

    method = "sleep"
    __slots__ = ("until",)

    def __init__(self, until: float) -> None:
        self.until = until


#: Every request type, in the order of the module.
REQUESTS: tuple[type, ...] = (Connect, Send, Recv, SizeSendBuffer, Acquire, TryAcquire, WaitProgress, Sleep)


def dispatch_table(transport: Any) -> dict[type, Callable[[Any], Any]]:
    """``{request type: transport.<request.method>}`` for a transport's runner."""
    return {cls: getattr(transport, cls.method) for cls in REQUESTS}
