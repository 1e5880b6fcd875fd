"""rpcbind (the Debian package) behind kmuxd: ONC RPC over TCP with ``framing = "oncrpc"``.

rpcbind binds ``0.0.0.0:111`` and ``[::]:111`` whatever ``-h`` says, so it
runs in a network namespace the test makes (``ip netns add``, loopback up),
and kmuxd with it (``ip netns exec``; its Unix sockets are files, so the
apps reach it from outside). It also writes ``/run/rpcbind.sock`` and
``/run/rpcbind.lock``: it runs in a mount namespace of its own with a fresh
tmpfs on ``/run`` (``unshare --mount``), so concurrent runs, or a system
rpcbind, never share its lock, and nothing is left behind. ``-f`` keeps it
in the foreground; ``-s`` makes it run as user ``daemon`` (without it, it
switches to ``_rpc``, which may not exist, and exits with only a syslog
line).

rpcbind accepts ``PMAPPROC_SET`` and ``UNSET`` over TCP from 127.0.0.1, so
the test registers programs of its own (distinct numbers, each with a
distinct port), looks them up, and removes them again:

* 20 clients x 100 ``PMAPPROC_GETPORT`` calls, each for a different
  registered program, every client numbering its calls with the same XIDs
  1..100, ten in flight at once, through ``id`` steering on the XID with
  rewrite. A reply belongs to its call when it comes back to the client
  that made the call, under that call's XID, with the port registered for
  that call's program. The test counts calls and mismatches.
* ``PMAPPROC_DUMP`` of those 2,000 registrations: rpcbind (libtirpc) sends
  the 40 KB reply as a record of several fragments of about 9,000 bytes.
  It arrives as one message, marks included, listing every registration.

Calls go to rpcbind in one fragment each, as libtirpc's clients send them:
rpcbind (libtirpc 1.3.3's non-blocking TCP server) answers a call of
several fragments with ``GARBAGE_ARGS`` and then resets the connection.
Calls of several fragments are tested against the scripted server in
``tests/integration/test_records.py``.
"""

from __future__ import annotations

import os
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

import kmux

from tests.integration.helpers import wait_until
from tests.integration.oncrpc import (
    IPPROTO_TCP,
    PMAPPROC_DUMP,
    PMAPPROC_GETPORT,
    PMAPPROC_SET,
    PMAPPROC_UNSET,
    USER_PROGRAMS,
    body_of,
    call,
    dump_entries,
    fragments_of,
    mapping,
    parse_reply,
    record,
)

from . import run_threads
from .conftest import ServerProcess, assert_request_counters, find_binary, group_stats

RPCBIND_PORT = 111
CLIENTS = 20
CALLS = 100
WINDOW = 10
#: Ports the test registers: one per program, all distinct, so a reply names its call.
PORT_BASE = 20000
#: Files rpcbind leaves in /run: the test must never touch the host's.
RUN_FILES = (Path("/run/rpcbind.sock"), Path("/run/rpcbind.lock"))


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@pytest.fixture
def rpcbind_netns(short_dir):
    """rpcbind in a network namespace and a mount namespace of its own; its namespace's name."""
    if os.geteuid() != 0:
        pytest.skip("rpcbind binds port 111 on every address: it runs in a network namespace, which needs root")
    binary = find_binary("rpcbind")
    if binary is None:
        pytest.skip("rpcbind is not installed (./dev.sh test installs the Debian package 'rpcbind')")
    for tool in ("ip", "unshare", "mount"):
        if find_binary(tool) is None:
            pytest.skip(f"{tool} is not installed (iproute2, util-linux, mount)")
    host_files = {p: p.exists() for p in RUN_FILES}
    name = f"kmx-rpc-{uuid.uuid4().hex[:8]}"
    made = _ip("netns", "add", name)
    if made.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {made.stderr.strip()}")
    server = None
    try:
        assert _ip("netns", "exec", name, "ip", "link", "set", "lo", "up").returncode == 0
        script = 'mount -t tmpfs -o size=1m,mode=0755 kmux-rpcbind /run && exec "$0" -f -s'
        server = ServerProcess(["ip", "netns", "exec", name, "unshare", "--mount", "--propagation", "private",
                                "sh", "-c", script, binary], short_dir / "rpcbind.log", RPCBIND_PORT)
        yield name, server
    finally:
        if server is not None:
            server.stop()
        _ip("netns", "del", name)
        for path, existed in host_files.items():
            assert existed or not path.exists(), f"rpcbind left {path} on the host"


def start_kmuxd(rpcbind_netns, daemon_factory, **group):
    name, server = rpcbind_netns
    cfg = {"endpoints": [f"127.0.0.1:{RPCBIND_PORT}"], "connections": 4, "framing": "oncrpc", "steering": "id",
           "id": {"request_offset": 4, "response_offset": 4, "size": 4, "rewrite": True},
           "max_message": 65536, "request_timeout": 10.0, "reconnect_initial": 0.05, "reconnect_max": 0.2,
           "connect_timeout": 1.0}
    cfg.update(group)
    daemon = daemon_factory({"g": cfg}, prefix=["ip", "netns", "exec", name])

    def up() -> bool:
        assert server.alive(), f"rpcbind exited with {server.proc.returncode}:\n{server.output()}"
        return group_stats(daemon)["connections_up"] == cfg["connections"]

    wait_until(up, 10.0, "kmuxd connected to rpcbind in the namespace")
    return daemon


def pipeline(c: kmux.Client, calls: list[tuple[int, bytes]], window: int = WINDOW) -> tuple[dict[int, bytes], int]:
    """Send records ``(xid, record)`` with up to ``window`` in flight. Returns the reply body to
    each XID, and how many replies came under an XID with no call of this client in flight
    (strays: replies that belong to someone else's call)."""
    replies: dict[int, bytes] = {}
    pending: set[int] = set()
    strays = 0
    todo = list(calls)
    while todo or pending:
        while todo and len(pending) < window:
            xid, rec = todo.pop(0)
            c.send(rec)
            pending.add(xid)
        try:
            body = body_of(c.recv(timeout=10.0))
        except TimeoutError:
            raise AssertionError(f"no reply to XIDs {sorted(pending)} within 10 s ({strays} strays)") from None
        xid = parse_reply(body).xid
        if xid in pending:
            pending.remove(xid)
            replies[xid] = body
        else:
            strays += 1
    return replies, strays


def portmap(proc: int, xid: int, prog: int, port: int = 0, fragments: list[int] | None = None) -> bytes:
    return record(call(xid, proc, mapping(prog, 1, IPPROTO_TCP, port)), fragments)


def result_word(body: bytes) -> int:
    return struct.unpack(">I", parse_reply(body).result)[0]


def test_rpcbind_answers_every_client_its_own_calls_through_xid_rewrite(rpcbind_netns, daemon_factory):
    daemon = start_kmuxd(rpcbind_netns, daemon_factory)
    total = CLIENTS * CALLS
    base = USER_PROGRAMS + (os.getpid() % 1000) * 4096
    programs = {k: (base + k, PORT_BASE + k) for k in range(total)}

    with daemon.connect(name="registrar") as reg:
        sets = [(k + 1, portmap(PMAPPROC_SET, k + 1, prog, port)) for k, (prog, port) in programs.items()]
        done, strays = pipeline(reg, sets, window=50)
        assert strays == 0 and all(result_word(b) == 1 for b in done.values()), "a PMAPPROC_SET failed"

    def client(i: int) -> tuple[int, int]:
        calls = 0
        mine = {j + 1: programs[i * CALLS + j] for j in range(CALLS)}  # XIDs 1..100 in every client
        with daemon.connect(name=f"getport{i}") as c:
            replies, mismatches = pipeline(c, [(xid, portmap(PMAPPROC_GETPORT, xid, prog))
                                               for xid, (prog, _) in mine.items()])
            for xid, (_, port) in mine.items():  # the port registered for this call's program
                calls += 1
                mismatches += result_word(replies[xid]) != port
            with pytest.raises(TimeoutError):
                c.recv(timeout=0.1)  # no reply left over, none duplicated
        return calls, mismatches

    results = run_threads(CLIENTS, client, timeout=60)
    calls = sum(r[0] for r in results)
    mismatches = sum(r[1] for r in results)

    with daemon.connect(name="dump") as c:
        c.send(record(call(1, PMAPPROC_DUMP)))
        dump = c.recv(timeout=10.0)
        fragments = fragments_of(dump)
        entries = dump_entries(parse_reply(body_of(dump)).result)
        ours = {(prog, port) for prog, _, prot, port in entries if prot == IPPROTO_TCP and prog >= base}
        unsets = [(k + 1, portmap(PMAPPROC_UNSET, k + 1, prog)) for k, (prog, _) in programs.items()]
        done, strays = pipeline(c, unsets, window=50)
        assert strays == 0 and all(result_word(b) == 1 for b in done.values()), "a PMAPPROC_UNSET failed"
        gone, _ = pipeline(c, [(1, portmap(PMAPPROC_GETPORT, 1, programs[0][0]))])
        assert result_word(gone[1]) == 0  # unregistered: port 0

    print(f"rpcbind through kmuxd (oncrpc, id steering on the XID with rewrite): {CLIENTS} clients, {calls} "
          f"PMAPPROC_GETPORT calls, {mismatches} mismatches; PMAPPROC_DUMP reply {len(dump)} bytes in "
          f"{len(fragments)} fragments {fragments}")
    assert calls == total
    assert mismatches == 0
    assert len(fragments) > 1, "rpcbind sent the dump in one fragment: the multi-fragment path went untested"
    assert ours == set(programs.values())
    g = assert_request_counters(daemon)
    assert g["refused"] == 0


def test_rpcbind_calls_too_short_for_the_xid_are_refused_before_they_reach_it(rpcbind_netns, daemon_factory):
    """A call whose first fragment ends inside the XID cannot have its XID rewritten in place:
    the client's own check and the daemon's refuse it alike, and rpcbind never sees it."""
    daemon = start_kmuxd(rpcbind_netns, daemon_factory, connections=1)
    bad = portmap(PMAPPROC_GETPORT, 7, USER_PROGRAMS, fragments=[3])
    with daemon.connect() as c:
        with pytest.raises(kmux.BadFrame, match="needs its first 8 bytes in the first fragment"):
            c.send(bad)
    with daemon.connect(validate=False) as c:
        seq = c.send(bad)
        with pytest.raises(kmux.BadFrame) as info:
            c.recv(timeout=5.0)
        assert info.value.seq == seq
        replies, _ = pipeline(c, [(8, portmap(PMAPPROC_GETPORT, 8, USER_PROGRAMS))])
        assert result_word(replies[8]) == 0
    g = group_stats(daemon)
    assert g["refused"] == 1 and g["connections_up"] == 1
    _, server = rpcbind_netns
    assert server.alive()
