"""Build hook: compile kmuxd's data path with mypyc when it can.

Everything else about the package is in ``pyproject.toml``. The modules in
``kmuxd/_compiled.py`` (the sans-IO cores and the event core's shell) are
compiled to C extensions with mypyc: the same code, type-checked by mypy and
run natively, about twice as fast per message (``docs/benchmark.md``). The
pure-Python modules stay in the package and are used when:

* ``KMUXD_PURE_PYTHON=1`` is set at build time (nothing is compiled) or at
  run time (the extensions are ignored);
* mypyc or a C compiler is missing at build time (a warning says so);
* a source file is newer than its extension (an edited checkout):
  ``kmuxd/__init__.py`` then loads all of them from source.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kmuxd._compiled import COMPILED_MODULES, MYPYC_FLAGS  # noqa: E402


def ext_modules() -> list:
    if os.environ.get("KMUXD_PURE_PYTHON"):
        print("kmuxd: KMUXD_PURE_PYTHON is set: building pure Python", file=sys.stderr)
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("kmuxd: mypyc is not installed: building pure Python (slower data path)", file=sys.stderr)
        return []
    paths = [name.replace(".", "/") + ".py" for name in COMPILED_MODULES]
    return mypycify([*MYPYC_FLAGS, *paths], opt_level="3")


setup(ext_modules=ext_modules())
