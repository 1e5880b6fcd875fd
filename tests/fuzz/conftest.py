"""Counts the examples each fuzz target really ran, and prints them with the time taken.

Hypothesis exposes the function it calls once per example as
``test.hypothesis.inner_test`` and lets plugins replace it; the wrapper here
counts the calls that returned (an example rejected by ``assume`` or a
failing one is not counted). The table at the end of the run is what
``docs/fuzzing.md`` quotes.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest

from .profiles import PROFILE, fuzz_settings

_HERE = Path(__file__).parent
_examples: dict[str, int] = {}
_seconds: dict[str, float] = {}


def _counting(nodeid: str, inner):
    @functools.wraps(inner)
    def counted(*args, **kwargs):
        result = inner(*args, **kwargs)
        _examples[nodeid] += 1
        return result

    return counted


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        handle = getattr(getattr(item, "obj", None), "hypothesis", None)
        if handle is None or _HERE not in Path(item.path).parents:
            continue
        _examples[item.nodeid] = 0
        handle.inner_test = _counting(item.nodeid, handle.inner_test)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    t0 = time.perf_counter()
    yield
    if item.nodeid in _examples:
        _seconds[item.nodeid] = time.perf_counter() - t0
        if PROFILE != "ci":
            # A long run prints each target as it ends, so a run cut short keeps what it did.
            reporter = item.config.pluginmanager.get_plugin("terminalreporter")
            reporter.write_line(f"fuzz: {_name(item.nodeid)}: {_examples[item.nodeid]:,} examples, "
                                f"{_seconds[item.nodeid]:.1f} s")


def _name(nodeid: str) -> str:
    return nodeid.split("::", 1)[1]


def pytest_terminal_summary(terminalreporter) -> None:
    ran = [n for n in _examples if n in _seconds]
    if not ran:
        return
    write = terminalreporter.write_line
    width = max(len(_name(n)) for n in ran)
    write("")
    write(f"fuzz targets (profile {PROFILE}, max_examples={fuzz_settings.max_examples})")
    write(f"  {'target':<{width}}  {'examples':>10}  {'seconds':>8}")
    for nodeid in ran:
        write(f"  {_name(nodeid):<{width}}  {_examples[nodeid]:>10,}  {_seconds[nodeid]:>8.1f}")
    write(f"  {'all':<{width}}  {sum(_examples[n] for n in ran):>10,}  {sum(_seconds.values()):>8.1f}")
