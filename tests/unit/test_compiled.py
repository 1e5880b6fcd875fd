"""The data path compiled by mypyc, and its pure-Python fallback (kmuxd/_compiled.py).

The same sources run both ways, so the same tests must pass both ways: the
suite runs against whatever the build produced (compiled when mypyc and a C
compiler were there), and this module runs the cores' unit tests once more
with ``KMUXD_PURE_PYTHON=1``, in a subprocess, and checks that the modules
really came from source there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .compiled_check import where_loaded

import kmuxd
from kmuxd._compiled import COMPILED_MODULES, is_checkout, stale, status

ROOT = Path(kmuxd.__file__).resolve().parent.parent
CORE_TESTS = ["tests/unit/test_sendq.py", "tests/unit/test_router.py", "tests/unit/test_requests.py",
              "tests/unit/test_endpoints.py", "tests/unit/test_inbox.py", "tests/unit/io"]


def _built() -> bool:
    return any((ROOT / m.replace(".", "/")).parent.glob(m.rsplit(".", 1)[1] + ".*.so") for m in COMPILED_MODULES)


def _where(env: dict[str, str]) -> dict:
    return where_loaded("kmuxd._compiled", COMPILED_MODULES, env, ROOT)


def test_every_compiled_module_comes_from_one_place():
    where = _where(dict(os.environ))
    kinds = {f.endswith(".so") for f in where["files"].values()}
    assert len(kinds) == 1, f"a mix of compiled and source modules: {where['files']}"
    assert where["status"]["compiled"] == kinds.pop()


@pytest.mark.skipif(not _built(), reason="the data path was not compiled (no mypyc or no C compiler at build time)")
def test_the_build_is_in_use_here():
    assert status()["compiled"], status()


def test_pure_python_switch_loads_every_module_from_source():
    where = _where({**os.environ, "KMUXD_PURE_PYTHON": "1"})
    assert all(f.endswith(".py") for f in where["files"].values()), where["files"]
    assert where["status"]["compiled"] is False and "KMUXD_PURE_PYTHON" in where["status"]["reason"]


def test_the_cores_pass_their_tests_in_pure_python_too():
    tests = [t for t in CORE_TESTS if (ROOT / t).exists()]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        env={**os.environ, "KMUXD_PURE_PYTHON": "1"}, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


def test_install_units_lets_the_service_see_mypycs_shared_module():
    """The shared runtime module (``<hash>__mypyc``) lies outside the packages (at the
    checkout's root in an editable install). A service whose sandbox binds only the
    packages cannot import a compiled module (found with a checkout under /tmp)."""
    from kmuxd.system.install import _code_paths

    shared = [p for p in _code_paths(sys.executable) if "__mypyc" in Path(p).name]
    if status()["compiled"]:
        assert shared and all(Path(p).is_file() for p in shared), shared
    else:
        assert not shared


def test_only_a_checkout_compares_timestamps(tmp_path):
    """pip writes a wheel's .so, then its .py a moment later: an installed compiled wheel must
    still run compiled. In a checkout, a source edited after the build means rebuild."""
    pkg = tmp_path / "kmuxd" / "io"
    pkg.mkdir(parents=True)
    so = pkg / "session.cpython-311-x86_64-linux-gnu.so"
    so.write_bytes(b"\x7fELF")
    py = pkg / "session.py"
    py.write_text("# newer\n")
    os.utime(so, (1000, 1000))
    os.utime(py, (1001, 1001))
    extensions = {"kmuxd.io.session": (py, [so]), "kmuxd.io.gone": (pkg / "gone.py", [])}
    assert not is_checkout(tmp_path)
    assert stale(extensions, checkout=False) == ["kmuxd.io.gone"]  # installed: only a missing extension counts
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "setup.py").write_text("")
    assert is_checkout(tmp_path) and is_checkout(ROOT)
    assert stale(extensions, checkout=True) == ["kmuxd.io.session", "kmuxd.io.gone"]
