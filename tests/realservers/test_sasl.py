"""Credentials apps never see: memcached with SASL (``-S``), authenticated by kmuxd's handshake step.

memcached (Debian's build) is started with SASL required and one user in a
sasldb (secure.py). The group's ``[[groups.NAME.handshake]]`` step sends a
SASL_AUTH PLAIN request read from a root-only file and expects status 0 at
bytes 6..7 of the reply. Apps run as other users that cannot read that
file; they only ever see their own values. A wrong password is a failed
dial naming the step and the bytes, and apps get an error, not an answer
and not a hang; memcached keeps a connection open after a failed
SASL_AUTH, so kmuxd closes it itself.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import kmux

from tests.integration.as_user import need_root
from tests.integration.helpers import kmux_cli, wait_until

from . import STATUS_OK, mc_get, mc_parse, mc_set
from .conftest import assert_request_counters, group_stats, response_over, start_kmuxd
from .mc_app import run_mc_apps
from .secure import SASL_PASSWORD, SASL_USER, STATUS_AUTH_ERROR, sasl_plain_auth, start_memcached_sasl
from .test_tls import QUEUE_TIMEOUT, assert_app_told, open_to_apps, totals

APPS = 5
ROUNDS = 60
APP_UID = 4400
CONNECTIONS = 3
WRONG = "handshake step 1: bytes 6..7 are 0020, expected 0000"


def handshake_file(short_dir: Path, password: str) -> Path:
    """The SASL_AUTH message, as an operator keeps it: root's, mode 0600, in a root-only directory."""
    secrets = short_dir / "secrets"
    secrets.mkdir(mode=0o700, exist_ok=True)
    path = secrets / "mc-sasl"
    path.write_bytes(sasl_plain_auth(SASL_USER, password))
    path.chmod(0o600)
    return path


def sasl_group(path: Path, **kw):
    cfg = {
        "framing": "memcached-binary",
        "steering": "id",
        "id": {"request_offset": 12, "response_offset": 12, "size": 4, "rewrite": True},
        "request_timeout": 10.0,
        "connections": CONNECTIONS,
        "handshake": [{"send_file": str(path), "expect_offset": 6, "expect_hex": "0000"}],
    }
    cfg.update(kw)
    return cfg


def unauthenticated_set(server) -> int:
    """What memcached answers a SET without SASL_AUTH, straight to it: proof that auth is required."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
        s.sendall(mc_set(b"k", b"v", opaque=1))
        return response_over(s).status


def established_to(port: int) -> int:
    """TCP connections to 127.0.0.1:port in ESTABLISHED state on this host (client side)."""
    r = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    return len([line for line in r.stdout.splitlines() if line.strip()])


def test_sasl_for_apps_that_cannot_read_the_handshake_file_also_across_reconnect(daemon_factory, short_dir):
    need_root()
    server = start_memcached_sasl(short_dir)
    try:
        assert unauthenticated_set(server) == STATUS_AUTH_ERROR
        secret = handshake_file(short_dir, SASL_PASSWORD)
        daemon = start_kmuxd(lambda groups: daemon_factory(groups, **open_to_apps(short_dir)), server,
                             **sasl_group(secret))

        def reconnect_all() -> None:
            for i in range(CONNECTIONS):
                r = kmux_cli(daemon, "reconnect", "g", str(i))
                assert r.returncode == 0, r.stderr
            wait_until(lambda: all(c["reconnects"] == 1 and c["state"] == "ready"
                                   for c in group_stats(daemon)["connections"]), 10, "every connection redialled")

        results = run_mc_apps(daemon.socket_path, "g", APPS, ROUNDS, [str(secret)], uid_base=APP_UID,
                              pause_at=ROUNDS // 2, between=reconnect_all)
        t = totals(results)
        figures = {"clients": APPS, "requests": t["requests"], "checked": t["checked"], "mismatches": t["mismatches"],
                   "reconnects": CONNECTIONS}
        print(f"\nSASL memcached: {json.dumps(figures)}", file=sys.stderr)
        for r in results:
            assert r["uid"] >= APP_UID and r["readable_secrets"] == [], r
            assert r["counts"].get("checked") == ROUNDS and not r["problems"], r
        assert t["mismatches"] == 0 and t["requests"] == APPS * ROUNDS * 2
        # Every connection, the first ones and the redialled ones, authenticated; no reply reached an app
        # or counted as unmatched.
        assert len(daemon.logs("connected")) == 2 * CONNECTIONS
        assert not daemon.logs("dial_failed")
        g = assert_request_counters(daemon)
        assert g["security"]["handshake_steps"] == 1 and g["rx_msgs"] == APPS * ROUNDS * 2, g
    finally:
        server.stop()


def test_a_wrong_password_fails_dials_naming_the_step_and_apps_get_an_error(daemon_factory, short_dir):
    server = start_memcached_sasl(short_dir)
    try:
        secret = handshake_file(short_dir, "not-the-password")
        daemon = daemon_factory({"g": {"endpoints": [server.address], **sasl_group(
            secret, queue_timeout=QUEUE_TIMEOUT, reconnect_initial=0.1, reconnect_max=0.2)}})
        lines = daemon.wait_log("dial_failed", count=3, timeout=10)
        assert all(line["error"] == WRONG for line in lines), lines
        g = group_stats(daemon)
        assert g["connections_up"] == 0 and g["endpoint_health"][0]["failures"] >= 1, g
        assert all(c["last_error"] == WRONG for c in g["connections"] if c["dial_failures"]), g["connections"]
        assert WRONG in kmux_cli(daemon, "group", "g").stdout
        # memcached keeps a connection open after a failed SASL_AUTH: kmuxd closed every one itself.
        wait_until(lambda: established_to(server.port) == 0, 5, "no connection left open to memcached")
        assert_app_told(daemon, WRONG)
    finally:
        server.stop()


def test_a_reload_with_a_changed_handshake_file_is_used_by_new_connections(daemon_factory, short_dir):
    server = start_memcached_sasl(short_dir)
    try:
        secret = handshake_file(short_dir, "an-old-password")
        daemon = daemon_factory({"g": {"endpoints": [server.address], **sasl_group(
            secret, reconnect_initial=0.05, reconnect_max=0.2)}})
        daemon.wait_log("dial_failed", count=2, timeout=10)
        handshake_file(short_dir, SASL_PASSWORD)  # the operator rotates the password
        r = kmux_cli(daemon, "reload")
        assert r.returncode == 0, r.stderr
        daemon.wait_log("connected", count=CONNECTIONS, timeout=10)
        with kmux.connect("g", daemon.socket_path, timeout=5.0) as c:
            c.send(mc_set(b"rotated", b"yes", opaque=3))
            assert mc_parse(c.recv(timeout=5)).status == STATUS_OK
            c.send(mc_get(b"rotated", opaque=3))
            got = mc_parse(c.recv(timeout=5))
        assert (got.status, got.value, got.opaque) == (STATUS_OK, b"yes", 3)
    finally:
        server.stop()
