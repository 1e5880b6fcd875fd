"""Handshake, notice and control encodings, and the error codes. No sockets."""

from __future__ import annotations

import msgpack
import pytest

from kmux import errors
from kmux.errors import (
    BadFrame,
    BadPacket,
    ConfigInvalid,
    HandshakeInvalid,
    KmuxError,
    LocalError,
    RemoteError,
    UnknownGroup,
    VersionUnsupported,
    error_class,
    error_from_code,
)
from kmux.framing import PRESETS, Framing
from kmux.protocol import (
    HANDSHAKE_MAX,
    Accepted,
    Control,
    Hello,
    Notice,
    Refused,
    decode_answer,
    decode_control,
    decode_hello,
    decode_notice,
    encode_answer,
    encode_control,
    encode_hello,
    encode_notice,
)

# -- hello -----------------------------------------------------------------


def test_hello_bytes_match_the_documented_example():
    expected = bytes.fromhex(
        "83 a4 6b 6d 75 78 01 a5 67 72 6f 75 70 a4 65 63 68 6f a7 72 65 63 65 69 76 65 c3"
    )
    assert encode_hello(Hello("echo")) == expected


@pytest.mark.parametrize("hello", [Hello("echo"), Hello("g" * 128, receive=False, name="worker-1"), Hello("x", name="n" * 128)])
def test_hello_round_trip(hello):
    assert decode_hello(encode_hello(hello)) == hello


def test_hello_omits_an_empty_name():
    assert "name" not in msgpack.unpackb(encode_hello(Hello("echo")))


def _packed(**body):
    return msgpack.packb(body)


@pytest.mark.parametrize(
    ("packet", "exc", "text"),
    [
        (b"\xc1", HandshakeInvalid, "the first packet must be the hello"),
        (b"\x00\x00\x00\x00\x04ping", HandshakeInvalid, r"this is a DATA packet \(kind byte 0x00\)"),
        (msgpack.packb({"op": "stats"}), HandshakeInvalid, "app socket, not its control socket"),
        (b"", HandshakeInvalid, "not valid msgpack"),
        (msgpack.packb([1, "echo"]), HandshakeInvalid, "the first packet must be the hello"),
        (msgpack.packb("echo"), HandshakeInvalid, "the first packet must be the hello"),
        (_packed(group="echo"), HandshakeInvalid, "integer 'kmux'"),
        (_packed(kmux=True, group="echo"), HandshakeInvalid, "integer 'kmux'"),
        (_packed(kmux="1", group="echo"), HandshakeInvalid, "integer 'kmux'"),
        (_packed(kmux=2, group="echo"), VersionUnsupported, "version 2"),
        (_packed(kmux=0, group="echo"), VersionUnsupported, "version 0"),
        (_packed(kmux=1, group="echo", recieve=True), HandshakeInvalid, "unknown hello keys: recieve"),
        (_packed(kmux=1, group="echo", b=1, a=2), HandshakeInvalid, "unknown hello keys: a, b"),
        (_packed(kmux=1), HandshakeInvalid, "needs a 'group'"),
        (_packed(kmux=1, group=""), HandshakeInvalid, "'group'"),
        (_packed(kmux=1, group="g" * 129), HandshakeInvalid, "'group'"),
        (_packed(kmux=1, group=7), HandshakeInvalid, "'group'"),
        (_packed(kmux=1, group="echo", receive=1), HandshakeInvalid, "'receive'"),
        (_packed(kmux=1, group="echo", name="n" * 129), HandshakeInvalid, "'name'"),
        (_packed(kmux=1, group="echo", name=None), HandshakeInvalid, "'name'"),
        (_packed(kmux=1, group="echo", name="x" * HANDSHAKE_MAX), HandshakeInvalid, "the limit is 4096"),
    ],
)
def test_hello_refusals(packet, exc, text):
    with pytest.raises(exc, match=text) as info:
        decode_hello(packet)
    assert type(info.value) is exc
    assert info.value.code == exc.code


def test_hello_at_the_size_limit_is_judged_on_content():
    packet = _packed(kmux=1, group="echo", pad="x" * (HANDSHAKE_MAX - 30))
    assert len(packet) <= HANDSHAKE_MAX
    with pytest.raises(HandshakeInvalid, match="unknown hello keys: pad"):
        decode_hello(packet)


def test_hello_validates_itself():
    with pytest.raises(HandshakeInvalid):
        Hello("")
    with pytest.raises(HandshakeInvalid):
        Hello("echo", receive="yes")  # type: ignore[arg-type]


# -- answer ----------------------------------------------------------------


@pytest.mark.parametrize(
    "framing", [*PRESETS.values(), Framing("custom", "fixed", 2, 8, "little", -3)], ids=lambda f: f.name
)
def test_accepted_round_trip(framing):
    answer = Accepted(group="echo", client_id=7, max_message=1 << 20, framing=framing, steering="balance")
    packet = encode_answer(answer)
    assert len(packet) <= HANDSHAKE_MAX
    assert decode_answer(packet) == answer


def test_accepted_map_matches_the_docs():
    answer = Accepted("echo", 7, 1048576, PRESETS["u32be"], "balance")
    assert msgpack.unpackb(encode_answer(answer)) == {
        "kmux": 1,
        "ok": True,
        "group": "echo",
        "client_id": 7,
        "max_message": 1048576,
        "steering": "balance",
        "up": True,
        "framing": {
            "name": "u32be",
            "kind": "fixed",
            "length_offset": 0,
            "length_size": 4,
            "length_order": "big",
            "length_adjust": 4,
        },
    }


def test_refused_round_trip_and_error():
    refused = Refused(code="unknown_group", message="no group 'nope' (groups: echo)")
    back = decode_answer(encode_answer(refused))
    assert back == refused
    err = back.error
    assert type(err) is UnknownGroup
    assert err.code == "unknown_group"
    assert err.message == "no group 'nope' (groups: echo)"


def test_refusal_with_a_future_code_keeps_it():
    err = decode_answer(_packed(kmux=1, ok=False, code="quota_exceeded", error="later")).error
    assert type(err) is KmuxError
    assert err.code == "quota_exceeded"


@pytest.mark.parametrize(
    "packet",
    [
        b"\xc1",
        msgpack.packb([1]),
        _packed(kmux=1),  # no "ok"
        _packed(kmux=1, ok=True, group="echo"),  # missing the rest
        _packed(kmux=1, ok=True, group="e", client_id="x", max_message=1, framing={"kind": "varint"}, steering="s"),
        _packed(kmux=1, ok=True, group="e", client_id=1, max_message=1, framing={"length_size": 3}, steering="s"),
        _packed(kmux=1, ok=False),  # no code
    ],
)
def test_malformed_answers(packet):
    with pytest.raises(HandshakeInvalid):
        decode_answer(packet)


# -- notice ----------------------------------------------------------------


def test_error_notice_round_trip():
    notice = Notice.for_error(BadFrame("u32be header announces 9 bytes, the message has 12", seq=42))
    packet = encode_notice(notice)
    assert packet[0] == 0x01
    assert msgpack.unpackb(packet[1:]) == {
        "code": "bad_frame",
        "error": "u32be header announces 9 bytes, the message has 12",
        "seq": 42,
    }
    back = decode_notice(memoryview(packet)[1:])
    assert back == notice
    assert back.seq == 42
    err = back.error
    assert type(err) is BadFrame
    assert err.seq == 42
    assert str(err) == "[bad_frame] u32be header announces 9 bytes, the message has 12 seq=42"


def test_event_notice_round_trip():
    packet = encode_notice(Notice(event="receive_off"))
    assert msgpack.unpackb(packet[1:]) == {"event": "receive_off"}
    back = decode_notice(packet[1:])
    assert back.event == "receive_off"
    assert back.code is None
    assert back.error is None


def test_notice_details_may_use_any_name():
    # A detail called "message" once collided with error_from_code's argument.
    notice = decode_notice(_packed(code="bad_frame", error="e", message="m", seq=1))
    err = notice.error
    assert type(err) is BadFrame
    assert err.message == "e"
    assert err.details == {"message": "m", "seq": 1}


@pytest.mark.parametrize(
    "body", [b"\xc1", msgpack.packb([1]), _packed(code=7, error="x"), _packed(event=["receive_off"])]
)
def test_bad_notices(body):
    with pytest.raises(BadPacket):
        decode_notice(body)


# -- control ---------------------------------------------------------------


@pytest.mark.parametrize("on", [True, False])
def test_control_round_trip(on):
    packet = encode_control(Control("receive", {"on": on}))
    assert packet[0] == 0x01
    assert msgpack.unpackb(packet[1:]) == {"op": "receive", "on": on}
    assert decode_control(memoryview(packet)[1:]) == Control("receive", {"on": on})


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb(["receive"]), "must be a msgpack map"),
        (_packed(op="pause"), "unknown control op 'pause'"),
        (_packed(on=False), "unknown control op None"),
        (_packed(op="receive", on=False, now=True), "unknown keys for control op 'receive': now"),
        (_packed(op="receive"), "needs a boolean 'on'"),
        (_packed(op="receive", on=0), "needs a boolean 'on'"),
        (_packed(op="receive", on=False, pad="x" * 5000), "the limit is 4096"),
    ],
)
def test_control_refusals(body, text):
    with pytest.raises(BadPacket, match=text):
        decode_control(body)


# -- errors ----------------------------------------------------------------

_WIRE_CLASSES = list(errors._BY_CODE.values())


@pytest.mark.parametrize("cls", _WIRE_CLASSES, ids=lambda c: c.code)
def test_error_from_code_round_trip(cls):
    err = cls("something broke", seq=3)
    wire = msgpack.unpackb(msgpack.packb(err.to_wire()))  # as it travels
    back = error_from_code(wire.pop("code"), wire.pop("error"), **wire)
    assert type(back) is cls
    assert back.code == cls.code
    assert back.message == "something broke"
    assert back.seq == 3
    assert back.to_wire() == err.to_wire()
    assert error_class(cls.code) is cls


def test_codes_are_unique_and_snake_case():
    classes = [errors.KmuxError, *errors._all_subclasses(errors.KmuxError)]
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))
    assert all(code.replace("_", "").isalpha() and code.islower() for code in codes)


def test_documented_codes_all_have_classes():
    documented = [
        "handshake_invalid",
        "version_unsupported",
        "unknown_group",
        "too_many_clients",
        "message_too_big",
        "bad_frame",
        "bad_packet",
        "connection_lost",
        "request_timeout",
        "response_too_big",
        "daemon_shutdown",
    ]
    for code in documented:
        assert error_class(code).code == code


def test_unknown_code_keeps_the_code():
    err = error_from_code("shiny_new_error", "from a newer daemon", seq=9)
    assert type(err) is KmuxError
    assert err.code == "shiny_new_error"
    assert err.to_wire() == {"code": "shiny_new_error", "error": "from a newer daemon", "seq": 9}
    assert KmuxError.code == "error"  # the class itself is untouched
    assert error_class("shiny_new_error") is KmuxError


def test_local_remote_split():
    assert issubclass(errors.BadFrame, LocalError)
    assert issubclass(errors.UnknownGroup, LocalError)
    assert issubclass(errors.DaemonShutdown, RemoteError)
    assert issubclass(errors.DaemonUnavailable, RemoteError)
    assert issubclass(errors.RemoteFrameTooBig, RemoteError)
    assert issubclass(errors.ResponseTooBig, RemoteError)


def test_config_invalid_carries_its_path():
    err = ConfigInvalid("groups.echo.max_message", "must be positive")
    assert err.path == "groups.echo.max_message"
    assert err.reason == "must be positive"
    assert err.message == "groups.echo.max_message: must be positive"
    # It never travels as a code: a daemon with a bad config does not start.
    assert error_class("config_invalid") is KmuxError


def test_error_without_a_message_shows_its_code():
    assert str(errors.DaemonShutdown()) == "[daemon_shutdown] daemon_shutdown"
