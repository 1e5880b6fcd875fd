"""Reconnecting clients across a daemon restart: real kmuxd processes, real sockets.

Every scenario runs on both transports (the ``transport`` fixture): several
reconnecting clients send numbered test frames flat out; the daemon
is stopped (SIGTERM: graceful, with the ``shutdown`` notice; or SIGKILL: a
crash) and a new one is started on the same config and socket path. The
backend then must hold every frame each client sent: exactly once after a
graceful stop, at least once after a crash, with every duplicate inside a
range the client reported as of unknown fate.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import signal
import threading
import time

import pytest
import trio

import kmux
from kmux import ReconnectPolicy

from .helpers import Daemon, group_config, group_record, make_frame, summarize_frame, wait_until
from .transports import AsyncClient, Transport, transport, until  # noqa: F401 -- the fixture

# The resend buffer must hold everything a sender can send between connect
# and the restart (it learns what was accepted only from the shutdown notice);
# unbounded senders on a fast machine pass the default 10,000 in well under a
# second. Overflow itself is tested in tests/unit/test_reconnect_core.py.
POLICY = ReconnectPolicy(deadline=10.0, initial_delay=0.02, max_delay=0.2,
                         buffer_messages=2_000_000, buffer_bytes=512 * 1024 * 1024)
N_CLIENTS = 4

# A resend buffer that overflows here means the bound above is too small for
# what the senders did, and the test would check less than it says: fail loudly.
pytestmark = pytest.mark.filterwarnings("error::kmux.AccountingWarning")


class Senders:
    """``n`` reconnecting clients of one transport, each sending frames ``(cid, seq)`` flat out until stopped.

    A blocking client sends from its own thread, as an app would; a trio
    client from its own task.
    """

    def __init__(self, transport: Transport, clients: list[AsyncClient]) -> None:
        self.transport = transport
        self.clients = [c.raw for c in clients]
        self.sent = [0] * len(clients)
        self.errors: list[BaseException] = []
        self._stop = threading.Event()

    @classmethod
    async def connect(cls, transport: Transport, path: str, policies: list[ReconnectPolicy]) -> "Senders":
        clients = [await transport.connect("g", path, receive=False, name=f"rc{i}", timeout=2.0, reconnect=p)
                   for i, p in enumerate(policies)]
        return cls(transport, clients)

    def start(self, nursery: trio.Nursery) -> None:
        for i in range(len(self.clients)):
            if self.transport.name == "sync":
                nursery.start_soon(trio.to_thread.run_sync, self._run_sync, i)
            else:
                nursery.start_soon(self._run_trio, i)

    def _next(self, i: int, rng: random.Random) -> bytes:
        return make_frame(i + 1, self.sent[i] + 1, rng.randint(14, 600), rng)

    def _sent(self, i: int, seq: int) -> None:
        assert seq == self.sent[i] + 1, f"client {i + 1}: send returned seq {seq}, expected {self.sent[i] + 1}"
        self.sent[i] = seq

    def _run_sync(self, i: int) -> None:
        rng = random.Random(i + 1)
        try:
            while not self._stop.is_set():
                self._sent(i, self.clients[i].send(self._next(i, rng)))
        except BaseException as exc:
            self.errors.append(exc)

    async def _run_trio(self, i: int) -> None:
        rng = random.Random(i + 1)
        try:
            while not self._stop.is_set():
                self._sent(i, await self.clients[i].send(self._next(i, rng)))
        except BaseException as exc:
            self.errors.append(exc)

    async def wait_progress(self, more: int, timeout: float = 5.0) -> None:
        """Wait until every client sent ``more`` frames beyond what it had sent now."""
        target = [s + more for s in self.sent]
        await until(lambda: all(s >= t for s, t in zip(self.sent, target)) or self.errors, "senders progressing",
                    timeout)
        assert not self.errors, self.errors

    def stop(self) -> None:
        """Stop sending (the senders' tasks end; the nursery waits for them)."""
        self._stop.set()


def _restart(old: Daemon, sig: int, started: list[Daemon]) -> Daemon:
    """Signal ``old``; once its socket file is gone (or it is dead), start a new daemon on the same config."""
    old.proc.send_signal(sig)
    if sig == signal.SIGKILL:
        old.proc.wait(5)  # the socket file stays: the new daemon finds it stale and binds again
    else:
        wait_until(lambda: not os.path.exists(old.socket_path), 5, "the old daemon to remove its socket")
    time.sleep(0.1)  # the stimulus: clients find no socket (ENOENT/ECONNREFUSED) for a moment
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


async def test_graceful_restart_every_message_exactly_once(transport, backend_factory, daemon_factory, restarted):
    backend = backend_factory(summarize=summarize_frame)
    d1 = daemon_factory({"g": group_config(backend, connections=2)}, shutdown_grace=5.0)
    senders = await Senders.connect(transport, d1.socket_path, [POLICY] * N_CLIENTS)
    async with trio.open_nursery() as nursery:
        senders.start(nursery)
        await senders.wait_progress(200)
        d2 = await trio.to_thread.run_sync(_restart, d1, signal.SIGTERM, restarted)
        assert d1.proc.wait(10) == 0
        await senders.wait_progress(200)
        senders.stop()
    assert not senders.errors, f"senders failed: {senders.errors!r}"
    got = await trio.to_thread.run_sync(_wait_all, backend, senders.sent)
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


async def test_crash_reports_unknown_fate_and_recovers(transport, backend_factory, daemon_factory, restarted):
    backend = backend_factory(summarize=summarize_frame)
    d1 = daemon_factory({"g": group_config(backend, connections=2)})
    reports: list[kmux.UnknownFate] = []
    policies = [POLICY] * (N_CLIENTS - 1) + [dataclasses.replace(POLICY, unknown="report",
                                                                  on_unknown=reports.append)]
    senders = await Senders.connect(transport, d1.socket_path, policies)
    async with trio.open_nursery() as nursery:
        senders.start(nursery)
        await senders.wait_progress(200)
        await trio.to_thread.run_sync(_restart, d1, signal.SIGKILL, restarted)
        await senders.wait_progress(200)
        senders.stop()
    assert not senders.errors, f"senders failed: {senders.errors!r}"
    sent = senders.sent
    # The "report" client (at-most-once) does not re-send: wait for the others' frames
    # plus its own frames outside the reported range.
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
        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: want <= {s for (c2, s) in _arrivals(backend) if c2 == cid}, 10,
                               f"client {cid}'s frames at the backend"))
        got = _arrivals(backend)
        mine = {s: n for (c2, s), n in got.items() if c2 == cid}
        assert set(mine) <= expected, "frames nobody sent"
        dupes = [s for s, n in mine.items() if n > 1]
        assert all(s in unsure for s in dupes), f"client {cid}: duplicates outside the unknown range: {dupes[:10]}"
        assert all(mine.get(s) == 1 for s in want if s not in unsure), f"client {cid}: lost or doubled"


async def test_recv_delivers_the_old_sockets_messages_then_reconnects(transport, backend_factory, daemon_factory,
                                                                     restarted):
    backend = backend_factory(echo=True)
    d1 = daemon_factory({"g": group_config(backend, connections=1)}, shutdown_grace=5.0)
    client = await transport.connect("g", d1.socket_path, timeout=2.0, reconnect=POLICY)
    msgs = [make_frame(1, i, 40) for i in range(1, 51)]
    for m in msgs:
        await client.send(m)
    # Every echo is in our socket before the daemon stops: steered to us, none left in the daemon's queue.
    await until(lambda: sum(c.frames for c in backend.conns()) == 50, "50 frames at the backend", 5)
    await trio.to_thread.run_sync(lambda: wait_until(
        lambda: (g := group_record(d1, "g"))["rx_msgs"] == 50 and g["rx_queued_bytes"] == 0, 5, "50 echoes steered"))
    await trio.to_thread.run_sync(_restart, d1, signal.SIGTERM, restarted)
    got = [await client.recv(timeout=5) for _ in range(50)]
    assert sorted(got) == sorted(msgs)
    last = make_frame(1, 51, 40)
    await client.send(last)
    assert await client.recv(timeout=5) == last  # over the new connection
    raw = client.raw
    assert raw.reconnects == 1 and raw.stats()["resent"] == 0 and raw.seq == 51
