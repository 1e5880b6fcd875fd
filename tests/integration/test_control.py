"""The control socket's statistics, end to end: known traffic in, exact counters out.

Everything goes through the real control socket with
:class:`kmux.control.ControlClient` (the CLI's transport): a real kmuxd
subprocess, real TCP backends on loopback, real SEQPACKET clients (some in
this process, one in a subprocess, so the peer credentials are checked
against two different processes).

Connection records are matched with the backend's connections by port: a
record's ``local`` is ``127.0.0.1:PORT``, and PORT is the backend's peer port.
"""

from __future__ import annotations

import os
import random
import socket
from collections import Counter

import pytest

import kmux.errors
from kmux.control import ControlClient

from .helpers import (
    conn_of,
    group_of,
    local_port,
    stats,
    MIN_FRAME,
    Receiver,
    SenderThreads,
    SubprocessSender,
    check_order_per_connection,
    group_config,
    make_frame,
    parse_frame,
    summarize_frame,
    u32be,
    wait_flat,
    wait_until,
)

MAX = 65536


# -- helpers -----------------------------------------------------------------------


def clients_by_name(answer: dict) -> dict[str, dict]:
    return {c["name"]: c for c in answer["clients"]}


def comm_of(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


@pytest.fixture
def close_all():
    things = []
    try:
        yield things.append
    finally:
        for t in reversed(things):
            t.close()


# -- 1. exact counters after known traffic ------------------------------------------------


def test_counters_are_exact_after_known_traffic(backend_factory, daemon_factory, close_all):
    """3 senders (2 here, 1 in a subprocess) x 120 frames of known sizes through 3 connections
    to an echo server, echoes steered to 2 receivers: every counter is known exactly."""
    per_client = 120
    backend = backend_factory(echo=True, summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=3, max_message=MAX)})
    backend.wait_open(3)
    receivers = [Receiver(daemon.connect(name=f"rx{i}"), name=f"rx{i}") for i in range(2)]
    for r in receivers:
        close_all(r)

    plans = {}
    for cid in (1, 2, 3):
        rng = random.Random(cid * 7919)
        sizes = [rng.randint(MIN_FRAME, 3000) for _ in range(per_client)]
        sizes[rng.randrange(per_client)] = MAX  # one max_message frame each
        sizes[rng.randrange(per_client)] = MIN_FRAME
        plans[cid] = sizes
    sub = SubprocessSender(daemon, 3, plans[3])
    close_all(sub)
    senders = [daemon.connect(receive=False, name=f"tx{cid}") for cid in (1, 2)]
    for s in senders:
        close_all(s)
    for cid, s in zip((1, 2), senders):
        rng = random.Random(cid)  # picks the bodies; the sizes are planned
        for seq, size in enumerate(plans[cid], 1):
            s.send(make_frame(cid, seq, size, rng))
    sub.wait_sent()

    total = 3 * per_client
    total_bytes = sum(sum(p) for p in plans.values())
    backend.wait_count(total, timeout=20)
    wait_until(lambda: sum(r.count() for r in receivers) >= total, 20, "every echo at a receiver")
    assert wait_flat(backend.count, quiet=0.2, timeout=10, what="frames at the backend") == total
    assert wait_flat(lambda: sum(r.count() for r in receivers), quiet=0.2, timeout=10) == total

    answer = stats(daemon)
    g = group_of(answer, "echo")
    assert (g["tx_msgs"], g["tx_bytes"], g["rx_msgs"], g["rx_bytes"]) == (total, total_bytes, total, total_bytes)
    assert (g["queued_msgs"], g["queued_bytes"], g["tx_retries"], g["refused"]) == (0, 0, 0, 0)
    assert (g["connections_up"], g["connections_total"], g["clients"], g["receivers_ready"]) == (3, 3, 5, 2)
    assert (g["clients_joined"], g["clients_left"], g["waiting_clients"]) == (5, 0, 0)

    # Per connection: the daemon's counts are the backend's counts on that TCP connection.
    by_port = backend.open_by_port()
    conns = g["connections"]
    assert [c["index"] for c in conns] == [0, 1, 2]
    records = backend.records()
    for c in conns:
        assert c["state"] == "ready" and c["endpoint"] == backend.address and c["remote"] == backend.address
        bconn = by_port[local_port(c)]
        frames = [rec for conn, rec in records if conn == bconn]
        nbytes = sum(rec[2] for rec in frames)
        # Every frame was echoed back on the same connection.
        assert (c["tx_msgs"], c["tx_bytes"], c["rx_msgs"], c["rx_bytes"]) == (len(frames), nbytes, len(frames), nbytes)
        assert (c["queued_msgs"], c["queued_bytes"], c["tx_aborts"], c["reconnects"], c["dial_failures"]) == (
            0, 0, 0, 0, 0,
        )
        assert (c["need_more_hdr"], c["msg_too_big"], c["msg_timeouts"], c["bad_hdr_len"]) == (0, 0, 0, 0)
        assert c["last_error"] is None
    assert len(by_port) == 3 and len(backend.conns()) == 3  # no connection was ever replaced
    assert sum(c["tx_msgs"] for c in conns) == g["tx_msgs"]
    assert sum(c["tx_bytes"] for c in conns) == g["tx_bytes"]
    assert sum(c["rx_msgs"] for c in conns) == g["rx_msgs"]
    assert sum(c["rx_bytes"] for c in conns) == g["rx_bytes"]
    assert sum(c["reserved"] for c in conns) >= 3  # every sender pinned itself at least once

    # Per client: what each one sent or received, exactly, and who it is.
    clients = clients_by_name(answer)
    assert sorted(clients) == ["rx0", "rx1", "subproc", "tx1", "tx2"]
    me, my_comm = os.getpid(), comm_of(os.getpid())
    for name, cid in (("tx1", 1), ("tx2", 2), ("subproc", 3)):
        c = clients[name]
        assert (c["tx_msgs"], c["tx_bytes"], c["rx_msgs"], c["rx_bytes"]) == (per_client, sum(plans[cid]), 0, 0), name
        assert (c["queued_msgs"], c["queued_bytes"], c["receiving"], c["state"]) == (0, 0, False, "not_receiving")
    for r in receivers:
        c = clients[r.name]
        got = r.messages()
        assert (c["tx_msgs"], c["tx_bytes"], c["rx_msgs"], c["rx_bytes"]) == (0, 0, len(got), sum(map(len, got)))
        assert (c["queued_msgs"], c["receiving"], c["state"]) == (0, True, "receiving")
    for name in ("tx1", "tx2", "rx0", "rx1"):
        assert (clients[name]["pid"], clients[name]["uid"], clients[name]["comm"]) == (me, os.getuid(), my_comm)
    assert clients["subproc"]["pid"] == sub.proc.pid != me
    assert clients["subproc"]["comm"] == comm_of(sub.proc.pid)
    assert clients["subproc"]["uid"] == os.getuid()
    assert len({c["id"] for c in answer["clients"]}) == 5
    assert all(c["group"] == "echo" and c["refused"] == 0 and c["notices_pending"] == 0 for c in answer["clients"])

    # The echoes themselves: every frame once, whole.
    echoed = Counter(parse_frame(m) for r in receivers for m in r.messages())
    assert echoed == Counter({(cid, s): 1 for cid in (1, 2, 3) for s in range(1, per_client + 1)})
    check_order_per_connection(records)

    # The daemon record agrees.
    d = answer["daemon"]
    assert (d["pid"], d["clients"], d["groups"], d["reloads"], d["reload_failures"]) == (
        daemon.proc.pid, 5, 1, 0, 0,
    )
    assert d["control_socket"] == daemon.control_socket and d["socket"] == daemon.socket_path
    assert d["config"] == str(daemon.config_path) and d["last_reload_error"] is None


# -- 2. retries after a forced connection failure ---------------------------------------


def test_retries_after_a_reset_are_counted_exactly(backend_factory, daemon_factory, close_all):
    """A connection is reset while its outbox holds messages; every counter that moves is known.

    Set-up: the server never reads (paused from the start) and every frame is
    SIZE bytes. Each connection then holds, at the moment of the reset:

    * bytes the kernel took (``tx_bytes``): ``tx_bytes // SIZE`` whole messages,
      counted as written (KCM semantics), and lost with the reset (the server
      had read nothing, and a reset discards both kernels' queues), plus a
      part-written one if ``tx_bytes % SIZE`` (then ``tx_aborts`` moves by 1);
    * messages in its outbox not wholly written: these are re-sent from byte 0
      (``tx_retries``). The slot redials at once, and its new TCP connection
      adopts the orphaned outbox, so the re-sent messages are exactly the
      frames on the new connection that were accepted before the reset (the
      senders keep going: frames accepted after it come on top).

    The other connection is untouched: it never reconnects or aborts.
    """
    size = 4096
    backend = backend_factory(summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory(
        {"echo": group_config(backend, connections=2, max_message=8192, write_buffer=16384)}
    )
    original = set(backend.wait_open(2))
    backend.pause()
    senders = SenderThreads(daemon, 2, size=lambda rng: size)
    close_all(senders)

    def snapshot():
        a = stats(daemon)
        return a, tuple((c["tx_bytes"], c["queued_bytes"]) for c in group_of(a, "echo")["connections"])

    # Wait until both connections are stuck with a non-empty outbox and nothing moves.
    wait_until(
        lambda: all(c["state"] == "busy" and c["queued_msgs"] > 0 for c in group_of(stats(daemon), "echo")["connections"]),
        20,
        "both connections busy with queued messages",
    )
    wait_flat(lambda: snapshot()[1], quiet=0.3, timeout=20, what="the stuck connections")
    before, _ = snapshot()
    x0, y0 = conn_of(before, "echo", 0), conn_of(before, "echo", 1)
    assert x0["state"] == y0["state"] == "busy"
    accepted_before = {c["name"]: c["tx_msgs"] + c["queued_msgs"] for c in before["clients"]}
    lost = x0["tx_bytes"] // size
    cut = 1 if x0["tx_bytes"] % size else 0
    # Every message accepted onto conn 0 that was not wholly written there.
    expect_retries = x0["tx_msgs"] + x0["queued_msgs"] - lost
    assert expect_retries >= 1
    assert backend.count() == 0

    victim = backend.open_by_port()[local_port(x0)]
    survivor = backend.open_by_port()[local_port(y0)]
    backend.kill([victim], rst=True)
    (failed,) = daemon.wait_log("connection_failed", timeout=10)
    assert failed["conn"] == 0 and failed["resend_msgs"] == expect_retries, failed
    (new,) = wait_until(lambda: set(backend.open_ids()) - original, 10, "the slot's new connection")
    # The new connection adopted the orphan before the server reads anything.
    wait_until(lambda: conn_of(stats(daemon), "echo", 0)["reconnects"] == 1, 10, "the reconnect")
    backend.resume()
    wait_until(lambda: backend.conn(new).frames >= expect_retries, 20, "the re-sent messages")
    senders.stop()
    senders.join(20)
    expected = senders.expected()
    wait_until(
        lambda: stats(daemon)["groups"][0]["queued_msgs"] == 0 and backend.count() >= len(expected) - lost,
        20, "everything written",
    )
    wait_flat(backend.count, quiet=0.2, timeout=10, what="frames at the backend")

    after = stats(daemon)
    g = group_of(after, "echo")
    x, y = conn_of(after, "echo", 0), conn_of(after, "echo", 1)
    records = backend.records()
    assert all(rec[0] != "bad" for _, rec in records), [r for r in records if r[1][0] == "bad"][:3]
    got = Counter((rec[0], rec[1]) for _, rec in records)
    assert max(got.values()) == 1, "a message arrived twice"
    assert backend.conn(victim).frames == 0
    # The re-sent messages: accepted before the reset, arrived on the new connection.
    id_of = dict(zip(senders.ids, senders.names))
    resent = [rec for rec in (r for c, r in records if c == new) if rec[1] <= accepted_before[id_of[rec[0]]]]
    assert g["tx_retries"] == len(resent) == expect_retries
    assert (x["reconnects"], x["tx_aborts"]) == (1, cut)
    assert (y["reconnects"], y["tx_aborts"], y["local"]) == (0, 0, y0["local"])
    assert x["local"] != x0["local"] and backend.open_by_port()[local_port(x)] == new
    # Exactly the messages the kernel had taken on the reset connection are missing.
    missing = expected - set(got)
    assert set(got) <= expected
    assert len(missing) == lost
    assert all(seq <= accepted_before[id_of[cid]] for cid, seq in missing)
    # Slot 0 counts the lost ones (written on its first connection) and everything on its second.
    assert x["tx_msgs"] == lost + backend.conn(new).frames
    assert y["tx_msgs"] == backend.conn(survivor).frames
    assert g["tx_msgs"] == len(expected) == len(records) + lost
    # Bytes: every message once, plus the part of the cut one that went before the reset.
    assert g["tx_bytes"] == size * len(expected) + x0["tx_bytes"] % size
    assert (g["queued_msgs"], g["queued_bytes"]) == (0, 0)
    clients = clients_by_name(after)
    for name, n in zip(senders.names, senders.sent):
        # Each message counts once for its client, the re-sent and the lost ones included.
        assert (clients[name]["tx_msgs"], clients[name]["tx_bytes"], clients[name]["queued_msgs"]) == (n, size * n, 0)
    check_order_per_connection(records)
    assert x["last_error"].startswith(("ECONNRESET", "EPIPE")), x["last_error"]
    assert y["last_error"] is None


# -- 3. parser error counters after a hostile server -------------------------------------


def _free_refusing_port():
    """A bound, never-listening TCP socket: connecting to its port is refused."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    return s


def test_parser_error_counters_per_slot_survive_reconnects(backend_factory, daemon_factory, close_all):
    """One hostile server per group, one counter each; each slot reconnects once and keeps its count."""
    big = backend_factory(max_frame=MAX)
    stall = backend_factory(max_frame=MAX)
    badhdr = backend_factory(max_frame=MAX)
    split = backend_factory(max_frame=MAX)
    daemon = daemon_factory(
        {
            "big": group_config(big, connections=1, max_message=1024, max_skip=2048),
            "stall": group_config(stall, connections=1, assembly_timeout=0.3),
            # The length field counts the whole message, header included: a length under 4 is impossible.
            "badhdr": group_config(badhdr, connections=1, framing={"length_offset": 0, "length_size": 4, "length_adjust": 0}),
            "split": group_config(split, connections=1),
        }
    )
    (b1,) = big.wait_open(1)
    (b2,) = stall.wait_open(1)
    (b3,) = badhdr.wait_open(1)
    (b4,) = split.wait_open(1)
    rx = Receiver(daemon.connect(group="split", name="rx"))
    close_all(rx)

    big.send(b1, (2045).to_bytes(4, "big") + b"x" * 10)  # announces 2049 bytes > max_skip 2048
    stall.send(b2, u32be(b"p" * 100)[:14])  # 14 of 104 bytes, then nothing
    badhdr.send(b3, (2).to_bytes(4, "big") + b"zz")  # a 2-byte message cannot hold its 4-byte header
    frame = make_frame(9, 1, 300)
    split.send(b4, frame[:2])  # a read that ends inside the header ...
    wait_until(lambda: conn_of(stats(daemon), "split", 0)["need_more_hdr"] == 1, 5, "need_more_hdr")
    split.send(b4, frame[2:])  # ... completed later
    wait_until(lambda: rx.count() == 1, 5, "the split message")
    assert rx.messages() == [frame]

    for b in (big, stall, badhdr):
        wait_until(lambda b=b: len(b.conns()) == 2 and len(b.open_ids()) == 1, 10, "the hostile connection replaced")
    wait_until(
        lambda: all(conn_of(stats(daemon), n, 0)["state"] == "ready" for n in ("big", "stall", "badhdr")),
        10, "the replaced connections ready",
    )
    answer = stats(daemon)
    counters = ("need_more_hdr", "msg_too_big", "msg_timeouts", "bad_hdr_len", "reconnects", "rx_msgs")
    got = {n: tuple(conn_of(answer, n, 0)[k] for k in counters) for n in ("big", "stall", "badhdr", "split")}
    assert got == {
        "big": (0, 1, 0, 0, 1, 0),
        "stall": (0, 0, 1, 0, 1, 0),
        "badhdr": (0, 0, 0, 1, 1, 0),
        "split": (1, 0, 0, 0, 0, 1),
    }
    codes = {e["group"]: e["error_code"] for e in daemon.logs("connection_failed")}
    assert codes == {"big": "remote_frame_too_big", "stall": "remote_assembly_timeout", "badhdr": "remote_bad_header"}
    for n in ("big", "stall", "badhdr"):
        c = conn_of(answer, n, 0)
        assert c["last_error"] and c["rx_bytes"] > 0 and c["tx_aborts"] == 0
        assert c["dial_failures"] == 0
    s = conn_of(answer, "split", 0)
    assert (s["rx_bytes"], group_of(answer, "split")["rx_bytes"], group_of(answer, "split")["rx_msgs"]) == (300, 300, 1)
    assert s["last_error"] is None


# -- 4. TCP_INFO ------------------------------------------------------------------------


def test_connection_records_carry_tcp_info_only_while_connected(backend_factory, daemon_factory, close_all):
    backend = backend_factory(echo=True, max_frame=MAX)
    refusing = _free_refusing_port()
    close_all(refusing)
    dead = f"127.0.0.1:{refusing.getsockname()[1]}"
    # A group whose only endpoint refuses: its slot never connects. (In a
    # group with a live endpoint too, the slot would move there instead.)
    daemon = daemon_factory({
        "echo": group_config(backend, connections=1),
        "down": group_config(backend, connections=1, endpoints=[dead]),
    })
    backend.wait_open(1)
    rx = Receiver(daemon.connect(name="rx"))
    close_all(rx)
    tx = daemon.connect(receive=False)
    close_all(tx)
    for seq in range(1, 21):
        tx.send(make_frame(1, seq, 1000))
    wait_until(lambda: rx.count() == 20, 10, "the echoes")
    answer = stats(daemon)
    live, down = conn_of(answer, "echo", 0), conn_of(answer, "down", 0)
    assert live["state"] == "ready" and live["endpoint"] == backend.address
    tcp = live["tcp"]
    assert set(tcp) >= {"rtt_us", "rttvar_us", "retransmits", "total_retrans", "snd_cwnd", "unacked"}
    assert tcp["rtt_us"] > 0 and tcp["snd_cwnd"] > 0
    assert tcp["retransmits"] == 0 and tcp["unacked"] >= 0
    assert live["age"] > 0 and live["remote"] == backend.address
    assert (live["tx_msgs"], live["rx_msgs"]) == (20, 20)
    # The slot that cannot connect: no TCP_INFO, no addresses, failures counted.
    assert down["state"] in ("backoff", "connecting") and down["endpoint"] == dead
    assert (down["tcp"], down["local"], down["remote"], down["age"]) == (None, None, None, 0.0)
    assert down["dial_failures"] >= 1 and "ECONNREFUSED" in down["last_error"]
    assert group_of(answer, "echo")["connections_up"] == 1
    assert group_of(answer, "down")["connections_up"] == 0
    # Only a connected slot can be reconnected.
    with ControlClient(daemon.control_socket) as c:
        assert c.request("reconnect", group="echo")["reconnected"] == [0]
        assert c.request("reconnect", group="down", conn=0)["reconnected"] == []


def test_control_requests_and_typed_errors(backend_factory, daemon_factory):
    backend = backend_factory()
    daemon = daemon_factory({"echo": group_config(backend, connections=2)})
    backend.wait_open(2)
    with ControlClient(daemon.control_socket) as c:
        # One connection answers many requests, in order.
        pong = c.request("ping")
        assert (pong["ok"], pong["pid"], pong["version"]) == (True, daemon.proc.pid, stats(daemon)["daemon"]["version"])
        assert [g["name"] for g in c.request("stats", group="echo")["groups"]] == ["echo"]
        with pytest.raises(kmux.errors.BadRequest, match="unknown op"):
            c.request("frobnicate")
        with pytest.raises(kmux.errors.UnknownGroup):
            c.request("stats", group="nope")
        with pytest.raises(kmux.errors.UnknownConnection):
            c.request("reconnect", group="echo", conn=9)
        with pytest.raises(kmux.errors.BadRequest):
            c.request("drain", group="echo", conn=0, timeout=0)
        with pytest.raises(kmux.errors.BadRequest):
            c.request("reconnect", group="echo", conn="0")
        with pytest.raises(kmux.errors.BadRequest):
            c.request("stats", verbose=True)
        # Nothing above disturbed a connection.
        assert [x["reconnects"] for x in c.request("stats")["groups"][0]["connections"]] == [0, 0]
    with pytest.raises(kmux.errors.DaemonUnavailable) as info:
        ControlClient(daemon.control_socket + ".nope").request("ping")
    assert info.value.details["errno"] == "ENOENT"


#: The error codes "Control socket, version 1" (docs/protocol.md) lists for control answers.
DOCUMENTED_CODES = {
    "bad_request", "unknown_group", "unknown_connection", "config_invalid", "reload_refused", "drain_timeout",
    "drain_in_progress", "permission_denied",
}


def test_a_second_drain_of_a_draining_connection_gets_a_documented_answer(backend_factory, daemon_factory):
    import threading

    backend = backend_factory(summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=1, max_message=8192, write_buffer=16384)})
    backend.wait_open(1)
    backend.pause()  # the queue cannot be written: the first drain stays in progress until its timeout
    senders = SenderThreads(daemon, 1, size=lambda rng: 4096)
    try:
        wait_until(lambda: conn_of(stats(daemon), "echo", 0)["queued_msgs"] > 0, 20, "a stuck queue")
        first: list = []

        def drain_first() -> None:
            try:
                with ControlClient(daemon.control_socket, timeout=10) as c:
                    first.append(c.request("drain", group="echo", conn=0, timeout=1.0))
            except kmux.errors.KmuxError as exc:
                first.append(exc)

        t = threading.Thread(target=drain_first, daemon=True)
        t.start()
        wait_until(lambda: conn_of(stats(daemon), "echo", 0)["state"] == "draining", 5, "the first drain")
        with ControlClient(daemon.control_socket, timeout=10) as c:
            try:
                answer = c.request("drain", group="echo", conn=0, timeout=0.5)
            except kmux.errors.KmuxError as exc:
                answer = exc
        t.join(10)
        assert isinstance(first[0], kmux.errors.DrainTimeout)
        # Whatever the second request gets (the same drain's result, or a refusal), it is documented.
        if isinstance(answer, kmux.errors.KmuxError):
            assert answer.code in DOCUMENTED_CODES, (answer.code, answer.message)
    finally:
        backend.resume()
        senders.close()
