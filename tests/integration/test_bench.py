"""``python -m kmuxd.tools.bench --quick``: the benchmark runs end to end and reports sane numbers.

It starts real processes (kmuxd, memcached, the sink, twemproxy, the zmq
broker, the C relay built from source) and drives them with the C load
generator and the Python app client. Nothing here asserts a timing: only
that every cell ran (or was skipped with a reason printed), that counts are
positive and consistent, that percentiles are ordered, and that every
target got a verdict line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kmuxd.tools.bench.procs import find_binary

#: The quick run takes seconds; this bounds a hung run.
QUICK_TIMEOUT = 240
TIMED = ("flood", "rr", "open", "latency", "app")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(*args: str, cwd: Path, timeout: float = QUICK_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kmuxd.tools.bench", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    if find_binary("memcached") is None:
        pytest.skip("memcached is not installed (./dev.sh test installs it)")
    if find_binary("cc") is None and find_binary("gcc") is None:
        pytest.skip("no C compiler for the load generator (./dev.sh test installs gcc)")
    d = tmp_path_factory.mktemp("bench")
    proc = bench("--quick", "--json", str(d / "out.json"), "--plot", str(d / "out.png"), cwd=d)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc, json.loads((d / "out.json").read_text()), d


def test_every_cell_ran_or_says_why(quick):
    proc, out, _ = quick
    cells = out["cells"]
    assert {c["workload"] for c in cells} == {"flood", "rr", "open", "latency", "app", "idle", "churn"}
    for c in cells:
        assert not c.get("error"), c
        if "skipped" in c:
            assert c["skipped"] and f"skipped: {c['skipped']}" in proc.stdout
    for peer, why in out["skipped_peers"].items():
        assert f"peer {peer} skipped: {why}" in proc.stdout
    ran = {c["target"] for c in cells if "skipped" not in c}
    assert {"kmuxd", "direct", "kmuxd-tls"} <= ran  # TLS rows next to plaintext (openssl, memcached -Z)
    assert "TLS ÷ plaintext" in proc.stdout
    # A progress line per cell, then the table, ratios and targets.
    assert sum(line.startswith("[") for line in proc.stdout.splitlines()) == len(cells)
    assert "targets (same machine, same run)" in proc.stdout


def test_timed_cells_report_sane_numbers(quick):
    _, out, _ = quick
    for c in out["cells"]:
        if c["workload"] not in TIMED or "skipped" in c:
            continue
        assert c["msgs"] > 0 and c["msgs_per_s"] > 0 and c["mb_per_s"] > 0, c
        assert 0 < c["window_s"] < 5, c
        if c["target"] == "direct":
            assert c["proxy_cpu_us"] is None and c["peak_rss_kib"] is None
        elif c["proxy_cpu_us"] is None:
            # CPU comes from /proc in clock ticks: too few to measure is said, never shown as a number.
            assert "clock tick" in c["proxy_cpu_unmeasured"], c
        else:
            assert c["proxy_cpu_us"] > 0 and c["peak_rss_kib"] > 0, c
        if c["workload"] == "flood":
            # The sink counted no more than the clients sent in the whole cell.
            assert 0 < c["sent_in_window"] <= c["sent_total"] and c["msgs"] <= c["sent_total"], c
            assert c["mb_per_s"] == pytest.approx(c["msgs_per_s"] * c["size"] / 1e6, rel=0.01)
        else:
            assert 0 < c["p50_us"] <= c["p99_us"] <= c["p999_us"], c
            if c["client"] != "python":  # a Python client ends its run with an error on any of these
                assert c["notices"] == c["overruns"] == c["strays"] == c["inflight_at_end"] == 0, c
        if c["workload"] == "open":
            assert c["unfinished"] == 0, c
            assert c["msgs_per_s"] == pytest.approx(c["rate"], rel=0.1), c
        if c["client"] == "python":
            assert c["client_cpu_us"] > 0 and c["client_user_us"] >= 0 and c["client_sys_us"] >= 0, c


def test_the_app_cells_count_the_clients_own_cost(quick):
    """Each app cell pairs the library with its raw twin in one process (alternating blocks): both CPU
    figures (nanosecond clock), their paired difference with its spread, and both sets of system calls."""
    _, out, _ = quick
    app = {(c["api"], c["recv_timeout"]): c for c in out["cells"] if c["workload"] == "app"}
    assert set(app) == {(api, 5.0) for api in ("kmux", "kmux-trio")}
    for c in app.values():
        assert c["pairs"] >= 1 and c["block"] > 0, c
        assert c["client_cpu_us"] > 0 and c["raw_cpu_us"] > 0, c
        assert c["extra_cpu_min_us"] <= c["extra_cpu_p25_us"] <= c["extra_cpu_us"] <= c["extra_cpu_p75_us"] \
            <= c["extra_cpu_max_us"], c
        if c.get("syscalls_unmeasured"):
            continue  # neither perf nor strace here: said, not shown
        for calls in (c["syscalls_per_rt"], c["raw_syscalls_per_rt"]):
            assert calls["sendto"] == pytest.approx(1, abs=0.02), c
            assert calls["recvfrom"] >= 0.98, c
    if not app[("kmux", 5.0)].get("syscalls_unmeasured"):
        # The library's blocking round trip: one send, one receive (the timeout kept by the kernel), nothing else.
        assert app[("kmux", 5.0)]["syscalls_per_rt"]["all"] == pytest.approx(2, abs=0.02)
        # Python's own socket timeout polls before each call.
        assert app[("kmux", 5.0)]["raw_syscalls_per_rt"].get("poll", 0) >= 1.9
    targets = {t["name"]: t for t in out["targets"]}
    for name, t in targets.items():
        if name.startswith("app, ") and "library client CPU/rt" in name and "timeout 5 s" in name:
            assert "paired" in t["measured"] and t["met"] in (True, False), t


def test_a_figure_that_cannot_be_measured_says_so():
    """A target whose cells are missing (a peer left out, a cell that failed) is "unmeasured", never met
    and never silently absent; the Python direct baseline is planned whatever --peers says."""
    from kmuxd.tools.bench import report
    from kmuxd.tools.bench.cli import build_plan, parser

    plan = build_plan(parser().parse_args(["--workload", "latency", "--peers", "twemproxy"]))
    assert any(c.workload == "latency" and c.client == "python" and c.target == "direct" for c in plan)
    lib = {"workload": "latency", "target": "kmuxd", "placement": "pinned", "client": "python", "api": "kmux",
           "p50_us": 60.0, "p99_us": 90.0}
    cells = [lib, {"workload": "latency", "target": "twemproxy", "placement": "pinned", "client": "python",
                   "api": "stream", "skipped": "nutcracker is not installed"}]
    py = [t for t in report.app_targets(cells) if t.name.startswith("1 client rr through Python")]
    assert len(py) == 2 and all(t.measured == "unmeasured" and t.met is None for t in py), py
    assert all("Python direct" in t.why and "twemproxy" in t.why for t in py), py
    app = [{"workload": "app", "api": "kmux", "recv_timeout": None, "error": "ConnectionRefusedError: ..."}]
    (blocking,) = [t for t in report.app_targets(app) if t.name.startswith("app, blocking, no timeout")]
    assert blocking.measured == "unmeasured" and blocking.met is None and "ConnectionRefused" in blocking.why


def test_kmuxd_idle_and_churn(quick):
    _, out, _ = quick
    (idle,) = [c for c in out["cells"] if c["workload"] == "idle"]
    assert idle["connected"] == idle["clients"] == 200
    assert idle["rss_after_kib"] > 0 and idle["connect_s"] > 0
    (churn,) = [c for c in out["cells"] if c["workload"] == "churn"]
    assert churn["clients_done"] == churn["clients"] == 100
    # 100 hellos cost kmuxd a few clock ticks: a figure, or "unmeasured" with the reason, never 0.0 called met.
    if churn["cpu_us_per_client"] is None:
        assert "clock tick" in churn["cpu_unmeasured"]
        (target,) = [t for t in out["targets"] if t["name"].startswith("client churn")]
        assert target["met"] is None and target["measured"] == "unmeasured"
    else:
        assert churn["cpu_us_per_client"] > 0


def test_kmuxd_wrote_at_least_what_the_sink_counted_from_it(quick):
    _, out, _ = quick
    final = {g["group"]: g for g in out["group_final"]}
    for target, group in (("kmuxd", "flood4"), ("kmuxd-tls", "flood4tls")):
        (cell,) = [c for c in out["cells"] if c["workload"] == "flood" and c["target"] == target]
        assert final[group]["tx_msgs"] >= cell["msgs"] > 0, (final[group], cell["msgs"])


def test_targets_and_plot(quick):
    proc, out, d = quick
    names = [t["name"] for t in out["targets"]]
    assert len(names) == 23  # 21, and the two TLS ÷ plaintext targets
    for t in out["targets"]:
        assert t["met"] in (True, False, None)
        assert t["name"] in proc.stdout
    if "plot: skipped: matplotlib" in proc.stdout:
        pytest.skip("matplotlib not installed: the plot is skipped and the output says so")
    assert (d / "out.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("args, message", [
    (["--sizes", "3"], "size 3 is not 5..1048576 bytes"),
    (["--connections", "2"], "--connections: from (1, 4)"),
    (["--workload", "nope"], "choose from flood, rr, open, latency, app, idle, churn, rss"),
    (["--clients", "x"], "is not a comma-separated list of integers"),
])
def test_bad_arguments_are_refused_clearly(tmp_path, args, message):
    proc = bench(*args, cwd=tmp_path, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_help_shows_defaults(tmp_path):
    proc = bench("--help", cwd=tmp_path, timeout=30)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps lines anywhere
    for default in ("(default: 64,1k,16k,256k)", "(default: 1,8,64)", "(default: 2.0)", "(default: 10000)",
                    "(default: flood,rr,open,latency,app,idle,churn)"):
        assert default in text, default
    assert os.path.exists(Path(__file__).parents[2] / "kmuxd" / "tools" / "bench" / "loadgen.c")


def test_repeats_merge_into_medians_and_keep_failures_visible():
    from kmuxd.tools.bench.cli import merge_runs

    runs = [{"label": "x", "msgs_per_s": v, "proxy_cpu_us": c, "flat": True} for v, c in ((10.0, 3.0), (30.0, 1.0),
                                                                                          (20.0, 2.0))]
    merged = merge_runs([*runs, {"label": "x", "error": "loadgen died"}])
    assert merged["msgs_per_s"] == 20.0 and merged["proxy_cpu_us"] == 2.0 and merged["flat"] is True
    assert [r.get("error") for r in merged["runs"]] == [None, None, None, "loadgen died"]
    failed = merge_runs([{"label": "x", "error": "a"}, {"label": "x", "error": "b"}])
    assert failed["error"] == "a"


#: Seconds a child may take to die after its tool was killed outright.
ORPHAN_DEATH_TIMEOUT = 10.0

ORPHAN_PARENT = """
import sys, time
from pathlib import Path
from kmuxd.tools.bench.procs import Child
child = Child("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"], Path(sys.argv[1]))
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie that nobody reaped yet counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_children_die_with_a_bench_that_is_killed_outright(tmp_path):
    """SIGKILL leaves the bench no chance to stop its children: the kernel's parent-death signal does it."""
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN_PARENT, str(tmp_path / "sleeper.log")],
                              stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert _alive(child_pid)
        parent.kill()
        parent.wait(5)
        deadline = time.monotonic() + ORPHAN_DEATH_TIMEOUT
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        survived = _alive(child_pid)
        if survived:
            os.kill(child_pid, signal.SIGKILL)
        assert not survived, "the bench's child outlived a SIGKILLed bench"
    finally:
        parent.kill()
        parent.stdout.close()
