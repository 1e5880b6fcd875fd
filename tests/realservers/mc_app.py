"""A memcached app in its own process, usually as another user (``python -m tests.realservers.mc_app``).

Arguments: ``SOCKET GROUP INDEX ROUNDS SECRETS_JSON``. The app first tries
to open each file in SECRETS_JSON (the daemon's client key, its handshake
file) and records which it could read: none, if the daemon keeps its
secrets. It joins GROUP, prints ``ready`` and waits for a line on stdin (so
that apps start together, or after the test did something). Then, for
each round, it SETs its own key to a random value and GETs it back, with
opaque = the round number: the same opaques in every app, so only kmuxd's
id rewrite keeps them apart. A response with the wrong opcode, opaque,
status or value is a *mismatch*; an error notice is counted by its code; no
outcome within RECV_TIMEOUT is a *timeout*. Between rounds it reads a line
from stdin when ``PAUSE_AT`` (env) names the round: the test reconnects the
daemon's connections meanwhile. It prints one JSON line and exits.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections import Counter

import kmux
from kmux.errors import KmuxError

from . import OP_GET, OP_SET, STATUS_OK, mc_get, mc_parse, mc_set

#: Seconds an app waits for one outcome.
RECV_TIMEOUT = 8.0


def readable(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                f.read(1)
            out.append(p)
        except OSError:
            pass
    return out


def exchange(c: kmux.Client, request: bytes, counts: Counter, problems: list[str]) -> bytes | None:
    c.send(request)
    counts["requests"] += 1
    try:
        return c.recv(timeout=RECV_TIMEOUT)
    except TimeoutError:
        counts["timeouts"] += 1
        problems.append("no outcome within RECV_TIMEOUT")
    except KmuxError as exc:
        counts[exc.code] += 1
        problems.append(f"{exc.code}: {exc.message}")
    return None


def run(path: str, group: str, index: int, rounds: int, secrets: list[str]) -> dict:
    counts: Counter = Counter()
    problems: list[str] = []
    pause_at = {int(r) for r in os.environ.get("PAUSE_AT", "").split(",") if r}
    rng = random.Random(index)
    can_read = readable(secrets)
    with kmux.connect(group, path, name=f"mc-app{index}", timeout=5.0) as c:
        print("ready", flush=True)
        sys.stdin.readline()
        for r in range(rounds):
            if r in pause_at:
                print(f"paused {r}", flush=True)
                sys.stdin.readline()
            key = f"app{index}-{r}".encode()
            value = rng.randbytes(rng.randint(1, 2000))
            opaque = r + 1
            raw = exchange(c, mc_set(key, value, opaque=opaque), counts, problems)
            if raw is None:
                continue
            got = mc_parse(raw)
            if (got.opcode, got.opaque, got.status) != (OP_SET, opaque, STATUS_OK):
                counts["mismatches"] += 1
                problems.append(f"round {r}: SET answered {got.opcode:#x}/{got.opaque}/{got.status:#x}")
                continue
            raw = exchange(c, mc_get(key, opaque=opaque), counts, problems)
            if raw is None:
                continue
            got = mc_parse(raw)
            if (got.opcode, got.opaque, got.status, got.value) != (OP_GET, opaque, STATUS_OK, value):
                counts["mismatches"] += 1
                problems.append(f"round {r}: GET answered {got.opcode:#x}/{got.opaque}/{got.status:#x}, "
                                f"{len(got.value)} bytes")
                continue
            counts["checked"] += 1
    return {"index": index, "uid": os.getuid(), "readable_secrets": can_read, "counts": dict(counts),
            "problems": problems[:5]}


def main() -> None:
    path, group, index, rounds, secrets = sys.argv[1:6]
    print(json.dumps(run(path, group, int(index), int(rounds), json.loads(secrets))), flush=True)


if __name__ == "__main__":
    main()


# -- the driver (in the test process) ------------------------------------------------------

def run_mc_apps(socket_path: str, group: str, n: int, rounds: int, secrets: list[str], *, uid_base: int | None,
                pause_at: int | None = None, between=None, timeout: float = 120.0) -> list[dict]:
    """Run ``n`` apps (uids ``uid_base + i``, or the test's own when None) together; returns their results.

    With ``pause_at``, every app stops before that round, ``between()`` runs,
    then they go on.
    """
    import subprocess
    from pathlib import Path

    from tests.integration.as_user import as_user

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PAUSE_AT": "" if pause_at is None else str(pause_at)}
    procs = []
    for i in range(n):
        prefix = [] if uid_base is None else as_user(uid_base + i, uid_base + i)
        procs.append(subprocess.Popen(
            [*prefix, sys.executable, "-m", "tests.realservers.mc_app", socket_path, group, str(i), str(rounds),
             json.dumps(secrets)],
            cwd=repo, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    try:
        def expect_line(p: subprocess.Popen, want: str) -> None:
            line = p.stdout.readline()
            assert line.startswith(want), (line, p.stderr.read() if p.poll() is not None else "")

        for p in procs:
            expect_line(p, "ready")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        if pause_at is not None:
            for p in procs:
                expect_line(p, "paused")
            if between is not None:
                between()
            for p in procs:
                p.stdin.write("go on\n")
                p.stdin.flush()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"app failed (rc={p.returncode}):\n{err}"
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
