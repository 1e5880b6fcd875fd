"""The sans-IO client session: handshake, seq, classification, receive off. No sockets."""

from __future__ import annotations

import msgpack
import pytest

from kmux._session import ANSWER_BUFSIZE, RECEIVE_OFF, ClientSession, HandBack, State
from kmux.errors import (
    BadFrame,
    BadPacket,
    ClientClosed,
    DaemonShutdown,
    DaemonUnavailable,
    HandshakeInvalid,
    IllegalTransition,
    KmuxError,
    MessageTooBig,
    TooManyClients,
    UnknownGroup,
    VersionUnsupported,
)
from kmux.framing import PRESETS
from kmux.protocol import (
    CONTROL_MAX,
    Accepted,
    Control,
    Notice,
    Refused,
    decode_control,
    decode_hello,
    encode_answer,
    encode_notice,
)

from ._frames import frame

U32BE = PRESETS["u32be"]
MAX = 64


def accepted(**overrides):
    fields = dict(group="echo", client_id=7, max_message=MAX, framing=U32BE, steering="balance")
    fields.update(overrides)
    return Accepted(**fields)


def ready_session(max_message: int = MAX, **kwargs) -> ClientSession:
    session = ClientSession("echo", **kwargs)
    session.hello_packet()
    session.receive_answer(encode_answer(accepted(max_message=max_message)))
    return session


def data(message: bytes) -> memoryview:
    return memoryview(b"\x00" + message)


def notice(**body) -> memoryview:
    return memoryview(b"\x01" + msgpack.packb(body))


MARKER = notice(event="receive_off")


# -- handshake -------------------------------------------------------------


def test_handshake_happy_path():
    session = ClientSession("echo", receive=False, name="w1")
    assert session.state is State.HELLO
    hello = decode_hello(session.hello_packet())
    assert (hello.group, hello.receive, hello.name) == ("echo", False, "w1")
    assert session.state is State.AWAIT_ANSWER
    assert session.recv_bufsize == ANSWER_BUFSIZE
    answer = session.receive_answer(memoryview(encode_answer(accepted(max_message=1 << 20))))
    assert answer.client_id == 7
    assert session.state is State.READY
    assert session.accepted == answer
    assert session.recv_bufsize == 1 + (1 << 20)


def test_tiny_max_message_still_fits_a_notice():
    session = ClientSession("echo")
    session.hello_packet()
    session.receive_answer(encode_answer(accepted(max_message=16)))
    assert session.recv_bufsize == 1 + CONTROL_MAX


def test_bad_group_fails_before_any_io():
    with pytest.raises(HandshakeInvalid):
        ClientSession("")
    with pytest.raises(HandshakeInvalid):
        ClientSession("g" * 129)


@pytest.mark.parametrize(
    ("code", "exc"),
    [("unknown_group", UnknownGroup), ("too_many_clients", TooManyClients), ("version_unsupported", VersionUnsupported)],
)
def test_refusal_raises_its_class(code, exc):
    session = ClientSession("nope")
    session.hello_packet()
    with pytest.raises(exc) as info:
        session.receive_answer(encode_answer(Refused(code, "no")))
    assert info.value.code == code
    assert session.state is State.CLOSED
    with pytest.raises(ClientClosed):
        session.check_data(frame(U32BE, b"x"))


def test_malformed_answer_closes_the_session():
    session = ClientSession("echo")
    session.hello_packet()
    with pytest.raises(HandshakeInvalid):
        session.receive_answer(b"\x00\x00\x00\x04ping")
    assert session.state is State.CLOSED


def test_accepted_with_another_version_is_refused_locally():
    session = ClientSession("echo")
    session.hello_packet()
    with pytest.raises(VersionUnsupported, match="version 2"):
        session.receive_answer(encode_answer(accepted(version=2)))
    assert session.state is State.CLOSED


def test_out_of_order_calls_are_illegal_transitions():
    session = ClientSession("echo")
    with pytest.raises(IllegalTransition):
        session.receive_answer(encode_answer(accepted()))
    with pytest.raises(IllegalTransition):
        session.check_data(frame(U32BE, b"x"))
    with pytest.raises(IllegalTransition):
        session.receive_packet(data(b"x"))
    session.hello_packet()
    with pytest.raises(IllegalTransition):
        session.hello_packet()
    with pytest.raises(IllegalTransition):
        session.receive_control(False)
    session.receive_answer(encode_answer(accepted()))
    with pytest.raises(IllegalTransition):
        session.receive_answer(encode_answer(accepted()))


# -- sending ---------------------------------------------------------------


def test_seq_counts_sent_packets_from_one():
    session = ready_session()
    for expected in (1, 2, 3):
        session.check_data(frame(U32BE, b"m"))
        assert session.data_sent() == expected
    assert session.seq == 3


def test_locally_refused_messages_are_not_counted():
    session = ready_session()
    session.check_data(frame(U32BE, b"a"))
    assert session.data_sent() == 1
    with pytest.raises(BadFrame):
        session.check_data(b"\x00\x00\x00\x09short")
    with pytest.raises(MessageTooBig):
        session.check_data(frame(U32BE, b"x" * MAX))
    with pytest.raises(BadFrame):
        session.check_data(b"")
    assert session.seq == 1  # the daemon never saw those: its next seq is 2, and so is ours
    session.check_data(frame(U32BE, b"b"))
    assert session.data_sent() == 2


def test_validation_accepts_bytes_like_messages():
    session = ready_session()
    message = frame(U32BE, b"abc")
    for m in (message, bytearray(message), memoryview(message)):
        session.check_data(m)


def test_validate_false_leaves_the_check_to_the_daemon():
    session = ready_session(validate=False)
    session.check_data(b"not framed at all")
    session.check_data(b"x" * (MAX * 2))
    assert session.data_sent() == 1


def test_varint_group_validates_with_varint():
    session = ClientSession("pb")
    session.hello_packet()
    session.receive_answer(encode_answer(accepted(framing=PRESETS["varint"])))
    session.check_data(b"\x03abc")
    with pytest.raises(BadFrame):
        session.check_data(b"\x00\x00\x00\x03abc")


# -- receiving -------------------------------------------------------------


def test_data_is_the_packet_without_its_kind_byte():
    session = ready_session()
    packet = data(frame(U32BE, b"pong"))
    event = session.receive_packet(packet)
    assert type(event) is memoryview
    assert event == frame(U32BE, b"pong")
    assert event.obj is session.recv_buffer.obj  # a view into the session's receive buffer, not a copy


def test_error_notice_raises_its_error_with_seq():
    session = ready_session()
    packet = memoryview(encode_notice(Notice.for_error(BadFrame("u32be header announces 9 bytes", seq=4))))
    with pytest.raises(BadFrame) as info:
        session.receive_packet(packet)
    assert info.value.seq == 4
    assert session.state is State.READY  # a per-message error; the session goes on


def test_unknown_error_code_is_raised_as_kmux_error():
    session = ready_session()
    with pytest.raises(KmuxError) as info:
        session.receive_packet(notice(code="brand_new", error="?"))
    assert info.value.code == "brand_new"


def test_daemon_shutdown_notice():
    session = ready_session()
    with pytest.raises(DaemonShutdown):
        session.receive_packet(notice(code="daemon_shutdown", error="stopping"))


def test_unknown_event_is_ignored():
    assert ready_session().receive_packet(notice(event="something_new", x=1)) is None


@pytest.mark.parametrize("packet", [b"\x02abc", b"\x7f", b"", b"\x01\xc1", b"\x01\x91\x01"])
def test_packets_the_protocol_does_not_allow(packet):
    with pytest.raises(BadPacket):
        ready_session().receive_packet(memoryview(packet))


# -- receive off and requeue -----------------------------------------------


def test_receive_control_packets():
    session = ready_session()
    off = session.receive_control(False)
    assert off[0] == 0x01
    assert decode_control(off[1:]) == Control("receive", {"on": False})
    on = session.receive_control(True)
    assert decode_control(on[1:]) == Control("receive", {"on": True})
    with pytest.raises(TypeError):
        session.receive_control(1)  # type: ignore[arg-type]


def test_data_before_the_marker_is_handed_back():
    session = ready_session()
    assert session.receive_packet(data(b"early")) == b"early"  # receiving: delivered
    session.receive_control(False)
    assert session.draining
    first = session.receive_packet(data(b"queued-1"))
    assert isinstance(first, HandBack)
    assert first.message == b"queued-1"  # a view: the next packet reuses the buffer
    second = session.receive_packet(data(b"queued-2"))
    assert isinstance(second, HandBack)
    session.max_packet = 4096
    [(requeue,)] = session.packets(second.message, requeue=True)
    assert requeue == b"\x02queued-2"
    assert session.receive_packet(MARKER) is RECEIVE_OFF
    assert not session.draining
    # After the marker nothing should come; if it does, it is kept, not lost.
    assert session.receive_packet(data(b"late")) == b"late"


def test_errors_while_draining_do_not_end_the_drain():
    session = ready_session()
    session.receive_control(False)
    with pytest.raises(BadFrame):
        session.receive_packet(notice(code="bad_frame", error="x", seq=1))
    assert session.draining
    assert isinstance(session.receive_packet(data(b"q")), HandBack)
    assert session.receive_packet(MARKER) is RECEIVE_OFF


def test_two_offs_need_two_markers():
    session = ready_session()
    session.receive_control(False)
    session.receive_control(False)
    assert session.receive_packet(MARKER) is None
    assert session.draining
    assert isinstance(session.receive_packet(data(b"q")), HandBack)
    assert session.receive_packet(MARKER) is RECEIVE_OFF
    assert not session.draining


def test_on_again_before_the_marker_keeps_the_data():
    session = ready_session()
    session.receive_control(False)
    session.receive_control(True)
    assert not session.draining
    # Requeue is only allowed while off, and the app wants messages again.
    assert session.receive_packet(data(b"q")) == b"q"
    assert session.receive_packet(MARKER) is None  # consumed quietly
    assert session.receive_packet(data(b"r")) == b"r"


def test_stray_marker_is_ignored():
    assert ready_session().receive_packet(MARKER) is None


def test_joining_with_receive_off_does_not_drain():
    session = ready_session(receive=False)
    assert not session.receiving
    assert not session.draining
    assert session.receive_packet(data(b"x")) == b"x"


def test_requeue_does_not_count_as_data():
    session = ready_session()
    session.receive_control(False)
    session.receive_packet(data(b"q"))
    assert session.seq == 0


# -- end of the connection -------------------------------------------------


def test_eof_after_the_handshake_is_daemon_shutdown():
    session = ready_session()
    err = session.eof()
    assert type(err) is DaemonShutdown
    assert err.message == "daemon closed the connection"
    assert session.state is State.CLOSED
    with pytest.raises(DaemonShutdown):  # not ClientClosed: the app did nothing wrong
        session.check_data(frame(U32BE, b"x"))
    assert type(session.eof()) is DaemonShutdown


def test_eof_before_the_answer_is_daemon_unavailable():
    session = ClientSession("echo")
    session.hello_packet()
    assert type(session.eof()) is DaemonUnavailable


def test_closed_session_raises_client_closed():
    session = ready_session()
    session.close()
    for call in (
        lambda: session.check_data(frame(U32BE, b"x")),
        lambda: session.receive_packet(data(b"x")),
        lambda: session.receive_control(False),
        session.require_ready,
    ):
        with pytest.raises(ClientClosed):
            call()


# -- continuation: splitting and joining -------------------------------------------


def test_packets_split_a_large_message_into_views():
    session = ready_session()
    session.max_packet = 10  # 9 bytes of message per packet
    message = bytes(range(20))
    packets = session.packets(message)
    assert [(p[0], bytes(p[1])) for p in packets] == [
        (b"\x80", message[:9]),
        (b"\x80", message[9:18]),
        (b"\x00", message[18:]),
    ]
    assert all(p[1].obj is message for p in packets)  # views, not copies
    assert [p[0] for p in session.packets(message, requeue=True)] == [b"\x82", b"\x82", b"\x02"]
    assert session.packets(message[:9]) == [(b"\x00" + message[:9],)]  # fits: one packet
    assert [len(p[1]) for p in session.packets(message[:18])] == [9, 9]  # no empty last piece


def test_large_single_packets_are_not_copied():
    session = ready_session(max_message=1 << 20)
    session.max_packet = 1 << 21
    message = bytes(5000)
    [(prefix, body)] = session.packets(message)
    assert prefix == b"\x00" and body is message


def test_pieces_are_joined_in_the_receive_buffer():
    session = ready_session()
    whole = frame(U32BE, b"0123456789" * 5)  # 54 bytes, MAX is 64
    assert session.receive_packet(memoryview(b"\x80" + whole[:20])) is None
    assert session.joining
    assert session.receive_packet(memoryview(b"\x80" + whole[20:40])) is None
    event = session.receive_packet(memoryview(b"\x00" + whole[40:]))
    assert event == whole and not session.joining
    assert event.obj is session.recv_buffer.obj  # joined where it was received: no copy
    assert session.receive_packet(data(b"next")) == b"next"


def test_a_joined_message_over_max_message_is_a_bad_packet_and_its_rest_is_skipped():
    session = ready_session()
    session.receive_packet(memoryview(b"\x80" + b"a" * 40))
    with pytest.raises(BadPacket, match="over max_message"):
        session.receive_packet(memoryview(b"\x80" + b"b" * 40))  # 80 > 64
    assert not session.joining
    assert session.receive_packet(memoryview(b"\x80" + b"c")) is None  # skipped
    assert session.receive_packet(memoryview(b"\x00" + b"d")) is None  # its last piece: skipped
    assert session.receive_packet(data(b"ok")) == b"ok"


def test_a_single_packet_over_max_message_is_a_bad_packet():
    session = ready_session(max_message=16)
    with pytest.raises(BadPacket, match="packet over max_message"):
        session.receive_packet(data(b"x" * 17))
    with pytest.raises(BadPacket):  # longer than the buffer: truncated
        session.receive_packet(data(b"x" * (CONTROL_MAX + 10)))


def test_anything_but_a_piece_inside_a_continued_message_is_a_bad_packet():
    for intruder in (notice(event="receive_off"), memoryview(b"\x02abc")):
        session = ready_session()
        session.receive_packet(memoryview(b"\x80abc"))
        with pytest.raises(BadPacket, match="inside a continued message"):
            session.receive_packet(intruder)
        assert not session.joining
        assert session.receive_packet(data(b"ok")) == b"ok"


def test_a_continued_message_before_the_marker_is_handed_back_whole():
    session = ready_session()
    session.receive_control(False)
    assert session.receive_packet(memoryview(b"\x80abc")) is None
    event = session.receive_packet(memoryview(b"\x00def"))
    assert isinstance(event, HandBack) and event.message == b"abcdef"


@pytest.mark.parametrize("code", ["slow_consumer", "idle_timeout", "permission_denied"])
def test_a_notice_that_ends_the_session_names_what_ended_it(code):
    session = ready_session()
    with pytest.raises(KmuxError) as info:
        session.receive_packet(notice(code=code, error="detached", accepted=5))
    assert info.value.code == code
    assert session.shutdown_accepted == 5
    err = session.eof()
    assert err.code == code and "ended the session" in err.message
