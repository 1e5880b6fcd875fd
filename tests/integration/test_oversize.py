"""A response over ``max_message`` is skipped, not fatal, against a scripted server.

The server (:class:`~tests.integration.oncrpc.ScriptedServer`, ``u32be``
framing) answers each request as the request says: a reply of a chosen
size, after a pause, trickled byte by byte, cut short and stalled, cut
short and closed, or announcing a length past ``max_skip``. The group has
one connection, so every request in a test shares it; each test checks
what the asker got (``response_too_big`` naming its ``seq``, or the
connection's fate), what the others got, and whether the connection is
still the same one (its local port, no reconnect, no endpoint failure).

What the real memcached does with a 200 KB value is in
``tests/realservers/test_memcached.py``; records (``oncrpc``) in
``test_records.py``.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

import kmux
from kmux.framing import PRESETS

from .helpers import conn_of, group_of, local_port, stats, wait_until
from .oncrpc import CLOSE, ScriptedServer

U32BE = PRESETS["u32be"]
#: A request: u32be length, a 4-byte id (echoed at the same offset in the reply), an op and two numbers.
REQUEST = struct.Struct(">IIBII")
OP_REPLY, OP_TRICKLE, OP_STALL, OP_CLOSE, OP_ANNOUNCE = range(5)
MAX_MESSAGE = 4096
ID_STEERING = {"request_offset": 4, "response_offset": 4, "size": 4, "rewrite": True}


def request(op: int, size: int, arg: int = 0, rid: int = 0) -> bytes:
    """Ask for a reply of ``size`` bytes in all (``arg``: ms to wait first, or bytes to send before a stall or close)."""
    return REQUEST.pack(REQUEST.size - 4, rid, op, size, arg)


def reply(rid: int, size: int) -> bytes:
    """``size`` bytes in all: the length, the request's id, then a pattern that names the size."""
    body = struct.pack(">I", rid) + struct.pack(">I", size) * ((size - 8) // 4) + b"z" * ((size - 8) % 4)
    return struct.pack(">I", size - 4) + body


def respond(message: bytes):
    _, rid, op, size, arg = REQUEST.unpack(message)
    whole = reply(rid, size)
    if op == OP_REPLY:
        if arg:
            yield arg / 1000
        yield whole
    elif op == OP_TRICKLE:
        for i in range(len(whole)):
            yield whole[i : i + 1]
            if i < 6:
                yield 0.02  # the header byte by byte: the daemon reads it in pieces
            elif i % 64 == 63:
                yield 0.001  # let the segments go out one by one
    elif op == OP_STALL:
        yield whole[:arg]
        yield 5.0  # past the group's assembly_timeout
    elif op == OP_CLOSE:
        yield whole[:arg]
        yield 0.05
        yield CLOSE
    elif op == OP_ANNOUNCE:
        yield struct.pack(">II", size - 4, rid) + bytes(1000)


def start(daemon_factory, server: ScriptedServer, steering: str, **kw):
    cfg = {"endpoints": [server.address], "connections": 1, "framing": "u32be", "steering": steering,
           "max_message": MAX_MESSAGE, "reconnect_initial": 0.05, "reconnect_max": 0.2}
    if steering == "id":
        cfg["id"] = ID_STEERING
    if steering != "balance":
        cfg["request_timeout"] = 10.0
    cfg.update(kw)
    daemon = daemon_factory({"g": cfg})
    wait_until(lambda: group_of(stats(daemon), "g")["connections_up"] == 1, 10.0, "the connection up")
    return daemon


def conn0(daemon) -> dict:
    return conn_of(stats(daemon), "g", 0)


def size_of(message: bytes) -> int:
    """The size a reply names in its pattern (checked against its length)."""
    assert struct.unpack_from(">I", message)[0] + 4 == len(message)
    (named,) = struct.unpack_from(">I", message, 8)
    assert named == len(message), (named, len(message))
    return named


def assert_same_connection(daemon, port: int) -> None:
    """Still the connection the test started with: no reconnect, no failure counted."""
    answer = stats(daemon)
    c = conn_of(answer, "g", 0)
    assert (local_port(c), c["reconnects"], c["last_error"]) == (port, 0, None), c
    (health,) = group_of(answer, "g")["endpoint_health"]
    assert (health["state"], health["failures"], health["reason"]) == ("healthy", 0, None), health
    assert not daemon.logs("connection_failed") and not daemon.logs("connection_closed")


@pytest.mark.parametrize("steering", ["fifo", "id"])
def test_a_response_just_over_the_limit_is_skipped_and_the_others_on_its_connection_answered(
        daemon_factory, steering):
    with ScriptedServer(U32BE, respond) as server:
        daemon = start(daemon_factory, server, steering)
        port = local_port(conn0(daemon))
        clients = [daemon.connect(name=f"c{i}") for i in range(3)]
        try:
            a, b, c = clients
            # All three in flight together: the first reply waits 300 ms, the server answers in order.
            a.send(request(OP_REPLY, 100, 300, rid=7))
            b.send(request(OP_REPLY, MAX_MESSAGE, rid=7))  # exactly the limit: delivered
            seq = b.send(request(OP_REPLY, MAX_MESSAGE + 1, rid=7))  # one byte over: skipped
            c.send(request(OP_REPLY, 200, rid=7))
            b.send(request(OP_REPLY, 300, rid=7))
            assert size_of(a.recv(timeout=5.0)) == 100
            assert size_of(b.recv(timeout=5.0)) == MAX_MESSAGE
            with pytest.raises(kmux.ResponseTooBig) as info:
                b.recv(timeout=5.0)
            assert size_of(b.recv(timeout=5.0)) == 300  # the connection carried on, in order
            assert size_of(c.recv(timeout=5.0)) == 200
        finally:
            for cl in clients:
                cl.close()
        assert_same_connection(daemon, port)
        answer = stats(daemon)
    err = info.value
    assert (err.seq, err.details["size"], err.details["max_message"]) == (seq, MAX_MESSAGE + 1, MAX_MESSAGE)
    assert err.code == "response_too_big" and isinstance(err, kmux.RemoteError)
    if steering == "id":
        assert err.details["id"] == 7  # the client's own id, not the rewritten one
    g, c0 = group_of(answer, "g"), conn_of(answer, "g", 0)
    assert (g["skipped_msgs"], g["skipped_bytes"], c0["skipped_msgs"], c0["skipped_bytes"]) == (
        1, MAX_MESSAGE + 1, 1, MAX_MESSAGE + 1)
    assert (g["rx_msgs"], g["requests_in_flight"], g["unmatched_responses"], g["requests_failed"]) == (4, 0, 0, 0)
    (line,) = daemon.logs("response_skipped")
    assert (line["bytes"], line["seq"], line["max_message"], line["conn"]) == (MAX_MESSAGE + 1, seq, MAX_MESSAGE, 0)


def test_a_response_trickled_byte_by_byte_is_skipped_as_it_comes(daemon_factory):
    with ScriptedServer(U32BE, respond) as server:
        daemon = start(daemon_factory, server, "fifo")
        port = local_port(conn0(daemon))
        with daemon.connect() as c:
            seq = c.send(request(OP_TRICKLE, 3 * MAX_MESSAGE))
            c.send(request(OP_TRICKLE, 500))
            with pytest.raises(kmux.ResponseTooBig) as info:
                c.recv(timeout=20.0)
            assert size_of(c.recv(timeout=20.0)) == 500
        assert (info.value.seq, info.value.details["size"]) == (seq, 3 * MAX_MESSAGE)
        c0 = conn0(daemon)
        assert c0["need_more_hdr"] > 0 and c0["skipped_msgs"] == 1  # it really came in pieces
        assert_same_connection(daemon, port)


def vm_hwm_kib(pid: int) -> int:
    """The process' peak resident set (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_60_MB_response_costs_no_memory_beyond_the_read_buffer(daemon_factory):
    size = 60 * 1024 * 1024
    with ScriptedServer(U32BE, respond) as server:
        daemon = start(daemon_factory, server, "fifo")
        port = local_port(conn0(daemon))
        with daemon.connect() as c:
            c.send(request(OP_REPLY, 100))
            assert size_of(c.recv(timeout=5.0)) == 100
            before = vm_hwm_kib(daemon.pid)
            seq = c.send(request(OP_REPLY, size))
            c.send(request(OP_REPLY, 100))
            with pytest.raises(kmux.ResponseTooBig) as info:
                c.recv(timeout=30.0)
            assert size_of(c.recv(timeout=5.0)) == 100
            grown = vm_hwm_kib(daemon.pid) - before
        assert (info.value.seq, info.value.details["size"]) == (seq, size)
        print(f"a {size}-byte response skipped: the daemon's peak RSS grew {grown} KiB")
        # Held: the read buffer (64 KiB) and a stub; the rest went by. A buffered copy would be 60 MiB.
        assert grown < 8 * 1024
        assert conn0(daemon)["skipped_bytes"] == size
        assert_same_connection(daemon, port)


def test_a_length_past_max_skip_closes_the_connection_with_a_clear_reason(daemon_factory):
    with ScriptedServer(U32BE, respond) as server:
        daemon = start(daemon_factory, server, "fifo", max_skip=65536)
        with daemon.connect() as c:
            seq = c.send(request(OP_ANNOUNCE, 65537))
            with pytest.raises(kmux.ConnectionLost) as info:
                c.recv(timeout=10.0)
            assert info.value.seq == seq
            # The group redials; the next request is answered on the new connection.
            wait_until(lambda: conn0(daemon)["state"] == "ready" and conn0(daemon)["reconnects"] == 1, 10.0,
                       "the connection replaced")
            c.send(request(OP_REPLY, 64))
            assert size_of(c.recv(timeout=5.0)) == 64
        why = "remote announced a 65537-byte message, over max_skip (65536): more likely a stream out of step"
        assert why in info.value.message
        (failed,) = daemon.wait_log("connection_failed")
        assert failed["error_code"] == "remote_frame_too_big" and why in failed["error"]
        g = group_of(stats(daemon), "g")
        assert g["skipped_msgs"] == 0
        (health,) = g["endpoint_health"]
        # The verdict and the last failure apart: a failure in the past, with its age.
        assert health["reason"].startswith("bad framing: " + why) and health["reason_age"] >= 0


def test_a_response_that_stalls_while_skipped_is_bounded_by_the_assembly_timeout(daemon_factory):
    timeout = 0.5
    with ScriptedServer(U32BE, respond) as server:
        daemon = start(daemon_factory, server, "fifo", assembly_timeout=timeout)
        with daemon.connect() as c:
            started = time.monotonic()
            seq = c.send(request(OP_STALL, 50_000, 20_000))
            with pytest.raises(kmux.ConnectionLost) as info:
                c.recv(timeout=10.0)
            took = time.monotonic() - started
        assert info.value.seq == seq
        assert timeout <= took < timeout + 2.0, took
        assert "a message over max_message (4096), 50000 bytes announced and being skipped," in info.value.message
        (failed,) = daemon.wait_log("connection_failed")
        assert failed["error_code"] == "remote_assembly_timeout"
        wait_until(lambda: conn0(daemon)["reconnects"] == 1, 10.0, "the connection replaced")
        c0 = conn0(daemon)
        assert (c0["msg_timeouts"], c0["skipped_msgs"]) == (1, 0)


@pytest.mark.parametrize("retries", [0, 1])
def test_a_connection_closed_while_a_response_is_skipped_settles_its_request_as_any_close(
        daemon_factory, retries):
    with ScriptedServer(U32BE, respond) as server:
        daemon = start(daemon_factory, server, "id", retry_unanswered=retries)
        with daemon.connect() as c:
            seq = c.send(request(OP_CLOSE, 50_000, 20_000, rid=3))
            with pytest.raises(kmux.ConnectionLost) as info:
                c.recv(timeout=10.0)
            assert info.value.seq == seq and info.value.details["id"] == 3
            wait_until(lambda: conn0(daemon)["state"] == "ready", 10.0, "a connection up again")
            c.send(request(OP_REPLY, 64, rid=4))
            assert size_of(c.recv(timeout=5.0)) == 64
        # Written once, then again on the next connection when retries are on (and cut short again).
        assert len([m for m in server.messages() if REQUEST.unpack(m)[2] == OP_CLOSE]) == 1 + retries
        g = group_of(stats(daemon), "g")
        assert (g["requests_failed"], g["requests_retried"], g["skipped_msgs"]) == (1, retries, 0)


def test_balance_skips_counts_and_logs_a_message_over_the_limit(daemon_factory):
    with ScriptedServer(U32BE, respond) as server:
        daemon = start(daemon_factory, server, "balance")
        port = local_port(conn0(daemon))
        with daemon.connect() as c:
            for size in (100, 2 * MAX_MESSAGE, 200, MAX_MESSAGE + 1, 300):
                c.send(request(OP_REPLY, size))
            assert [size_of(c.recv(timeout=5.0)) for _ in range(3)] == [100, 200, 300]
            with pytest.raises(TimeoutError):
                c.recv(timeout=0.2)
        answer = stats(daemon)
        g, c0 = group_of(answer, "g"), conn_of(answer, "g", 0)
        assert (g["skipped_msgs"], g["skipped_bytes"], g["rx_msgs"]) == (2, 3 * MAX_MESSAGE + 1, 3)
        assert (c0["skipped_msgs"], c0["rx_msgs"]) == (2, 5)
        lines = daemon.logs("response_skipped")
        # Rate-limited: the first is logged, the second counted (said by the next line logged).
        assert [(line["bytes"], line["seq"], line["steering"]) for line in lines] == [(2 * MAX_MESSAGE, None, "balance")]
        assert_same_connection(daemon, port)
