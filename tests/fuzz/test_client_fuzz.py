"""Fuzz target: the client library's handling of what the daemon sends.

Invariants: after the handshake, any sequence of packets (any kind byte,
any NOTICE body, empty packets), interleaved with receive on/off requests,
either returns a documented value (the message, a ``HandBack``,
``RECEIVE_OFF`` or ``None``) or raises a :class:`~kmux.errors.KmuxError`
that prints; DATA always comes back byte for byte. Any handshake answer
gives ``Accepted`` or a ``KmuxError``.

The entry points are the sans-IO client core's public ones, gathered in
:func:`ready_session` and :func:`classify`; when the client moves to a
``ClientDriver``, repoint these two and nothing else.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kmux._session import RECEIVE_OFF, ClientSession, HandBack
from kmux.errors import KmuxError
from kmux.framing import PRESETS
from kmux.protocol import KIND_DATA, KIND_DATA_MORE, Accepted, encode_answer, encode_notice

from .checks import REFUSED, decode_or_refuse
from .profiles import fuzz_settings
from .strategies import accepteds, hostile_msgpack, notices, refuseds


def ready_session(steering: str) -> ClientSession:
    session = ClientSession("g")
    session.hello_packet()
    accepted = Accepted(group="g", client_id=1, max_message=4096, framing=PRESETS["u32be"], steering=steering)
    session.receive_answer(encode_answer(accepted))
    return session


def classify(session: ClientSession, packet: bytes):
    return session.receive_packet(memoryview(packet))


_notice_bodies = hostile_msgpack(notices.map(lambda n: encode_notice(n)[1:]))
_events = st.sampled_from([b'\x81\xa5event\xabreceive_off', b'\x82\xa5event\xa8shutdown\xa8accepted\x05'])
_packets = st.one_of(
    st.binary(max_size=40).map(lambda b: b"\x00" + b),
    st.binary(max_size=40).map(lambda b: b"\x80" + b),  # a piece of a continued message
    st.one_of(_notice_bodies, _events).map(lambda b: b"\x01" + b),
    st.binary(max_size=40),  # any kind byte, or an empty packet
)
# A step is a packet from the daemon, or the app switching receiving on or off.
_steps = st.lists(st.one_of(_packets, st.booleans()), max_size=8)


@fuzz_settings
@given(steering=st.sampled_from(["balance", "id", "fifo"]), steps=_steps)
def test_any_packets_after_the_handshake(steering, steps):
    session = ready_session(steering)
    joined = b""  # the pieces of a continued message so far (DATA_MORE bodies)
    for step in steps:
        if isinstance(step, bool):
            session.receive_control(step)
            continue
        got = decode_or_refuse(lambda packet: classify(session, packet), step, (KmuxError,))
        if got is REFUSED:
            # A refused packet ends a continued message (the steps stay far below
            # max_message), except an empty one: on a socket that reads as the end of
            # the stream, so it is refused without touching what was joined.
            if step:
                joined = b""
            continue
        if step[:1] == bytes([KIND_DATA_MORE]):
            assert got is None, "a piece is not a message"
            joined += step[1:]
        elif step[:1] == bytes([KIND_DATA]):
            message = got.message if isinstance(got, HandBack) else got
            assert bytes(message) == joined + step[1:]
            joined = b""
        else:
            assert not joined, "a packet of another kind inside a continued message must be refused"
            assert got is None or got is RECEIVE_OFF
    assert session.state.value == "ready"


@fuzz_settings
@given(answer=hostile_msgpack(st.one_of(accepteds, refuseds).map(encode_answer)))
def test_any_handshake_answer(answer):
    session = ClientSession("g")
    session.hello_packet()
    accepted = decode_or_refuse(session.receive_answer, answer, (KmuxError,))
    if accepted is REFUSED:
        assert session.state.value == "closed"
        return
    assert isinstance(accepted, Accepted) and session.state.value == "ready"
