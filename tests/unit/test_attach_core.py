"""Attaching a connection an app made: who may (``may_attach``), which descriptors
(the ``DESCRIPTOR_CHECKS`` table), the slot's ``attach`` row, the config keys, and
the endpoint pool keeping no health for an attached peer. No I/O, except one test that
checks the core's Linux ABI numbers against the socket module."""

from __future__ import annotations

import copy
import dataclasses
import socket

import pytest

from kmux.errors import AttachRefused, ConfigInvalid, IllegalTransition, error_from_code

from kmuxd.core import attach as core
from kmuxd.core.access import AccessPolicy, Principal
from kmuxd.core.attach import (ATTACHED_BASE, DESCRIPTOR_CHECKS, REFUSAL_REASONS, AttachedPeer, SocketFacts,
                               check_descriptor, may_attach)
from kmuxd.core.endpoints import EndpointPool, Verdict
from kmuxd.core.states import SLOT_TRANSITIONS, SlotEvent, SlotState, StateMachine
from kmuxd.system.config import Endpoint, parse_config

TCP = SocketFacts(domain=core.AF_INET, type=core.SOCK_STREAM, protocol=core.IPPROTO_TCP,
                  listening=False, connected=True, unread=0)


def test_the_core_numbers_are_the_kernel_abi():
    assert (core.AF_INET, core.AF_INET6, core.SOCK_STREAM, core.IPPROTO_TCP) == (
        socket.AF_INET, socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP)


def test_a_connected_tcp_socket_with_nothing_unread_passes_v4_and_v6():
    assert check_descriptor(TCP) is None
    assert check_descriptor(dataclasses.replace(TCP, domain=core.AF_INET6)) is None


@pytest.mark.parametrize("change, reason", [
    ({"domain": socket.AF_UNIX}, "not_inet"),
    ({"type": socket.SOCK_DGRAM, "protocol": socket.IPPROTO_UDP}, "not_stream"),
    ({"protocol": 262}, "not_tcp"),  # IPPROTO_MPTCP: a stream, but not plain TCP
    ({"protocol": socket.IPPROTO_SCTP}, "not_tcp"),
    ({"listening": True, "connected": False}, "listening"),
    ({"connected": False}, "not_connected"),
    ({"unread": 1}, "unread_data"),
])
def test_each_row_refuses_with_its_reason(change, reason):
    refusal = check_descriptor(dataclasses.replace(TCP, **change))
    assert refusal is not None and refusal[0] == reason
    assert refusal[1].startswith("the descriptor ")


def test_the_first_failed_row_decides_a_unix_listener_is_not_inet():
    facts = SocketFacts(domain=socket.AF_UNIX, type=socket.SOCK_STREAM, protocol=0, listening=True,
                        connected=False, unread=0)
    assert check_descriptor(facts)[0] == "not_inet"


def test_the_unread_count_is_named():
    assert "4096 bytes queued" in check_descriptor(dataclasses.replace(TCP, unread=4096))[1]


def test_the_reasons_are_a_closed_vocabulary_documented_in_the_error():
    assert REFUSAL_REASONS == tuple(r.reason for r in DESCRIPTOR_CHECKS)
    assert len(set(REFUSAL_REASONS)) == len(REFUSAL_REASONS)
    for reason in (*REFUSAL_REASONS, "no_descriptor", "attach_max", "socket_error"):
        assert f"``{reason}``" in AttachRefused.__doc__


def test_attach_refused_travels_by_code_with_its_reason():
    err = error_from_code("attach_refused", "no", reason="listening")
    assert isinstance(err, AttachRefused) and err.details["reason"] == "listening"


USERS = AccessPolicy(users=(Principal(1042, "billing"),))
GROUPS = AccessPolicy(groups=(Principal(700, "attachers"),))


@pytest.mark.parametrize("policy, uid, gid, sup, ok", [
    (None, 0, 0, (), True),  # root always
    (None, 1042, 1042, (), False),  # not configured: nobody else
    (None, 998, 998, (), True),  # kmuxd's own uid (daemon_uid below)
    (USERS, 1042, 5, (), True),
    (USERS, 1043, 5, (), False),
    (GROUPS, 1043, 700, (), True),  # primary gid
    (GROUPS, 1043, 5, (9, 700), True),  # supplementary
    (GROUPS, 1043, 5, (9,), False),
    (AccessPolicy(users=()), 1042, 5, (), False),  # an empty list admits nobody
])
def test_may_attach(policy, uid, gid, sup, ok):
    assert may_attach(policy, uid, gid, sup, daemon_uid=998) is ok


def test_an_attached_slot_goes_up_without_dialling_and_closes_for_good():
    sm = StateMachine(SLOT_TRANSITIONS, SlotState.IDLE, "attached")
    sm.fire(SlotEvent.ATTACH)
    assert sm.state is SlotState.UP
    with pytest.raises(IllegalTransition):
        sm.fire(SlotEvent.ATTACH)
    sm.fire(SlotEvent.CLOSE)
    assert sm.state is SlotState.CLOSED
    dialling = StateMachine(SLOT_TRANSITIONS, SlotState.CONNECTING, "dialled")
    with pytest.raises(IllegalTransition):
        dialling.fire(SlotEvent.ATTACH)


def test_the_pool_keeps_no_health_for_an_attached_peer_even_at_a_configured_address():
    ep = Endpoint("127.0.0.1", 11211)
    pool = EndpointPool([ep], 0.1, 1.0)
    peer = AttachedPeer("127.0.0.1", 11211, 1042, 77)
    assert peer != ep and str(peer) == str(ep)
    pool.answered(peer)
    pool.eject(peer, 0.0, "x")
    assert pool.request_timed_out(peer, 0.0) is False
    assert pool.closed(peer, 0.0, answered=True, graceful=True) is Verdict.RECYCLE
    assert pool.closed(peer, 0.0, answered=True, graceful=False) is Verdict.FAILURE
    assert pool.closed(peer, 0.0, answered=True, graceful=False, requested=True) is Verdict.REQUESTED
    (stats,) = pool.statistics(0.0)
    assert stats.state == "healthy" and stats.failures == 0 and stats.connections == 0


def test_attached_numbers_never_meet_dialled_ones():
    cfg = parse_config({"version": 1, "groups": {"g": {"endpoints": ["127.0.0.1:1"], "connections": 1024}}})
    assert cfg.groups["g"].connections - 1 < ATTACHED_BASE


# -- config ---------------------------------------------------------------------------------

BASE = {"version": 1, "groups": {"g": {"endpoints": ["127.0.0.1:11211"]}}}


def group(**keys):
    raw = copy.deepcopy(BASE)
    raw["groups"]["g"].update(keys)
    return parse_config(raw).groups["g"]


def problems(raw_group: dict) -> list[list[str]]:
    with pytest.raises(ConfigInvalid) as info:
        parse_config({"version": 1, "groups": {"g": raw_group}})
    return info.value.problems


def test_attach_is_off_unless_a_list_is_set():
    g = group()
    assert g.attach is None and g.attach_max == 16 and g.unattach_timeout == 10.0


def test_attach_lists_resolve_names_and_ids_like_allow_lists():
    g = group(attach_users=["root", 1042], attach_groups=["0"], attach_max=2, unattach_timeout=0.5)
    assert [p.id for p in g.attach.users] == [0, 1042] and [p.id for p in g.attach.groups] == [0]
    assert g.access.open  # who may use the group is a separate list
    assert (g.attach_max, g.unattach_timeout) == (2, 0.5)


def test_an_attached_only_group_needs_no_endpoints_and_dials_nothing():
    cfg = parse_config({"version": 1, "groups": {"g": {"attach_groups": [0], "min_connections": 2}}})
    g = cfg.groups["g"]
    assert g.endpoints == () and g.connections == 0 and g.min_connections == 2


def test_config_errors_name_their_key_path():
    assert any("groups.g.endpoints" in p[0] for p in problems({}))
    assert any(p[0] == "groups.g.connections" for p in problems({"attach_users": [0], "connections": 2}))
    assert any(p[0] == "groups.g.attach_users[0]" for p in problems(
        {"endpoints": ["127.0.0.1:1"], "attach_users": ["no-such-user-kmux"]}))
    assert any(p[0] == "groups.g.min_connections" for p in problems({"attach_users": [0], "attach_max": 1,
                                                                     "min_connections": 2}))
    assert any(p[0] == "groups.g.attach_users" for p in problems(
        {"endpoints": ["127.0.0.1:1"], "attach_users": [0], "tls": {"server_name": "x"}}))
