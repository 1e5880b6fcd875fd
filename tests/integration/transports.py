"""One scenario, both transports: the ``transport`` fixture.

A scenario is an async test. It connects through ``transport.connect(...)``
and gets an :class:`AsyncClient` whatever the transport:

* ``sync``: a real blocking :class:`kmux.Client`; every call runs in a
  worker thread (``trio.to_thread``), so the blocking client does exactly
  what it does in an app, while the test stays one piece of trio code;
* ``trio``: a real :class:`kmux.trio.TrioClient`, awaited directly.

``recv(timeout)`` raises TimeoutError on both. ``client.raw`` is the real
client object (its properties, ``statistics()``, ``fileno()``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import pytest
import trio

import kmux
import kmux.trio

#: Bound of every wait in a scenario, seconds.
WAIT = 10.0


class AsyncClient:
    """The calls a scenario makes, the same for both transports."""

    def __init__(self, raw: Any, transport: str) -> None:
        self.raw = raw
        self.transport = transport

    async def _call(self, name: str, *args: Any) -> Any:
        method = getattr(self.raw, name)
        if self.transport == "trio":
            return await method(*args)
        return await trio.to_thread.run_sync(functools.partial(method, *args))

    async def send(self, message: bytes) -> int:
        return await self._call("send", message)

    async def recv(self, timeout: float = WAIT) -> bytes:
        if self.transport == "sync":
            return await self._call("recv", timeout)
        try:
            with trio.fail_after(timeout):
                return await self.raw.recv()
        except trio.TooSlowError:
            raise TimeoutError("no message within the timeout") from None

    async def set_receive(self, on: bool) -> None:
        if self.transport == "sync":
            return await self._call("set_receive", on, WAIT)
        with trio.fail_after(WAIT):
            await self.raw.set_receive(on)

    async def close(self) -> None:
        if self.transport == "sync":
            self.raw.close()
        else:
            await self.raw.aclose()


class Transport:
    """Connects clients of one transport (``sync`` or ``trio``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.clients: list[AsyncClient] = []

    async def connect(self, group: str, path: str, **kw: Any) -> AsyncClient:
        kw.setdefault("timeout", 5.0)
        if self.name == "trio":
            raw = await kmux.trio.connect(group, path, **kw)
        else:
            raw = await trio.to_thread.run_sync(functools.partial(kmux.connect, group, path, **kw))
        client = AsyncClient(raw, self.name)
        self.clients.append(client)
        return client

    async def close_all(self) -> None:
        for c in self.clients:
            await c.close()


@pytest.fixture(params=["sync", "trio"])
async def transport(request: pytest.FixtureRequest) -> Transport:
    t = Transport(request.param)
    try:
        yield t
    finally:
        await t.close_all()


async def until(pred: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll ``pred`` (a cheap, non-blocking check) until it is truthy; AssertionError after ``timeout``."""
    with trio.move_on_after(timeout):
        while not (value := pred()):
            await trio.sleep(0.005)
        return value
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
