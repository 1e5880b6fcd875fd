"""The client's fast lane compiled by mypyc, optionally, and the guard that keeps it in step.

Theory of operation
-------------------
The blocking client's round trip is a few hundred bytecodes in six frames
(``Client.send``, ``send_now``, ``check_data``, ``Client.recv``,
``receive_now``, ``received``): interpreting them costs more than the two
system calls they make (docs/benchmark.md, "The app's side").
``setup.py`` compiles :data:`COMPILED_MODULES` with mypyc into one group of
its own (one shared ``<hash>__mypyc`` module, apart from the daemon's): the
same sources, run natively. Compiling is optional; the same ``.py`` files
are the library wherever the extensions are not used:

* nothing was compiled (no mypyc or no C compiler at build time, or
  ``KMUXD_PURE_PYTHON=1`` then: the ``py3-none-any`` wheel);
* another interpreter (an extension's tag names the CPython it was built
  for; any other finds only the ``.py`` files);
* ``KMUXD_PURE_PYTHON=1`` at run time, or, in a checkout, a source newer
  than its extension (edited since the build): :func:`install_guard`,
  run by ``kmux/__init__.py`` before any of them is imported, loads *every*
  one of them from source, never a mix (compiled modules call each other
  natively and must come from the same build).

Only a checkout's timestamps count (kmuxd/_compiled.py explains why: pip
writes a wheel's ``.py`` after its ``.so``). This module imports nothing
but the standard library: ``setup.py`` reads :data:`COMPILED_MODULES` from
it by path, in a build environment without the library's dependencies.

:func:`status` says which it was (``kmux._compiled.status()``).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["COMPILED_MODULES", "install_guard", "status"]

#: The fast lane and what it calls per message (the driver's rules included: one driver, compiled or not).
COMPILED_MODULES = ("kmux._session", "kmux._driver", "kmux._link", "kmux._sync")

_PACKAGE = Path(__file__).resolve().parent
_STATUS: dict[str, Any] = {"compiled": False, "reason": "not checked"}


def _paths(name: str) -> tuple[Path, list[Path]]:
    base = _PACKAGE / name.rsplit(".", 1)[1]
    return base.with_suffix(".py"), sorted(_PACKAGE.glob(base.name + ".*.so"))


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Answers for the compiled modules only: load them from their ``.py``."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in COMPILED_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, _paths(fullname)[0])


def _checkout() -> bool:
    root = _PACKAGE.parent.parent  # client/kmux -> the source tree
    return (root / "pyproject.toml").is_file() and (root / "setup.py").is_file()


def install_guard() -> None:
    extensions = {name: _paths(name) for name in COMPILED_MODULES}
    if not any(sos for _, sos in extensions.values()):
        _STATUS.update(compiled=False, reason="not built (pure Python)")
        return
    checkout = _checkout()
    stale = [name for name, (py, sos) in extensions.items()
             if not sos or (checkout and py.stat().st_mtime > max(so.stat().st_mtime for so in sos))]
    if os.environ.get("KMUXD_PURE_PYTHON"):
        reason = "KMUXD_PURE_PYTHON is set"
    elif stale:
        reason = f"sources newer than their extensions ({', '.join(stale)}): rebuild with ./dev.sh setup"
    else:
        _STATUS.update(compiled=True, reason="mypyc extensions")
        return
    sys.meta_path.insert(0, _SourceFirst())
    _STATUS.update(compiled=False, reason=reason)


def status() -> dict[str, Any]:
    """Whether the fast lane runs compiled, and why (not)."""
    mod = sys.modules.get("kmux._driver")
    loaded = getattr(mod, "__file__", "") or ""
    return {**_STATUS, "loaded_from": "extension" if loaded.endswith(".so") else ("source" if mod else "not loaded")}
