"""Which modules mypyc compiles, and the guard that keeps source and extensions in step.

Theory of operation
-------------------
``setup.py`` compiles :data:`COMPILED_MODULES` with mypyc into one shared
extension: compiled modules call each other natively, so they are one unit
and must all come from the same place. :func:`install_guard` (run when
``kmuxd`` is imported) decides once, before any of them is imported:

* compiled extensions present and not older than their sources: use them;
* ``KMUXD_PURE_PYTHON=1`` in the environment, or, in a checkout, any source
  newer than its extension (edited since the last build): load *every* one
  of them from its ``.py`` (a meta path finder that only answers for these
  names), never a mix.

Only a checkout's timestamps say anything: an installed wheel's or
package's files were never edited, and pip writes each file as it unpacks
it, so a ``.py`` written a microsecond after its ``.so`` would otherwise
turn an installed compiled wheel into a pure-Python one (it did).

:func:`status` says which it was (``kmuxd --version``, the daemon's
statistics and start-up log).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["COMPILED_MODULES", "MYPYC_FLAGS", "install_guard", "status"]

#: The data path: sans-IO cores and the event core's shell.
COMPILED_MODULES = (
    "kmuxd.core.sendq",
    "kmuxd.core.notsent",
    "kmuxd.core.contention",
    "kmuxd.core.pacing",
    "kmuxd.core.router",
    "kmuxd.core.inbox",
    "kmuxd.core.steering",
    "kmuxd.core.counters",
    "kmuxd.core.states",
    "kmuxd.core.latency",
    "kmuxd.core.endpoints",
    "kmuxd.core.backoff",
    "kmuxd.io.reactor",
    "kmuxd.io.session",
    "kmuxd.io.intake",
    "kmuxd.io.replies",
    "kmuxd.io.assembly",
    "kmuxd.io.receive",
    "kmuxd.io.conn",
    "kmuxd.io.slot",
    "kmuxd.io.retry",
    "kmuxd.io.tls",
    "kmuxd.io.group",
    "kmuxd.io.pacer",
    "kmuxd.io.server",
)
#: mypy settings for the compiled modules: their imports are type-checked
#: only as far as they are used (the rest of the package is not compiled).
MYPYC_FLAGS = ("--follow-imports=silent", "--ignore-missing-imports")

_ROOT = Path(__file__).resolve().parent.parent
_STATUS: dict[str, Any] = {"compiled": False, "reason": "not checked"}


def _paths(name: str) -> tuple[Path, list[Path]]:
    base = _ROOT / name.replace(".", "/")
    return base.with_suffix(".py"), sorted(base.parent.glob(base.name + ".*.so"))


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Answers for the compiled modules only: load them from their ``.py``."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in COMPILED_MODULES:
            return None
        source, _ = _paths(fullname)
        return importlib.util.spec_from_file_location(fullname, source)


def is_checkout(root: Path = _ROOT) -> bool:
    """Whether kmuxd runs from a source tree (edited in place), not from an installed wheel or package."""
    return (root / "pyproject.toml").is_file() and (root / "setup.py").is_file()


def stale(extensions: dict[str, tuple[Path, list[Path]]], checkout: bool) -> list[str]:
    """The modules that cannot run compiled: no extension, or (in a checkout) a source edited since."""
    return [name for name, (py, sos) in extensions.items()
            if not sos or (checkout and py.exists() and py.stat().st_mtime > max(so.stat().st_mtime for so in sos))]


def install_guard() -> None:
    already = [m for m in COMPILED_MODULES if m in sys.modules]
    extensions = {name: _paths(name) for name in COMPILED_MODULES}
    built = [name for name, (_, sos) in extensions.items() if sos]
    if not built:
        _STATUS.update(compiled=False, reason="not built (pure-Python install)")
        return
    stale_modules = stale(extensions, is_checkout())
    if os.environ.get("KMUXD_PURE_PYTHON"):
        reason = "KMUXD_PURE_PYTHON is set"
    elif stale_modules:
        reason = (f"sources newer than their extensions ({', '.join(stale_modules[:3])}...): "
                  "rebuild with ./dev.sh setup")
    else:
        _STATUS.update(compiled=True, reason="mypyc extensions")
        return
    if already:
        reason += f" (too late for {', '.join(already)})"
    sys.meta_path.insert(0, _SourceFirst())
    _STATUS.update(compiled=False, reason=reason)


def status() -> dict[str, Any]:
    """Whether the data path runs compiled, and why (not)."""
    mod = sys.modules.get("kmuxd.io.reactor")
    loaded = getattr(mod, "__file__", "") or ""
    return {**_STATUS, "loaded_from": "extension" if loaded.endswith(".so") else ("source" if mod else "not loaded")}
