"""``[groups.NAME.socket]`` on a real kmuxd's real connections (issue 18, section 3).

What the server sees and what the kernel reports, never what was asked:

* a loopback server sees the configured source address, and a source port
  in the configured range; a port of the range already taken is skipped;
* ``SO_MARK``, ``IP_TOS``, ``TCP_CONGESTION``, ``SO_BINDTODEVICE`` and
  ``TCP_NOTSENT_LOWAT`` read back (getsockopt) on the daemon's connections,
  in ``kmux-cli group -j`` and in its table;
* more connections than ports: the ones that fit come up, the others fail
  their dials saying the range is exhausted, and come up once a port is free;
* a daemon without capabilities (root with an empty bounding set, as the
  shipped unit runs it): the group that needs one fails its dials with
  ``permission_denied`` naming the capability and the drop-in, the daemon
  stays up and a group that needs nothing carries traffic;
* a congestion algorithm the kernel lacks is refused at load.

Ports: the ranges are picked at test time among ports below the ephemeral
range that nothing holds (:func:`free_range`); ``[700, 710]`` is used only
by the tests that need a privileged port, and only while root.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess

import pytest

from kmuxd.system.privileges import KernelNet

from .helpers import (AcceptingServer, group_config, group_record, kmux_cli, kmuxd_command, make_frame, parse_frame,
                      wait_until, write_config)

#: Ports tried for a free range: below the ephemeral range (32768+), above the registered services most hosts run.
RANGE_SEARCH = (20000, 32000)


def free_range(n: int, rng: random.Random | None = None) -> tuple[int, int]:
    """``n`` consecutive loopback ports nothing is bound to now."""
    rng = rng or random.Random()
    for _ in range(100):
        first = rng.randrange(*RANGE_SEARCH)
        probes = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                probes.append(s)
                s.bind(("0.0.0.0", port))
        except OSError:
            continue
        finally:
            for s in probes:
                s.close()
        return first, first + n - 1
    raise AssertionError(f"no {n} free consecutive ports in {RANGE_SEARCH}")


@pytest.fixture
def recorder():
    """A loopback server that accepts, keeps each connection and remembers its peer's address."""
    r = AcceptingServer(keep=True)
    try:
        yield r
    finally:
        r.close()


def connections(daemon, group: str | None = None) -> list[dict]:
    return group_record(daemon, group)["connections"]


def echoed(daemon, group: str, n: int) -> list[int]:
    """Send ``n`` frames through ``group`` to an echo backend; the seqs that came back, sorted."""
    with daemon.connect(group=group, receive=True) as client:
        for seq in range(1, n + 1):
            client.send(make_frame(client.client_id, seq, 100))
        return sorted(parse_frame(client.recv(timeout=10))[1] for _ in range(n))


def test_the_server_sees_the_source_address_and_a_port_in_the_range(recorder, backend_factory, daemon_factory):
    first, last = free_range(8)
    taken = socket.socket()  # a port of the range someone else holds: the dials skip it
    taken.bind(("0.0.0.0", first))
    taken.listen(1)
    backend = backend_factory(echo=True)
    try:
        daemon = daemon_factory({
            "seen": group_config(recorder, connections=4,
                                 socket={"source_address": "127.0.0.2", "source_ports": [first, last]}),
            "echo": group_config(backend, connections=3, socket={"source_ports": [first, last]}),
        })
        wait_until(lambda: len(recorder.peers) == 4, 10, "4 connections at the recording server")
        hosts = {host for host, _ in recorder.peers}
        ports = [port for _, port in recorder.peers]
        assert hosts == {"127.0.0.2"}, recorder.peers
        assert all(first < port <= last for port in ports), (ports, first, last)
        assert len(set(ports)) == 4
        # What the daemon reports is what the server saw (getsockname).
        wait_until(lambda: all(c["local"] for c in connections(daemon, "seen")), 10, "every conn's local address")
        assert sorted(c["local"] for c in connections(daemon, "seen")) == sorted(f"127.0.0.2:{p}" for p in ports)
        # Sibling groups to another endpoint may share ports (only the four-tuple is unique);
        # messages flow on connections bound this way.
        backend.wait_open(3)
        assert all(first < port <= last for port in backend.open_by_port())
        assert echoed(daemon, "echo", 50) == list(range(1, 51))
    finally:
        taken.close()


def test_mark_tos_congestion_device_and_lowat_read_back_on_the_daemons_connections(backend_factory, daemon_factory):
    kernel = KernelNet.read()
    # An algorithm other than the default, so that reading it back proves it was set.
    default = open("/proc/sys/net/ipv4/tcp_congestion_control").read().strip()
    algo = next(a for a in kernel.congestion_available if a != default)
    backend = backend_factory(echo=True)
    sock_cfg = {"mark": 0x2A, "dscp": 46, "congestion": algo, "bind_device": "lo", "tcp_notsent_lowat": 16384}
    daemon = daemon_factory({"g": group_config(backend, connections=2, socket=sock_cfg),
                             "plain": group_config(backend, connections=1)})
    backend.wait_open(3)
    wait_until(lambda: all(c["socket"] for c in connections(daemon)), 10, "socket options on every connection")
    for conn in connections(daemon):
        assert conn["socket"] == {"mark": 0x2A, "tos": 46 << 2, "congestion": algo, "bind_device": "lo",
                                  "notsent_lowat": 16384}, conn
    (plain,) = connections(daemon, "plain")
    assert plain["socket"]["mark"] == 0 and plain["socket"]["tos"] == 0 and plain["socket"]["congestion"] == default
    # kmux-cli group -j carries the same record; the table shows it in words.
    proc = kmux_cli(daemon, "group", "g", "-j")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert [c["socket"] for c in record["connections"]] == [c["socket"] for c in connections(daemon)]
    assert record["socket"]["configured"] == {"mark": 0x2A, "bind_device": "lo", "tos": 0xB8, "congestion": algo,
                                              "tcp_notsent_lowat": 16384}
    table = kmux_cli(daemon, "group", "g")
    assert table.returncode == 0, table.stderr
    assert table.stdout.count(f"mark=0x2a tos=0xb8 cc={algo} dev=lo lowat=16384") == 2, table.stdout
    assert f"socket mark 0x2a  bind_device lo  tos 0xb8  congestion {algo}  tcp_notsent_lowat 16384" in table.stdout
    # Traffic flows with all of it set.
    assert echoed(daemon, "g", 20) == list(range(1, 21))


def test_more_connections_than_ports_exhausts_the_range_clearly(recorder, daemon_factory):
    first, last = free_range(2)
    daemon = daemon_factory({"g": group_config(recorder, connections=4, reconnect_initial=0.05, reconnect_max=0.2,
                                               socket={"source_ports": [first, last]})})
    wait_until(lambda: len(recorder.peers) == 2, 10, "two connections at the server")
    expected = (f"source_ports {first}..{last} exhausted: all 2 ports tried are in use towards "
                f"{recorder.address} (groups.g.socket.source_ports: widen the range, or lower connections)")

    def two_refused():
        down = [c for c in connections(daemon) if not c["local"]]
        return len(down) == 2 and all(c["last_error"] == expected for c in down) and down
    wait_until(two_refused, 10, "the two connections without a port to report the range exhausted")
    assert sorted(p for _, p in recorder.peers) == [first, last]
    assert daemon.wait_log("dial_failed", error=expected)
    assert daemon.proc.poll() is None


def _capability_free_prefix() -> list[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root: the test runs kmuxd as root with no capabilities, as the shipped unit does")
    if not shutil.which("setpriv"):
        pytest.skip("no setpriv (util-linux)")
    return ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"]


def test_a_group_whose_capability_is_missing_fails_its_dials_and_the_others_go_on(recorder, backend_factory,
                                                                                  daemon_factory):
    prefix = _capability_free_prefix()
    backend = backend_factory(echo=True)
    daemon = daemon_factory({
        "low": group_config(recorder, connections=2, socket={"source_ports": [700, 710]}),
        "marked": group_config(recorder, connections=1, socket={"mark": 7}),
        "echo": group_config(backend, connections=2),
    }, prefix=prefix)
    status = open(f"/proc/{daemon.pid}/status").read()
    assert "CapEff:\t0000000000000000" in status, "kmuxd must run without capabilities here"
    # It says so at start, once per capability, with the drop-in.
    missing = {e["capability"]: e for e in daemon.logs("capability_missing")}
    assert sorted(missing) == ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"]
    assert missing["CAP_NET_ADMIN"]["keys"] == ["groups.marked.socket.mark"]
    assert missing["CAP_NET_BIND_SERVICE"]["drop_in"] == (
        "[Service]; CapabilityBoundingSet=CAP_NET_BIND_SERVICE; AmbientCapabilities=CAP_NET_BIND_SERVICE")

    def failed(group: str, cap: str):
        return all((c["last_error"] or "").startswith("permission_denied: ") and cap in c["last_error"]
                   for c in connections(daemon, group))
    wait_until(lambda: failed("low", "CAP_NET_BIND_SERVICE"), 10, "low's dials refused for CAP_NET_BIND_SERVICE")
    wait_until(lambda: failed("marked", "CAP_NET_ADMIN"), 10, "marked's dials refused for CAP_NET_ADMIN")
    error = connections(daemon, "low")[0]["last_error"]
    assert "binding source port 7" in error and "(groups.low.socket.source_ports)" in error
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in error and "AmbientCapabilities=CAP_NET_BIND_SERVICE" in error
    assert "kmuxd.service.d" in error and "docs/systemd.md" in error
    assert recorder.peers == []
    # The daemon is up and the group that needs nothing carries traffic.
    backend.wait_open(2)
    assert echoed(daemon, "echo", 20) == list(range(1, 21))
    assert daemon.proc.poll() is None
    health = group_record(daemon, "low")["endpoint_health"][0]
    assert health["state"] != "healthy" and health["failures"] >= 1, health


def test_with_the_capability_the_same_group_connects_from_a_privileged_port(recorder, daemon_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: binding a port below 1024")
    prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all,+net_bind_service", "--"]
    daemon = daemon_factory({"low": group_config(recorder, connections=2, socket={"source_ports": [700, 710]})},
                            prefix=prefix)
    wait_until(lambda: len(recorder.peers) == 2, 10, "two connections from privileged ports")
    assert all(700 <= port <= 710 for _, port in recorder.peers), recorder.peers
    assert daemon.proc.poll() is None


def test_a_congestion_algorithm_the_kernel_lacks_is_refused_at_load(short_dir):
    kernel = KernelNet.read()
    lacking = next(a for a in ("vegas", "westwood", "htcp", "hybla") if a not in kernel.congestion_available)
    path = write_config(short_dir / "cc.toml", {"socket": str(short_dir / "k.sock")},
                        {"g": {"endpoints": ["127.0.0.1:9"], "socket": {"congestion": lacking}}})
    proc = subprocess.run([*kmuxd_command(), "--config", str(path), "--check"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"kmuxd: invalid configuration: groups.g.socket.congestion: {lacking!r} is not "
                                  "available in this kernel"), proc.stderr


def test_a_reload_applies_changed_options_to_new_connections(backend_factory, daemon_factory):
    backend = backend_factory(echo=True)
    groups = {"g": group_config(backend, connections=2, socket={"dscp": 10})}
    daemon = daemon_factory(groups)
    backend.wait_open(2)
    wait_until(lambda: [c["socket"]["tos"] for c in connections(daemon) if c["socket"]] == [40, 40], 10, "tos 40")
    groups["g"]["socket"] = {"dscp": 46}
    write_config(daemon.config_path, {"socket": daemon.socket_path, "log_format": "json"}, groups)
    proc = kmux_cli(daemon, "reload")
    assert proc.returncode == 0, proc.stderr
    assert group_record(daemon)["socket"]["configured"] == {"tos": 184}
    assert [c["socket"]["tos"] for c in connections(daemon)] == [40, 40]  # the live ones keep theirs
    assert kmux_cli(daemon, "reconnect", "g").returncode == 0
    wait_until(lambda: [c["socket"]["tos"] for c in connections(daemon) if c["socket"]] == [184, 184], 10,
               "the new connections with tos 184")
    assert echoed(daemon, "g", 10) == list(range(1, 11))
