"""A peer that vanishes without a FIN is found by TCP keepalive or ``tcp_user_timeout`` (issue #10).

To make a peer vanish for real, the test makes a network namespace of its
own (``ip netns add``; only its loopback, 127.0.0.1, is used), runs
memcached *and* kmuxd inside it (``ip netns exec``; kmuxd's Unix sockets
are files, so the test's apps reach them from outside), and then drops
every packet on that loopback with the ``blackhole`` qdisc (``tc``): no
FIN, no reset, nothing. The namespace is deleted at teardown. Needs root
and ``ip``/``tc``; skipped otherwise (the stalled-server variants in
``tests/integration`` still run).

* ``tcp_user_timeout``: a request written into the dead network stays
  unacknowledged; the kernel gives up after the timeout and the request
  gets ``connection_lost``, within the timeout plus the retransmission
  schedule, long before any ``request_timeout``.
* keepalive: memcached is stopped (SIGSTOP: its kernel still acknowledges
  the request, so nothing is unacknowledged), then the network dies. Only
  keepalive probes can tell, after about ``keepalive_idle + keepalive_interval
  x keepalive_count``; then the request gets ``connection_lost``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import pytest

import kmux

from . import OP_GET, OP_SET, STATUS_OK, mc_get, mc_parse, mc_set
from .conftest import Memcached, find_binary, group_stats
from tests.integration.helpers import wait_until

MC_PORT = 11211
#: Slack on top of a kernel timer: retransmissions back off from 200 ms (TCP_RTO_MIN), and the
#: user timeout is checked only when one fires; a loaded machine adds scheduling delay.
KERNEL_SLACK = 3.0


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@pytest.fixture
def netns():
    """A fresh network namespace with its loopback up; deleted at teardown."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        pytest.skip("network namespaces need root, ip and tc")
    name = f"kmx-{uuid.uuid4().hex[:8]}"
    made = _ip("netns", "add", name)
    if made.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {made.stderr.strip()}")
    try:
        assert _ip("netns", "exec", name, "ip", "link", "set", "lo", "up").returncode == 0
        probe = _ip("netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "blackhole")
        if probe.returncode != 0:
            pytest.skip(f"the blackhole qdisc is not available: {probe.stderr.strip()}")
        assert _ip("netns", "exec", name, "tc", "qdisc", "del", "dev", "lo", "root").returncode == 0
        yield name
    finally:
        _ip("netns", "del", name)


def blackhole(ns: str, on: bool) -> None:
    """Drop every packet on the namespace's loopback (or stop dropping)."""
    args = ["add", "dev", "lo", "root", "blackhole"] if on else ["del", "dev", "lo", "root"]
    done = _ip("netns", "exec", ns, "tc", "qdisc", *args)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def memcached_in(netns, short_dir):
    binary = find_binary("memcached")
    if binary is None:
        pytest.skip("memcached is not installed (./dev.sh test installs the Debian package 'memcached')")
    server = Memcached(["ip", "netns", "exec", netns, binary, "-l", "127.0.0.1", "-p", str(MC_PORT), "-U", "0",
                        "-t", "1", "-B", "binary", "-u", "nobody"], short_dir / "memcached-netns.log", MC_PORT)
    try:
        yield server
    finally:
        server.resume()
        server.stop()


def start_in(netns: str, daemon_factory, **group):
    cfg = {"endpoints": [f"127.0.0.1:{MC_PORT}"], "connections": 1, "framing": "memcached-binary",
           "steering": "id", "id": {"request_offset": 12, "response_offset": 12, "size": 4, "rewrite": True},
           "reconnect_initial": 0.05, "reconnect_max": 0.2, "connect_timeout": 1.0, "max_message": 65536}
    cfg.update(group)
    daemon = daemon_factory({"g": cfg}, prefix=["ip", "netns", "exec", netns])
    wait_until(lambda: group_stats(daemon)["connections_up"] == cfg["connections"], 10.0, "connected in the netns")
    return daemon


def set_and_get(c: kmux.Client, key: bytes, opaque: int) -> None:
    c.send(mc_set(key, b"v", opaque=opaque))
    r = mc_parse(c.recv(timeout=5.0))
    assert (r.opcode, r.status, r.opaque) == (OP_SET, STATUS_OK, opaque), r
    c.send(mc_get(key, opaque=opaque + 1))
    r = mc_parse(c.recv(timeout=5.0))
    assert (r.opcode, r.status, r.opaque, r.value) == (OP_GET, STATUS_OK, opaque + 1, b"v"), r


def lost_after(c: kmux.Client, seq: int, bound: float) -> float:
    """Wait for connection_lost naming ``seq``; seconds it took (AssertionError past ``bound``)."""
    started = time.monotonic()
    try:
        msg = c.recv(timeout=bound)
    except kmux.ConnectionLost as exc:
        assert exc.seq == seq, exc
        return time.monotonic() - started
    except TimeoutError:
        raise AssertionError(f"no outcome for seq {seq} within {bound}s: the dead peer went unnoticed") from None
    raise AssertionError(f"a dead network answered: {msg[:40]!r}")


def test_tcp_user_timeout_finds_a_peer_that_vanished_mid_request(netns, memcached_in, daemon_factory):
    user_timeout = 1.0
    daemon = start_in(netns, daemon_factory, tcp_user_timeout=user_timeout, keepalive_idle=0, request_timeout=0)
    with daemon.connect() as c:
        set_and_get(c, b"ut", 1)
        blackhole(netns, True)
        try:
            seq = c.send(mc_get(b"ut", opaque=3))
            took = lost_after(c, seq, user_timeout + KERNEL_SLACK)
            g = group_stats(daemon)
            assert g["connections"][0]["last_error"] and "ETIMEDOUT" in g["connections"][0]["last_error"], g
        finally:
            blackhole(netns, False)
        wait_until(lambda: group_stats(daemon)["connections_up"] == 1, 10.0, "reconnected once the network is back")
        set_and_get(c, b"ut2", 10)
    print(f"tcp_user_timeout={user_timeout}s: the request in flight got connection_lost after {took:.2f}s")


def test_keepalive_finds_a_peer_that_vanished_with_a_request_acknowledged(netns, memcached_in, daemon_factory):
    idle, interval, count = 1, 1, 2
    daemon = start_in(netns, daemon_factory, keepalive_idle=idle, keepalive_interval=interval,
                      keepalive_count=count, request_timeout=0)
    with daemon.connect() as c:
        set_and_get(c, b"ka", 1)
        memcached_in.pause()  # its kernel still ACKs: the request below is acknowledged, never answered
        seq = c.send(mc_get(b"ka", opaque=3))
        # Written and acknowledged by the server's kernel (TCP_INFO: nothing unacked) before the network dies.
        wait_until(lambda: (conn := group_stats(daemon)["connections"][0])["in_flight"] == 1
                   and conn["tcp"]["unacked"] == 0, 5.0, "the request written and acknowledged")
        blackhole(netns, True)
        try:
            bound = idle + interval * count + KERNEL_SLACK
            took = lost_after(c, seq, bound)
            g = group_stats(daemon)
            assert "ETIMEDOUT" in (g["connections"][0]["last_error"] or ""), g
        finally:
            blackhole(netns, False)
            memcached_in.resume()
        wait_until(lambda: group_stats(daemon)["connections_up"] == 1, 10.0, "reconnected once the network is back")
        set_and_get(c, b"ka2", 10)
    print(f"keepalive {idle}+{interval}x{count}s: the acknowledged request got connection_lost after "
          f"{took:.2f}s of dead network")
