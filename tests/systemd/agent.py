"""Processes the systemd tests run *inside* the sdbox container.

    python agent.py backend --port-file F --records F [--echo]
    python agent.py ping --group G --count N          (kmux.connect: send N, receive N echoes)
    python agent.py refused                           (connect must fail: no permission)
    python agent.py flow --group G --tag T --count N --rate R
                                                      (send N messages, surviving daemon restarts)
    python agent.py libflow ...                       (the same through kmux.connect(..., reconnect=...))
    python agent.py mc --group G --tag T --count N [--secret F]
                                                      (memcached binary SET then GET of N keys through
                                                      kmuxd; whether this user can read F)

Each prints one JSON line on stdout (``backend`` prints nothing: it writes
its port to ``--port-file`` and appends one ``TAG IDX`` line per frame it
receives to ``--records``). It runs with the project's venv interpreter, as
root or as an unprivileged test user, so it imports nothing from tests/.

Test messages are u32be frames ``length, tag (u16), idx (u32), filler``:
the backend records ``(tag, idx)`` so every message can be accounted for.

``flow`` speaks the wire protocol itself (kmux.protocol, docs/protocol.md)
because it must see the daemon's ``shutdown`` notice: ``{"event":
"shutdown", "accepted": N}`` says that this connection's DATA packets up to
seq N were read and will be written; later ones were never read and are
sent again after reconnecting. While kmuxd restarts, systemd keeps the
socket, so the reconnect's connect succeeds at once and its hello waits in
the backlog until the new daemon accepts it.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import selectors
import socket
import struct
import sys
import time

FRAME = struct.Struct(">IHI")
SOCKET = "/run/kmuxd/kmuxd.sock"


def frame(tag: int, idx: int, size: int = 64) -> bytes:
    size = max(size, FRAME.size)
    return FRAME.pack(size - 4, tag, idx) + bytes(size - FRAME.size)


def ident(message: bytes) -> tuple[int, int]:
    _, tag, idx = FRAME.unpack_from(message)
    return tag, idx


# -- backend -----------------------------------------------------------------------


def backend(args: argparse.Namespace) -> None:
    """A loopback TCP service: splits u32be frames, records ``tag idx``, optionally echoes."""
    lsock = socket.create_server(("127.0.0.1", args.port), backlog=128)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ)
    bufs: dict[socket.socket, bytearray] = {}
    records = open(args.records, "a", buffering=1)
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(lsock.getsockname()[1]))
    os.replace(tmp, args.port_file)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if sock is lsock:
                try:
                    conn, _ = lsock.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(True)
                bufs[conn] = bytearray()
                sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(1 << 18)
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
                bufs.pop(sock, None)
                continue
            buf = bufs[sock]
            buf += data
            lines, out, pos = [], bytearray(), 0
            while len(buf) - pos >= 4:
                (n,) = struct.unpack_from(">I", buf, pos)
                if len(buf) - pos < n + 4:
                    break
                msg = bytes(buf[pos : pos + n + 4])
                pos += n + 4
                if len(msg) >= FRAME.size:
                    lines.append("%d %d\n" % ident(msg))
                if args.echo:
                    out += msg
            del buf[:pos]
            if lines:
                records.write("".join(lines))
            if out:
                try:
                    sock.sendall(out)  # blocking: a slow reader only slows this test backend
                except OSError:
                    pass


# -- ping / refused (the client library) ---------------------------------------------


def ping(args: argparse.Namespace) -> dict:
    import kmux

    sent, got = [], []
    with kmux.connect(args.group, SOCKET, name="systemd-test", timeout=10) as client:
        for i in range(1, args.count + 1):
            msg = frame(args.tag, i, 32 + i % 200)
            client.send(msg)
            sent.append(msg)
        while len(got) < len(sent):
            got.append(client.recv(timeout=10))
    return {"uid": os.getuid(), "groups": os.getgroups(), "sent": len(sent), "received": len(got),
            "same": sorted(sent) == sorted(got), "kmux": kmux.__file__}


def refused(args: argparse.Namespace) -> dict:
    import kmux

    out: dict = {"uid": os.getuid(), "groups": os.getgroups()}
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        raw.connect(SOCKET)
        out["raw_errno"] = 0
    except OSError as exc:
        out["raw_errno"] = errno.errorcode.get(exc.errno, str(exc.errno))
    finally:
        raw.close()
    try:
        kmux.connect(args.group, SOCKET, timeout=5).close()
        out["library"] = "connected"
    except kmux.KmuxError as exc:
        out["library"] = f"{exc.code}: {exc}"
    return out


# -- mc: memcached's binary protocol through a group ----------------------------------

MC_HEADER = struct.Struct(">BBHBBHIIQ")  # magic, opcode, keylen, extlen, datatype, vbucket|status, bodylen, opaque, cas


def mc_request(opcode: int, key: bytes, extras: bytes = b"", value: bytes = b"", opaque: int = 0) -> bytes:
    body = extras + key + value
    return MC_HEADER.pack(0x80, opcode, len(key), len(extras), 0, 0, len(body), opaque, 0) + body


def mc(args: argparse.Namespace) -> dict:
    """SET then GET ``count`` keys (opaques 1..count, the same in every agent: the group rewrites them)."""
    import kmux

    out: dict = {"uid": os.getuid(), "set_ok": 0, "get_ok": 0, "errors": []}
    if args.secret:
        try:
            open(args.secret, "rb").close()
            out["secret_readable"] = True
        except OSError as exc:
            out["secret_readable"] = errno.errorcode.get(exc.errno, str(exc.errno))
    with kmux.connect(args.group, SOCKET, name=f"mc-{args.tag}", timeout=10) as client:
        for opcode, field in ((0x01, "set_ok"), (0x00, "get_ok")):
            for i in range(1, args.count + 1):
                key, value = b"k-%d-%d" % (args.tag, i), b"v-%d-%d" % (args.tag, i)
                extras = struct.pack(">II", 0, 0) if opcode == 0x01 else b""
                client.send(mc_request(opcode, key, extras, value if opcode == 0x01 else b"", opaque=i))
                reply = client.recv(timeout=10)
                _, op, keylen, extlen, _, status, _, opaque, _ = MC_HEADER.unpack_from(reply)
                got = reply[MC_HEADER.size + extlen + keylen:]
                if (op, status, opaque) == (opcode, 0, i) and (opcode == 0x01 or got == value):
                    out[field] += 1
                elif len(out["errors"]) < 5:
                    out["errors"].append(f"op {op:#x} status {status:#x} opaque {opaque} value {got[:40]!r}")
    return out


# -- flow: a sender that survives restarts ---------------------------------------------


class Flow:
    """Send messages 1..count at ``rate``/s; after a shutdown notice, reconnect and re-send the unread ones."""

    def __init__(self, args: argparse.Namespace) -> None:
        from kmux import protocol

        self.p = protocol
        self.args = args
        self.pending = list(range(args.count, 0, -1))  # a stack: pop() gives the next idx
        self.resent: set[int] = set()
        self.report = {"tag": args.tag, "count": args.count, "connects": 0, "notices": [], "eof_without_notice": 0,
                       "errors": [], "handshake_retries": 0}

    def connect(self, deadline: float) -> socket.socket:
        """Connect and handshake, retrying while the daemon is away (bounded by ``deadline``)."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(SOCKET)
                sock.send(self.p.encode_hello(self.p.Hello(self.args.group, receive=False, name=f"flow-{self.args.tag}")))
                answer = sock.recv(65536)
                if not answer:
                    raise ConnectionResetError(errno.ECONNRESET, "closed before answering the hello")
                decoded = self.p.decode_answer(answer)
                if isinstance(decoded, self.p.Refused):
                    raise RuntimeError(f"refused: {decoded.code}: {decoded.message}")
                sock.setblocking(False)
                self.report["connects"] += 1
                return sock
            except (OSError, TimeoutError) as exc:
                sock.close()
                self.report["handshake_retries"] += 1
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"could not reconnect: {exc!r}") from None
                time.sleep(0.05)

    def run(self) -> dict:
        args = self.args
        t0 = time.monotonic()
        deadline = t0 + args.deadline
        interval = 1.0 / args.rate
        while self.pending:
            sock = self.connect(deadline)
            try:
                self.session(sock, t0, interval, deadline)
            finally:
                sock.close()
        self.report["resent"] = sorted(self.resent)
        self.report["seconds"] = round(time.monotonic() - t0, 3)
        return self.report

    def session(self, sock: socket.socket, t0: float, interval: float, deadline: float) -> None:
        """One connection: send until done (then linger) or until the daemon goes away."""
        on_conn: list[int] = []  # idx of each DATA packet sent here; its position + 1 is its seq
        accepted = None
        poll = select.poll()
        poll.register(sock, select.POLLIN)
        done_at = None
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError("flow did not finish in time")
            if not self.pending and done_at is None:
                done_at = now
            if done_at is not None and now - done_at >= self.args.linger:
                return
            sent_total = self.args.count - len(self.pending)
            next_at = t0 + sent_total * interval
            if accepted is None and self.pending and now >= next_at:
                idx = self.pending[-1]
                try:
                    sock.send(b"\x00" + frame(self.args.tag, idx, self.args.size))
                except BlockingIOError:
                    poll.modify(sock, select.POLLIN | select.POLLOUT)
                except OSError as exc:
                    if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                        raise
                    self._eof(on_conn, accepted)
                    return
                else:
                    self.pending.pop()
                    on_conn.append(idx)
                    continue
            wait = 0.05 if accepted is not None or not self.pending else max(0.0, min(0.05, next_at - now))
            events = poll.poll(wait * 1000)
            poll.modify(sock, select.POLLIN)
            if not any(ev & (select.POLLIN | select.POLLHUP | select.POLLERR) for _, ev in events):
                continue
            try:
                packet = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.ECONNRESET, errno.ENOTCONN):
                    raise
                packet = b""
            if not packet:
                self._eof(on_conn, accepted)
                return
            if packet[0] == self.p.KIND_NOTICE:
                notice = self.p.decode_notice(memoryview(packet)[1:])
                if notice.event == "shutdown":
                    accepted = int(notice.details["accepted"])
                    self.report["notices"].append({"accepted": accepted, "sent_here": len(on_conn)})
                elif notice.code is not None:
                    self.report["errors"].append(f"{notice.code}: {notice.message}")

    def _eof(self, on_conn: list[int], accepted: int | None) -> None:
        """The daemon closed the connection: re-send what it did not read."""
        if accepted is None:
            # No notice (a crash): we cannot know; re-send everything sent here.
            self.report["eof_without_notice"] += 1
            accepted = 0
        unread = on_conn[accepted:]
        self.resent.update(unread)
        self.pending.extend(reversed(unread))


def libflow(args: argparse.Namespace) -> dict:
    """Like ``flow``, through the client library's reconnect helper (``kmux.connect(reconnect=...)``)."""
    import kmux

    policy = kmux.ReconnectPolicy(deadline=args.deadline)
    t0 = time.monotonic()
    with kmux.connect(args.group, SOCKET, receive=False, name=f"libflow-{args.tag}", timeout=10,
                      reconnect=policy) as client:
        for idx in range(1, args.count + 1):
            delay = t0 + (idx - 1) / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            client.send(frame(args.tag, idx, args.size))
        time.sleep(args.linger)  # stay connected a moment after the last send, as the flow agent does
        stats = client.stats()
    return {"tag": args.tag, "count": args.count, "stats": stats, "seconds": round(time.monotonic() - t0, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backend")
    b.add_argument("--port", type=int, default=0)
    b.add_argument("--port-file", required=True)
    b.add_argument("--records", required=True)
    b.add_argument("--echo", action="store_true")
    for name in ("ping", "refused", "flow", "libflow", "mc"):
        s = sub.add_parser(name)
        s.add_argument("--group", default="echo")
        s.add_argument("--tag", type=int, default=1)
        s.add_argument("--count", type=int, default=100)
        s.add_argument("--rate", type=float, default=1000.0)
        s.add_argument("--size", type=int, default=64)
        s.add_argument("--linger", type=float, default=0.3)
        s.add_argument("--deadline", type=float, default=60.0)
        s.add_argument("--secret", help="mc: a file this user should not be able to read")
    args = parser.parse_args()
    if args.cmd == "backend":
        backend(args)
        return
    result = {"ping": ping, "refused": refused, "flow": lambda a: Flow(a).run(), "libflow": libflow,
              "mc": mc}[args.cmd](args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
