"""Records of fragments (``framing = "oncrpc"``) and masked lengths, end to end, against a
scripted server that does what real servers rarely do on cue.

rpcbind itself is in ``tests/realservers/test_oncrpc.py``; here a server of
ours (:class:`~tests.integration.oncrpc.ScriptedServer`) sends:

* replies cut into fragments of sizes the client chose, zero-length ones and
  an empty last fragment included, to calls that are themselves cut into
  fragments: both directions pass through unchanged, marks included, and
  every reply reaches the client whose call it answers (``id`` steering on
  the XID, with rewrite);
* a reply of hundreds of fragments trickled one byte per segment;
* a record announced fragment by fragment past ``max_message``: the daemon
  cannot know its total up front; at the first fragment header that proves
  it too long (having held less than ``max_message`` of it) it starts to
  skip it, walking the remaining marks and dropping their data until the
  last fragment; the call gets ``response_too_big`` with the record's size,
  and the connection carries on. Past ``max_skip`` the connection closes at
  the mark that proves it: the call gets ``connection_lost``, nothing else;
* a record whose fragments keep coming but whose last one never does:
  ``assembly_timeout`` bounds the whole record, not each fragment.

And the framing check is one check: a client's own validation of a masked
length field, and of a record whose first fragment is too short for the id,
refuses exactly what the daemon refuses, with the same text.
"""

from __future__ import annotations

import random
import struct
import time

import pytest

import kmux
from kmux.control import ControlClient
from kmux.framing import PRESETS, Framing

from .helpers import wait_until
from .oncrpc import (
    CALL_HEADER,
    ScriptedServer,
    body_of,
    call,
    fragments_of,
    parse_reply,
    record,
    reply,
)

ONCRPC = PRESETS["oncrpc"]
XID_STEERING = {"request_offset": 4, "response_offset": 4, "size": 4, "rewrite": True}
#: Procedures of the scripted RPC program (its own numbers; no real program is involved).
PROC_LAYOUT, PROC_TRICKLE, PROC_ENDLESS, PROC_NO_LAST, PROC_BIG = 1, 2, 3, 4, 5


def rpc_group(server: ScriptedServer, **kw) -> dict:
    cfg = {"endpoints": [server.address], "connections": 2, "framing": "oncrpc", "steering": "id",
           "id": XID_STEERING, "max_message": 65536, "reconnect_initial": 0.05, "reconnect_max": 0.2,
           "connect_timeout": 2.0, "request_timeout": 10.0}
    cfg.update(kw)
    return cfg


def start(daemon_factory, server: ScriptedServer, **kw):
    """kmuxd with group ``g`` on ``server`` (``rpc_group`` with ``kw``), all its connections up."""
    cfg = rpc_group(server, **kw)
    daemon = daemon_factory({"g": cfg})
    wait_up(daemon, cfg["connections"])
    return daemon


def group_stats(daemon) -> dict:
    with ControlClient(daemon.control_socket, timeout=5.0) as c:
        (g,) = c.request("stats", group="g")["groups"]
    return g


def wait_up(daemon, n: int) -> None:
    wait_until(lambda: group_stats(daemon)["connections_up"] == n, 10.0, f"{n} connections up")


def layout_call(xid: int, tag: int, reply_cuts: list[int]) -> bytes:
    """A call asking for a reply whose result is ``tag`` and 4 bytes per cut, cut at ``reply_cuts``."""
    return call(xid, PROC_LAYOUT, struct.pack(">II", tag, len(reply_cuts)) + b"".join(
        struct.pack(">I", c) for c in reply_cuts), prog=0x20000019, vers=1)


def scripted(message: bytes):
    """The scripted program: what the server does with each call (a record, marks included)."""
    body = body_of(message)
    xid, proc = struct.unpack_from(">I", body)[0], struct.unpack_from(">I", body, 20)[0]
    args = body[CALL_HEADER:]
    if proc == PROC_LAYOUT:
        tag, count = struct.unpack_from(">II", args)
        cuts = list(struct.unpack_from(f">{count}I", args, 8))
        # The result names the tag and how the server received the call (its fragments).
        result = struct.pack(">I", tag) + b"".join(struct.pack(">I", s) for s in fragments_of(message))
        yield record(reply(xid, result), cuts)
    elif proc == PROC_TRICKLE:
        (count,) = struct.unpack_from(">I", args)
        result = bytes(range(256)) * 2
        rec = record(reply(xid, result), [24] + [i % 3 for i in range(count)])  # the first: the reply header
        for i in range(len(rec)):
            yield rec[i : i + 1]
            if i % 64 == 63:
                yield 0.001  # let the segments go out one by one
    elif proc == PROC_ENDLESS:
        # Fragments of 1000 bytes, none the last: the record never ends.
        head = record(reply(xid, b""), [len(reply(xid, b""))])[:-4]  # the reply's start, as a non-last fragment
        yield head
        for _ in range(100):
            yield struct.pack(">I", 1000) + bytes(1000)
            yield 0.01
    elif proc == PROC_BIG:
        # A reply of `count` fragments of 1000 bytes, then a last one of 10: over max_message.
        (count,) = struct.unpack_from(">I", args)
        rep = reply(xid, bytes(1000 * count + 10))
        yield record(rep, [24] + [1000] * count)
    elif proc == PROC_NO_LAST:
        body = reply(xid, b"")
        yield struct.pack(">I", len(body)) + body  # not the last fragment
        for _ in range(40):  # 10 bytes every 0.2 s: each fragment well within the timeout
            yield 0.2
            yield struct.pack(">I", 10) + bytes(10)


def test_fragmented_calls_and_replies_pass_through_unchanged_to_their_callers(daemon_factory):
    with ScriptedServer(ONCRPC, scripted) as server:
        daemon = start(daemon_factory, server)
        rng = random.Random(19)
        clients = [daemon.connect(name=f"rpc{i}") for i in range(4)]
        calls = mismatches = multi = 0
        try:
            for rnd in range(25):
                sent = {}
                for i, c in enumerate(clients):
                    for k in range(3):  # three in flight per client, the same XIDs in every client
                        xid, tag = 100 + k, (rnd << 16) | (i << 8) | k
                        # Zero-length fragments and an empty last one; the first holds the XID.
                        reply_cuts = [rng.choice([0, 0, 1, 3, 17, 100]) for _ in range(rng.randint(0, 4))]
                        if reply_cuts:
                            reply_cuts[0] = rng.choice([4, 24, 100])
                        # The call itself in fragments: the first holds at least the XID.
                        call_rec = record(layout_call(xid, tag, reply_cuts),
                                          rng.choice([[], [CALL_HEADER], [CALL_HEADER, 0], [4, 30]]))
                        c.send(call_rec)
                        sent[(i, xid)] = (tag, reply_cuts, call_rec)
                for i, c in enumerate(clients):
                    for _ in range(3):
                        got = c.recv(timeout=5.0)
                        calls += 1
                        rep = parse_reply(body_of(got))
                        if (i, rep.xid) not in sent:
                            mismatches += 1
                            continue
                        tag, reply_cuts, call_rec = sent.pop((i, rep.xid))
                        got_tag, *call_fragments = struct.unpack(f">{len(rep.result) // 4}I", rep.result)
                        # The reply's marks are the server's, byte for byte: the layout asked for;
                        # the server got the call's marks as the client wrote them.
                        layout = fragments_of(record(bytes(len(body_of(got))), reply_cuts))
                        ok = (got_tag == tag and fragments_of(got) == layout
                              and call_fragments == fragments_of(call_rec))
                        mismatches += not ok
                        multi += len(fragments_of(got)) > 1
            for c in clients:
                with pytest.raises(TimeoutError):
                    c.recv(timeout=0.1)
        finally:
            for c in clients:
                c.close()
        print(f"oncrpc scripted: {len(clients)} clients, {calls} calls, {multi} replies of several fragments, "
              f"{mismatches} mismatches")
        assert calls == 300 and multi > 100
        assert mismatches == 0
        g = group_stats(daemon)
        assert g["unmatched_responses"] == 0 and g["refused"] == 0


def test_a_reply_trickled_one_byte_per_segment_arrives_whole(daemon_factory):
    with ScriptedServer(ONCRPC, scripted) as server:
        daemon = start(daemon_factory, server, connections=1)
        with daemon.connect() as c:
            c.send(record(call(7, PROC_TRICKLE, struct.pack(">I", 300), prog=0x20000019, vers=1)))
            got = c.recv(timeout=15.0)
        assert fragments_of(got)[:301] == [24] + [i % 3 for i in range(300)]
        rep = parse_reply(body_of(got))
        assert rep.xid == 7 and rep.result == bytes(range(256)) * 2
        (conn,) = group_stats(daemon)["connections"]
        assert conn["need_more_hdr"] > 0  # it really came in pieces, headers split


def test_a_record_over_max_message_fragment_by_fragment_is_skipped_and_the_connection_carries_on(daemon_factory):
    max_message = 8192
    with ScriptedServer(ONCRPC, scripted) as server:
        daemon = start(daemon_factory, server, connections=1, max_message=max_message)
        (before,) = group_stats(daemon)["connections"]
        with daemon.connect() as c, daemon.connect() as other:
            seq = c.send(record(call(21, PROC_BIG, struct.pack(">I", 30), prog=0x20000019, vers=1)))
            other.send(record(layout_call(22, 0xAB, [5])))  # in flight behind it, on the same connection
            c.send(record(layout_call(23, 0xAC, [])))
            with pytest.raises(kmux.ResponseTooBig) as info:
                c.recv(timeout=10.0)
            assert parse_reply(body_of(other.recv(timeout=5.0))).xid == 22
            assert parse_reply(body_of(c.recv(timeout=5.0))).xid == 23
        # The reply: 24 bytes + 30 x 1000 + 10 of data, 32 marks (4 bytes each).
        size = 24 + 30 * 1000 + 10 + 32 * 4
        assert (info.value.seq, info.value.details["id"]) == (seq, 21)
        assert (info.value.details["size"], info.value.details["max_message"]) == (size, max_message)
        (conn,) = group_stats(daemon)["connections"]
        # The same connection, never redialled; the record counted once, skipped whole.
        assert (conn["local"], conn["reconnects"], conn["last_error"]) == (before["local"], 0, None)
        assert (conn["msg_too_big"], conn["skipped_msgs"], conn["skipped_bytes"]) == (1, 1, size)
        assert len(server.conns) == 1 and server.conns[0].ended is None


def test_a_record_announced_past_max_skip_fragment_by_fragment_ends_only_its_connection(daemon_factory):
    max_message, max_skip = 8192, 16384
    with ScriptedServer(ONCRPC, scripted) as server:
        daemon = start(daemon_factory, server, connections=1, max_message=max_message, max_skip=max_skip)
        with daemon.connect() as c:
            seq = c.send(record(call(9, PROC_ENDLESS, prog=0x20000019, vers=1)))
            with pytest.raises(kmux.ConnectionLost) as info:
                c.recv(timeout=10.0)
            assert info.value.seq == seq
            # The daemon closed at the header that proved the record too long, before
            # the server had sent much more: it read less than max_message of the record.
            first = server.conns[0]
            wait_until(lambda: first.ended is not None, 5.0, "the server to see the connection end")
            # The group reconnects, and the next call is answered.
            wait_up(daemon, 1)
            c.send(record(layout_call(10, 0xBEEF, [5])))
            assert parse_reply(body_of(c.recv(timeout=5.0))).xid == 10
        # A 28-byte first fragment, then fragments of 1004 bytes: the 9th mark (9064 bytes
        # announced) proves it over max_message, and the daemon skips it, holding 28 bytes;
        # after 16 of them room remains for a bare mark (16092 + 4 <= 16384); the 17th mark
        # announces 17096 bytes with more to follow, and the daemon closes there.
        (conn,) = group_stats(daemon)["connections"]
        assert ("record is over max_skip (16384): its fragments so far announce 17096 bytes and another fragment "
                "follows: more likely a stream out of step" in conn["last_error"]), conn
        assert conn["skipped_msgs"] == 0


def test_a_record_whose_last_fragment_never_comes_is_bounded_by_the_assembly_timeout(daemon_factory):
    timeout = 1.0
    with ScriptedServer(ONCRPC, scripted) as server:
        daemon = start(daemon_factory, server, connections=1, assembly_timeout=timeout)
        with daemon.connect() as c:
            started = time.monotonic()
            seq = c.send(record(call(11, PROC_NO_LAST, prog=0x20000019, vers=1)))
            with pytest.raises(kmux.ConnectionLost) as info:
                c.recv(timeout=10.0)
            took = time.monotonic() - started
        assert info.value.seq == seq
        # A fragment came every 0.2 s; the record as a whole had 1 s.
        assert timeout <= took < timeout + 2.0, took
        (conn,) = group_stats(daemon)["connections"]
        assert conn["msg_timeouts"] == 1


def echo(message: bytes):
    yield message


def test_a_masked_length_is_checked_alike_by_the_client_and_the_daemon(daemon_factory):
    # A type byte above a 24-bit length of the rest: the kind of header a mask is for.
    framing = {"length_size": 4, "length_mask": 0x00FFFFFF, "length_adjust": 4}
    local = Framing.from_spec(framing)
    with ScriptedServer(local, echo) as server:
        daemon = daemon_factory({"g": {"endpoints": [server.address], "connections": 1, "framing": framing,
                                       "max_message": 4096}})
        wait_up(daemon, 1)
        good = b"\x5a\x00\x00\x03abc"
        bad = b"\x5a\x00\x00\x04abc"
        with daemon.connect() as c:
            assert c.send(good) == 1
            assert c.recv(timeout=5.0) == good
            with pytest.raises(kmux.BadFrame) as mine:
                c.send(bad)
            assert c.seq == 1  # refused before it was sent
        with daemon.connect(validate=False) as c:
            seq = c.send(bad)
            with pytest.raises(kmux.BadFrame) as theirs:
                c.recv(timeout=5.0)
            assert theirs.value.seq == seq
        assert mine.value.message == theirs.value.message == (
            "custom header length 4 (field 0x5a000004, length_mask 0xffffff) (+4 header bytes = 8 bytes), "
            "but the message has 7 bytes")
        assert server.messages() == [good]


def test_a_call_whose_xid_would_straddle_a_fragment_mark_is_refused_not_rewritten(daemon_factory):
    with ScriptedServer(ONCRPC, scripted) as server:
        daemon = start(daemon_factory, server, connections=1)
        straddling = record(layout_call(5, 1, []), [2])  # the XID's first 2 bytes, then a mark
        with daemon.connect() as c:
            with pytest.raises(kmux.BadFrame, match="needs its first 8 bytes in the first fragment"):
                c.send(straddling)
        with daemon.connect(validate=False) as c:
            seq = c.send(straddling)
            with pytest.raises(kmux.BadFrame, match="needs its first 8 bytes") as info:
                c.recv(timeout=5.0)
            assert info.value.seq == seq
            # The shared stream was never touched: the next call goes through.
            c.send(record(layout_call(6, 0xAB, [])))
            assert parse_reply(body_of(c.recv(timeout=5.0))).xid == 6
            # A reply like it cannot be steered (its XID is cut by a mark): its connection
            # ends as on any bad header, and the call gets connection_lost.
            seq = c.send(record(layout_call(7, 0xAC, [2, 5])))
            with pytest.raises(kmux.ConnectionLost, match="needs its first 8 bytes") as lost:
                c.recv(timeout=5.0)
            assert lost.value.seq == seq
        assert len(server.messages()) == 2
        (conn,) = group_stats(daemon)["connections"]
        assert "needs its first 8 bytes" in conn["last_error"], conn
