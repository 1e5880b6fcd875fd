"""The client library's layout is its architecture: one sans-IO driver, two transports.

* The driver and everything under it (session, reconnect accounting,
  protocol, framing, errors) import no socket, no thread, no event loop.
* Only the transports (``_sync``, ``trio``) and the link they share know
  sockets; only ``trio`` (and ``control``'s trio half, if any) imports trio,
  so ``import kmux`` does not.
* Every module opens with its theory of operation.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import kmux

ROOT = Path(kmux.__file__).resolve().parent
SANS_IO = ["_driver.py", "_session.py", "_reconnect.py", "_client.py", "protocol.py", "framing.py", "errors.py"]
IO = {"socket", "select", "selectors", "threading", "asyncio", "trio"}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("name", SANS_IO)
def test_the_driver_and_what_it_builds_on_are_sans_io(name: str) -> None:
    assert not _imports(ROOT / name) & IO, f"{name} imports I/O"


def test_importing_kmux_does_not_import_trio() -> None:
    code = "import sys, kmux; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_client_module_opens_with_its_theory() -> None:
    missing = [p.name for p in ROOT.glob("*.py") if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not missing, f"modules without a docstring: {missing}"


def _parameters(fn: object) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]  # type: ignore[arg-type]


def test_both_transports_connect_with_the_same_parameters() -> None:
    import kmux.trio

    assert _parameters(kmux.connect) == _parameters(kmux.trio.connect)


def test_the_readme_lists_every_parameter_of_connect() -> None:
    readme = (ROOT.parents[1] / "README.md").read_text()
    listed = readme[readme.index("kmux.connect(group, socket_path=None") :].split(")", 1)[0]
    for name, default in _parameters(kmux.connect):
        shown = name if default is inspect.Parameter.empty else f"{name}={default!r}".replace("'", '"')
        assert shown in listed, f"README's kmux.connect(...) does not show {shown}"
