"""The bugs the fuzz targets found, one plain test each (they run whatever the profile).

Each input is the shrunk falsifying example Hypothesis printed. Before the
fixes each of these raised something other than the decoder's documented
error (``TypeError``, ``AttributeError``, ``OverflowError``,
``RecursionError``), which the daemon does not catch: one 9-byte CONTROL
packet from any local app stopped kmuxd (see
``tests/integration/test_hostile_packets.py``).
"""

from __future__ import annotations

import msgpack
import pytest

from kmux.errors import BadPacket, BadRequest, ConfigInvalid, HandshakeInvalid
from kmux.framing import Framing
from kmux.protocol import NESTING_MAX, decode_answer, decode_control, decode_hello, decode_notice
from kmuxd.io.control import parse_request

from .checks import default_recursion_limit

#: A list nested 1010 deep: under msgpack's stack limit (1024), over Python's recursion limit.
DEEP = b"\x91" * 1010 + b"\xc0"


def nested(levels: int) -> bytes:
    """A notice map whose "error" list nests so that the deepest container is at ``levels``."""
    return b"\x81\xa5error" + b"\x91" * (levels - 1) + b"\xc0"


def test_from_spec_array_length_order_is_config_invalid():
    # Was TypeError (unhashable list): `framing = {length_order = ["big"]}` crashed the config load.
    with pytest.raises(ConfigInvalid) as info:
        Framing.from_spec({"length_order": []}, "groups.g.framing")
    assert info.value.path == "groups.g.framing.length_order"


def test_from_spec_with_str_and_bytes_keys_is_config_invalid():
    # Was TypeError (sorting str with bytes) in the first draft of the records framing's key check.
    with pytest.raises(ConfigInvalid) as info:
        Framing.from_spec({"": None, b"": None}, "groups.g.framing")
    assert info.value.path == "groups.g.framing."


def test_control_packet_with_a_list_op_is_bad_packet():
    # Was TypeError: the daemon's session task died with it, and took kmuxd down.
    with pytest.raises(BadPacket, match="unknown control op"):
        decode_control(b"\x81\xa2op\x90")


def test_control_request_with_a_list_op_is_bad_request():
    with pytest.raises(BadRequest, match="unknown op"):
        parse_request(b"\x82\xa2op\x90\xa5\x00\x00\x00\x00\x00\x00")


def test_control_request_with_a_deep_wrong_type_is_bad_request_that_prints():
    # Was RecursionError from repr() in the error text.
    with default_recursion_limit(), pytest.raises(BadRequest, match=r"stats.group has the wrong type: \[\[\["):
        parse_request(b"\x82\xa2op\xa5stats\xa5group" + DEEP)


@pytest.mark.parametrize(
    "framing",
    [1, "u32be", [], 1.5],
    ids=["int", "str", "list", "float"],
)
def test_answer_with_a_framing_that_is_not_a_map_is_handshake_invalid(framing):
    # Was AttributeError ('int' object has no attribute 'get').
    answer = {"kmux": 1, "ok": True, "group": "g", "client_id": 1, "max_message": 64, "framing": framing,
              "steering": "balance"}
    with pytest.raises(HandshakeInvalid, match="malformed handshake answer"):
        decode_answer(msgpack.packb(answer))


def test_answer_with_an_infinite_number_is_handshake_invalid():
    # Was OverflowError (int(inf)).
    answer = {"kmux": 1, "ok": True, "group": "g", "client_id": float("inf"), "max_message": 64,
              "framing": {"kind": "varint"}, "steering": "balance"}
    with pytest.raises(HandshakeInvalid, match="malformed handshake answer"):
        decode_answer(msgpack.packb(answer))


@pytest.mark.parametrize("max_message", [2**64 - 1, 0, -1, 64 * 1024 * 1024 + 1])
def test_answer_with_a_max_message_out_of_range_is_handshake_invalid(max_message):
    # Found by the long run: 2**64 - 1 passed, and ClientSession.receive_answer raised
    # OverflowError sizing its receive buffer (bytearray(max_message)).
    answer = {"kmux": 1, "ok": True, "group": "g", "client_id": 1, "max_message": max_message,
              "framing": {"kind": "varint"}, "steering": "balance"}
    with pytest.raises(HandshakeInvalid, match="max_message .* is outside 1..67108864"):
        decode_answer(msgpack.packb(answer))


def test_a_client_session_refuses_an_answer_with_a_huge_max_message():
    from kmux._session import ClientSession

    session = ClientSession("g")
    session.hello_packet()
    answer = {"kmux": 1, "ok": True, "group": "g", "client_id": 0, "max_message": 2**64 - 1,
              "framing": {"kind": "varint"}, "steering": "balance", "up": False}
    with pytest.raises(HandshakeInvalid):
        session.receive_answer(msgpack.packb(answer))
    assert session.state.value == "closed"


def test_notice_with_str_and_bin_keys_is_bad_packet():
    # Was a KmuxError whose str() raised TypeError (its details' keys could not be sorted).
    with pytest.raises(BadPacket, match="keys must be strings"):
        decode_notice(b"\x83\xa4code\xa0\xa3\x00\x00\x00\x00\xc4\x00\x00")


@pytest.mark.parametrize("decode", [decode_hello, decode_answer, decode_notice, decode_control])
def test_maps_nested_too_deep_are_refused_with_the_decoders_error(decode):
    # Was RecursionError from str() of the notice's "error" (and of anything else printed).
    with default_recursion_limit(), pytest.raises((HandshakeInvalid, BadPacket), match="deeper than"):
        decode(b"\x81\xa5error" + DEEP)


def test_nesting_limit_is_exact():
    assert decode_notice(nested(NESTING_MAX)).message.startswith("[")
    with pytest.raises(BadPacket, match=f"deeper than {NESTING_MAX} levels"):
        decode_notice(nested(NESTING_MAX + 1))


@pytest.mark.parametrize(("packet", "kind"), [(b"\x80\x00\x00\x00\x04ping", "DATA_MORE"), (b"\x82abc", "REQUEUE_MORE")])
def test_a_continued_piece_sent_first_is_named(packet, kind):
    # 0x80/0x82 are msgpack map headers: the refusal said only "not valid msgpack".
    with pytest.raises(HandshakeInvalid, match=f"if this is a {kind} packet.*the first packet must be the hello"):
        decode_hello(packet)
