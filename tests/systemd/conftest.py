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

import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from kmuxd.tools.backend.recording import wait_until as _wait_until

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
    return _wait_until(pred, timeout, what, interval)


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

    def agent(self, *args: str, user: str | None = None, timeout: float = COMMAND_TIMEOUT,
              python: str = PYTHON) -> dict:
        """Run tests/systemd/agent.py in the container (with ``python``: whose kmux library); its one JSON line."""
        proc = self.run(python, str(AGENT), *args, user=user, timeout=timeout)
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


#: The kmuxd.service tests talk to; backends record what arrives under this directory.
STATE = "/run/kmuxtest"
#: A user in group kmux, and one outside it.
MEMBER, OUTSIDER = "kmuxtest", "kmuxout"


class Service:
    """kmuxd.service in one container, however it was installed, and the loopback backends it talks to."""

    def __init__(self, box: Box, ports: dict[str, int]) -> None:
        self.box = box
        self.ports = ports

    def props(self, *names: str) -> dict[str, str]:
        return self.box.show("kmuxd.service", *names)

    def main_pid(self) -> int:
        return int(self.props("MainPID")["MainPID"])

    def wait_running(self, timeout: float = 20) -> dict[str, str]:
        def running():
            p = self.props("ActiveState", "SubState", "MainPID")
            return p if (p["ActiveState"], p["SubState"]) == ("active", "running") and p["MainPID"] != "0" else None
        return wait_until(running, timeout, "kmuxd.service active (running)")

    def ensure_running(self) -> None:
        if self.props("ActiveState")["ActiveState"] != "active":
            self.box.run("systemctl", "reset-failed", "kmuxd.service", check=False)
            self.box.run("systemctl", "start", "kmuxd.service")
        self.wait_running()

    def records(self, backend: str) -> collections.Counter:
        text = self.box.run("sh", "-c", f"cat {STATE}/{backend}.rec 2>/dev/null || true").stdout
        return collections.Counter(tuple(map(int, line.split())) for line in text.splitlines() if line.strip())

    def events(self, event: str, since: str | None = None) -> list[dict]:
        """The daemon's journal entries for one KMUX_EVENT, optionally only those after a :meth:`mark`."""
        return self.box.journal("-u", "kmuxd.service", f"KMUX_EVENT={event}", *([since] if since else []))

    def mark(self) -> str:
        """A ``--since=`` option that selects journal entries written after now.

        (journalctl 252 finds nothing with ``--after-cursor`` plus a field
        match when the cursor's entry does not match, so: timestamps.)
        """
        last = self.box.journal("-n", "1")
        usec = int(last[-1]["__REALTIME_TIMESTAMP"]) + 1 if last else 0
        return f"--since=@{usec // 1_000_000}.{usec % 1_000_000:06d}"

    def wait_event(self, since: str, event: str) -> dict:
        """The first ``event`` after ``since``, once SubState is back to running (a reload's end)."""
        found = wait_until(lambda: self.events(event, since), 15, f"{event} in the journal")
        wait_until(lambda: self.props("SubState")["SubState"] == "running", 10, "SubState back to running")
        return found[-1]


def start_backends(box: Box, names: dict[str, bool]) -> dict[str, int]:
    """Loopback backends as transient services in the container (``{name: echo}``); their ports.

    Each records ``TAG IDX`` per frame in ``STATE/NAME.rec``; an echo backend also answers every frame.
    """
    box.run("mkdir", "-p", STATE)
    for name, echo in names.items():
        box.run("systemd-run", f"--unit=kmuxtest-{name}", "--property=Type=exec", PYTHON, str(AGENT), "backend",
                f"--port-file={STATE}/{name}.port", f"--records={STATE}/{name}.rec", *(["--echo"] if echo else []))
    return {name: int(wait_until(lambda: box.run("sh", "-c", f"cat {STATE}/{name}.port 2>/dev/null || true").stdout.strip(),
                                 15, f"backend {name} listening")) for name in names}


def add_users(box: Box, *, outsider: bool = False) -> None:
    """MEMBER in group kmux (which must exist by now), and OUTSIDER in none."""
    box.run("useradd", "-M", "-s", "/usr/sbin/nologin", "-G", "kmux", MEMBER)
    if outsider:
        box.run("useradd", "-M", "-s", "/usr/sbin/nologin", OUTSIDER)


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


@contextlib.contextmanager
def boot_box(binds: tuple[str, ...] = ()) -> Iterator[Box]:
    """One container for a ``with`` block, always torn down; skips the test when sdbox cannot run.

    ``binds``: more host directories the container must see (read-only),
    such as a build directory under /tmp, which the container's own /tmp hides.
    """
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tool = sdbox_tool()
    t0 = time.monotonic()
    try:
        env = dict(os.environ, SDBOX_BIND=":".join([*sdbox_binds(), *binds]))
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


@pytest.fixture(scope="module")
def box():
    with boot_box() as b:
        yield b


def _open_paths_for_users(b: Box) -> None:
    """Let unprivileged test users reach the interpreter, the venv and the checkout.

    A pyenv Python under /root (0700) is invisible to other users. Inside the
    container every directory is an overlay copy, so adding o+x to the
    ancestors changes nothing on the host.
    """
    targets = [os.path.realpath(PYTHON), PYTHON, str(REPO), str(AGENT)]
    dirs = sorted({str(p) for t in targets for p in Path(t).parents if p != Path("/")})
    b.run("sh", "-c", 'for d in "$@"; do [ -d "$d" ] && chmod o+x "$d"; done; true', "sh", *dirs)


#: Seconds packaging/build.sh may take (about 40 s here; a cold pip cache fetches the dependencies).
BUILD_TIMEOUT = 600


@dataclass(frozen=True)
class Artefacts:
    """What packaging/build.sh made, in one directory the containers see read-only."""

    dir: Path
    sdist: Path
    #: The compiled wheel (py3-none-any when nothing could compile)
    wheel: Path
    #: The pure-Python py3-none-any wheel
    pure_wheel: Path
    wheelhouse: Path
    deb: Path


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory) -> Artefacts:
    """The sdist, the wheel, the wheelhouse and the .deb, built once per test run (./dev.sh deb's script)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)  # nothing could install them: do not spend the build
    missing = [tool for tool in ("dpkg-buildpackage", "dh", "/usr/bin/python3") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"no {', '.join(missing)}: ./dev.sh test (or ./dev.sh deb) installs debhelper, dpkg-dev, python3")
    out = tmp_path_factory.mktemp("dist")
    t0 = time.monotonic()
    proc = subprocess.run([str(REPO / "packaging" / "build.sh"), str(out)], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, f"packaging/build.sh failed:\n{proc.stderr[-3000:]}"
    MEASURED["packaging/build.sh (sdist, wheel, wheelhouse, .deb)"] = f"{time.monotonic() - t0:.1f} s"
    sdist, wheel, pure_wheel, wheelhouse, deb = (Path(p) for p in proc.stdout.split())
    return Artefacts(out, sdist, wheel, pure_wheel, wheelhouse, deb)


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("systemd measurements")
        for key, value in MEASURED.items():
            terminalreporter.write_line(f"{key}: {value}")
