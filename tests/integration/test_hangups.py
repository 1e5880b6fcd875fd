"""Sessions end when their app goes, whatever the group's state (issue #10).

A real kmuxd subprocess, real SEQPACKET apps, real loopback TCP servers.

The daemon stops reading an app in several states: it waits for a
connection (the group has none up, or every connection is busy), it is
parked on a full outbox (its backlog is pinned to a connection that cannot
write), or it left ``client_notice_limit`` notices unread. In each state an
app that closes its socket must be detached at once (the hang-up is in the
epoll interest set whatever the session is doing), not when the group
recovers or a timeout fires: every test here sets ``queue_timeout = 0``
(wait for ever), so only the hang-up can end the session.

How fast: the daemon's own ``client_detached`` log line is timestamped; its
distance from the moment the test closed the socket is what is checked
against :data:`DETACH_BOUND` (the issue's "under a second"), so the test's
own polling does not count.

Also here: what an app had sent and the daemon had accepted is still
written after it left, what it had not accepted is dropped and counted
(``dropped_unread``), and a churn of 1,000 apps through a dead group never
locks a healthy group's apps out nor leaks a descriptor.
"""

from __future__ import annotations

import struct
import threading
import time

import pytest

import kmux
from kmux.errors import TooManyClients

from .helpers import (
    RawApp,
    client_record,
    frame_packet,
    group_config,
    group_record,
    log_time,
    make_frame,
    parse_frame,
    summarize_frame,
    unread_by_peer,
    wait_flat,
    wait_until,
)

#: The issue's bound: an app that closed its socket is detached within this many seconds.
DETACH_BOUND = 1.0
#: How long a test waits for a detach at all before it calls it missing.
DETACH_WAIT = 10.0
#: A u32be message whose header announces 9 bytes but that has 3: refused with bad_frame.
BAD_FRAME = struct.pack(">I", 9) + b"abc"


def detach_delay(daemon, app: RawApp) -> float:
    """Seconds from the app's close to the daemon's ``client_detached`` line for it."""
    (entry,) = daemon.wait_log("client_detached", timeout=DETACH_WAIT, client=app.client_id)
    return log_time(entry) - app.closed_at


def assert_detached_promptly(daemon, app: RawApp, state: str) -> float:
    delay = detach_delay(daemon, app)
    assert delay < DETACH_BOUND, f"{state}: client {app.client_id} detached {delay:.3f}s after it closed its socket"
    wait_until(lambda: client_record(daemon, app.client_id) is None, 5.0, f"client {app.client_id} gone from stats")
    return delay


def assert_not_read(daemon, app: RawApp, what: str) -> None:
    """The daemon has stopped reading ``app``: its sends hit EAGAIN and the count stays flat."""
    app.push(frame_packet(app.client_id))
    before = client_record(daemon, app.client_id)
    # Not reading is an absence: give a daemon that wrongly reads a window to do so.
    time.sleep(0.2)
    assert app.push(frame_packet(app.client_id), limit=50) == 0, f"{what}: the daemon is still reading the app"
    after = client_record(daemon, app.client_id)
    assert (after["tx_msgs"] + after["queued_msgs"]) == (before["tx_msgs"] + before["queued_msgs"]), what


# -- each state in which the daemon stops reading an app ------------------------------------------


def test_waiting_for_a_connection_of_a_dead_group(daemon_factory, refusing_port):
    """No connection up at all: the app's first message waits; the app leaves; it is detached."""
    daemon = daemon_factory({"down": {"endpoints": [f"127.0.0.1:{refusing_port}"], "connections": 2,
                                      "queue_timeout": 0, "reconnect_initial": 0.05, "reconnect_max": 0.2}})
    app = RawApp(daemon.socket_path, "down")
    assert app.answer.up is False, "the hello's answer must say the group has no connection up"
    assert app.push(frame_packet(1), limit=3) == 3
    wait_until(lambda: group_record(daemon)["waiting_clients"] == 1, 5.0, "the app waiting for a connection")
    app.close()
    delay = assert_detached_promptly(daemon, app, "waiting, group down")
    g = wait_until(lambda: (g := group_record(daemon))["dropped_unread"] == 3 and g, 5.0, "3 packets dropped unread")
    assert g["clients"] == 0 and g["waiting_clients"] == 0 and g["queue_timeouts"] == 0, g
    print(f"waiting (group down): detached {delay * 1000:.0f} ms after close, dropped_unread {g['dropped_unread']}")


@pytest.fixture
def stalled(backend_factory, daemon_factory):
    """One connection to a server that reads nothing: the first app fills the outbox and parks
    on it (pinned), a second app's message waits for a connection (none is free)."""
    backend = backend_factory(rcvbuf=4096, summarize=summarize_frame)
    daemon = daemon_factory({"g": group_config(backend, connections=1, queue_timeout=0, write_buffer=16384)},
                            shutdown_grace=0.5)
    backend.wait_open(1)
    backend.pause()
    parked = RawApp(daemon.socket_path, "g", "parked")
    wait_flat(lambda: (parked.push(frame_packet(1)), parked.sent)[1], 0.3, 10.0, "the first app's sends")
    rec = client_record(daemon, parked.client_id)
    assert rec["queued_msgs"] > 0, rec
    assert_not_read(daemon, parked, "parked on a full outbox")
    waiting = RawApp(daemon.socket_path, "g", "waiting")
    assert waiting.push(frame_packet(2), limit=1) == 1
    wait_until(lambda: group_record(daemon)["waiting_clients"] == 1, 5.0, "the second app waiting")
    return backend, daemon, parked, waiting


def test_waiting_while_every_connection_is_busy(stalled):
    backend, daemon, parked, waiting = stalled
    waiting.close()
    delay = assert_detached_promptly(daemon, waiting, "waiting, every connection busy")
    g = group_record(daemon)
    assert g["waiting_clients"] == 0 and g["clients"] == 1, g
    print(f"waiting (all busy): detached {delay * 1000:.0f} ms after close")


def test_parked_on_a_full_outbox(stalled):
    backend, daemon, parked, waiting = stalled
    parked.close()
    delay = assert_detached_promptly(daemon, parked, "parked on a full outbox")
    # The waiting app is not harmed; once the server reads again it gets the connection.
    backend.resume()
    wait_until(lambda: any(r[0] == 2 for _, r in backend.records()), 10.0, "the waiting app's message written")
    print(f"parked: detached {delay * 1000:.0f} ms after close")


def test_over_its_notice_limit(backend_factory, daemon_factory):
    """An app that sends bad frames and never reads its notices: past client_notice_limit
    unread notices the daemon stops reading it. It leaves: detached at once."""
    backend = backend_factory(echo=True)
    limit = 4
    daemon = daemon_factory({"g": group_config(backend, connections=1, queue_timeout=0)}, client_notice_limit=limit)
    app = RawApp(daemon.socket_path, "g", "noisy")

    def pending() -> dict | None:
        app.push(lambda seq: b"\x00" + BAD_FRAME)  # more bad frames, as fast as the daemon reads them
        r = client_record(daemon, app.client_id)
        return r if r["notices_pending"] >= limit else None

    rec = wait_until(pending, 10.0, f"{limit} notices pending")
    stuck = wait_flat(lambda: (app.push(lambda seq: b"\x00" + BAD_FRAME), app.sent)[1], 0.3, 10.0, "packets sent")
    assert app.push(lambda seq: b"\x00" + BAD_FRAME, limit=10) == 0, "the daemon still reads the app"
    app.close()
    delay = assert_detached_promptly(daemon, app, "over its notice limit")
    # Every bad frame it sent was either refused (a notice) or never read (counted). Which of
    # the two depends on whether the hang-up was seen while packets were still queued.
    g = wait_until(lambda: (g := group_record(daemon))["refused"] + g["dropped_unread"] == stuck and g, 5.0,
                   "every bad frame refused or counted as unread")
    print(f"notice limit: {stuck} bad frames, {rec['refused']} refused before the limit, "
          f"{g['dropped_unread']} dropped unread, detached {delay * 1000:.0f} ms after close")


def test_in_the_middle_of_a_continued_message(backend_factory, daemon_factory):
    """An app leaves after the first piece of a message: the piece is dropped and counted,
    nothing reaches the server, and the connection serves the next app."""
    backend = backend_factory(echo=True, summarize=summarize_frame)
    daemon = daemon_factory({"g": group_config(backend, connections=1, queue_timeout=0)})
    app = RawApp(daemon.socket_path, "g", "pieces")
    whole = make_frame(1, 1, 4000)
    app.sock.send(b"\x80" + whole[:1000])  # DATA_MORE: the message goes on in the next packet
    wait_until(lambda: unread_by_peer(app.sock) == 0, 5.0, "the daemon to read the first piece")
    app.close()
    delay = assert_detached_promptly(daemon, app, "mid continuation")
    g = wait_until(lambda: (g := group_record(daemon))["dropped_unread"] == 1 and g, 5.0, "the open message counted")
    with daemon.connect() as c:
        c.send(make_frame(2, 1, 100))
        assert parse_frame(c.recv(timeout=5.0)) == (2, 1)
    assert [r for _, r in backend.records()] == [(2, 1, 100)]
    print(f"mid message: detached {delay * 1000:.0f} ms after close, dropped_unread {g['dropped_unread']}")


# -- what was accepted is written, what was not is counted ------------------------------------------


def test_accepted_is_written_unread_is_dropped_and_counted(backend_factory, daemon_factory):
    """The server stops reading; an app sends until the kernel refuses more, then leaves.
    The daemon had accepted a prefix of its messages: once the server reads again exactly
    that prefix arrives, in order; the rest is ``dropped_unread``."""
    backend = backend_factory(rcvbuf=4096, summarize=summarize_frame)
    daemon = daemon_factory({"g": group_config(backend, connections=1, queue_timeout=0, write_buffer=16384)})
    backend.wait_open(1)
    backend.pause()
    app = RawApp(daemon.socket_path, "g", "leaver")
    sent = wait_flat(lambda: (app.push(frame_packet(7, 2000)), app.sent)[1], 0.3, 10.0, "packets sent")
    rec = client_record(daemon, app.client_id)
    accepted = rec["tx_msgs"] + rec["queued_msgs"]
    assert 0 < accepted < sent, (accepted, sent)
    app.close()
    assert_detached_promptly(daemon, app, "pushed back with unread packets")
    backend.resume()
    backend.wait_count(accepted, timeout=10.0)
    wait_flat(backend.count, 0.3, 5.0, "frames at the server")
    seqs = [r[1] for _, r in backend.records()]
    assert seqs == list(range(1, accepted + 1)), f"server got {len(seqs)} frames, accepted {accepted}"
    g = group_record(daemon)
    assert g["dropped_unread"] == sent - accepted, (g["dropped_unread"], sent, accepted)
    assert g["queued_msgs"] == 0, g
    print(f"leaver: sent {sent}, accepted and written {accepted}, dropped_unread {g['dropped_unread']}")


# -- churn through a dead group --------------------------------------------------------------------

CHURN_CLIENTS = 1000
CHURN_THREADS = 4
#: A client of the healthy group checks in after every this many churned clients (per thread).
CHURN_PROBE_EVERY = 50


def test_churn_through_a_dead_group_locks_nobody_out(backend_factory, daemon_factory, refusing_port):
    """``max_clients = 16``. 1,000 apps join a group whose endpoint refuses every dial, send,
    and exit, four at a time. Every one is detached (none is refused: a session that
    outlived its app would take a slot for ever), an app of a healthy group always gets
    in and gets its echo, and kmuxd's descriptor count returns to its baseline."""
    backend = backend_factory(echo=True)
    daemon = daemon_factory(
        {
            "dead": {"endpoints": [f"127.0.0.1:{refusing_port}"], "connections": 4, "queue_timeout": 0,
                     "reconnect_initial": 0.05, "reconnect_max": 0.5},
            "ok": group_config(backend, connections=2),
        },
        max_clients=16,
    )
    backend.wait_open(2)
    baseline = wait_flat(daemon.fd_count, 0.3, 5.0, "kmuxd's descriptors")
    refused: list[str] = []
    errors: list[BaseException] = []
    probes = [0]
    lock = threading.Lock()
    probing = threading.Lock()  # one healthy-group app at a time: balance steering echoes to any receiver

    def churn(t: int) -> None:
        try:
            churn_inner(t)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    def churn_inner(t: int) -> None:
        for k in range(CHURN_CLIENTS // CHURN_THREADS):
            cid = t * 10_000 + k
            try:
                c = kmux.connect("dead", daemon.socket_path, receive=False, timeout=5.0)
            except TooManyClients as exc:
                with lock:
                    refused.append(f"dead #{cid}: {exc}")
                continue
            for seq in (1, 2):
                c.send(make_frame(cid % 65536, seq, 64))
            c.close()
            if k % CHURN_PROBE_EVERY == 0:
                try:
                    with probing, kmux.connect("ok", daemon.socket_path, timeout=5.0) as ok:
                        ok.send(make_frame(60_000 + t, k + 1, 64))
                        assert parse_frame(ok.recv(timeout=5.0)) == (60_000 + t, k + 1)
                except TooManyClients as exc:
                    with lock:
                        refused.append(f"ok probe {t}/{k}: {exc}")
                    continue
                with lock:
                    probes[0] += 1

    threads = [threading.Thread(target=churn, args=(t,), daemon=True) for t in range(CHURN_THREADS)]
    started = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
        assert not th.is_alive(), "a churn thread is stuck"
    took = time.monotonic() - started
    assert not errors, errors
    assert not refused, f"{len(refused)} refused, e.g. {refused[:3]}"
    g = wait_until(lambda: (g := group_record(daemon, "dead"))["clients"] == 0 and g, 5.0, "every dead-group app gone")
    assert g["clients_joined"] == CHURN_CLIENTS and g["clients_left"] == CHURN_CLIENTS, g
    assert g["dropped_unread"] == 2 * CHURN_CLIENTS and g["tx_msgs"] == 0, g
    after = wait_until(lambda: (n := daemon.fd_count()) == baseline and n, 5.0,
                       f"kmuxd's descriptors back to {baseline} (now {daemon.fd_count()})")
    print(f"churn: {CHURN_CLIENTS} apps through a dead group in {took:.1f}s, {g['clients_left']} left, "
          f"{probes[0]} healthy-group probes all served, fds {baseline} before / {after} after")
