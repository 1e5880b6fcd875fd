"""Reconnecting clients across a daemon restart: real kmuxd processes, real sockets.

Several reconnecting clients send numbered test frames flat out; the daemon
is stopped (SIGTERM: graceful, with the ``shutdown`` notice; or SIGKILL: a
crash) and a new one is started on the same config and socket path. The
backend then must hold every frame each client sent: exactly once after a
graceful stop, at least once after a crash, with every duplicate inside a
range the client reported as of unknown fate.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time

import pytest
import trio

import kmux
import kmux.trio
from kmux import ReconnectPolicy

from .helpers import Daemon, group_config, make_frame, summarize_frame, wait_until

# The resend buffer must hold everything a sender can send between connect
# and the restart (it learns what was accepted only from the shutdown notice);
# unbounded senders on a fast machine pass the default 10,000 in well under a
# second. Overflow itself is tested in tests/unit/test_reconnect_core.py.
POLICY = ReconnectPolicy(deadline=10.0, initial_delay=0.02, max_delay=0.2,
                         buffer_messages=2_000_000, buffer_bytes=512 * 1024 * 1024)
N_CLIENTS = 4


class Senders:
    """``n`` reconnecting sync clients, each sending frames ``(cid, seq)`` until stopped."""

    def __init__(self, path: str, n: int, policies: list[ReconnectPolicy]) -> None:
        self.clients = [
            kmux.connect("g", path, receive=False, name=f"rc{i}", timeout=2.0, reconnect=policies[i]) for i in range(n)
        ]
        self.sent = [0] * n
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        client, cid = self.clients[i], i + 1
        rng = random.Random(cid)
        try:
            while not self._stop.is_set():
                seq = client.send(make_frame(cid, self.sent[i] + 1, rng.randint(14, 600), rng))
                assert seq == self.sent[i] + 1, f"client {cid}: send returned seq {seq}, expected {self.sent[i] + 1}"
                self.sent[i] = seq
        except BaseException as exc:
            self.errors.append(exc)

    def wait_progress(self, more: int, timeout: float = 5.0) -> None:
        """Wait until every client sent ``more`` frames beyond what it had sent now."""
        target = [s + more for s in self.sent]
        wait_until(lambda: all(s >= t for s, t in zip(self.sent, target)) or self.errors, timeout, "senders progressing")
        assert not self.errors, self.errors

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(10)
            assert not t.is_alive(), "a sender is stuck"
        assert not self.errors, f"senders failed: {self.errors!r}"

    def close(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(5)
        for c in self.clients:
            c.close()


def _restart(old: Daemon, sig: int, started: list[Daemon]) -> Daemon:
    """Signal ``old``; once its socket file is gone (or it is dead), start a new daemon on the same config."""
    old.proc.send_signal(sig)
    if sig == signal.SIGKILL:
        old.proc.wait(5)  # the socket file stays: the new daemon finds it stale and binds again
    else:
        wait_until(lambda: not os.path.exists(old.socket_path), 5, "the old daemon to remove its socket")
    time.sleep(0.1)  # clients find no socket (ENOENT/ECONNREFUSED) for a moment
    new = Daemon(old.config_path, old.socket_path, old.group)
    started.append(new)
    return new.start()


@pytest.fixture
def restarted():
    started: list[Daemon] = []
    try:
        yield started
    finally:
        for d in started:
            d.stop()


def _arrivals(backend) -> collections.Counter:
    recs = [r for _, r in backend.records()]
    assert not [r for r in recs if r[0] == "bad"], "torn or garbled frames at the backend"
    return collections.Counter((r[0], r[1]) for r in recs)


def _wait_all(backend, sent: list[int], timeout: float = 10.0) -> collections.Counter:
    expected = {(i + 1, s) for i, n in enumerate(sent) for s in range(1, n + 1)}

    def complete():
        got = _arrivals(backend)
        return got if expected <= set(got) else None

    try:
        got = wait_until(complete, timeout, "every sent frame at the backend", interval=0.05)
    except AssertionError:
        got = _arrivals(backend)
        missing = sorted(expected - set(got))
        raise AssertionError(f"{len(missing)} frame(s) never arrived, e.g. {missing[:10]}") from None
    assert set(got) == expected, f"frames nobody sent: {sorted(set(got) - expected)[:10]}"
    return got


def test_graceful_restart_every_message_exactly_once(backend_factory, daemon_factory, restarted):
    backend = backend_factory(summarize=summarize_frame)
    d1 = daemon_factory({"g": group_config(backend, connections=2)}, shutdown_grace=5.0)
    senders = Senders(d1.socket_path, N_CLIENTS, [POLICY] * N_CLIENTS)
    try:
        senders.wait_progress(200)
        d2 = _restart(d1, signal.SIGTERM, restarted)
        assert d1.proc.wait(10) == 0
        senders.wait_progress(200)
        senders.stop()
        got = _wait_all(backend, senders.sent)
        dupes = {k: v for k, v in got.items() if v != 1}
        assert not dupes, (
            f"{len(dupes)} duplicates after a graceful restart, seqs {min(dupes)}..{max(dupes)}; "
            f"clients: {[(c.stats(), c.unknown_fate and c.unknown_fate[0]) for c in senders.clients]}"
        )
        for c in senders.clients:
            st = c.stats()
            assert st["reconnects"] == 1, st
            assert c.unknown_fate == [] and st["unknown"] == 0 and st["resent_unknown"] == 0, st
            assert st["dropped"] == 0 and c.guaranteed, st
            # The notice accounted for everything the old daemon read; what it never read was re-sent.
            assert 0 < st["accepted_seq"] <= st["seq"], st
        # The old daemon told every client how much it had read.
        assert d2.logs("client_attached") and len(d2.logs("client_attached")) >= N_CLIENTS
    finally:
        senders.close()


def test_crash_reports_unknown_fate_and_recovers(backend_factory, daemon_factory, restarted):
    backend = backend_factory(summarize=summarize_frame)
    d1 = daemon_factory({"g": group_config(backend, connections=2)})
    reports: list[kmux.UnknownFate] = []
    policies = [POLICY] * (N_CLIENTS - 1) + [ReconnectPolicy(deadline=10.0, initial_delay=0.02, max_delay=0.2,
                                                              unknown="report", on_unknown=reports.append)]
    senders = Senders(d1.socket_path, N_CLIENTS, policies)
    try:
        senders.wait_progress(200)
        _restart(d1, signal.SIGKILL, restarted)
        senders.wait_progress(200)
        senders.stop()
        sent = senders.sent
        # The "report" client (at-most-once) does not re-send: wait for the others' frames
        # plus its own frames outside the reported range.
        got = _arrivals(backend)
        for i, c in enumerate(senders.clients):
            cid = i + 1
            st = c.stats()
            assert st["reconnects"] == 1, st
            assert len(c.unknown_fate) == 1, c.unknown_fate
            fate = c.unknown_fate[0]
            # Nothing was ever accounted on the first connection, so every message sent on it is unsure.
            assert fate.first_seq == 1 and fate.last_seq >= 200 and fate.missing == 0, fate
            assert fate.held == fate.count
            unsure = range(fate.first_seq, fate.last_seq + 1)
            expected = set(range(1, sent[i] + 1))
            if c.policy.unknown == "resend":
                assert fate.resent and st["resent_unknown"] == fate.count and st["accepted_seq"] == 0
                want = expected
            else:
                assert reports == [fate] and not fate.resent and st["resent"] == 0
                assert [s for s, _ in fate.messages] == list(unsure)
                assert st["accepted_seq"] == fate.last_seq
                want = expected - set(unsure)
            wait_until(lambda: want <= {s for (c2, s) in _arrivals(backend) if c2 == cid}, 10,
                       f"client {cid}'s frames at the backend")
            got = _arrivals(backend)
            mine = {s: n for (c2, s), n in got.items() if c2 == cid}
            assert set(mine) <= expected, "frames nobody sent"
            dupes = [s for s, n in mine.items() if n > 1]
            assert all(s in unsure for s in dupes), f"client {cid}: duplicates outside the unknown range: {dupes[:10]}"
            assert all(mine.get(s) == 1 for s in want if s not in unsure), f"client {cid}: lost or doubled"
    finally:
        senders.close()


async def test_trio_client_survives_a_graceful_restart(backend_factory, daemon_factory, restarted):
    backend = backend_factory(summarize=summarize_frame)
    d1 = daemon_factory({"g": group_config(backend, connections=2)}, shutdown_grace=5.0)
    sent = 0
    done = trio.Event()

    async def restart() -> None:
        await trio.to_thread.run_sync(_restart, d1, signal.SIGTERM, restarted)
        done.set()

    client = await kmux.trio.connect("g", d1.socket_path, receive=False, timeout=2.0, reconnect=POLICY)
    async with client, trio.open_nursery() as nursery:
        rng = random.Random(7)
        with trio.fail_after(10):
            after = None
            while after is None or sent < after:
                seq = await client.send(make_frame(1, sent + 1, rng.randint(14, 600), rng))
                assert seq == sent + 1
                sent = seq
                if sent == 300:
                    nursery.start_soon(restart)
                if after is None and done.is_set():
                    after = sent + 300
                if sent % 50 == 0:
                    await trio.sleep(0.001)  # let the restart thread's task run
        assert client.reconnects == 1 and client.unknown_fate == [], client.stats()
        assert 0 < client.accepted_seq <= client.seq
    got = await trio.to_thread.run_sync(_wait_all, backend, [sent])
    assert all(v == 1 for v in got.values())


def test_recv_delivers_the_old_sockets_messages_then_reconnects(backend_factory, daemon_factory, restarted):
    backend = backend_factory(echo=True)
    d1 = daemon_factory({"g": group_config(backend, connections=1)}, shutdown_grace=5.0)
    client = kmux.connect("g", d1.socket_path, timeout=2.0, reconnect=POLICY)
    try:
        msgs = [make_frame(1, i, 40) for i in range(1, 51)]
        for m in msgs:
            client.send(m)
        # Every echo is in our socket before the daemon stops.
        wait_until(lambda: sum(c.frames for c in backend.conns()) == 50, 5, "50 frames at the backend")
        time.sleep(0.2)
        _restart(d1, signal.SIGTERM, restarted)
        got = [client.recv(timeout=5) for _ in range(50)]
        assert sorted(got) == sorted(msgs)
        last = make_frame(1, 51, 40)
        client.send(last)
        assert client.recv(timeout=5) == last  # over the new connection
        assert client.reconnects == 1 and client.stats()["resent"] == 0 and client.seq == 51
    finally:
        client.close()
