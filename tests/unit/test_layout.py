"""The layout is the architecture: these imports would break it.

* ``kmuxd/core`` is sans-IO: no sockets, no event loop, no readiness API,
  and nothing from the shells above it.
* The daemon (core, io, system) never imports the operator tools (demo,
  bench, soak, their backends) nor ``kmux-cli``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kmuxd

ROOT = Path(kmuxd.__file__).resolve().parent
FORBIDDEN_IN_CORE = {"socket", "trio", "select", "selectors", "asyncio", "kmuxd.io", "kmuxd.system", "kmuxd.cli", "kmuxd.tools"}
DAEMON_PACKAGES = ("core", "io", "system")
NOT_FOR_THE_DAEMON = {"kmuxd.tools", "kmuxd.cli"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = "kmuxd." + ".".join(path.relative_to(ROOT).parent.parts)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                found.add(node.module)
    return found


def _hits(names: set[str], forbidden: set[str]) -> list[str]:
    return sorted(n for n in names for f in forbidden if n == f or n.startswith(f + "."))


@pytest.mark.parametrize("path", sorted((ROOT / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_is_sans_io(path: Path) -> None:
    assert not _hits(_imports(path), FORBIDDEN_IN_CORE), f"{path.name} imports I/O or a higher layer"


@pytest.mark.parametrize(
    "path", sorted(p for pkg in DAEMON_PACKAGES for p in (ROOT / pkg).glob("*.py")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_daemon_does_not_import_tools(path: Path) -> None:
    assert not _hits(_imports(path), NOT_FOR_THE_DAEMON), f"{path.name} imports an operator tool"


def test_every_module_opens_with_its_theory() -> None:
    missing = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not missing, f"modules without a docstring: {missing}"
