"""The client's fast lane compiled by mypyc, and its pure-Python fallback (kmux/_compiled.py).

The same sources run both ways, so the client's tests must pass both ways:
the suite runs against whatever the build produced (compiled when mypyc and
a C compiler were there); this module runs the client's own tests once more
with ``KMUXD_PURE_PYTHON=1``, in a subprocess, and checks that the modules
really came from source there, and never from a mix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .compiled_check import where_loaded

import kmux
from kmux._compiled import COMPILED_MODULES, status

ROOT = Path(kmux.__file__).resolve().parent.parent.parent
PACKAGE = Path(kmux.__file__).resolve().parent
CLIENT_TESTS = ["tests/unit/test_session.py", "tests/unit/test_client_settings.py",
                "tests/integration/test_client_transports.py"]


def _built() -> bool:
    return any(PACKAGE.glob(m.rsplit(".", 1)[1] + ".*.so") for m in COMPILED_MODULES)


def _where(env: dict[str, str]) -> dict:
    return where_loaded("kmux._compiled", COMPILED_MODULES, env, ROOT)


def test_the_fast_lane_comes_from_one_place():
    where = _where(dict(os.environ))
    kinds = {f.endswith(".so") for f in where["files"].values()}
    assert len(kinds) == 1, f"a mix of compiled and source modules: {where['files']}"
    assert where["status"]["compiled"] == kinds.pop()


@pytest.mark.skipif(not _built(), reason="the client was not compiled (no mypyc or no C compiler at build time)")
def test_the_build_is_in_use_here():
    assert status()["compiled"], status()


def test_pure_python_switch_loads_the_client_from_source():
    where = _where({**os.environ, "KMUXD_PURE_PYTHON": "1"})
    assert all(f.endswith(".py") for f in where["files"].values()), where["files"]
    assert where["status"]["compiled"] is False
    if _built():
        assert "KMUXD_PURE_PYTHON" in where["status"]["reason"]


def test_the_client_passes_its_tests_in_pure_python_too():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CLIENT_TESTS],
        env={**os.environ, "KMUXD_PURE_PYTHON": "1"}, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


def test_the_build_reads_the_module_list_without_importing_the_library():
    """setup.py runs in a build environment without msgpack or trio: it reads the list by path."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('m', {str(PACKAGE / '_compiled.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print(','.join(m.COMPILED_MODULES)); print('msgpack' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [",".join(COMPILED_MODULES), "False"]
