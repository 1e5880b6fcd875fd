"""Fixtures for the I/O shell's unit tests: worlds built and torn down per test."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from .world import World


@pytest.fixture
def world_factory() -> Iterator[Callable[..., World]]:
    """``world_factory(**group_settings)``: a fresh :class:`World`, closed after the test."""
    worlds: list[World] = []

    def make(**kw: Any) -> World:
        w = World(**kw)
        worlds.append(w)
        return w

    yield make
    for w in worlds:
        w.close()
