"""Where a compiled unit's modules were loaded from, asked of a fresh interpreter.

Shared by the daemon's (kmuxd/_compiled.py) and the client's
(client/kmux/_compiled.py) checks: each unit must come wholly from its
extensions or wholly from source, and only a new process can say which,
since the guard decides once, at the package's first import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Iterable

#: Seconds a fresh interpreter may take to import a unit and answer.
WHERE_TIMEOUT = 60


def where_loaded(guard: str, modules: Iterable[str], env: dict[str, str], cwd: Path) -> dict:
    """``{"status": <guard>.status(), "files": {module: __file__}}`` in a fresh interpreter with ``env``."""
    code = (
        f"import json, importlib, {guard} as c\n"
        f"mods = {list(modules)!r}\n"
        "files = {m: importlib.import_module(m).__file__ for m in mods}\n"
        "print(json.dumps({'status': c.status(), 'files': files}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=WHERE_TIMEOUT, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
