"""Who may use a group (``allow_users``/``allow_groups``): real apps under their own ids.

Each app is a real process (:class:`~tests.integration.as_user.AppPeer`)
that the kernel knows by the uid, primary gid and supplementary groups it
was started with, so what kmuxd reads with ``SO_PEERCRED`` and
``SO_PEERGROUPS`` is the kernel's word. The apps' socket is mode 0666 in a
0755 directory: only kmuxd's own check stands between an app and a group.

The groups are named so that no name is part of another or of any
refusal's fixed wording: a refusal that mentions a group other than the one
asked for is found by a substring search over every configured name.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter

import pytest

from kmux.control import ControlClient

from kmuxd.io.server import REFUSAL_LOG_INTERVAL

from .as_user import AppPeer, need_root
from .helpers import group_config, wait_until, write_config
from .test_cli import cli
from .reqresp import summarize_req

#: Every group, open or not, and who its lists name (numbers, names, numeric strings).
GROUPS: dict[str, dict] = {
    "open-sesame": {},
    "alpha-uids": {"allow_users": [4242]},
    "bravo-gids": {"allow_groups": [4343]},
    "charlie-names": {"allow_users": ["nobody"], "allow_groups": ["daemon", "nogroup"]},
    "delta-closed": {"allow_users": []},
    "foxtrot-mixed": {"allow_users": ["4242"], "allow_groups": ["4444"]},
}
#: (uid, primary gid, supplementary gids) -> the groups that must admit it. Users
#: and groups named in the config: nobody = uid 65534, nogroup = gid 65534, daemon = gid 1.
IDENTITIES: list[tuple[tuple[int, int, list[int]], set[str]]] = [
    ((4242, 4242, []), {"open-sesame", "alpha-uids", "foxtrot-mixed"}),  # by uid (a number and "4242")
    ((4243, 4343, []), {"open-sesame", "bravo-gids"}),  # by primary gid
    ((4244, 4244, [4343]), {"open-sesame", "bravo-gids"}),  # by supplementary gid
    ((65534, 4245, []), {"open-sesame", "charlie-names"}),  # by user name (nobody)
    ((4246, 4246, [1]), {"open-sesame", "charlie-names"}),  # by supplementary group name (daemon)
    ((4247, 65534, []), {"open-sesame", "charlie-names"}),  # by primary group name (nogroup)
    ((4248, 4248, [4444, 5555]), {"open-sesame", "foxtrot-mixed"}),  # one of several supplementary gids
    ((4249, 4249, [4342, 4443]), {"open-sesame"}),  # near misses: admitted nowhere else
]
UNKNOWN = "zulu-missing"
#: Where the test's own requests start, so they never collide with a peer's.
CID = 7


def echo_backend(backend_factory):
    return backend_factory(echo=True, summarize=summarize_req, max_frame=65536)


@pytest.fixture
def policy_daemon(backend_factory, daemon_factory, short_dir):
    """Every group of GROUPS on one echo backend; the apps' socket open to every uid."""
    need_root()
    short_dir.chmod(0o755)
    backend = echo_backend(backend_factory)
    groups = {name: group_config(backend, connections=1, **extra) for name, extra in GROUPS.items()}
    daemon = daemon_factory(groups, socket_mode="0666")
    backend.wait_open(len(GROUPS))
    return daemon, backend


def try_every_group(peer: AppPeer, cid: int) -> dict[str, dict]:
    """Join each group (and an unknown one); where admitted, one request makes its round trip."""
    outcome = {}
    for name in [*GROUPS, UNKNOWN]:
        answer = peer.connect(group=name, name=f"probe-{cid}")
        if answer["ok"]:
            handle = answer["client"]
            assert peer.send(client=handle, cid=cid, count=1)["sent"] == 1
            echo = peer.recv(client=handle, timeout=5.0)
            assert (echo["kind"], echo["client"], echo["seq"]) == ("data", cid, 1), echo
            peer.disconnect(client=handle)
        outcome[name] = answer
    return outcome


def assert_names_only(text: str, asked: str) -> None:
    others = [name for name in [*GROUPS, UNKNOWN] if name != asked and name in text]
    assert not others, f"the refusal for {asked!r} names {others}: {text!r}"


def test_who_is_admitted_and_what_refusals_say_and_how_they_are_counted_and_logged(policy_daemon):
    """Each identity of IDENTITIES joins exactly the groups that admit it (and can use
    them); every refusal is permission_denied (unknown_group for the unknown name) and
    names no group but the one asked for. Refusals are counted by code, and logged
    with uid, pid, comm and group: the first in full, then nothing for
    REFUSAL_LOG_INTERVAL, then one line that says how many were left out."""
    daemon, _ = policy_daemon
    burst = 300
    with AppPeer(daemon.socket_path, uid=4242, gid=4242, comm="kmx-knocker") as peer:
        pid = peer.whoami()["pid"]
        got = peer.connect_many(group="bravo-gids", count=burst)
        assert got["codes"] == {"permission_denied": burst}
        assert len(got["messages"]) == 1  # one wording for all: uid 4242 is not admitted
        burst_over = time.monotonic()  # the first line was logged before this
    (first,) = daemon.wait_log("client_refused")
    assert (first["uid"], first["pid"], first["comm"], first["group"]) == (4242, pid, "kmx-knocker", "bravo-gids")
    assert (first["error_code"], first["suppressed"]) == ("permission_denied", 0)

    refused = Counter({"permission_denied": burst})
    for cid, ((uid, gid, groups), admitted) in enumerate(IDENTITIES, start=100):
        with AppPeer(daemon.socket_path, uid=uid, gid=gid, groups=groups) as peer:
            assert peer.whoami()["uid"] == uid
            outcome = try_every_group(peer, cid)
        got = {name for name, answer in outcome.items() if answer["ok"]}
        assert got == admitted, f"uid {uid} gid {gid} groups {groups}: admitted to {sorted(got)}"
        for name, answer in outcome.items():
            if answer["ok"]:
                continue
            refused[answer["code"]] += 1
            assert answer["code"] == ("unknown_group" if name == UNKNOWN else "permission_denied"), answer
            assert_names_only(answer["message"], name)
            if name != UNKNOWN:
                assert f"uid {uid}" in answer["message"]
    # root is no exception: the lists are the policy.
    with AppPeer(daemon.socket_path) as root:
        outcome = try_every_group(root, 99)
    assert {name for name, answer in outcome.items() if answer["ok"]} == {"open-sesame"}
    refused.update(answer["code"] for answer in outcome.values() if not answer["ok"])

    status = json.loads(cli(daemon.control_socket, "status", "-j").stdout)
    assert status["refused_by_code"] == dict(refused)
    assert status["clients_refused"] == sum(refused.values())
    assert len(daemon.logs("client_refused")) == 1  # all the others within the interval: counted only
    # The rate limit's interval has to pass for the next line: that is what is tested.
    time.sleep(max(0.0, burst_over + REFUSAL_LOG_INTERVAL + 0.1 - time.monotonic()))
    with AppPeer(daemon.socket_path, uid=4243, gid=4243, comm="kmx-late") as peer:
        assert peer.connect_many(group="alpha-uids", count=1)["codes"] == {"permission_denied": 1}
    _, second = daemon.wait_log("client_refused", count=2)
    assert (second["uid"], second["comm"], second["group"]) == (4243, "kmx-late", "alpha-uids")
    assert second["suppressed"] == sum(refused.values()) - 1


def test_the_policy_is_shown_by_kmux_cli(policy_daemon):
    daemon, _ = policy_daemon
    policies = {g["name"]: g["access"] for g in json.loads(cli(daemon.control_socket, "groups", "-j").stdout)}
    assert policies["open-sesame"]["open"] is True and policies["open-sesame"]["text"] == "open"
    assert policies["alpha-uids"] == {"open": False, "users": [[4242, "4242"]], "groups": None, "text": "users 4242"}
    assert policies["charlie-names"]["users"] == [[65534, "nobody"]]
    assert policies["charlie-names"]["groups"] == [[1, "daemon"], [65534, "nogroup"]]
    assert policies["delta-closed"]["text"] == "users (none)"
    table = cli(daemon.control_socket, "groups").stdout.splitlines()
    policy_column = {line.split()[0]: line.split()[-1] for line in table[1:]}
    assert policy_column["open-sesame"] == "open"
    assert policy_column["alpha-uids"] == "u:4242"
    assert policy_column["bravo-gids"] == "g:4343"
    assert policy_column["delta-closed"] == "u:none"
    detail = cli(daemon.control_socket, "group", "charlie-names").stdout
    assert "access users nobody(65534); groups daemon(1), nogroup(65534)" in detail


def client_records(daemon) -> dict[str, dict]:
    with ControlClient(daemon.control_socket, timeout=5.0) as c:
        return {r["name"]: r for r in c.request("stats")["clients"]}


def test_a_reload_detaches_whom_the_new_policy_refuses_and_still_writes_what_it_accepted(
    backend_factory, daemon_factory, short_dir
):
    """``kmux-cli reload`` and SIGHUP: a client the new lists no longer admit gets
    ``permission_denied`` and is detached; every message the daemon had accepted
    from it (queued, not yet written: the backend is paused) still reaches the
    backend, once, in order. Clients still admitted stay, among them one admitted
    now only through a supplementary group that nobody read at its hello."""
    need_root()
    short_dir.chmod(0o755)
    backend = backend_factory(summarize=summarize_req, max_frame=65536, rcvbuf=16384)
    # A large outbox: everything the revoked client sends is accepted while the backend is paused.
    # (8 MB sent: more than the kernel's TCP buffers take, 4 MiB at most here.)
    settings = {"connections": 1, "write_buffer": 16 << 20}
    daemon = daemon_factory(
        {"ledger": group_config(backend, allow_users=[4242, 4243, 4250], **settings)}, socket_mode="0666"
    )
    backend.wait_open(1)
    a = AppPeer(daemon.socket_path, uid=4242, gid=4242, comm="kmx-revoked")
    b = AppPeer(daemon.socket_path, uid=4243, gid=4243)
    c = AppPeer(daemon.socket_path, uid=4250, gid=4250, groups=[4350])
    try:
        ha, hb, hc = (p.connect(group="ledger", name=n, receive=False)["client"] for p, n in ((a, "a"), (b, "b"), (c, "c")))
        backend.pause()
        count = 250
        assert a.send(client=ha, cid=1, count=count, size=32768)["sent"] == count
        assert b.send(client=hb, cid=2, count=10)["sent"] == 10
        queued = wait_until(
            lambda: (r := client_records(daemon)["a"])["tx_msgs"] + r["queued_msgs"] == count and r["queued_msgs"],
            10, "every message of a accepted",
        )
        assert queued > 0  # accepted and not yet written when the policy changes

        write_config(daemon.config_path, settings_of(daemon),
                     {"ledger": group_config(backend, allow_users=[4243], allow_groups=[4350], **settings)})
        reload = cli(daemon.control_socket, "reload")
        assert reload.returncode == 0, reload
        notice = a.recv(client=ha, timeout=5.0)
        assert (notice["kind"], notice["code"]) == ("notice", "permission_denied"), notice
        assert "seq" not in notice["details"] and "ledger" in notice["message"]
        # Then the socket is closed; the library keeps saying why.
        assert a.recv(client=ha, timeout=5.0)["code"] in ("permission_denied", "daemon_shutdown")
        (line,) = daemon.wait_log("client_no_longer_admitted")
        assert (line["uid"], line["pid"]) == (4242, a.proc.pid)
        assert set(client_records(daemon)) == {"b", "c"}

        backend.resume()
        backend.wait_count(count + 10)
        frames = [rec for _, rec in backend.records()]
        assert [seq for client, seq, _ in frames if client == 1] == list(range(1, count + 1))
        assert [seq for client, seq, _ in frames if client == 2] == list(range(1, 11))

        # SIGHUP does the same: now b goes, c (supplementary 4350) stays and is served.
        write_config(daemon.config_path, settings_of(daemon),
                     {"ledger": group_config(backend, allow_users=[], allow_groups=[4350], **settings)})
        daemon.proc.send_signal(signal.SIGHUP)
        notice = b.recv(client=hb, timeout=5.0)
        assert (notice["kind"], notice["code"]) == ("notice", "permission_denied"), notice
        daemon.wait_log("reload_applied", count=2)
        assert set(client_records(daemon)) == {"c"}
        assert c.send(client=hc, cid=3, count=5)["sent"] == 5
        backend.wait_count(count + 15)
        assert [seq for _, (client, seq, _) in backend.records() if client == 3] == [1, 2, 3, 4, 5]
    finally:
        for peer in (a, b, c):
            peer.close()


def settings_of(daemon) -> dict:
    """The daemon table the fixture wrote (socket, logging, mode), to write the file again."""
    import tomllib

    return tomllib.loads(daemon.config_path.read_text())["daemon"]
