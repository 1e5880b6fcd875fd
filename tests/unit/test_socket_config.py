"""``[groups.NAME.socket]``: validation at load, the source-port walk, and the capability table.

No sockets here: the config is parsed from dicts, the port walk is the
sans-IO :class:`~kmuxd.core.sourceports.SourcePorts`, and the capability
table is read against :class:`~kmuxd.system.privileges.KernelNet` facts
given by the test (the kernel's own are read where noted).
"""

from __future__ import annotations

import copy
import itertools
import random

import pytest

from kmux.errors import ConfigInvalid, PermissionDenied

from kmuxd.core.sourceports import TRIES_MAX, SourcePorts
from kmuxd.system.config import NOTSENT_LOWAT_DEFAULT, NOTSENT_LOWAT_MESSAGES_DEFAULT, SocketConfig, parse_config
from kmuxd.system.privileges import (CapabilityReport, KernelNet, drop_in, effective_capabilities, missing, needs)

BASE = {"version": 1, "groups": {"mc": {"endpoints": ["127.0.0.1:11211"]}}}


def parse_socket(table: dict, endpoints: list[str] | None = None) -> SocketConfig:
    raw = copy.deepcopy(BASE)
    raw["groups"]["mc"]["socket"] = table
    if endpoints:
        raw["groups"]["mc"]["endpoints"] = endpoints
    return parse_config(raw).groups["mc"].socket


def problems(table: dict, endpoints: list[str] | None = None) -> list[list[str]]:
    with pytest.raises(ConfigInvalid) as info:
        parse_socket(table, endpoints)
    return info.value.problems


# -- the config section ------------------------------------------------------------------------


def test_no_table_means_no_options() -> None:
    cfg = parse_config(copy.deepcopy(BASE)).groups["mc"].socket
    assert cfg == SocketConfig() and not cfg.configured


def test_every_option_parses() -> None:
    available = KernelNet.read().congestion_available
    assert available, "this kernel lists no congestion control algorithm"
    cfg = parse_socket({"source_address": "127.0.0.2", "source_ports": [700, 710], "mark": 0x2A, "bind_device": "lo",
                        "dscp": 46, "congestion": available[0], "tcp_notsent_lowat": 16384})
    assert cfg == SocketConfig("127.0.0.2", (700, 710), 0x2A, "lo", 46 << 2, available[0], 16384)
    assert cfg.configured
    assert parse_socket({"tos": 0x10}).tos == 0x10
    scaled = parse_socket({"tcp_notsent_lowat_messages": 0})
    assert (scaled.tcp_notsent_lowat_messages, scaled.notsent_messages, scaled.configured) == (0, 0, True)
    assert (SocketConfig().notsent_floor, SocketConfig().notsent_messages) == (
        NOTSENT_LOWAT_DEFAULT, NOTSENT_LOWAT_MESSAGES_DEFAULT)
    assert parse_socket({"source_address": "::1"}, ["[::1]:11211"]).source_address == "::1"


@pytest.mark.parametrize("table, key, words", [
    ({"source_address": "10.0.0.300"}, "source_address", "not an IPv4 or IPv6 address"),
    ({"source_address": 7}, "source_address", "must be an IPv4 or IPv6 address"),
    ({"source_address": "::1"}, "source_address", "IPv6 source ::1, but endpoint 127.0.0.1:11211 is IPv4"),
    ({"source_ports": [1023, 600]}, "source_ports", "first <= last"),
    ({"source_ports": [0, 10]}, "source_ports", "1 <= first"),
    ({"source_ports": [600]}, "source_ports", "[first, last]"),
    ({"source_ports": [600, True]}, "source_ports", "[first, last]"),
    ({"mark": 0}, "mark", "between 1 and 4294967295"),
    ({"mark": 1 << 32}, "mark", "between 1 and 4294967295"),
    ({"bind_device": "eth0/1"}, "bind_device", "interface name"),
    ({"bind_device": "x" * 16}, "bind_device", "interface name"),
    ({"tos": 0xB9}, "tos", "ECN"),
    ({"tos": 256}, "tos", "between 0 and 255"),
    ({"dscp": 64}, "dscp", "between 0 and 63"),
    ({"tos": 0x10, "dscp": 4}, "dscp", "tos or dscp, not both"),
    ({"congestion": "Cubic!"}, "congestion", "congestion control name"),
    ({"tcp_notsent_lowat": 0}, "tcp_notsent_lowat", "between 1 and"),
    ({"tcp_notsent_lowat_messages": 65}, "tcp_notsent_lowat_messages", "between 0 and 64"),
    ({"tcp_notsent_lowat_messages": -1}, "tcp_notsent_lowat_messages", "between 0 and 64"),
    ({"tcp_notsent_lowat_messages": 2.5}, "tcp_notsent_lowat_messages", "must be an integer"),
    ({"sndbuf": 1}, "sndbuf", "unknown key"),
])
def test_each_bad_value_names_its_key_path(table: dict, key: str, words: str) -> None:
    (path, reason), = problems(table)
    assert path == f"groups.mc.socket.{key}"
    assert words in reason, reason


def test_a_congestion_algorithm_the_kernel_lacks_is_refused_at_load() -> None:
    kernel = KernelNet.read()
    lacking = next(name for name in ("vegas", "westwood", "htcp", "hybla", "illinois", "lp", "veno", "yeah")
                   if name not in kernel.congestion_available)
    (path, reason), = problems({"congestion": lacking})
    assert path == "groups.mc.socket.congestion"
    assert f"{lacking!r} is not available in this kernel" in reason
    assert " ".join(kernel.congestion_available) in reason and f"modprobe tcp_{lacking}" in reason


def test_every_problem_of_the_table_is_reported_at_once() -> None:
    found = problems({"mark": -1, "tos": 3, "source_ports": [5, 1], "bogus": 1})
    assert sorted(p for p, _ in found) == [f"groups.mc.socket.{k}" for k in ("bogus", "mark", "source_ports", "tos")]


def test_a_host_name_endpoint_leaves_the_family_to_the_dial() -> None:
    assert parse_socket({"source_address": "::1"}, ["localhost:11211"]).source_address == "::1"


# -- the source-port walk -----------------------------------------------------------------------


def test_one_dial_proposes_each_port_once_starting_after_the_last_taken() -> None:
    ports = SourcePorts(700, 703)
    assert list(ports.candidates()) == [700, 701, 702, 703]
    ports.took(701)
    assert list(ports.candidates()) == [702, 703, 700, 701]
    ports.took(703)  # the cursor wraps
    assert list(ports.candidates()) == [700, 701, 702, 703]


def test_busy_ports_are_skipped_and_a_full_range_is_exhausted() -> None:
    ports = SourcePorts(700, 702)
    held = {700, 702}
    took = None
    for port in ports.candidates():
        if port in held:
            ports.in_use(port)
            continue
        ports.took(port)
        took = port
        break
    assert took == 701
    held.add(701)
    for port in ports.candidates():
        assert port in held
        ports.in_use(port)
    ports.gave_up()
    s = ports.statistics()
    assert (s.first, s.last, s.taken, s.busy, s.exhausted) == (700, 702, 1, 4, 1)


def test_a_huge_range_is_walked_at_most_tries_max_ports_per_dial() -> None:
    ports = SourcePorts(1, 65535)
    assert sum(1 for _ in ports.candidates()) == TRIES_MAX


def test_random_schedules_never_hand_out_a_held_port_and_exhaust_only_when_full() -> None:
    rng = random.Random(18)
    for _ in range(200):
        first = rng.randrange(1, 60000)
        ports = SourcePorts(first, first + rng.randrange(0, 12))
        held: set[int] = set()
        for _ in range(40):
            if held and rng.random() < 0.3:
                held.discard(rng.choice(sorted(held)))  # a connection closed
                continue
            tried = list(itertools.islice(ports.candidates(), ports.tries))
            assert len(set(tried)) == len(tried) == ports.size
            free = [p for p in tried if p not in held]
            if free:
                ports.took(free[0])
                held.add(free[0])
            else:
                assert len(held) == ports.size


def test_an_empty_or_reversed_range_is_a_bug() -> None:
    with pytest.raises(ValueError):
        SourcePorts(10, 9)


# -- what needs which capability ------------------------------------------------------------------


def _groups(**socket: object) -> list:
    raw = copy.deepcopy(BASE)
    raw["groups"]["mc"]["socket"] = socket
    raw["groups"]["plain"] = {"endpoints": ["127.0.0.1:1"]}
    return list(parse_config(raw).groups.values())


KERNEL = KernelNet(unprivileged_port_start=1024, congestion_available=("reno", "cubic", "bbr"),
                   congestion_allowed=("reno", "cubic"), release=(6, 1))


def test_the_capability_table() -> None:
    found = needs(_groups(source_ports=[700, 710], mark=1, bind_device="lo", congestion="bbr", tos=0x10), KERNEL)
    assert [(n.capability, n.key) for n in found] == [
        ("CAP_NET_BIND_SERVICE", "groups.mc.socket.source_ports"),
        ("CAP_NET_ADMIN", "groups.mc.socket.mark"),
        ("CAP_NET_ADMIN", "groups.mc.socket.congestion"),
    ]
    # High ports, an allowed algorithm, TOS and notsent_lowat need nothing.
    assert needs(_groups(source_ports=[40000, 40010], congestion="cubic", tcp_notsent_lowat=1), KERNEL) == []
    # A lowered net.ipv4.ip_unprivileged_port_start frees low ports.
    low = KernelNet(600, KERNEL.congestion_available, KERNEL.congestion_allowed, (6, 1))
    assert needs(_groups(source_ports=[700, 710]), low) == []
    # SO_BINDTODEVICE needed CAP_NET_RAW before Linux 5.7.
    old = KernelNet(1024, ("reno",), ("reno",), (5, 4))
    assert [n.capability for n in needs(_groups(bind_device="lo"), old)] == ["CAP_NET_RAW"]


def test_held_capabilities_come_from_capeff() -> None:
    assert effective_capabilities("Name:\tx\nCapEff:\t0000000000000000\n") == set()
    assert effective_capabilities("CapEff:\t0000000000003400\n") == {"CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN",
                                                                      "CAP_NET_RAW"}
    assert effective_capabilities("CapEff:\t0000000000000400\n") == {"CAP_NET_BIND_SERVICE"}


def test_the_check_report_outside_and_inside_a_service() -> None:
    groups = _groups(source_ports=[700, 710], mark=3)
    outside = CapabilityReport.of(groups, KERNEL, env={})
    assert outside.held is None and len(outside.lines()) == 3
    assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE" in outside.lines()[-1]
    inside = CapabilityReport.of(groups, KERNEL, status="CapEff:\t0000000000000400\n", env={"INVOCATION_ID": "x"})
    assert inside.lacking == ("CAP_NET_ADMIN",)
    text = "\n".join(inside.lines())
    assert "CAP_NET_BIND_SERVICE for groups.mc.socket.source_ports" in text and ": held" in text
    assert "CAP_NET_ADMIN for groups.mc.socket.mark (SO_MARK): MISSING" in text
    assert "CapabilityBoundingSet=CAP_NET_ADMIN\n" in text + "\n" and "permission_denied" in text
    assert CapabilityReport.of(_groups(), KERNEL, env={}).lines() == []


def test_the_drop_in_and_the_error_name_the_capability() -> None:
    assert drop_in(["CAP_NET_RAW", "CAP_NET_ADMIN", "CAP_NET_RAW"]) == (
        "[Service]\nCapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW\nAmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW\n")
    err = missing("CAP_NET_BIND_SERVICE", "groups.mc.socket.source_ports", "binding source port 700")
    assert isinstance(err, PermissionDenied) and err.code == "permission_denied"
    assert err.details == {"capability": "CAP_NET_BIND_SERVICE", "key": "groups.mc.socket.source_ports"}
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in err.message and "docs/systemd.md" in err.message
