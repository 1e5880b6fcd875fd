"""The client library end to end with a real kmuxd: large messages and ``require_up``.

Both run on both transports. The large-message test runs daemon and client
under the stock kernel's send buffer limit (``KMUX_WMEM_MAX=212992``) and
first proves that the kernel really refuses a packet of that size, so it
cannot pass by accident on a machine with larger buffers.
"""

from __future__ import annotations

from typing import Any

import pytest

import kmux
from kmux import sockbuf

from .helpers import group_config
from .test_client_transports import MAX, STOCK, assert_stock_limit_is_real, message
from .transports import transport  # noqa: F401 -- the fixture

#: A group whose only endpoint has nothing listening: it never has a connection up.
DOWN_GROUP: dict[str, Any] = {
    "endpoints": ["127.0.0.1:1"],
    "connections": 1,
    "max_message": 65536,
    "reconnect_initial": 0.05,
    "reconnect_max": 0.2,
    "connect_timeout": 2.0,
}


async def test_1mib_messages_both_ways_under_the_stock_limit(transport, backend_factory, daemon_factory,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Both the daemon (it inherits the environment) and this client size their
    # sockets as on a stock kernel, where one packet carries at most ~416 KiB.
    monkeypatch.setenv(sockbuf.WMEM_MAX_ENV, str(STOCK))
    assert_stock_limit_is_real()
    backend = backend_factory(echo=True)
    daemon = daemon_factory({"echo": group_config(backend, connections=2, max_message=MAX)})
    backend.wait_open(2)
    c = await transport.connect("echo", daemon.socket_path)
    msgs = [message(MAX, seed=i) for i in range(3)] + [message(100, seed=9)]
    for i, m in enumerate(msgs, 1):
        assert await c.send(m) == i
    got = [await c.recv(timeout=10) for _ in msgs]
    assert sorted(got) == sorted(msgs)
    st = c.raw.statistics()
    assert (st.continued_sent, st.continued_received) == (3, 3)


async def test_require_up_attaches_to_a_group_with_a_connection_up(transport, backend_factory,
                                                                   daemon_factory) -> None:
    backend = backend_factory(echo=True)
    daemon = daemon_factory({"ok": group_config(backend, connections=1), "down": DOWN_GROUP})
    backend.wait_open(1)
    c = await transport.connect("ok", daemon.socket_path, require_up=True)
    assert c.raw.up is True
    m = message(64, seed=1)
    await c.send(m)
    assert await c.recv() == m


async def test_require_up_refuses_a_group_with_no_connection_up(transport, backend_factory,
                                                                daemon_factory) -> None:
    backend = backend_factory(echo=True)
    daemon = daemon_factory({"ok": group_config(backend, connections=1), "down": DOWN_GROUP})
    backend.wait_open(1)
    with pytest.raises(kmux.GroupUnavailable):
        await transport.connect("down", daemon.socket_path, require_up=True)
    c = await transport.connect("down", daemon.socket_path)  # without require_up it attaches
    assert c.raw.up is False
