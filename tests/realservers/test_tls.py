"""TLS to real servers: memcached with mutual TLS (Debian's build, ``-Z``), unbound serving DNS over TLS.

The certificates are made when the tests run (tests/integration/certs.py).
Apps run as other users (tests/integration/as_user.py) that cannot read the
client key kmuxd presents for them: the privilege the daemon lends. Each
app checks every value it reads back (mc_app.py), with the same opaques in
every app, so only kmuxd's id rewrite keeps them apart.

The failures are real ones: a CA that did not sign the server's
certificate, a name the certificate does not carry, an expired
certificate, a server that wants a client certificate we do not have.
Each is a failed dial with a clear reason (``last_error``, the log,
kmux-cli), and an app's request gets ``group_unavailable`` naming it within
``queue_timeout``: never a hang.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.integration.as_user import need_root
from tests.integration.certs import SERVER_NAME, make_pki
from tests.integration.helpers import kmux_cli, log_time, wait_until

from .conftest import assert_request_counters, group_stats, start_kmuxd, start_unbound
from .mc_app import run_mc_apps
from .secure import start_memcached_tls

APPS = 6
ROUNDS = 100
#: The uids the apps run as: no passwd entry, no group shared with root.
APP_UID = 4300


def tls_group(pki, **kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "framing": "memcached-binary",
        "steering": "id",
        "id": {"request_offset": 12, "response_offset": 12, "size": 4, "rewrite": True},
        "request_timeout": 10.0,
        "tls": {"ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key),
                "server_name": SERVER_NAME},
    }
    cfg.update(kw)
    return cfg


@pytest.fixture
def pki(short_dir: Path):
    return make_pki(short_dir / "pki")


def open_to_apps(short_dir: Path) -> dict[str, Any]:
    """The daemon settings and directory mode that let apps of other uids reach the socket."""
    short_dir.chmod(0o755)
    return {"socket_mode": "0666"}


def totals(results: list[dict]) -> Counter:
    out: Counter = Counter()
    for r in results:
        out.update(r["counts"])
    return out


def cli(daemon, *args: str) -> subprocess.CompletedProcess:
    return kmux_cli(daemon, *args, timeout=20)


def test_memcached_mutual_tls_for_apps_that_cannot_read_the_key(daemon_factory, short_dir, pki):
    need_root()
    server = start_memcached_tls(short_dir, pki)
    try:
        daemon = start_kmuxd(lambda groups: daemon_factory(groups, **open_to_apps(short_dir)), server,
                             **tls_group(pki))
        results = run_mc_apps(daemon.socket_path, "g", APPS, ROUNDS, [str(pki.client_key)], uid_base=APP_UID)
        t = totals(results)
        figures = {"clients": APPS, "requests": t["requests"], "checked": t["checked"],
                   "mismatches": t["mismatches"], "errors": t["requests"] - 2 * t["checked"] - t["mismatches"]}
        print(f"\nmutual TLS memcached: {json.dumps(figures)}", file=sys.stderr)
        for r in results:
            assert r["uid"] >= APP_UID and r["readable_secrets"] == [], r
            assert r["counts"].get("checked") == ROUNDS and not r["problems"], r
        assert t["requests"] == APPS * ROUNDS * 2 and t["mismatches"] == 0
        assert_request_counters(daemon)

        g = group_stats(daemon)
        sec = g["security"]
        assert sec["tls"] and sec["verify"] and sec["client_cert"] and sec["warning"] is None, sec
        for c in g["connections"]:
            tls = c["tls"]
            assert tls["verified"] and tls["server_subject"] == f"CN={SERVER_NAME}", tls
            assert tls["version"] in ("TLSv1.2", "TLSv1.3") and tls["cipher"], tls
            # make_pki issues for 30 days
            assert 29 * 86400 < tls["server_cert_expiry_seconds"] <= 30 * 86400, tls
            assert 29 * 86400 < tls["client_cert_expiry_seconds"] <= 30 * 86400, tls
        metrics = cli(daemon, "metrics").stdout
        for cert in ("server", "client"):
            assert any(line.startswith("kmux_tls_cert_expiry_seconds{") and f'cert="{cert}"' in line
                       for line in metrics.splitlines()), metrics
        shown = cli(daemon, "group", "g").stdout
        assert "tls 1.2+ verify on" in shown and f"name {SERVER_NAME}" in shown, shown
    finally:
        server.stop()


def test_sessions_are_resumed_across_reconnects(daemon_factory, short_dir, pki):
    server = start_memcached_tls(short_dir, pki)
    try:
        daemon = start_kmuxd(daemon_factory, server, **tls_group(pki, connections=2))
        assert all(not c["tls"]["resumed"] for c in group_stats(daemon)["connections"])
        for i in range(2):
            assert cli(daemon, "reconnect", "g", str(i)).returncode == 0
        wait_until(lambda: all(c["tls"] and c["reconnects"] == 1 for c in group_stats(daemon)["connections"]),
                   10, "both connections redialled")
        g = group_stats(daemon)
        assert all(c["tls"]["resumed"] for c in g["connections"]), g["connections"]
        assert g["security"]["tls_resumed"] >= 2 and g["security"]["tls_handshakes"] >= 4, g["security"]
        assert len(daemon.logs("connected", resumed=True)) >= 2
    finally:
        server.stop()


# -- failed handshakes: failed dials, a clear reason, clients told within queue_timeout -------------------

QUEUE_TIMEOUT = 1.0


def assert_dials_fail(daemon, *fragments: str) -> str:
    """Every slot's dials fail with a reason carrying ``fragments``; returns that reason."""
    lines = daemon.wait_log("dial_failed", count=2, timeout=10)
    error = lines[-1]["error"]
    for f in fragments:
        assert f in error, error
    g = group_stats(daemon)
    assert g["connections_up"] == 0, g
    for c in g["connections"]:
        assert c["state"] in ("backoff", "connecting", "tls_handshake"), c
        assert c["dial_failures"] >= 1 and all(f in c["last_error"] for f in fragments), c
    health = g["endpoint_health"][0]
    assert health["state"] in ("ejected", "probing") and health["failures"] >= 1, health
    shown = cli(daemon, "group", "g").stdout
    assert fragments[0] in shown, shown
    return error


def assert_app_told(daemon, fragment: str) -> None:
    """An app's request gets group_unavailable naming the failure, within queue_timeout (never a hang)."""
    import kmux
    from kmux.errors import GroupUnavailable

    from . import mc_get

    with kmux.connect("g", daemon.socket_path, timeout=5.0) as c:
        t0 = time.monotonic()
        c.send(mc_get(b"anything", opaque=7))
        with pytest.raises(GroupUnavailable) as info:
            c.recv(timeout=QUEUE_TIMEOUT + 5)
        waited = time.monotonic() - t0
    assert waited < QUEUE_TIMEOUT + 1.5, f"told after {waited:.2f}s"
    assert fragment in info.value.message and info.value.seq == 1, info.value


@pytest.mark.parametrize("case", ["wrong_ca", "name_mismatch", "expired", "no_client_cert"])
def test_a_failed_tls_handshake_is_a_failed_dial_with_a_clear_reason(daemon_factory, short_dir, pki, case):
    cert = key = None
    group = tls_group(pki, queue_timeout=QUEUE_TIMEOUT, connections=2, reconnect_initial=0.2, reconnect_max=0.5)
    if case == "wrong_ca":
        group["tls"]["ca"] = str(pki.other_ca)
        want = ("TLS handshake with", "certificate verify failed", "tls.ca does not trust it")
    elif case == "name_mismatch":
        group["tls"]["server_name"] = "other.kmux.test"
        want = ("TLS handshake with", "Hostname mismatch", "other.kmux.test")
    elif case == "expired":
        cert, key = pki.issue("expired", SERVER_NAME, days=-1)
        want = ("TLS handshake with", "certificate has expired")
    else:
        del group["tls"]["cert"], group["tls"]["key"]
        want = ("TLS handshake with", "client certificate")
    server = start_memcached_tls(short_dir, pki, cert=cert, key=key)
    try:
        daemon = daemon_factory({"g": {"endpoints": [server.address], **group}})
        error = assert_dials_fail(daemon, *want)
        print(f"\n{case}: {error}", file=sys.stderr)
        assert_app_told(daemon, want[0])
        assert server.alive()
    finally:
        server.stop()


# -- unbound: DNS over TLS ------------------------------------------------------------------------

def test_unbound_dns_over_tls_30_apps_reusing_query_ids(daemon_factory, short_dir, pki):
    from .test_recycling import run_dns_apps

    server = start_unbound(short_dir, tls=(pki.server_cert, pki.server_key))
    try:
        group = {
            "endpoints": [f"127.0.0.1:{server.tls_port}"],
            "connections": 4,
            "framing": "u16be",
            "max_message": 65535,
            "steering": "id",
            "id": {"request_offset": 2, "response_offset": 2, "size": 2, "rewrite": True},
            "request_timeout": 10.0,
            "tls": {"ca": str(pki.ca), "server_name": SERVER_NAME},
        }
        daemon = daemon_factory({"g": group})
        daemon.wait_log("connected", count=4, timeout=10)
        totals_, problems, _ = run_dns_apps(daemon, server.records)
        print(f"\nunbound DoT: {dict(totals_)}", file=sys.stderr)
        assert totals_["mismatches"] == 0 and totals_["timeouts"] == 0, (totals_, problems)
        assert totals_["answers"] == totals_["queries"] > 0, (totals_, problems)
        assert all(c["tls"] and c["tls"]["verified"] for c in group_stats(daemon)["connections"])
        assert_request_counters(daemon)
    finally:
        server.stop()


def test_a_reload_with_renewed_certificate_files_replaces_connections_without_loss(daemon_factory, short_dir, pki):
    """The operator renews the client certificate in place (same paths) and reloads while apps
    run: new connections present the new certificate, the old ones are replaced make-before-break,
    and every app's every request is answered and checked."""
    import threading

    server = start_memcached_tls(short_dir, pki)
    try:
        cert, key = short_dir / "client.pem", short_dir / "client.key"
        cert.write_bytes(pki.client_cert.read_bytes())
        key.write_bytes(pki.client_key.read_bytes())
        key.chmod(0o600)
        group = tls_group(pki)
        group["tls"].update(cert=str(cert), key=str(key))
        daemon = start_kmuxd(daemon_factory, server, **group)
        before = group_stats(daemon)["connections"]
        assert all(c["tls"]["client_cert_expiry_seconds"] > 29 * 86400 for c in before)
        reloads: list[Any] = []

        def renew_and_reload() -> None:
            new_cert, new_key = pki.issue("renewed", "kmuxd-client", client=True, san="", days=20)
            cert.write_bytes(new_cert.read_bytes())
            key.write_bytes(new_key.read_bytes())
            # The apps go on while the reload is applied.
            t = threading.Thread(target=lambda: reloads.append(cli(daemon, "reload")), daemon=True)
            t.start()
            reloads.append(t)

        rounds = 600
        results = run_mc_apps(daemon.socket_path, "g", 4, rounds, [], uid_base=None, pause_at=50,
                              between=renew_and_reload)
        apps_done = time.time()
        reloads[0].join(20)
        assert reloads[1].returncode == 0, reloads[1].stderr
        t = totals(results)
        assert t["checked"] == 4 * rounds and t["mismatches"] == 0 and t["requests"] == 4 * rounds * 2, (t, results)
        renewed = daemon.wait_log("tls_renewed")
        assert renewed[0]["connections_replaced"] == 4, renewed
        assert log_time(renewed[0]) < apps_done, "the reload came after the apps were done: not under traffic"
        wait_until(lambda: all(c["tls"] and c["tls"]["client_cert_expiry_seconds"] < 21 * 86400
                               and c["state"] == "ready" for c in group_stats(daemon)["connections"]),
                   10, "every connection replaced by one with the renewed certificate")
        g = assert_request_counters(daemon)
        assert g["recycles"] >= 4 and g["requests_failed"] == 0, g
    finally:
        server.stop()
