"""Human units and aligned tables for ``kmux-cli``.

Kept apart from the CLI so the formatting rules (the part people read and
argue about) can be tested without a daemon or a socket. Everything here is
pure: numbers in, strings out. A value that is missing or ``None`` always
renders as ``-``, because the daemon may be older or newer than the CLI and
records only ever gain keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

__all__ = [
    "MISSING",
    "fmt_count",
    "fmt_bytes",
    "fmt_duration",
    "fmt_us",
    "fmt_rate",
    "fmt_byte_rate",
    "fmt_plain",
    "fmt_text",
    "Column",
    "render_table",
    "RateTracker",
]

#: What any absent or unknown value is shown as.
MISSING = "-"


def _number(value: Any) -> float | None:
    """The value as a finite number, or None; bools and strings are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _scaled(value: float, base: float, units: list[str]) -> tuple[float, str]:
    """Divide by ``base`` until the value fits, promoting when rounding would show 1000 (or 1024)."""
    i = 0
    while i < len(units) - 1 and round(abs(value), 1) >= base:
        value /= base
        i += 1
    return value, units[i]


def fmt_count(value: Any) -> str:
    """Counts: ``999``, ``1.2k``, ``12.3k``, ``123k``, ``3.4M``, ``5.6G``, ``7.8T`` (powers of 1000)."""
    n = _number(value)
    if n is None:
        return MISSING
    if abs(n) < 1000:
        return str(int(n)) if float(n).is_integer() else f"{n:.1f}"
    v, unit = _scaled(float(n), 1000.0, ["", "k", "M", "G", "T", "P"])
    if abs(v) < 99.95:
        return f"{v:.1f}{unit}"
    return f"{v:.0f}{unit}"


def fmt_bytes(value: Any) -> str:
    """Bytes: ``512 B``, ``1.5 KiB``, ``3.4 MiB`` (powers of 1024, IEC names as ``ss``/``ip -h`` do)."""
    n = _number(value)
    if n is None:
        return MISSING
    if abs(n) < 1024:
        return f"{int(n)} B" if float(n).is_integer() else f"{n:.1f} B"
    v, unit = _scaled(float(n), 1024.0, ["B", "KiB", "MiB", "GiB", "TiB", "PiB"])
    return f"{v:.1f} {unit}"


def fmt_duration(seconds: Any) -> str:
    """Durations: ``0s``, ``850µs``, ``12.3ms``, ``4.2s``, ``3m12s``, ``2h05m``, ``3d04h``.

    Three significant digits at most below a minute (enough to compare RTTs),
    two units above it (``ps`` style), since nobody reads uptime to the ms.
    """
    s = _number(seconds)
    if s is None:
        return MISSING
    if s < 0:
        return "-" + fmt_duration(-s)
    if s == 0:
        return "0s"
    if s < 1e-3:
        us = s * 1e6
        if us < 9.95 and not float(us).is_integer():
            return f"{us:.1f}µs"
        return f"{us:.0f}µs"
    if s < 1.0:
        ms = s * 1e3
        if ms < 9.995:
            return f"{ms:.2f}ms"
        return f"{ms:.1f}ms" if ms < 99.95 else f"{ms:.0f}ms"
    if s < 60:
        return f"{s:.1f}s" if s < 59.95 else "1m00s"
    total = int(s)
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


def fmt_us(microseconds: Any) -> str:
    """A duration given in microseconds (TCP_INFO and latency fields are)."""
    us = _number(microseconds)
    return MISSING if us is None else fmt_duration(us / 1e6)


def fmt_rate(per_second: Any) -> str:
    """Messages (or any count) per second: ``0/s``, ``850/s``, ``1.2k/s``."""
    r = _number(per_second)
    return MISSING if r is None else fmt_count(round(r) if abs(r) >= 10 else round(r, 1)) + "/s"


def fmt_byte_rate(per_second: Any) -> str:
    """Bytes per second: ``512 B/s``, ``3.4 MiB/s``."""
    r = _number(per_second)
    return MISSING if r is None else fmt_bytes(round(r)) + "/s"


def fmt_plain(value: Any) -> str:
    """Anything else: strings as they are, bools as yes/no, lists comma-joined, None as ``-``."""
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(fmt_plain(v) for v in value) or MISSING
    return str(value)


def fmt_text(value: Any, width: int | None = None) -> str:
    """A string someone else chose (a client's name, its comm): safe to print, at most ``width`` wide.

    Control characters are shown escaped (``\\x1b``), so a client cannot
    send escape sequences to the terminal of whoever runs kmux-cli; text
    longer than ``width`` is cut with ``…``.
    """
    if value is None or value == "":
        return MISSING
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(value))
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text


# -- tables ------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One table column: its header, how to get its text from a row, and which way it aligns.

    Numbers align right so magnitudes line up; text (names, states,
    addresses, errors) aligns left like ``ss`` and ``ip`` do.
    """

    header: str
    get: Callable[[Mapping[str, Any]], str]
    right: bool = True


def render_table(columns: list[Column], rows: Iterable[Mapping[str, Any]], *, header: bool = True) -> list[str]:
    """Aligned lines, two spaces between columns, trailing spaces stripped.

    A getter that raises (a record of an unexpected shape) shows ``-``
    rather than losing the whole table.
    """
    cells: list[list[str]] = []
    if header:
        cells.append([c.header for c in columns])
    for row in rows:
        line = []
        for c in columns:
            try:
                text = c.get(row)
            except (KeyError, TypeError, ValueError, AttributeError):
                text = MISSING
            line.append(MISSING if text is None else str(text))
        cells.append(line)
    if not cells:
        return []
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for r in cells:
        parts = [r[i].rjust(widths[i]) if columns[i].right else r[i].ljust(widths[i]) for i in range(len(columns))]
        out.append("  ".join(parts).rstrip())
    return out


# -- rates ------------------------------------------------------------------------


class RateTracker:
    """Per-second rates of counters between two successive samples (``--watch``).

    Keyed by whatever identifies a row (group name, (group, conn), client
    id), so rows that appear, vanish or reorder between samples are fine.
    A counter that went backwards (a daemon restart, a replaced connection)
    has no rate for that interval rather than a negative one.
    """

    def __init__(self) -> None:
        self._prev: dict[Any, tuple[float, Mapping[str, Any]]] = {}
        self._next: dict[Any, tuple[float, Mapping[str, Any]]] = {}

    def rate(self, key: Any, record: Mapping[str, Any], field: str, now: float) -> float | None:
        """The rate of ``record[field]`` since the previous :meth:`commit`; None on the first sample."""
        prev = self._prev.get(key)
        if prev is None:
            return None
        t0, old = prev
        a, b = _number(old.get(field)), _number(record.get(field))
        dt = now - t0
        if a is None or b is None or dt <= 0 or b < a:
            return None
        return (b - a) / dt

    def commit(self, key: Any, record: Mapping[str, Any], now: float) -> None:
        """Remember this sample for the next interval."""
        self._next[key] = (now, record)

    def advance(self) -> None:
        """End of one refresh: the committed samples become the previous ones."""
        self._prev, self._next = self._next, {}


def records(answer: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    """A list of records from a control answer, ignoring anything that is not a map."""
    value = answer.get(key)
    return [r for r in value if isinstance(r, Mapping)] if isinstance(value, list) else []
