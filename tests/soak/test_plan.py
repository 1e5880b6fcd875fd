"""The soak's plan: settings that name their option, schedules that keep their invariants,
a daemon configuration that kmuxd itself accepts."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from kmux.errors import ConfigInvalid
from kmuxd.tools.soak.plan import GROUPS, SoakSettings, daemon_config, operation_schedule, outage_schedule

SEEDS = range(40)


def test_settings_name_the_option():
    with pytest.raises(ConfigInvalid) as info:
        SoakSettings(clients=0, duration=1.0, operations=("reconnect", "explode"))
    lines = info.value.lines()
    assert "--clients: must be between 1 and 64, not 0" in lines
    assert any(line.startswith("--duration:") for line in lines)
    assert any(line.startswith("--operations: unknown explode") for line in lines)


@pytest.mark.parametrize("seed", SEEDS)
def test_outages_never_overlap_on_an_endpoint_and_end_before_the_calm(seed):
    s = SoakSettings(duration=60.0, seed=seed)
    outages = outage_schedule(s, random.Random(seed))
    assert outages
    busy: dict[tuple[str, int], float] = {}
    for o in sorted(outages, key=lambda o: o.at):
        assert s.warmup / 2 <= o.at and o.at + o.length <= s.duration - s.calm + 1e-6, o
        assert o.how in (("fin",) if o.group == "oneway" else ("fin", "rst"))
        for e in o.endpoints:
            assert busy.get((o.group, e), 0.0) <= o.at, f"endpoint {o.group}/{e} taken down twice at once"
            busy[(o.group, e)] = o.at + o.length


@pytest.mark.parametrize("seed", SEEDS)
def test_operations_name_connections_that_exist_and_sizes_come_back(seed):
    s = SoakSettings(duration=60.0, seed=seed, connections=3)
    ops = operation_schedule(s, random.Random(seed))
    size = {g.name: s.connections for g in GROUPS}
    for o in ops:
        assert o.at < s.duration - s.calm
        if o.op == "resize":
            size[o.group] = o.connections
        elif o.conn is not None:
            assert 0 <= o.conn < min(size[o.group], s.connections), (o, size)
    assert size == {g.name: s.connections for g in GROUPS}, "every resize is undone before the calm"
    assert not operation_schedule(SoakSettings(operations=()), random.Random(seed))


def test_the_same_seed_gives_the_same_schedules():
    s = SoakSettings(duration=120.0, seed=7)
    assert outage_schedule(s, random.Random(7)) == outage_schedule(s, random.Random(7))
    assert operation_schedule(s, random.Random(7)) == operation_schedule(s, random.Random(7))
    assert outage_schedule(s, random.Random(7)) != outage_schedule(s, random.Random(8))


def test_kmuxd_accepts_the_configuration(tmp_path):
    s = SoakSettings(request_timeout=0.5, queue_timeout=2.0, retry_unanswered=1, max_requests_per_connection=50)
    ports = {(g.name, e): 40000 + i * 10 + e for i, g in enumerate(GROUPS) for e in range(s.endpoints)}
    config = tmp_path / "k.toml"
    config.write_text(daemon_config(s, str(tmp_path / "k.sock"), ports, {"rr-fifo": 2}))
    done = subprocess.run([sys.executable, "-m", "kmuxd", "--config", str(config), "--check"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    text = config.read_text()
    assert "[groups.rr-id.id]" in text and "rewrite = true" in text
    assert text.count("queue_timeout = 2.0") == len(GROUPS)
    assert "connections = 2" in text  # the resized group
