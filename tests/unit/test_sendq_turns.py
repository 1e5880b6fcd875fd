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
    assert tx.route(b) is None  # the only connection is busy: b waits
    write(tx, c, limit=16)  # the kernel took one message: a still pinned, room again
    assert c.outbox.has_room()
    assert tx.route(a) is None  # a yields its turn
    woken = write(tx, c)  # drained: the connection goes to the longest waiter
    assert b in woken
    assert tx.route(b) is c
    put(tx, b, c, frame(2, 1))
    assert tx.route(a) is None  # a waits behind b
    assert a in write(tx, c)
    assert tx.route(a) is c
    assert bytes(c.wire) == frame(1, 1) + frame(1, 2) + frame(2, 1)


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
