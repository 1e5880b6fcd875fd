"""Socket errors on the hot path are logged, rate-limited and counted, and cost nobody else (issue #12).

A real kmuxd subprocess, real SEQPACKET apps, a real loopback TCP echo
server. The app that draws the errors has shut down its *reading* side
(``shutdown(SHUT_RD)``): every send the daemon makes to it fails with
``EPIPE``, yet it never hangs up, so its session stays attached. That is
the case that used to be swallowed with only a counter (each response
dropped in silence); a closed app is detached on its hang-up instead.
"""

from __future__ import annotations

import socket
import time

import pytest

from kmuxd.io.sockerr import SOCKET_ERROR_LOG_INTERVAL

from .helpers import (
    RawApp,
    Receiver,
    frame_packet,
    group_config,
    group_record,
    log_time,
    make_frame,
    parse_frame,
    wait_until,
)

#: Requests the deaf app sends in each burst (they fit its socket buffer at once).
BURST = 20


def deaf_app(daemon, name: str = "deaf") -> RawApp:
    """An attached app (receiving on) that shut down its reading side."""
    app = RawApp(daemon.socket_path, daemon.group, name)
    app.sock.shutdown(socket.SHUT_RD)
    return app


@pytest.mark.slow
def test_failed_sends_to_an_app_are_logged_once_per_interval_with_a_suppressed_count(backend_factory,
                                                                                      daemon_factory):
    backend = backend_factory(echo=True)
    daemon = daemon_factory({"g": group_config(backend, connections=1, steering="fifo")})
    backend.wait_open(1)
    app = deaf_app(daemon)
    assert app.push(frame_packet(app.client_id, 200), limit=BURST) == BURST
    # Each answer came back and its send to the app failed: the router counts it dropped.
    wait_until(lambda: group_record(daemon)["dropped_responses"] == BURST, 10.0, "every response dropped")
    (first,) = daemon.wait_log("client_socket_error", client=app.client_id)
    assert (first["level"], first["op"], first["errno"], first["peer_gone"], first["suppressed"]) == (
        "warning", "send", "EPIPE", False, 0), first
    # The interval has to pass for the next line: that is what is tested.
    time.sleep(max(0.0, log_time(first) + SOCKET_ERROR_LOG_INTERVAL + 0.1 - time.time()))
    assert len(daemon.logs("client_socket_error", client=app.client_id)) == 1, "a line within the interval"
    assert app.push(frame_packet(app.client_id, 200), limit=BURST) == BURST
    wait_until(lambda: group_record(daemon)["dropped_responses"] == 2 * BURST, 10.0, "the second burst dropped")
    _, second = daemon.wait_log("client_socket_error", count=2, client=app.client_id)
    assert second["suppressed"] == BURST - 1, second  # the rest of the first burst
    # The session stayed attached all along; its end reports every error.
    app.close()
    (detached,) = daemon.wait_log("client_detached", client=app.client_id)
    assert detached["socket_errors"] == 2 * BURST, detached
    # Nobody else paid for it.
    with daemon.connect(name="healthy") as c:
        c.send(make_frame(9, 1, 100))
        assert parse_frame(c.recv(timeout=5.0)) == (9, 1)


@pytest.mark.parametrize("size", [200, 240_000], ids=["one packet", "in pieces"])
def test_balance_steering_skips_a_receiver_whose_send_fails_and_the_connection_goes_on(backend_factory,
                                                                                        daemon_factory, size):
    """The reviewer's question: a send to a receiver that fails with an OSError other
    than EAGAIN takes that receiver out of the ring, and the message it could not
    take goes to the next ready receiver at once: no message lost, no stall.
    240,000 bytes is over one packet while the daemon's send buffers stay at the
    kernel's default of 208 KiB (``KMUX_WMEM_MAX`` keeps it from raising them), so
    the daemon sends those in pieces from the receiver's queue."""
    backend = backend_factory(echo=True)
    daemon = daemon_factory({"g": group_config(backend, connections=1, rx_batch=1, max_message=1 << 20)},
                            prefix=["env", "KMUX_WMEM_MAX=65536"])
    backend.wait_open(1)
    deaf = deaf_app(daemon)  # rx_batch = 1: the ring turns every message, so it is offered one of the first two
    good = Receiver(daemon.connect(name="good"))
    total = 40 if size < 1000 else 6
    try:
        with daemon.connect(receive=False, name="sender") as sender:
            frames = [make_frame(1, seq, size) for seq in range(1, total + 1)]
            for frame in frames:
                sender.send(frame)
            wait_until(lambda: good.count() >= total, 20.0, f"{total} messages at the ready receiver")
            assert sorted(good.messages()) == sorted(frames)
        try:
            (line,) = daemon.wait_log("client_socket_error", client=deaf.client_id)
        except AssertionError as exc:
            # Seen twice under a loaded full suite, never alone: say what the daemon knew.
            raise AssertionError(f"{exc}; group: {group_record(daemon)}; the deaf client's lines: "
                                 f"{daemon.logs(client=deaf.client_id)}") from None
        assert (line["op"], line["errno"], line["peer_gone"]) == ("send", "EPIPE", False), line
        g = group_record(daemon)
        assert (g["rx_msgs"], g["receivers_ready"]) == (total, 1), g
        assert len(daemon.logs("client_socket_error")) == 1, "the receiver was tried again after it failed"
    finally:
        good.close()
        deaf.close()


def test_a_receiver_that_blocks_on_the_last_message_of_its_turn_does_not_take_the_next_ones_turn(
        backend_factory, daemon_factory):
    """The flake of the test above ("in pieces", twice in loaded full suites): the
    good receiver took a message in pieces, its socket filled, so it left the ring
    (blocked) while taking it; it read the message and was back in the ring before
    the next one came, and the ring charged its used turn to the deaf receiver
    behind it and turned past it, every time: the deaf receiver was never offered
    a message. Here each step is made to happen in that order: the good receiver
    is not reading while its message is sent, and is ready again before the next."""
    backend = backend_factory(echo=True)
    daemon = daemon_factory({"g": group_config(backend, connections=1, rx_batch=1, max_message=1 << 20)},
                            prefix=["env", "KMUX_WMEM_MAX=65536"])
    backend.wait_open(1)
    deaf = deaf_app(daemon)
    good = Receiver(daemon.connect(name="good"))
    total = 4
    frames = [make_frame(1, seq, 240_000) for seq in range(1, total + 1)]
    try:
        with daemon.connect(receive=False, name="sender") as sender:
            for n, frame in enumerate(frames, start=1):
                good.pause_reading()  # so its socket fills: it leaves the ring while taking the message
                sender.send(frame)
                wait_until(lambda: group_record(daemon)["rx_msgs"] == n, 10.0, f"message {n} steered")
                good.resume_reading()
                wait_until(lambda: good.count() == n, 10.0, f"message {n} at the good receiver")
                # ... and the good receiver is in the ring again before the next message.
                ready = 1 if daemon.logs("client_socket_error") else 2  # the deaf one leaves when it fails
                wait_until(lambda: group_record(daemon)["receivers_ready"] == ready, 10.0, "the good one ready again")
            assert good.messages() == frames
        (line,) = daemon.wait_log("client_socket_error", client=deaf.client_id, timeout=2.0)
        assert (line["op"], line["errno"]) == ("send", "EPIPE"), line
    finally:
        good.close()
        deaf.close()
