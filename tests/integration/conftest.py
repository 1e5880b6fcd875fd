"""Fixtures for the integration suite: real backends, a real kmuxd subprocess.

``backend_factory(**kw)`` starts a :class:`~tests.integration.helpers.Backend`
(closed at teardown). ``daemon_factory(groups=..., **daemon_settings)``
writes a TOML config into a short private directory under /tmp (Unix socket
paths must stay under 108 bytes), starts ``kmuxd --config`` (under
``prefix``, e.g. ``ip netns exec NAME``, if given) and waits for its
``ready`` line; teardown sends SIGTERM, waits 10 s, then kills.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest

from .helpers import Backend, Daemon, write_config
from .reqresp import Fault, FaultServer


@pytest.fixture
def short_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="kmx-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def backend_factory() -> Callable[..., Backend]:
    started: list[Backend] = []

    def start(**kw: Any) -> Backend:
        b = Backend(**kw)
        started.append(b)
        return b

    try:
        yield start
    finally:
        for b in started:
            b.close()


@pytest.fixture
def daemon_factory(short_dir: Path) -> Callable[..., Daemon]:
    started: list[Daemon] = []

    def start(groups: dict[str, dict[str, Any]], *, name: str = "kmuxd", prefix: list[str] | None = None,
              **daemon: Any) -> Daemon:
        settings = {"socket": str(short_dir / f"{name}.sock"), "log_format": "json", "log_level": "info"}
        settings.update(daemon)
        config = write_config(short_dir / f"{name}.toml", settings, groups)
        d = Daemon(config, settings["socket"], next(iter(groups)), prefix)
        started.append(d)
        return d.start()

    try:
        yield start
    finally:
        for d in started:
            d.stop()



@pytest.fixture
def refusing_port() -> int:
    """A loopback port bound but not listening: every dial to it is refused (ECONNREFUSED).
    Bound with SO_REUSEADDR, so a server may listen there later (``Backend(port=...)``),
    and the port refuses again when that server closes."""
    import socket

    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.fixture
def fault_servers() -> Callable[..., FaultServer]:
    """``fault_servers(plan)`` starts a :class:`~tests.integration.reqresp.FaultServer`
    (``plan(n)``: what its n-th connection does); all closed at teardown."""
    started: list[FaultServer] = []

    def start(plan: Callable[[int], Fault | None] = lambda n: None) -> FaultServer:
        s = FaultServer(plan)
        started.append(s)
        return s

    try:
        yield start
    finally:
        for s in started:
            s.close()
