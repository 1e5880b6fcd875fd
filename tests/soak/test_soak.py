"""The short soak: ``python -m kmuxd.tools.soak`` for a few seconds, every check asserted.

A real kmuxd, the chaos backends and client processes that come and go,
exactly as ``./dev.sh soak`` runs them, only shorter and with fewer clients
(docs/soak.md has the full run). The seed is fixed so that a failure can be
repeated with the printed command; the run's table is printed either way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = 20261130
#: Every operator action ``./dev.sh soak`` takes by default, resizing included.
OPERATIONS = "reconnect,drain,resize"
ARGS = ["--duration", "14", "--clients", "4", "--seed", str(SEED), "--operations", OPERATIONS]
#: Seconds the whole run may take (set-up, 14 s of traffic, the clients' last
#: sessions, settling) before the test gives up on it.
RUN_TIMEOUT = 180


@pytest.fixture(scope="module")
def short_soak():
    done = subprocess.run([sys.executable, "-m", "kmuxd.tools.soak", *ARGS, "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode in (0, 1), f"the soak could not run (exit {done.returncode}):\n{done.stderr}"
    result = json.loads(done.stdout)
    from kmuxd.tools.soak.report import render

    print(f"\npython -m kmuxd.tools.soak {' '.join(ARGS)}\n{render(result)}")
    return done.returncode, result


def test_every_check_passes(short_soak):
    rc, result = short_soak
    failed = {c["name"]: c["detail"] for c in result["checks"] if not c["ok"]}
    assert not failed, f"seed {SEED}; logs in {result['run_dir']}: {failed}"
    assert rc == 0


def test_the_run_was_a_soak(short_soak):
    """Checks that pass on an idle run prove nothing: traffic, faults and churn happened."""
    _, result = short_soak
    groups = result["groups"]
    assert {g["mode"] for g in groups.values()} == {"id", "fifo", "balance"}
    for name, g in groups.items():
        assert g["requests"] > 100 and g["sessions"] >= 2, (name, g["requests"], g["sessions"])
        assert g["daemon"]["clients_joined"] == g["sessions"]
    assert result["outages"], "the schedule for this seed has outages"
    assert result["operations"], "the schedule for this seed has operator actions"
    assert sum(result["faults"].values()) >= 5, result["faults"]
    assert result["client_processes"] > result["settings"]["clients"], "client processes came and went"
    rr = [g for g in groups.values() if g["mode"] != "balance"]
    assert sum(g["notices"].get("connection_lost", 0) for g in rr) > 0
    assert all(g["responses"] > 0 for g in rr)
