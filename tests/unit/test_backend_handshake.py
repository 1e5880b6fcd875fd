"""BackendHandshake: the steps of a per-connection credential handshake, with no sockets."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

import pytest

from kmux.errors import ConnectFailed, IllegalTransition
from kmux.framing import Framing

from kmuxd.core.backend_handshake import BackendHandshake, StepState, reply_mismatch

MC = Framing.from_spec("memcached-binary")
U32 = Framing.from_spec("u32be")


@dataclass(frozen=True)
class Step:
    message: bytes
    expect_offset: int = 0
    expect: bytes = b""


def mc_reply(status: int, body: bytes = b"") -> bytes:
    return struct.pack(">BBHBBHIIQ", 0x81, 0x21, 0, 0, 0, status, len(body), 0, 0) + body


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def test_one_step_matches_and_is_done():
    hs = BackendHandshake([Step(b"AUTH", 6, b"\x00\x00")], MC, 4096)
    assert hs.message_to_send() == b"AUTH" and hs.state is StepState.AWAIT
    assert hs.receive_data(mc_reply(0, b"Authenticated")) is True
    assert hs.done


def test_a_reply_split_anywhere_is_checked_once_whole():
    reply = mc_reply(0, b"Authenticated")
    for cut in range(1, len(reply)):
        hs = BackendHandshake([Step(b"x", 6, b"\x00\x00")], MC, 4096)
        hs.message_to_send()
        assert hs.receive_data(reply[:cut]) is False
        assert hs.receive_data(reply[cut:]) is True


def test_the_mismatch_names_the_step_and_the_bytes():
    hs = BackendHandshake([Step(b"x", 6, b"\x00\x00")], MC, 4096)
    hs.message_to_send()
    with pytest.raises(ConnectFailed) as info:
        hs.receive_data(mc_reply(0x20, b"Auth failure."))
    assert info.value.message == "handshake step 1: bytes 6..7 are 0020, expected 0000"
    assert hs.state is StepState.FAILED


def test_steps_go_in_order_and_a_later_step_is_named():
    steps = [Step(b"one", 4, b"ok"), Step(b"two", 4, b"ok"), Step(b"three", 4, b"ok")]
    hs = BackendHandshake(steps, U32, 4096)
    assert hs.message_to_send() == b"one"
    assert hs.receive_data(frame(b"ok")) is False and hs.state is StepState.SEND
    assert hs.message_to_send() == b"two"
    assert hs.receive_data(frame(b"ok")) is False
    assert hs.message_to_send() == b"three"
    with pytest.raises(ConnectFailed, match=r"handshake step 3: bytes 4\.\.5 are 6e6f, expected 6f6b"):
        hs.receive_data(frame(b"no"))


def test_a_short_reply_says_so():
    assert reply_mismatch(b"\x00" * 5, 6, b"\x00\x00") == "the 5-byte reply is too short for bytes 6..7 (expected 0000)"
    hs = BackendHandshake([Step(b"x", 4, b"\x00\x00")], U32, 4096)
    hs.message_to_send()
    with pytest.raises(ConnectFailed, match=r"handshake step 1: the 5-byte reply is too short for bytes 4\.\.5"):
        hs.receive_data(frame(b"\x00"))


def test_bytes_after_the_reply_fail():
    hs = BackendHandshake([Step(b"x", 4, b"ok")], U32, 4096)
    hs.message_to_send()
    with pytest.raises(ConnectFailed, match="handshake step 1: the server sent 3 bytes after its 6-byte reply"):
        hs.receive_data(frame(b"ok") + b"abc")


def test_speaking_before_being_asked_fails():
    hs = BackendHandshake([Step(b"x", 4, b"ok")], U32, 4096)
    with pytest.raises(ConnectFailed, match="sent 3 bytes before it was asked anything"):
        hs.receive_data(b"abc")


def test_a_bad_reply_header_and_a_reply_too_big_fail():
    hs = BackendHandshake([Step(b"x")], U32, 64)
    hs.message_to_send()
    with pytest.raises(ConnectFailed, match="handshake step 1: bad reply: remote announced a 104-byte message"):
        hs.receive_data(struct.pack(">I", 100))


def test_close_and_time_out_are_failures_naming_the_step():
    hs = BackendHandshake([Step(b"a", 4, b"ok"), Step(b"b", 4, b"ok")], U32, 4096)
    hs.message_to_send()
    hs.receive_data(frame(b"ok"))
    hs.message_to_send()
    hs.receive_data(b"\x00\x00")
    assert hs.closed().message == ("handshake step 2: the server closed the connection after 2 bytes of its reply "
                                   "(a close during the handshake is a failure)")
    hs2 = BackendHandshake([Step(b"a", 4, b"ok")], U32, 4096)
    hs2.message_to_send()
    assert hs2.timed_out(0.5).message == "handshake step 1: no reply within auth_timeout=0.5s"


def test_an_empty_expectation_takes_any_whole_reply():
    hs = BackendHandshake([Step(b"hello")], U32, 4096)
    hs.message_to_send()
    assert hs.receive_data(frame(b"whatever")) is True


def test_sending_twice_without_a_reply_is_illegal():
    hs = BackendHandshake([Step(b"a"), Step(b"b")], U32, 4096)
    hs.message_to_send()
    with pytest.raises(IllegalTransition):
        hs.message_to_send()


def test_random_cuts_and_outcomes_agree_with_a_direct_check():
    rng = random.Random(18)
    for _ in range(300):
        n = rng.randint(1, 4)
        replies = [bytes(rng.randrange(3) for _ in range(rng.randint(2, 8))) for _ in range(n)]
        steps = [Step(b"s%d" % i, 4 + rng.randint(0, 1), bytes([rng.randrange(3)])) for i in range(n)]
        hs = BackendHandshake(steps, U32, 4096)
        expected_fail = next((i for i, (st, r) in enumerate(zip(steps, replies))
                              if reply_mismatch(frame(r), st.expect_offset, st.expect)), None)
        outcome = None
        for i, r in enumerate(replies):
            hs.message_to_send()
            data = frame(r)
            cut = rng.randint(0, len(data))
            try:
                hs.receive_data(data[:cut])
                done = hs.receive_data(data[cut:]) if cut < len(data) else hs.done
            except ConnectFailed as exc:
                outcome = i
                assert exc.message.startswith(f"handshake step {i + 1}: ")
                break
            assert done == (i == n - 1)
        assert outcome == expected_fail
