"""Fuzz targets for :mod:`kmux.protocol`: hello, handshake answer, notice and control decoders.

Invariants:

* ``decode_*(encode_*(x)) == x`` for every valid value (a CONTROL map has
  exactly two, both in ``tests/unit/test_protocol.py``);
* on any bytes each decoder returns a valid value or raises its documented
  :class:`~kmux.errors.KmuxError` (hello: ``HandshakeInvalid`` or
  ``VersionUnsupported``; answer: ``HandshakeInvalid``; notice and control:
  ``BadPacket``), never a msgpack exception, ``TypeError``,
  ``RecursionError`` or ``MemoryError``;
* the error, and the error a decoded notice carries, can be printed (the app
  or the daemon's log will print it).

The bytes are hostile: arbitrary, any msgpack value, maps with the right
keys and values of any type, nesting past every stack limit, declared
lengths up to ``2**32 - 1``, and mutations of valid packets.
"""

from __future__ import annotations

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from kmux.errors import BadPacket, HandshakeInvalid, VersionUnsupported
from kmux.protocol import (
    HANDSHAKE_MAX,
    Accepted,
    Hello,
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

from .checks import REFUSED, decode_or_refuse
from .profiles import fuzz_settings
from .strategies import (
    accepteds,
    controls,
    hellos,
    hostile_msgpack,
    notices,
    odd_values,
    refuseds,
    shaped_maps,
)

# Maps with each decoder's own keys, holding values of any type (an answer's framing: a map of any values).
_FRAMING_KEYS = ["name", "kind", "length_offset", "length_size", "length_order", "length_adjust"]
_field_values = st.one_of(
    odd_values,
    st.sampled_from(["receive", "receive_off", "shutdown", "bad_frame", "config_invalid", "error"]),
    st.dictionaries(st.sampled_from(_FRAMING_KEYS), odd_values, max_size=7),
)


def hostile(valid: st.SearchStrategy[bytes], keys: list[str]) -> st.SearchStrategy[bytes]:
    return st.one_of(hostile_msgpack(valid), shaped_maps(keys, _field_values))


def _shown_by_the_client(value) -> str:
    """A refusal or an error notice becomes an exception the app prints; anything else, its repr."""
    error = getattr(value, "error", None)
    return str(error) if error is not None else repr(value)


# -- round trips ----------------------------------------------------------------


@fuzz_settings
@given(hello=hellos)
def test_hello_round_trip(hello):
    assert decode_hello(encode_hello(hello)) == hello


@fuzz_settings
@given(answer=st.one_of(accepteds, refuseds))
def test_answer_round_trip(answer):
    assert decode_answer(encode_answer(answer)) == answer


@fuzz_settings
@given(notice=notices, view=st.booleans())
def test_notice_round_trip(notice, view):
    body = encode_notice(notice)[1:]
    assert decode_notice(memoryview(body) if view else body) == notice


# -- hostile bytes --------------------------------------------------------------

_HELLO_KEYS = ["kmux", "group", "receive", "name", "op"]
_ANSWER_KEYS = ["kmux", "ok", "group", "client_id", "max_message", "framing", "steering", "up", "code", "error"]
_NOTICE_KEYS = ["code", "error", "event", "seq", "accepted", "id", "message"]
_CONTROL_KEYS = ["op", "on"]

# Hellos around the size limit (a name padded to the edge; too long to be valid).
_hello_at_limit = st.integers(HANDSHAKE_MAX - 40, HANDSHAKE_MAX + 40).map(
    lambda n: msgpack.packb({"kmux": 1, "group": "g", "name": "n" * n})
)


@fuzz_settings
@given(packet=st.one_of(hostile(hellos.map(encode_hello), _HELLO_KEYS), _hello_at_limit))
def test_hello_decoder_on_hostile_bytes(packet):
    hello = decode_or_refuse(decode_hello, packet, (HandshakeInvalid, VersionUnsupported))
    if hello is REFUSED:
        return
    assert len(packet) <= HANDSHAKE_MAX
    assert isinstance(hello, Hello) and hello == Hello(hello.group, hello.receive, hello.name)


@fuzz_settings
@given(packet=hostile(st.one_of(accepteds, refuseds).map(encode_answer), _ANSWER_KEYS))
def test_answer_decoder_on_hostile_bytes(packet):
    answer = decode_or_refuse(decode_answer, packet, (HandshakeInvalid,), show=_shown_by_the_client)
    if answer is REFUSED:
        return
    assert isinstance(answer, (Accepted, Refused))
    if isinstance(answer, Accepted):
        assert answer.framing.min_header >= 1


@fuzz_settings
@given(body=hostile(notices.map(lambda n: encode_notice(n)[1:]), _NOTICE_KEYS), view=st.booleans())
def test_notice_decoder_on_hostile_bytes(body, view):
    notice = decode_or_refuse(decode_notice, memoryview(body) if view else body, (BadPacket,),
                              show=_shown_by_the_client)
    if notice is REFUSED:
        return
    assert isinstance(notice.code, (str, type(None))) and isinstance(notice.event, (str, type(None)))


@fuzz_settings
@given(body=hostile(controls.map(lambda c: encode_control(c)[1:]), _CONTROL_KEYS), view=st.booleans())
def test_control_decoder_on_hostile_bytes(body, view):
    control = decode_or_refuse(decode_control, memoryview(body) if view else body, (BadPacket,))
    if control is REFUSED:
        return
    assert control.op == "receive" and isinstance(control.args["on"], bool)
