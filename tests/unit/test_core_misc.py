"""Steering, state tables, back-off and configuration: no sockets."""

from __future__ import annotations

import random

import pytest

from kmux.errors import ConfigInvalid, IllegalTransition, KmuxError
from kmuxd.core.backoff import Backoff
from kmuxd.system.config import parse_config
from kmuxd.core.states import (
    CLIENT_TRANSITIONS,
    CONN_TRANSITIONS,
    SLOT_TRANSITIONS,
    VISIBLE_SLOT_STATES,
    ClientEvent,
    ClientState,
    ConnEvent,
    ConnState,
    SlotEvent,
    SlotState,
    StateMachine,
)
from kmux.framing import PRESETS
from kmuxd.core.counters import GroupCounters
from kmuxd.core.inbox import Inbox
from kmuxd.core.steering import FAILED, TAKEN_LAST, BalanceSteering, ReceiverRing

# -- steering ----------------------------------------------------------------


def drain(steering: ReceiverRing, n: int) -> list:
    out = []
    for _ in range(n):
        r, quota = steering.take()
        if r is None:
            break
        out.append(r)
        steering.used(r, 1)
    return out


def test_balance_gives_each_receiver_a_batch_in_turn():
    s = ReceiverRing(batch=3)
    for r in "abc":
        s.receive_on(r)
    got = "".join(drain(s, 18))
    assert got == "bbbcccaaa" * 2  # whole batches, the ring turning after each


def test_blocked_receiver_is_skipped_and_comes_back():
    s = ReceiverRing(batch=2)
    s.receive_on("a")
    s.receive_on("b")
    s.blocked("a")
    assert set(drain(s, 6)) == {"b"}
    assert s.unblocked("a") is True
    assert "a" in drain(s, 6)


def test_receive_off_leaves_the_ring_and_no_receiver_means_none():
    s = ReceiverRing(batch=1)
    s.receive_on("a")
    s.receive_off("a")
    assert s.take() == (None, 0)
    # Unblocking a receiver that is not receiving does not make it ready.
    assert s.unblocked("a") is False
    assert s.receive_on("a") is True
    assert s.take()[0] == "a"


def test_blocked_receiver_turned_on_stays_out_until_unblocked():
    s = ReceiverRing(batch=1)
    # "a" attached with receiving off: the ring never saw it
    s.blocked("a")
    assert s.receive_on("a") is False
    assert s.take() == (None, 0)
    assert s.unblocked("a") is True
    assert s.statistics().ready == 1


class PiecesReceiver:
    """Takes each message in pieces, as a session whose socket holds less than one
    message: the rest is queued, so it leaves the ring (blocked) during the offer."""

    gone = False

    def __init__(self, ring: ReceiverRing) -> None:
        self.ring = ring
        self.got = 0

    def offer(self, buf, view, pos, end, keep=False) -> int:
        self.got += 1
        self.ring.blocked(self)
        return TAKEN_LAST


class DeafReceiver:
    """Its every send fails (an app that shut down its reading side)."""

    gone = False

    def __init__(self) -> None:
        self.offered = 0

    def offer(self, buf, view, pos, end, keep=False) -> int:
        self.offered += 1
        return FAILED


def test_a_receiver_that_blocks_while_taking_its_last_message_does_not_use_up_the_next_ones_turn():
    """The flake of test_socket_errors (balance, in pieces): the receiver at the front took a
    message in pieces and left the ring (blocked) during the offer; its use of the turn was
    charged to the receiver that had become the front, so when the first came back before
    the next message arrived, the ring turned past the other one, every time."""
    ring = ReceiverRing(batch=1)
    steering = BalanceSteering(ring, GroupCounters())
    inbox = Inbox(PRESETS["u32be"], 1000, 1000)
    deaf, good = DeafReceiver(), PiecesReceiver(ring)
    ring.receive_on(deaf)
    ring.receive_on(good)
    for _ in range(6):  # one message at a time, the good receiver writable again in between
        message = (96).to_bytes(4, "big") + bytes(96)  # u32be: the length after the header
        inbox.space()[: len(message)] = message
        assert inbox.received(len(message), 0.0) == 1
        assert steering.steer(inbox, None, None, 0.0) == 1
        ring.unblocked(good)
    assert deaf.offered == 1  # one of the first two, then out of the ring
    assert (good.got, ring.statistics().ready) == (6, 1)

def test_receivers_leaving_from_anywhere_keep_the_turns_and_the_ring_bounded():
    """Leaving is O(1) (a stale entry, dropped later): the turns must be exactly those of
    a ring without the leavers, a receiver that comes back gets one turn per round, not
    two, and toggling receivers while the ring stands still does not grow it."""
    s = ReceiverRing(batch=1)
    for r in "abcdef":
        s.receive_on(r)
    s.remove("c")  # from the middle
    s.receive_off("e")
    assert "".join(drain(s, 8)) == "bdfabdfa"
    s.blocked("d")
    assert s.unblocked("d") is True  # back: behind the others, once
    assert "".join(drain(s, 8)) == "bfdabfda"
    assert s.statistics().ready == 4
    for _ in range(1000):  # blocked and unblocked with no message taken meanwhile
        s.blocked("a")
        s.unblocked("a")
    assert len(s._ring) <= 2 * s.statistics().ready + 16
    assert sorted(drain(s, 4)) == ["a", "b", "d", "f"]
    for r in "abdf":
        s.remove(r)
    assert s.take() == (None, 0) and s.statistics().ready == 0


# -- state tables ------------------------------------------------------------


@pytest.mark.parametrize("events", [
    [SlotEvent.SECURE, SlotEvent.CONNECTED],                            # TLS only
    [SlotEvent.AUTHENTICATE, SlotEvent.CONNECTED],                      # handshake steps only
    [SlotEvent.SECURE, SlotEvent.AUTHENTICATE, SlotEvent.CONNECTED],    # TLS, then the steps
])
def test_tls_and_authentication_are_rows_between_connecting_and_up(events):
    sm = StateMachine(SLOT_TRANSITIONS, SlotState.IDLE, "slot")
    sm.fire(SlotEvent.DIAL)
    for ev in events:
        sm.fire(ev)
    assert sm.state is SlotState.UP
    # A failure in either phase is a failed dial: back off, then dial again from CONNECTING.
    for failing in (SlotState.TLS_HANDSHAKE, SlotState.AUTHENTICATING):
        sm = StateMachine(SLOT_TRANSITIONS, failing, "slot")
        assert sm.fire(SlotEvent.DIAL_FAILED) is SlotState.BACKOFF
        assert not sm.can(SlotEvent.SECURE) and sm.fire(SlotEvent.RETRY) is SlotState.CONNECTING
    # No traffic before UP: a connection mid-handshake cannot be recycled or lost as a live one,
    # and TLS never follows the credential steps.
    for state, ev in [(SlotState.TLS_HANDSHAKE, SlotEvent.RECYCLE), (SlotState.AUTHENTICATING, SlotEvent.LOST),
                      (SlotState.AUTHENTICATING, SlotEvent.SECURE)]:
        with pytest.raises(IllegalTransition):
            StateMachine(SLOT_TRANSITIONS, state, "slot").fire(ev)
    assert {"tls_handshake", "authenticating"} <= set(VISIBLE_SLOT_STATES)


def test_slot_lifecycle_follows_the_table():
    sm = StateMachine(SLOT_TRANSITIONS, SlotState.IDLE, "slot")
    for ev, want in [
        (SlotEvent.DIAL, SlotState.CONNECTING),
        (SlotEvent.CONNECTED, SlotState.UP),
        (SlotEvent.RECYCLE, SlotState.CONNECTING),  # make-before-break: dial the replacement now
        (SlotEvent.CONNECTED, SlotState.UP),
        (SlotEvent.LOST, SlotState.BACKOFF),
        (SlotEvent.RETRY, SlotState.CONNECTING),
        (SlotEvent.DIAL_FAILED, SlotState.BACKOFF),
        (SlotEvent.CLOSE, SlotState.CLOSED),
    ]:
        assert sm.fire(ev) is want


def test_connection_lifecycle_follows_the_table():
    sm = StateMachine(CONN_TRANSITIONS, ConnState.READY, "conn")
    for ev, want in [
        (ConnEvent.WRITE_BLOCKED, ConnState.BUSY),
        (ConnEvent.WRITE_DONE, ConnState.READY),
        (ConnEvent.RETIRE, ConnState.DRAINING),
        (ConnEvent.WRITE_BLOCKED, ConnState.DRAINING),
        (ConnEvent.RESUME, ConnState.READY),
        (ConnEvent.FAIL, ConnState.CLOSED),
    ]:
        assert sm.fire(ev) is want


@pytest.mark.parametrize(
    "table,state,event",
    [
        (SLOT_TRANSITIONS, SlotState.IDLE, SlotEvent.CONNECTED),
        (SLOT_TRANSITIONS, SlotState.BACKOFF, SlotEvent.RECYCLE),
        (CONN_TRANSITIONS, ConnState.READY, ConnEvent.RESUME),
        (CONN_TRANSITIONS, ConnState.CLOSED, ConnEvent.RETIRE),
    ],
)
def test_illegal_transitions_raise(table, state, event):
    sm = StateMachine(table, state, "conn 3")
    with pytest.raises(IllegalTransition) as e:
        sm.fire(event)
    assert not isinstance(e.value, KmuxError)  # a bug, never a wire error
    assert "conn 3" in str(e.value)
    assert sm.state is state


def test_client_cannot_toggle_receive_before_the_handshake():
    sm = StateMachine(CLIENT_TRANSITIONS, ClientState.HANDSHAKING, "client")
    with pytest.raises(IllegalTransition):
        sm.fire(ClientEvent.RECEIVE_OFF)
    assert sm.fire(ClientEvent.ACCEPT_RECEIVING) is ClientState.RECEIVING
    assert sm.fire(ClientEvent.RECEIVE_OFF) is ClientState.NOT_RECEIVING
    assert sm.fire(ClientEvent.CLOSE) is ClientState.CLOSED


# -- back-off ------------------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets():
    b = Backoff(0.1, 2.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(10)]
    ceilings = [min(2.0, 0.1 * 2**i) for i in range(10)]
    for d, c in zip(delays, ceilings):
        assert c / 2 <= d <= c
    assert b.attempt == 10
    b.reset()
    assert 0.05 <= b.next_delay() <= 0.1


def test_backoff_jitter_spreads_slots():
    delays = {round(Backoff(1.0, 1.0, rng=random.Random(i)).next_delay(), 6) for i in range(20)}
    assert len(delays) == 20


# -- configuration -------------------------------------------------------------

GOOD = {
    "version": 1,
    "daemon": {"socket": "/tmp/x.sock"},
    "groups": {"echo": {"endpoints": ["127.0.0.1:7000", "[::1]:7001"], "connections": 4, "framing": "u32be"}},
}


def with_(path: str, value):
    import copy

    raw = copy.deepcopy(GOOD)
    node = raw
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return raw


def test_good_config_parses_into_frozen_dataclasses():
    cfg = parse_config(GOOD)
    g = cfg.groups["echo"]
    assert [str(e) for e in g.endpoints] == ["127.0.0.1:7000", "[::1]:7001"]
    assert g.framing.name == "u32be" and g.max_message == 1048576 and g.steering == "balance"
    assert g.max_skip == 64 * 1024 * 1024  # skip what is over max_message, up to the protocol's limit
    with pytest.raises(Exception):
        g.connections = 5  # frozen


@pytest.mark.parametrize(
    "path,value,where",
    [
        ("groups.echo.connections", 0, "groups.echo.connections"),
        ("groups.echo.connections", "4", "groups.echo.connections"),
        ("groups.echo.conections", 4, "groups.echo.conections"),
        ("groups.echo.endpoints", ["127.0.0.1:7000", "nohost"], "groups.echo.endpoints[1]"),
        ("groups.echo.endpoints", ["127.0.0.1:70000"], "groups.echo.endpoints[0]"),
        ("groups.echo.endpoints", ["[zz::1]:80"], "groups.echo.endpoints[0]"),
        ("groups.echo.framing", {"length_size": 9}, "groups.echo.framing.length_size"),
        ("groups.echo.framing", "u24", "groups.echo.framing"),
        ("groups.echo.steering", "random", "groups.echo.steering"),
        ("groups.echo.max_message", 10**9, "groups.echo.max_message"),
        ("groups.echo.max_skip", 1000, "groups.echo.max_skip"),  # under max_message
        ("groups.echo.max_skip", 1 << 33, "groups.echo.max_skip"),  # past the ceiling (4 GiB)
        ("groups.echo.max_skip", "64M", "groups.echo.max_skip"),
        ("groups.echo.assembly_timeout", -1, "groups.echo.assembly_timeout"),
        ("groups.echo.reconnect_initial", 60.0, "groups.echo.reconnect_initial"),
        ("groups.echo.client_rate_contended", -1.0, "groups.echo.client_rate_contended"),
        ("groups.echo.client_burst_contended", 0, "groups.echo.client_burst_contended"),
        ("daemon.socket_mode", "rw", "daemon.socket_mode"),
        ("daemon.socket", "/" + "x" * 200, "daemon.socket"),
        ("daemon.max_clientz", 3, "daemon.max_clientz"),
        ("version", 2, "version"),
    ],
)
def test_bad_config_names_the_exact_key(path, value, where):
    with pytest.raises(ConfigInvalid) as e:
        parse_config(with_(path, value))
    assert e.value.path == where
    assert e.value.code == "config_invalid"
    assert str(e.value).count(where) >= 1


def test_pacing_settings_belong_to_balance_and_the_window_to_every_mode():
    """client_rate_contended/client_burst_contended pace balance clients (id and fifo
    count answers instead); contention_window serves both rules."""
    cfg = parse_config(with_("groups.echo.client_rate_contended", 2000))
    assert cfg.groups["echo"].client_rate_contended == 2000.0 and cfg.groups["echo"].client_burst_contended == 16
    assert parse_config(with_("groups.echo.contention_window", 0.5)).groups["echo"].contention_window == 0.5
    raw = with_("groups.echo.client_burst_contended", 8)
    raw["groups"]["echo"]["steering"] = "fifo"
    with pytest.raises(ConfigInvalid) as e:
        parse_config(raw)
    assert e.value.path == "groups.echo.client_burst_contended" and "balance" in str(e.value)


def test_bad_group_name_and_missing_groups():
    with pytest.raises(ConfigInvalid) as e:
        parse_config({"version": 1, "groups": {"bad name": {"endpoints": ["127.0.0.1:1"]}}})
    assert e.value.path == "groups.bad name"
    with pytest.raises(ConfigInvalid) as e:
        parse_config({"version": 1, "groups": {}})
    assert e.value.path == "groups"
    with pytest.raises(ConfigInvalid) as e:
        parse_config({"version": 1, "groups": {"g": {}}})
    assert e.value.path == "groups.g.endpoints"


def test_every_problem_of_a_file_is_reported_at_once():
    raw = with_("groups.echo.connections", 0)
    raw["groups"]["echo"]["steering"] = "random"
    raw["daemon"] = {"max_clients": -1}
    raw["groups"]["other"] = {"endpoints": ["nohost"], "allow_users": ["no-such-user-kmx"]}
    with pytest.raises(ConfigInvalid) as e:
        parse_config(raw)
    paths = [p for p, _ in e.value.problems]
    assert paths == [
        "daemon.max_clients",
        "groups.echo.connections",
        "groups.echo.steering",
        "groups.other.endpoints[0]",
        "groups.other.allow_users[0]",
    ]
    assert e.value.message.startswith("5 problems: daemon.max_clients: ")
    assert len(e.value.lines()) == 5


def problems_of(raw) -> list[list[str]]:
    with pytest.raises(ConfigInvalid) as e:
        parse_config(raw)
    return e.value.problems


def test_a_typo_is_one_problem_that_names_the_key_it_resembles():
    """The issue's case: `stering = "id"` beside an [id] table and a request setting gave
    "unknown key" plus two errors that only came from steering falling back to balance."""
    raw = with_("groups.echo.stering", "id")
    raw["groups"]["echo"]["id"] = {"request_offset": 4, "response_offset": 4}
    raw["groups"]["echo"]["request_timeout"] = 2.0
    assert problems_of(raw) == [["groups.echo.stering", "unknown key; did you mean 'steering'?"]]
    # Fixed, the file is good; a real mistake beside the typo is still reported.
    raw["groups"]["echo"]["steering"] = raw["groups"]["echo"].pop("stering")
    assert parse_config(raw).groups["echo"].steering == "id"
    raw["groups"]["echo"]["stering"] = "id"
    raw["groups"]["echo"]["connections"] = 0
    assert [p for p, _ in problems_of(raw)] == ["groups.echo.stering", "groups.echo.connections"]


@pytest.mark.parametrize(
    "path, value, problems",
    [
        # A required key misspelt is not also "missing".
        ("groups.echo.endpoint", ["127.0.0.1:1"], [["groups.echo.endpoint", "unknown key; did you mean 'endpoints'?"]]),
        ("verison", 1, [["verison", "unknown key; did you mean 'version'?"]]),
        ("daemon.max_client", 8, [["daemon.max_client", "unknown key; did you mean 'max_clients'?"]]),
        ("groups.echo.id.request_ofset", 4, [["groups.echo.id.request_ofset", "unknown key; did you mean 'request_offset'?"]]),
        # A value that is not one of the choices: the closest one is suggested, and it does not
        # make the [id] table look misplaced either.
        ("groups.echo.steering", "ids", [["groups.echo.steering", "must be one of 'balance', 'id', 'fifo', not 'ids'; "
                                                                  "did you mean 'id'?"]]),
        # Nothing close: the allowed keys are listed instead.
        ("groups.echo.frobnicate", 1, None),
    ],
)
def test_typos_suggest_the_key_and_bring_no_follow_on_errors(path, value, problems):
    raw = with_(path, value)
    echo = raw["groups"]["echo"]
    if path == "groups.echo.endpoint":
        del echo["endpoints"]
    if path == "verison":
        del raw["version"]
    if path == "groups.echo.id.request_ofset" or path == "groups.echo.steering":
        echo.setdefault("id", {}).update({"response_offset": 4} if "request_ofset" in echo["id"] else
                                         {"request_offset": 4, "response_offset": 4})
        echo.setdefault("steering", "id")
    got = problems_of(raw)
    if problems is None:
        ((where, reason),) = got
        assert where == path and reason.startswith("unknown key (allowed: allow_groups, allow_users, ")
    else:
        assert got == problems


def test_a_misspelt_groups_table_is_not_also_no_groups_at_all():
    raw = {"version": 1, "group": {"echo": {"endpoints": ["127.0.0.1:1"]}}}
    assert problems_of(raw) == [["group", "unknown key; did you mean 'groups'?"]]


def test_access_lists_resolve_names_and_ids():
    import grp
    import pwd

    root_group = grp.getgrgid(0).gr_name
    raw = with_("groups.echo.allow_users", ["root", 1234, "65534"])
    raw["groups"]["echo"]["allow_groups"] = [root_group]
    g = parse_config(raw).groups["echo"]
    assert [(p.id, p.label) for p in g.access.users] == [(0, pwd.getpwuid(0).pw_name), (1234, "1234"), (65534, "65534")]
    assert g.access.admits(1234, 999) and g.access.admits(5000, 5000, [0]) and not g.access.admits(5000, 5000, [7])
    assert parse_config(GOOD).groups["echo"].access.open


def test_contention_sees_another_sender_within_the_window_and_not_ones_own_streak():
    from kmuxd.core.contention import Contention

    c = Contention()
    assert not c.contended(1, 0.0, 1.0)  # nobody has sent
    c.sent(1, 0.0)
    c.sent(1, 0.5)
    assert not c.contended(1, 0.6, 1.0)  # only its own streak
    assert c.contended(2, 0.6, 1.0)  # client 1 sent 0.1 s ago
    assert c.contended(3, 1.4, 1.0) and not c.contended(3, 1.5, 1.0)  # the window ends 1 s after the last send
    c.sent(2, 2.0)
    assert c.contended(2, 2.1, 2.0)  # client 1, at 0.5, is within 2 s
    assert not c.contended(2, 2.1, 1.0)  # ... but not within 1 s
    assert c.contended(1, 2.1, 1.0)  # client 2 just sent
    c.sent(1, 2.2)
    assert c.contended(1, 2.3, 1.0)  # its new streak began after client 2's send at 2.0
    assert c.statistics().last_sender == 1


def test_a_pace_lets_a_burst_through_then_refills_at_the_rate():
    from kmuxd.core.pacing import Pace

    rate, burst = 1000.0, 16  # a message a millisecond
    p = Pace(burst, now=0.0)
    assert p.room(0.0, rate, burst) == 16  # a client starts with a full burst
    p.spend(16)
    assert p.room(0.0, rate, burst) == 0  # out of tokens: the shell holds it
    assert p.ready_at(rate, burst) == 0.016  # when a whole burst has refilled, not the next token
    assert p.statistics().holds == 1
    assert p.room(0.0105, rate, burst) == 10  # 10.5 ms: ten whole messages
    p.spend(10)
    assert p.room(10.0, rate, burst) == 16  # never more than a burst, however long it waited
    # A rate changed by a reload applies to the next question.
    p.spend(16)
    assert p.room(10.5, 10.0, burst) == 5


def test_a_pace_may_be_overdrawn_by_a_read_and_waits_it_off():
    from kmuxd.core.pacing import Pace

    p = Pace(4, now=0.0)
    assert p.room(0.0, 100.0, 4) == 4
    p.spend(6)  # a message in pieces or a refused one costs too: the next questions wait it off
    assert p.room(0.01, 100.0, 4) == 0  # -1 token
    assert abs(p.ready_at(100.0, 4) - 0.06) < 1e-9  # 5 more to a full burst: 50 ms after 0.01
