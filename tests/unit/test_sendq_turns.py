"""Turns when the connections are the bottleneck: a pinned client yields to waiting ones.

The scheduler keeps a client's messages on the stream it already uses
(pinning, for per-client order). Without a turn rule, a pinned client that
keeps refilling an outbox its connection cannot drain holds that
connection for as long as it keeps sending: the outbox never empties, so
it never comes free for the clients waiting for one. These tests pin down
the rule: while anyone waits for a connection, a pinned client takes no
more room; the connection, once drained, goes to the longest waiter, and
the pinned client waits behind it.
"""

from __future__ import annotations

from .test_sendq import Owner, frame, make, put, write


def test_a_pinned_client_takes_no_more_room_while_another_waits():
    tx, (c,) = make(1, capacity=256)
    a, b = Owner(1), Owner(2)
    assert tx.route(a) is c
    put(tx, a, c, frame(1, 1), frame(1, 2))
    tx.blocked(c)  # the kernel refused part of the write: the connection is the bottleneck
    assert tx.route(b) is None  # b waits
    assert tx.route(a) is None  # a is pinned to c, but b waits: a parks, it does not refill
    woken = write(tx, c)  # written out: the connection goes to the longest waiter, then a
    assert b in woken and a in woken
    assert tx.route(b) is c
    put(tx, b, c, frame(2, 1))
    assert tx.route(a) is c  # nobody waits any more: a shares the batch again
    put(tx, a, c, frame(1, 3))
    write(tx, c)
    assert bytes(c.wire) == frame(1, 1) + frame(1, 2) + frame(2, 1) + frame(1, 3)


def test_without_waiters_a_pinned_client_keeps_filling_its_outbox():
    tx, (c, d) = make(2, capacity=256)
    a = Owner(1)
    assert tx.route(a) is c
    put(tx, a, c, frame(1, 1))
    write(tx, c, limit=8)  # part of the message written: a stays pinned
    assert tx.route(a) is c  # nobody waits: batching goes on, order kept
    put(tx, a, c, frame(1, 2))
    write(tx, c)
    assert bytes(c.wire) == frame(1, 1) + frame(1, 2)
