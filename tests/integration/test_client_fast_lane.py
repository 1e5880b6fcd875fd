"""The client's fast lane (kmux._driver, "The fast lane"): what it costs in system calls, and that it keeps every rule.

System calls are counted, not timed: an app (``syscall_app.py``) runs one
scenario under ``strace -f`` against a real kmuxd and a real echo backend,
and :func:`kmuxd.tools.bench.syscalls.count` counts only the calls between
its two marker calls. A count does not depend on how busy the machine is:

* the blocking client makes exactly one ``send`` and one receive per round
  trip, with or without a timeout: one blocking ``recv`` whether the answer
  is there yet or not, the timeout kept by the kernel (``SO_RCVTIMEO``, set
  once: no ``setsockopt``, no ``poll``);
* the trio client makes one receive per message and never a receive that
  finds nothing on the common path: after a send it waits for readiness
  first; messages already queued are read without a wait;
* a timeout costs one receive that times out, nothing more.

The rest run in-process on both transports (the ``transport`` fixture):
timeouts, notices, reconnecting, threads and continued messages go through
the fast lane with the same rules as the driver's generators.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

import kmux
from kmux import ReconnectPolicy, sockbuf
from kmuxd.tools.bench import syscalls

from .helpers import Daemon, group_config
from .test_client_transports import STOCK, assert_stock_limit_is_real, peer_factory, session_of  # noqa: F401
from .transports import transport, until  # noqa: F401 -- the fixture

APP = Path(__file__).with_name("syscall_app.py")
ROUND_TRIPS = 100
#: System calls a Python process may make now and then on its own (an arena
#: of memory, a signal): a count may exceed the calls asked for by this many.
SLACK = 4
RECEIVES = ("recvfrom", "recvmsg", "recv")
SENDS = ("sendto", "sendmsg", "send")
POLLS = ("poll", "ppoll", "select", "pselect6", "epoll_wait", "epoll_pwait", "epoll_pwait2")


def _strace_usable() -> str | None:
    why = syscalls.available()
    if why:
        return f"{why} (./dev.sh test installs it)"
    probe = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"strace cannot trace here (ptrace not allowed?): {probe.stderr.strip()[:200]}"
    return None


@pytest.fixture
def echo_daemon(backend_factory, daemon_factory):
    backend = backend_factory(echo=True)
    daemon = daemon_factory({"echo": group_config(backend, connections=1, max_message=1 << 20)})
    backend.wait_open(1)
    return daemon


def counted(daemon, transport_name: str, scenario: str, n: int = ROUND_TRIPS, size: int = 64,
            env: dict[str, str] | None = None) -> tuple[syscalls.SyscallCounts, dict]:
    why = _strace_usable()
    if why:
        pytest.skip(why)
    argv = [sys.executable, str(APP), daemon.socket_path, "echo", transport_name, scenario, str(n), str(size)]
    counts = syscalls.count(argv, env={**os.environ, **(env or {})})
    out = json.loads(counts.stdout.strip().splitlines()[-1])
    assert out["ok"], out
    return counts, out


def _shown(c: syscalls.SyscallCounts) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items()))


# -- system calls, counted --------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["rr", "rr-timeout"])
def test_a_blocking_round_trip_is_one_send_and_one_receive(echo_daemon, scenario):
    c, _ = counted(echo_daemon, "sync", scenario)
    n = ROUND_TRIPS
    assert c.calls(*SENDS) == n and c.calls(*RECEIVES) == n, _shown(c)
    assert c.failed("EAGAIN", *RECEIVES) == 0 and c.calls(*POLLS) == 0, _shown(c)
    assert c.calls("setsockopt") == 0, _shown(c)  # the timeout was set once, in the warm-up
    assert sum(v for k, v in c.items() if ":" not in k) <= 2 * n + SLACK, _shown(c)


@pytest.mark.parametrize("scenario", ["rr", "rr-timeout"])
def test_a_trio_round_trip_never_reads_before_the_answer_is_there(echo_daemon, scenario):
    c, _ = counted(echo_daemon, "trio", scenario)
    n = ROUND_TRIPS
    assert c.calls(*SENDS) == n and c.calls(*RECEIVES) == n, _shown(c)
    assert c.failed("EAGAIN", *RECEIVES) == 0, _shown(c)
    # trio's own cost of a wait: one epoll_wait per scheduling pass, an epoll_ctl per wait.
    assert c.calls("epoll_ctl") <= n + SLACK and c.calls(*POLLS) <= 2 * n + SLACK, _shown(c)


@pytest.mark.parametrize("transport_name", ["sync", "trio"])
def test_messages_already_waiting_are_one_receive_each(echo_daemon, transport_name):
    n = 50
    c, out = counted(echo_daemon, transport_name, "waiting", n)
    assert out["all"]
    assert c.calls(*RECEIVES) == n and c.failed("EAGAIN", *RECEIVES) == 0, _shown(c)
    if transport_name == "sync":
        assert c.calls(*POLLS) == 0, _shown(c)
    else:  # one readiness wait, for the first (the client had just sent): the rest are read at once
        assert c.calls("epoll_ctl") <= 1, _shown(c)


def test_a_blocking_timeout_is_one_receive_that_times_out(echo_daemon):
    c, out = counted(echo_daemon, "sync", "timeout")
    assert out["timed_out"] and out["then"], out
    # SO_RCVTIMEO counts in clock ticks (at most two late, 8 ms at 250 Hz); the rest is a loaded machine.
    assert 0.3 <= out["waited"] < 1.3, out
    assert c.calls(*RECEIVES) == 2 and c.failed("EAGAIN", *RECEIVES) == 1, _shown(c)
    assert c.calls(*POLLS) == 0 and c.calls("setsockopt") == 0 and c.calls(*SENDS) == 1, _shown(c)


def test_a_trio_timeout_is_a_cancelled_wait(echo_daemon):
    c, out = counted(echo_daemon, "trio", "timeout")
    assert out["timed_out"] and out["then"], out
    assert 0.3 <= out["waited"] < 1.3, out
    assert c.calls(*RECEIVES) <= 2 and c.failed("EAGAIN", *RECEIVES) <= 1, _shown(c)


def test_continued_messages_under_the_stock_limit_are_blocking_reads_only(backend_factory, daemon_factory,
                                                                            monkeypatch):
    monkeypatch.setenv(sockbuf.WMEM_MAX_ENV, str(STOCK))  # the daemon inherits it; the app gets it below
    assert_stock_limit_is_real()
    backend = backend_factory(echo=True)
    daemon = daemon_factory({"echo": group_config(backend, connections=1, max_message=1 << 20)})
    backend.wait_open(1)
    n, size = 3, 1 << 20
    for transport_name in ("sync", "trio"):
        c, out = counted(daemon, transport_name, "rr-timeout", n, size, env={sockbuf.WMEM_MAX_ENV: str(STOCK)})
        assert out["continued_received"] >= n, out  # the answers came in pieces
        pieces = c.calls(*RECEIVES) - c.failed("EAGAIN", *RECEIVES)
        assert pieces >= 2 * n, _shown(c)
        if transport_name == "sync":
            assert c.failed("EAGAIN", *RECEIVES) == 0 and c.calls(*POLLS) == 0, _shown(c)


# -- the rules, through the fast lane -------------------------------------------------------------


def _frame(size: int, tag: int) -> bytes:
    return struct.pack(">I", size - 4) + bytes([tag % 256]) * (size - 4)


async def test_a_receive_that_times_out_then_one_that_does_not(transport, echo_daemon):
    c = await transport.connect("echo", echo_daemon.socket_path)
    for timeout in (0.3, 0.02):  # SO_RCVTIMEO (sync), then a bound under RCVTIMEO_MIN (try, then poll)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await c.recv(timeout=timeout)
        assert timeout <= time.monotonic() - t0 < timeout + 1.0
        m = _frame(64, 1)
        await c.send(m)
        assert await c.recv(timeout=timeout + 2.0) == m  # a longer bound: a changed SO_RCVTIMEO
        assert await c.send(m) and await c.recv() == m  # no bound at all after one


def test_the_kernel_keeps_the_bound_asked_for(echo_daemon):
    with kmux.connect("echo", echo_daemon.socket_path) as c:
        sock = socket.socket(fileno=os.dup(c.fileno()))
        try:
            def rcvtimeo() -> tuple[int, int]:
                return struct.unpack("@ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))

            m = _frame(64, 2)
            c.send(m)
            assert c.recv(timeout=2.5) == m
            assert rcvtimeo() == (2, 500000)
            c.send(m)
            assert c.recv() == m
            assert rcvtimeo() == (0, 0)  # no bound
        finally:
            sock.close()


async def test_a_notice_on_the_fast_lane_raises_with_its_seq(transport, echo_daemon):
    c = await transport.connect("echo", echo_daemon.socket_path, validate=False)
    good = _frame(64, 3)
    await c.send(good)
    assert await c.recv() == good
    bad_seq = await c.send(b"\x00\x00\x00\x09abc")  # the header announces 9 bytes, 3 follow
    with pytest.raises(kmux.BadFrame) as info:
        await c.recv()
    assert info.value.seq == bad_seq == 2
    await c.send(good)
    assert await c.recv() == good  # a per-message error: the connection goes on


async def test_a_reconnecting_client_gets_the_fast_lane_back(transport, echo_daemon):
    c = await transport.connect("echo", echo_daemon.socket_path, reconnect=ReconnectPolicy(deadline=10.0))
    m = _frame(64, 4)
    await c.send(m)
    assert await c.recv(timeout=5) == m
    echo_daemon.stop()
    new = Daemon(echo_daemon.config_path, echo_daemon.socket_path, echo_daemon.group)
    try:
        new.start()
        await _reconnect_and_round_trip(c)
    finally:
        new.stop()


async def _reconnect_and_round_trip(c) -> None:
    for i in range(3):  # the first call finds the old socket gone and reconnects
        m = _frame(64, 5 + i)
        await c.send(m)
        assert await c.recv(timeout=5) == m
    assert c.raw.reconnects == 1
    assert c.raw._driver.fast is not None  # the new connection took the fast lane again


def test_a_second_thread_waits_for_the_receiving_thread(echo_daemon):
    with kmux.connect("echo", echo_daemon.socket_path) as c:
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(c.recv(timeout=10)))
        reader.start()
        try:
            deadline = time.monotonic() + 5
            while not c._recv_lock.locked():  # the reader is blocked in its one receive
                assert time.monotonic() < deadline, "the reader never took the receive lock"
                time.sleep(0.005)
            with pytest.raises(TimeoutError, match="another thread"):
                c.recv(timeout=0.2)
            m = _frame(64, 9)
            c.send(m)  # the send lane is free while a thread waits to receive
        finally:
            reader.join(10)
        assert got == [m]


async def test_close_wakes_a_receiver_blocked_on_the_fast_lane(transport, echo_daemon):
    c = await transport.connect("echo", echo_daemon.socket_path)
    async with trio.open_nursery() as nursery:
        failure: list[BaseException] = []

        async def receive() -> None:
            try:
                await c.recv(timeout=10)
            except BaseException as exc:  # noqa: BLE001 -- the test checks which
                failure.append(exc)

        nursery.start_soon(receive)
        await until(lambda: c.raw._recv_lock.locked(), "the receiver holds the lane")
        if transport.name == "sync":
            await trio.to_thread.run_sync(functools.partial(c.raw.close))
        else:
            await c.raw.aclose()
    assert len(failure) == 1 and isinstance(failure[0], kmux.ClientClosed), failure


async def test_the_control_socket_is_named_when_an_app_dials_it(transport, echo_daemon):
    with pytest.raises(kmux.HandshakeInvalid, match="looks like kmuxd's control socket, not its app socket"):
        await transport.connect("echo", echo_daemon.control_socket)
    [line] = echo_daemon.wait_log("control_error")
    assert "an app's hello (group 'echo') on the control socket" in line["error"], line


async def test_a_message_the_fast_lane_reads_during_a_receive_off_is_handed_back(transport, peer_factory):
    """A receiver waits on the fast lane when another caller switches receiving off: a message that
    arrives before the marker is handed back (REQUEUE), not delivered. The blocking receiver is inside
    its one blocking read when draining starts, so the fast lane reads the message and leaves it to the
    driver's hand-back; the trio receiver checks after its readiness wait and leaves the read to the driver."""
    peer = peer_factory(echo=False)
    c = await transport.connect("g", peer.path)
    s = await session_of(peer)
    driver = c.raw._driver
    got: list[bytes] = []
    off = trio.Event()
    m = _frame(100, 11)

    async def reader() -> None:  # one blocking receive at a time, holding the lane until a message comes
        while not off.is_set():
            got.append(await c.recv(timeout=10))

    async def switch_off() -> None:
        await c.set_receive(False)
        off.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await until(lambda: c.raw._recv_lock.locked(), "the reader waits on the fast lane")
        s.pause()  # the peer reads nothing: its marker waits behind the control packet
        control_sent = driver.conn.link.unread_bytes()
        nursery.start_soon(switch_off)
        await until(lambda: driver.conn.link.unread_bytes() > control_sent, "the control packet sent")
        s.send_message(m)  # arrives before the marker: the waiting reader's fast lane reads it
        await until(lambda: driver.conn.link.unread_bytes() > control_sent + len(m), "the hand-back sent")
        s.resume()
        await off.wait()
        last = _frame(100, 12)
        s.send_message(last)  # receiving is off and no marker is outstanding: delivered, and the reader ends
    await until(lambda: s.requeued, "the peer to read the hand-back")  # its own thread reads on
    assert got == [last] and s.requeued == [m], (got, s.requeued)


async def test_trio_receives_cancelled_anywhere_lose_nothing_and_repeat_nothing(echo_daemon):
    """A trio ``recv`` on the fast lane cancelled before its read (the hint says read first: a message
    is queued), during its readiness wait (the hint says wait first: nothing is) or as its read
    returns: each message is either left in the socket or returned, never lost and never returned
    twice. The app keeps up to 8 requests in flight so both of the hint's paths run. Most bounds are
    under 50 µs and run out while the read is under way (a cancellable checkpoint after the read
    would lose the message it read: seen to fail in 2 runs of 3 with one)."""
    import random

    import kmux.trio

    n, in_flight = 2000, 8
    rng = random.Random(17)
    sent = [struct.pack(">II", 60, i) + bytes(56) for i in range(n)]
    got = 0
    cancelled = 0
    async with await kmux.trio.connect("echo", echo_daemon.socket_path) as c:
        for _ in range(20 * n):  # bounded: each pass receives one message or is cut short
            if got == n:
                break
            while c.seq < min(n, got + in_flight):
                await c.send(sent[c.seq])
            bound = rng.uniform(0, 50e-6) if rng.random() < 0.7 else rng.choice((0.0, 0.001, 0.01))
            with trio.move_on_after(bound) as scope:
                message = await c.recv()
            if scope.cancelled_caught:
                cancelled += 1
                continue
            # In order, each once: a lost message shows at the next one (fail now, not after the loop).
            assert message == sent[got], (got, struct.unpack_from(">I", message, 4)[0])
            got += 1
        else:
            pytest.fail(f"{got} of {n} messages came back")
        assert c.statistics().received == n
    assert cancelled >= 100, cancelled  # the bounds really cut receives short
