"""Socket errors (kmuxd/io/sockerr.py) on real socket pairs: which are a peer gone, and the rate limit."""

from __future__ import annotations

import socket

import pytest
import structlog
from structlog.testing import capture_logs

from kmuxd.io.sockerr import SOCKET_ERROR_LOG_INTERVAL, SocketErrors, discard_unread, errno_name, hung_up


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def send_error(sock: socket.socket) -> OSError:
    with pytest.raises(OSError) as info:
        sock.send(b"x")
    return info.value


def test_a_closed_peer_is_gone_and_logged_at_debug(pair):
    ours, theirs = pair
    theirs.close()
    exc = send_error(ours)
    assert errno_name(exc) == "EPIPE" and hung_up(ours)
    errors = SocketErrors(structlog.get_logger(), "client_socket_error")
    with capture_logs() as logs:
        errors.note("send", exc, ours)
    assert [(e["log_level"], e["event"], e["errno"], e["peer_gone"]) for e in logs] == [
        ("debug", "client_socket_error", "EPIPE", True)]


def test_a_peer_that_only_stopped_reading_is_a_warning(pair):
    """shutdown(SHUT_RD): our sends fail with EPIPE, but the peer never hangs up."""
    ours, theirs = pair
    theirs.shutdown(socket.SHUT_RD)
    exc = send_error(ours)
    assert errno_name(exc) == "EPIPE" and not hung_up(ours)
    errors = SocketErrors(structlog.get_logger(), "client_socket_error")
    with capture_logs() as logs:
        errors.note("send", exc, ours, client=7)
    (line,) = logs
    assert (line["log_level"], line["peer_gone"], line["client"], line["suppressed"]) == ("warning", False, 7, 0)


def test_one_line_per_interval_and_the_next_says_how_many_were_suppressed(pair):
    ours, theirs = pair
    theirs.shutdown(socket.SHUT_RD)
    errors = SocketErrors(structlog.get_logger(), "client_socket_error")
    t0 = 1000.0
    with capture_logs() as logs:
        for i in range(50):  # a burst inside one interval
            errors.note("send", send_error(ours), ours, now=t0 + i * SOCKET_ERROR_LOG_INTERVAL / 100)
        errors.note("send", send_error(ours), ours, now=t0 + SOCKET_ERROR_LOG_INTERVAL)
        errors.note("send", send_error(ours), ours, now=t0 + SOCKET_ERROR_LOG_INTERVAL + 1)
    assert [e["suppressed"] for e in logs] == [0, 49]
    assert errors.count == 52


def test_an_error_without_errno_is_named_by_its_class():
    assert errno_name(OSError("no errno")) == "OSError"
    assert errno_name(BrokenPipeError(32, "Broken pipe")) == "EPIPE"


def test_a_closed_socket_counts_as_hung_up(pair):
    ours, _ = pair
    ours.close()
    assert hung_up(ours)


# -- a departed app's unread packets ------------------------------------------------------------


def test_packets_behind_the_pending_reset_of_an_app_that_left_notices_unread_are_counted(pair):
    """An app that closes with our notices unread leaves ECONNRESET pending on our end, reported
    once before the packets it sent and we never read: each of them is still counted."""
    ours, theirs = pair
    for i in range(5):
        theirs.send(b"\x00bad frame %d" % i)
    ours.send(b"\x01a notice it never reads")
    theirs.close()
    assert discard_unread(ours, 100) == 5
    assert discard_unread(ours, 100) == 0  # EOF now


def test_unread_packets_of_an_app_that_read_everything_are_counted_up_to_the_limit(pair):
    ours, theirs = pair
    for i in range(5):
        theirs.send(b"\x00m%d" % i)
    assert discard_unread(ours, 3) == 3
    theirs.close()
    assert discard_unread(ours, 100) == 2


def test_nothing_unread_is_nothing_counted(pair):
    ours, theirs = pair
    assert discard_unread(ours, 100) == 0  # EAGAIN: the app is still there
    ours.send(b"\x01notice")
    theirs.close()
    assert discard_unread(ours, 100) == 0  # the one reset, then EOF
