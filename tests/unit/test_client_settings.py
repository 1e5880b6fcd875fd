"""connect()'s arguments are checked before any I/O (a socket path that does not exist is never reached)."""

from __future__ import annotations

import pytest

import kmux
import kmux.trio
from kmux import HandshakeInvalid, ReconnectPolicy

NOWHERE = "/nonexistent/kmuxd.sock"


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"group": ""}, HandshakeInvalid, "group"),
        ({"name": "n" * 129}, HandshakeInvalid, "name"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"require_up": "yes"}, TypeError, "require_up"),
        ({"reconnect": "yes"}, TypeError, "reconnect"),
    ],
)
async def test_bad_arguments_fail_before_connecting(kw, exc, match):
    group = kw.pop("group", "g")
    with pytest.raises(exc, match=match):
        kmux.connect(group, NOWHERE, **kw)
    with pytest.raises(exc, match=match):
        await kmux.trio.connect(group, NOWHERE, **kw)


async def test_an_unreachable_daemon_names_the_path():
    with pytest.raises(kmux.DaemonUnavailable, match=f"no daemon listening at {NOWHERE}"):
        kmux.connect("g", NOWHERE)
    with pytest.raises(kmux.DaemonUnavailable, match="gave up reconnecting .* after 2 attempt"):
        await kmux.trio.connect("g", NOWHERE, reconnect=ReconnectPolicy(max_attempts=2, initial_delay=0.001))
