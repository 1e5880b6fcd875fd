"""Control requests, reload planning, the latency histogram: no sockets."""

from __future__ import annotations

import copy

import msgpack
import pytest

from kmux.errors import BadRequest, PermissionDenied, ReloadRefused
from kmuxd.system.config import parse_config
from kmuxd.io.control import REQUESTS, Privilege, authorize, parse_request, privilege_rule
from kmuxd.io.daemon import plan_reload
from kmuxd.core.latency import LatencyHistogram


def req(**kw) -> bytes:
    return msgpack.packb(kw)


@pytest.mark.parametrize(
    "packet,why",
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1]), "must be a msgpack map"),
        (req(op="nope"), "unknown op"),
        (req(), "unknown op"),
        (req(op="drain", group="g"), "needs 'conn'"),
        (req(op="drain", group="g", conn="1"), "wrong type"),
        (req(op="drain", group="g", conn=True), "wrong type"),
        (req(op="drain", group="g", conn=1, timeout=0), "drain.timeout"),
        (req(op="stats", colour="red"), "takes no 'colour'"),
        (b"\x80" + b"x" * 5000, "limit"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(packet, why):
    with pytest.raises(BadRequest) as e:
        parse_request(packet)
    assert why in e.value.message
    assert e.value.code == "bad_request"


def test_good_requests_parse():
    assert parse_request(req(op="stats")).args == {}
    r = parse_request(req(op="drain", group="g", conn=2))
    assert (r.op, r.args) == ("drain", {"group": "g", "conn": 2, "timeout": 10.0})
    assert parse_request(req(op="reconnect", group="g")).args == {"group": "g"}


def test_every_op_has_its_privilege_in_the_table():
    by_level = {level: sorted(op for op, spec in REQUESTS.items() if spec.privilege is level) for level in Privilege}
    assert by_level == {Privilege.READ: ["ping", "stats"], Privilege.ADMIN: ["drain", "reconnect", "reload"],
                        Privilege.ATTACH: ["attach", "unattach"]}


@pytest.mark.parametrize("op", sorted(REQUESTS))
def test_root_may_ask_for_anything(op):
    authorize(op, 0)
    authorize(op, 0, daemon_uid=1000, control_group="kmuxadm")


def test_others_read_but_do_not_act():
    for op in ("ping", "stats"):
        authorize(op, 1000, control_group="kmuxadm")  # the kernel's file mode let them connect
    for op in ("reload", "drain", "reconnect"):
        with pytest.raises(PermissionDenied) as e:
            authorize(op, 1000, control_group="kmuxadm")
        assert e.value.code == "permission_denied"
        assert e.value.message == f"{op} needs uid 0 (root), whatever the socket's file mode; you are uid 1000"
        assert e.value.details == {"op": op, "rule": "uid 0 (root), whatever the socket's file mode"}


def test_a_non_root_daemon_lets_its_own_uid_act():
    authorize("reload", 1000, daemon_uid=1000)
    with pytest.raises(PermissionDenied) as e:
        authorize("reload", 1001, daemon_uid=1000)
    assert e.value.details["rule"] == "uid 0 (root) or kmuxd's own uid 1000, whatever the socket's file mode"


def test_the_read_rule_names_the_control_group():
    assert privilege_rule(Privilege.READ) == "whoever the control socket's file mode lets connect (root)"
    assert privilege_rule(Privilege.READ, control_group="kmuxadm") == (
        "whoever the control socket's file mode lets connect (root, or members of group 'kmuxadm')"
    )


BASE = {
    "version": 1,
    "daemon": {"socket": "/tmp/k/a.sock"},
    "groups": {
        "same": {"endpoints": ["127.0.0.1:1"]},
        "grow": {"endpoints": ["127.0.0.1:2"], "connections": 2},
        "swap": {"endpoints": ["127.0.0.1:3"]},
        "gone": {"endpoints": ["127.0.0.1:4"]},
    },
}


def test_reload_plan_classifies_every_group():
    new = copy.deepcopy(BASE)
    new["groups"]["grow"]["connections"] = 5
    new["groups"]["swap"]["framing"] = "u16be"
    del new["groups"]["gone"]
    new["groups"]["fresh"] = {"endpoints": ["127.0.0.1:5"]}
    plan = plan_reload(parse_config(BASE), parse_config(new))
    assert plan.added == ("fresh",)
    assert plan.removed == ("gone",)
    assert plan.resized == ("grow",)
    assert plan.replaced == ("swap",)
    assert plan.unchanged == ("same",)


def test_reload_refuses_socket_changes():
    new = copy.deepcopy(BASE)
    new["daemon"]["socket"] = "/tmp/k/b.sock"
    with pytest.raises(ReloadRefused) as e:
        plan_reload(parse_config(BASE), parse_config(new))
    assert "daemon.socket" in e.value.message


def test_latency_histogram_percentiles_are_within_one_bucket():
    h = LatencyHistogram()
    assert h.percentile(50) is None
    for i in range(1, 1001):
        h.record(i * 1e-6)  # 1 µs .. 1 ms, uniform
    p50, p99 = h.percentile(50), h.percentile(99)
    assert 500e-6 <= p50 <= 500e-6 * 1.19
    assert 990e-6 <= p99 <= 990e-6 * 1.19
    h.record(1e9)  # far beyond the last bucket: counted, bounded
    assert h.count == 1001 and h.percentile(100) <= 100 * 1.19
