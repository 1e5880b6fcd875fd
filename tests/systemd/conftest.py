"""The systemd tests' sandbox: a real systemd as PID 1 in a throw-away container (sdbox).

``sdbox up`` boots systemd in fresh pid/mount/net/... namespaces whose root
is a copy-on-write overlay of this machine's ``/`` (so this checkout and its
venv are visible inside, and nothing inside is ever written back), with
fresh tmpfs on /run and /tmp. Each test module that asks for :func:`box`
gets one container, booted once and always torn down.

The tests skip, saying why, only when the sandbox cannot run at all: not
root, no sdbox, or ``sdbox up`` failing (no overlayfs, no cgroup2...).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
AGENT = Path(__file__).resolve().parent / "agent.py"
#: The venv's interpreter and kmuxd, as the container sees them (same paths).
PYTHON = sys.executable
KMUXD = str(Path(sys.executable).parent / "kmuxd")
SDBOX_CANDIDATES = (Path("/work/shared/tools/sdbox"), REPO / "tools" / "sdbox")
#: Seconds any single command in the container may take.
COMMAND_TIMEOUT = 60
#: Filled by the tests, printed at the end of the run (start -> READY time, security score).
MEASURED: dict[str, str] = {}


#: Trees the container covers with a fresh tmpfs that the project's sdbox copy
#: can bind a checkout back into (SDBOX_BIND).
BINDABLE_TREES = ("/tmp", "/var/tmp")


def _under_any(path: str, trees: tuple[str, ...]) -> bool:
    return any(path == t or path.startswith(t + "/") for t in trees)


def sdbox_binds() -> list[str]:
    """Host paths the container must see that a fresh /tmp or /var/tmp would hide."""
    paths = {str(REPO), os.path.realpath(sys.prefix)}
    return sorted(p for p in paths if _under_any(p, BINDABLE_TREES))


def sdbox_tool() -> Path | None:
    # A checkout under /tmp (CI may clone there) needs the project's copy,
    # which can bind it into the container (SDBOX_BIND).
    candidates = SDBOX_CANDIDATES[1:] if sdbox_binds() else SDBOX_CANDIDATES
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``pred`` until truthy; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Box:
    """One running container: run commands in it, read and write its files."""

    def __init__(self, tool: Path, state: str) -> None:
        self.tool = tool
        self.state = state

    def _argv(self, cmd: tuple[str, ...], user: str | None) -> list[str]:
        if user is not None:
            cmd = ("setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *cmd)
        return [str(self.tool), "exec", self.state, *cmd]

    def run(self, *cmd: str, user: str | None = None, input: str | None = None, check: bool = True,
            timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._argv(cmd, user), input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def popen(self, *cmd: str, user: str | None = None) -> subprocess.Popen:
        return subprocess.Popen(self._argv(cmd, user), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def agent(self, *args: str, user: str | None = None, timeout: float = COMMAND_TIMEOUT) -> dict:
        """Run tests/systemd/agent.py in the container; its one JSON line."""
        proc = self.run(PYTHON, str(AGENT), *args, user=user, timeout=timeout)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def agent_popen(self, *args: str, user: str | None = None) -> subprocess.Popen:
        return self.popen(PYTHON, str(AGENT), *args, user=user)

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-c", 'mkdir -p "$(dirname "$0")" && cat > "$0"', path, input=text)

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict]:
        out = self.run("journalctl", "--no-pager", "-o", "json", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def _collect(proc: subprocess.Popen, timeout: float) -> dict:
    """The JSON line of an agent started with :meth:`Box.agent_popen`."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"agent did not finish within {timeout}s\nstdout: {out}\nstderr: {err}")
    assert proc.returncode == 0, f"agent exited {proc.returncode}\nstdout: {out}\nstderr: {err}"
    return json.loads(out.strip().splitlines()[-1])


collect = _collect


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "systemd tests need Linux"
    if os.geteuid() != 0:
        return "systemd tests need root: sdbox boots systemd in new namespaces (run the suite as root)"
    if sdbox_tool() is None:
        return f"no sdbox at {' or '.join(map(str, SDBOX_CANDIDATES))}"
    if _under_any(str(REPO), ("/run",)) or _under_any(sys.prefix, ("/run",)):
        return "the checkout or venv is under /run, which the container replaces with a fresh tmpfs"
    if not os.access(KMUXD, os.X_OK):
        return f"no kmuxd console script at {KMUXD} (pip install -e .)"
    return None


@pytest.fixture(scope="module")
def box():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tool = sdbox_tool()
    t0 = time.monotonic()
    try:
        env = dict(os.environ, SDBOX_BIND=":".join(sdbox_binds()))
        up = subprocess.run([str(tool), "up"], capture_output=True, text=True, timeout=150, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip("sdbox up did not finish in 150 s")
    state = up.stdout.strip().splitlines()[-1] if up.stdout.strip() else ""
    if up.returncode != 0 or not state:
        if state.startswith("/var/tmp/sdbox-"):
            subprocess.run([str(tool), "down", state], capture_output=True, timeout=60)
        pytest.skip(f"sdbox cannot run here (sdbox up exited {up.returncode}): {up.stderr.strip()[-500:]}")
    MEASURED["sdbox boot"] = f"{time.monotonic() - t0:.2f} s"
    b = Box(tool, state)
    try:
        _open_paths_for_users(b)
        yield b
    finally:
        subprocess.run([str(tool), "down", state], capture_output=True, timeout=120)


def _open_paths_for_users(b: Box) -> None:
    """Let unprivileged test users reach the interpreter, the venv and the checkout.

    A pyenv Python under /root (0700) is invisible to other users. Inside the
    container every directory is an overlay copy, so adding o+x to the
    ancestors changes nothing on the host.
    """
    targets = [os.path.realpath(PYTHON), PYTHON, str(REPO), str(AGENT)]
    dirs = sorted({str(p) for t in targets for p in Path(t).parents if p != Path("/")})
    b.run("sh", "-c", 'for d in "$@"; do [ -d "$d" ] && chmod o+x "$d"; done; true', "sh", *dirs)


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("systemd measurements")
        for key, value in MEASURED.items():
            terminalreporter.write_line(f"{key}: {value}")
