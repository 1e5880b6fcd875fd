"""Build hook: compile kmuxd's data path with mypyc when it can.

Everything else about the package is in ``pyproject.toml``. The modules in
``kmuxd/_compiled.py`` (the sans-IO cores and the event core's shell) are
compiled to C extensions with mypyc: the same code, type-checked by mypy and
run natively, with 10-20% less daemon CPU per message (docs/systemd.md,
"Which wheel"). So is the client library's fast lane, as a group of its own
(``client/kmux/_compiled.py``: the modules, and the client's own guard).
The pure-Python modules stay in the package and are used when:

* ``KMUXD_PURE_PYTHON=1`` is set at build time (nothing is compiled) or at
  run time (the extensions are ignored);
* mypyc or a C compiler is missing at build time (a warning says so);
* a source file is newer than its extension (an edited checkout):
  ``kmuxd/__init__.py`` then loads all of them from source.

The systemd units' one source is ``packaging/systemd/``: the build copies
them into the package as ``kmuxd/share/systemd/`` (:class:`BuildPy`), where
``kmuxd install-units`` finds them in a wheel; a checkout's
``kmuxd install-units`` reads ``packaging/systemd/`` itself.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kmuxd._compiled import COMPILED_MODULES, MYPYC_FLAGS  # noqa: E402


def client_modules() -> tuple[str, ...]:
    """The client's fast lane (client/kmux/_compiled.py), read by path: importing ``kmux`` needs its dependencies."""
    spec = importlib.util.spec_from_file_location("_kmux_compiled", HERE / "client/kmux/_compiled.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.COMPILED_MODULES


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
    # The client's fast lane is a group of its own (its own shared module): the
    # library's modules and the daemon's never call each other natively.
    client = ["client/" + name.replace(".", "/") + ".py" for name in client_modules()]
    return [*mypycify([*MYPYC_FLAGS, *paths], opt_level="3"),
            *mypycify([*MYPYC_FLAGS, *client], opt_level="3", group_name="kmux_client")]


#: The systemd units' one source, and where the wheel carries them (kmuxd.system.install.units_dir).
UNITS_SOURCE = "packaging/systemd"
UNITS_IN_PACKAGE = "kmuxd/share/systemd"


def copy_units(source: Path, target: Path) -> list[str]:
    """Copy the unit files of ``source`` into ``target`` (made afresh); their paths there."""
    if target.exists():
        for old in target.iterdir():
            old.unlink()
    target.mkdir(parents=True, exist_ok=True)
    out = []
    for unit in sorted(source.iterdir()):
        if unit.suffix in (".service", ".socket"):
            (target / unit.name).write_bytes(unit.read_bytes())
            out.append(str(target / unit.name))
    if not out:
        raise SystemExit(f"kmuxd: no systemd units in {source}")
    return out


class BuildPy(build_py):
    """build_py, plus the units from packaging/systemd/ into the built package."""

    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):  # an editable install reads packaging/systemd itself
            self._units = copy_units(HERE / UNITS_SOURCE, Path(self.build_lib) / UNITS_IN_PACKAGE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), *getattr(self, "_units", [])]


setup(ext_modules=ext_modules(), cmdclass={"build_py": BuildPy})
