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
import time

import pytest

from kmuxd.io.server import REFUSAL_LOG_INTERVAL

from .as_user import AppPeer, need_root
from .helpers import group_config
from .test_cli import cli
from .test_request_steering import summarize_req

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


def test_each_list_admits_by_uid_primary_or_supplementary_group_and_refusals_name_no_other_group(policy_daemon):
    daemon, _ = policy_daemon
    for cid, ((uid, gid, groups), admitted) in enumerate(IDENTITIES, start=100):
        with AppPeer(daemon.socket_path, uid=uid, gid=gid, groups=groups) as peer:
            assert peer.whoami()["uid"] == uid
            outcome = try_every_group(peer, cid)
        got = {name for name, answer in outcome.items() if answer["ok"]}
        assert got == admitted, f"uid {uid} gid {gid} groups {groups}: admitted to {sorted(got)}"
        for name, answer in outcome.items():
            if answer["ok"]:
                continue
            assert answer["code"] == ("unknown_group" if name == UNKNOWN else "permission_denied"), answer
            assert_names_only(answer["message"], name)
            if name != UNKNOWN:
                assert f"uid {uid}" in answer["message"]
    # root is no exception: the lists are the policy.
    with AppPeer(daemon.socket_path) as root:
        got = {name for name, answer in try_every_group(root, 99).items() if answer["ok"]}
    assert got == {"open-sesame"}


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


def test_refusals_are_counted_and_logged_at_a_bounded_rate(policy_daemon):
    daemon, _ = policy_daemon
    burst = 300
    with AppPeer(daemon.socket_path, uid=4242, gid=4242, comm="kmx-knocker") as peer:
        pid = peer.whoami()["pid"]
        got = peer.connect_many(group="bravo-gids", count=burst)
        assert got["codes"] == {"permission_denied": burst}
        assert len(got["messages"]) == 1  # one wording for all: uid 4242 is not admitted
        assert peer.connect_many(group=UNKNOWN, count=1)["codes"] == {"unknown_group": 1}
        burst_over = time.monotonic()  # the first line was logged before this
    status = json.loads(cli(daemon.control_socket, "status", "-j").stdout)
    assert status["refused_by_code"] == {"permission_denied": burst, "unknown_group": 1}
    assert status["clients_refused"] == burst + 1
    # The first refusal is logged in full, the rest of the burst only counted ...
    (first,) = daemon.wait_log("client_refused")
    assert (first["uid"], first["pid"], first["comm"], first["group"]) == (4242, pid, "kmx-knocker", "bravo-gids")
    assert (first["error_code"], first["suppressed"]) == ("permission_denied", 0)
    time.sleep(0.5)
    assert len(daemon.logs("client_refused")) == 1
    # ... and the next line, once the interval is over, says how many were left out.
    time.sleep(max(0.0, burst_over + REFUSAL_LOG_INTERVAL + 0.1 - time.monotonic()))
    with AppPeer(daemon.socket_path, uid=4243, gid=4243, comm="kmx-late") as peer:
        assert peer.connect_many(group="alpha-uids", count=1)["codes"] == {"permission_denied": 1}
    _, second = daemon.wait_log("client_refused", count=2)
    assert (second["uid"], second["comm"], second["group"], second["suppressed"]) == (4243, "kmx-late", "alpha-uids", burst)

