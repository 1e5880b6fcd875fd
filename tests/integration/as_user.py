"""Run a short Python program as another user: real uid, gid and supplementary groups.

The child is a real process that the kernel knows by the ids it was given
(``setpriv``: ``setgroups``, ``setregid``, ``setreuid``, then ``exec``, with
no capabilities left), so what a daemon reads with
``SO_PEERCRED``/``SO_PEERGROUPS`` is the kernel's word, not ours. The ids
need no passwd or group entries. ``setpriv`` rather than subprocess's
``user=``: it resolves the interpreter's path before giving up root, and
this checkout's virtualenv points into root's home. Needs root; callers
skip otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

#: A uid and a primary gid with no passwd/group entry: nobody else on the host uses them.
OTHER_UID = 4242
OTHER_GID = 4242


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")


def as_user(uid: int = OTHER_UID, gid: int = OTHER_GID, groups: list[int] = ()) -> list[str]:
    """The command prefix that runs a program with these ids (and only these groups)."""
    which = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", which]


def python_as(code: str, *, uid: int = OTHER_UID, gid: int = OTHER_GID, groups: list[int] = (),
              timeout: float = 30.0, args: list[str] = ()) -> subprocess.CompletedProcess:
    """Run ``python -c code args...`` with these ids; returns the finished process."""
    return subprocess.run(
        [*as_user(uid, gid, groups), sys.executable, "-c", code, *args],
        capture_output=True, text=True, timeout=timeout, cwd="/", stdin=subprocess.DEVNULL,
    )


def json_as(code: str, **kw: Any) -> Any:
    """Like :func:`python_as` for a program that prints one JSON document; fails loudly otherwise."""
    r = python_as(code, **kw)
    assert r.returncode == 0, f"child failed (rc={r.returncode}):\n{r.stderr}"
    return json.loads(r.stdout)
