"""Fuzz target: ``kmuxd.io.control.parse_request``, the control socket's request decoder.

Invariants: every valid request of ``docs/protocol.md`` ("Control socket,
version 1": the op, its required and optional arguments, values of the
documented types) parses to the same op and arguments; any other bytes
raise ``BadRequest`` and nothing else, with a printable message. The
requests are written here from the docs, not read from the daemon's
``REQUESTS`` table, so the table is checked against the docs too.
"""

from __future__ import annotations

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from kmux.errors import BadRequest
from kmuxd.io.control import (
    DRAIN_TIMEOUT_DEFAULT,
    DRAIN_TIMEOUT_MAX,
    REQUEST_MAX,
    REQUESTS,
    ControlRequest,
    parse_request,
)

from .checks import REFUSED, decode_or_refuse
from .profiles import fuzz_settings
from .strategies import hostile_msgpack, odd_values, shaped_maps

_NAME = st.text(max_size=40)
_INDEX = st.integers(-(2**63), 2**64 - 1)
_SECONDS = st.one_of(st.integers(1, int(DRAIN_TIMEOUT_MAX)), st.floats(0, DRAIN_TIMEOUT_MAX, exclude_min=True))
#: docs/protocol.md, "Control socket, version 1": op -> (required, optional) arguments and their values.
DOCUMENTED: dict[str, tuple[dict[str, st.SearchStrategy], dict[str, st.SearchStrategy]]] = {
    "ping": ({}, {}),
    "stats": ({}, {"group": _NAME}),
    "reconnect": ({"group": _NAME}, {"conn": _INDEX}),
    "drain": ({"group": _NAME, "conn": _INDEX}, {"timeout": _SECONDS}),
    "reload": ({}, {}),
    "attach": ({"group": _NAME}, {}),  # its descriptor rides in SCM_RIGHTS, not in the map
    "unattach": ({"group": _NAME, "conn": _INDEX}, {}),
}
_OPS = sorted(DOCUMENTED)
_ARG_NAMES = sorted({name for required, optional in DOCUMENTED.values() for name in (*required, *optional)})


@st.composite
def valid_requests(draw) -> dict:
    op = draw(st.sampled_from(_OPS))
    required, optional = DOCUMENTED[op]
    args = {name: draw(values) for name, values in required.items()}
    for name, values in optional.items():
        if draw(st.booleans()):
            args[name] = draw(values)
    return {"op": op, **args}


_shaped = shaped_maps(["op", *_ARG_NAMES], st.one_of(st.sampled_from(_OPS), odd_values))
_oversized = st.integers(REQUEST_MAX - 8, REQUEST_MAX + 8).map(lambda n: msgpack.packb({"op": "ping", "x": "p" * n}))


@fuzz_settings
@given(request=valid_requests())
def test_valid_requests_parse_to_themselves(request):
    parsed = parse_request(msgpack.packb(request))
    op = request.pop("op")
    if op == "drain":
        request["timeout"] = float(request.get("timeout", DRAIN_TIMEOUT_DEFAULT))
    assert parsed == ControlRequest(op, request)


@fuzz_settings
@given(packet=st.one_of(hostile_msgpack(valid_requests().map(msgpack.packb)), _shaped, _oversized))
def test_parse_request_on_hostile_bytes(packet):
    request = decode_or_refuse(parse_request, packet, (BadRequest,))
    if request is REFUSED:
        return
    assert len(packet) <= REQUEST_MAX
    required, optional = DOCUMENTED[request.op]
    assert set(required) <= set(request.args) <= set(required) | set(optional)


def test_the_daemon_knows_exactly_the_documented_ops():
    assert set(REQUESTS) == set(DOCUMENTED)
