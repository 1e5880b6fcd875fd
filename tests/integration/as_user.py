"""Run a short Python program as another user: real uid, gid and supplementary groups.

The child is a real process that the kernel knows by the ids it was given
(``setpriv``: ``setgroups``, ``setregid``, ``setreuid``, then ``exec``, with
no capabilities left), so what a daemon reads with
``SO_PEERCRED``/``SO_PEERGROUPS`` is the kernel's word, not ours. The ids
need no passwd or group entries. ``setpriv`` rather than subprocess's
``user=``: it resolves the interpreter's path before giving up root, and
this checkout's virtualenv points into root's home. Needs root; callers
skip otherwise.

:class:`AppPeer` runs ``app_peer.py`` (an app driven command by command)
that way, or as a plain second process when no ids are given.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path
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


#: The peer program (see its docstring) and the seconds one of its commands may take.
APP_PEER = str(Path(__file__).with_name("app_peer.py"))
PEER_COMMAND_TIMEOUT = 60.0


class AppPeer:
    """An app in its own process (``app_peer.py``), with these ids when given, driven command by command.

    ``peer.connect(group)``, ``peer.send(client, cid, count)``, ... run the
    peer's command of that name and return its JSON answer; a command that
    failed inside the peer fails the test here, with the peer's reason.
    Without ``uid`` the peer keeps the test's own ids (root): a separate
    process for CPU, not for credentials.
    """

    def __init__(self, socket_path: str, *, uid: int | None = None, gid: int = OTHER_GID, groups: list[int] = (),
                 comm: str = "kmx-app") -> None:
        prefix = [] if uid is None else as_user(uid, gid, groups)
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, APP_PEER, socket_path, comm],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
        )
        self._out = self.proc.stdout
        assert self._answer(PEER_COMMAND_TIMEOUT) == {"ready": True}
        self.pid = self.proc.pid

    def _answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self._out], [], [], timeout)
        line = self._out.readline() if ready else ""
        if not line:
            self.proc.kill()
            raise AssertionError(f"the peer did not answer within {timeout}s: {self.proc.stderr.read()}")
        return json.loads(line)

    def call(self, op: str, answer_within: float = PEER_COMMAND_TIMEOUT, **args: Any) -> dict:
        self.begin(op, **args)
        return self.end(answer_within)

    def begin(self, op: str, **args: Any) -> None:
        """Start a command and return at once (the peer works on it meanwhile); :meth:`end` answers."""
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        self._op = op

    def end(self, answer_within: float = PEER_COMMAND_TIMEOUT) -> dict:
        answer = self._answer(answer_within)
        assert "failed" not in answer, f"peer command {self._op} failed: {answer['failed']}"
        return answer

    def __getattr__(self, op: str) -> Any:
        if op.startswith("_"):
            raise AttributeError(op)
        return lambda **args: self.call(op, **args)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()

    def __enter__(self) -> "AppPeer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
