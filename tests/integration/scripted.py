"""A scripted kmuxd: a real SEQPACKET listener playing the daemon's part of docs/protocol.md.

The client library is tested against it where the real daemon cannot be
made to do something on cue (continue a message in pieces of a chosen size,
send a notice between two messages, close mid-message, answer ``up: false``),
and for the daemon side of continuation, which is not written yet.

Each accepted client is served by its own thread with blocking sockets and
bounded waits. The peer does what docs/protocol.md says kmuxd does:

* reads the hello, answers with an accepted map (``max_message``,
  ``framing``, ``steering``, ``up`` as configured) or a refusal;
* joins DATA_MORE/REQUEUE_MORE pieces into messages, counting ``seq`` once
  per message at its first piece, and records every packet's kind and size;
* echoes each whole DATA message (``echo=True``), continuing it in pieces
  when it does not fit its own send buffer (``sndbuf`` caps it, as
  ``net.core.wmem_max`` does on a stock kernel);
* answers ``{"op": "receive", "on": false}`` with the ``receive_off`` marker.

The test drives the rest through :class:`PeerSession` (send a message or a
notice, shut down gracefully, crash, stop reading).

Run as a program it serves until killed, for benchmarks that need the peer
in another process: ``python -m tests.integration.scripted PATH [--flood N]``.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from kmux.framing import PRESETS, Framing
from kmux.protocol import (
    DATA_MORE_PREFIX,
    DATA_PREFIX,
    KIND_CONTROL,
    KIND_DATA,
    KIND_DATA_MORE,
    KIND_MORE,
    KIND_REQUEUE,
    KIND_REQUEUE_MORE,
    Accepted,
    Notice,
    Refused,
    decode_control,
    encode_answer,
    encode_notice,
)
from kmux.sockbuf import PACKET_OVERHEAD

from .helpers import wait_until

#: Every blocking wait of the peer is bounded by this (seconds).
WAIT = 10.0
#: How often a serving thread looks up from a blocked read to see if it should stop.
POLL_MS = 50


@dataclass
class PeerSession:
    """One client as the scripted daemon sees it. Methods may be called from any thread."""

    sock: socket.socket
    daemon: "ScriptedDaemon"
    hello: dict[str, Any] = field(default_factory=dict)
    #: ``(kind, size)`` of every packet after the hello, size without the kind byte
    packets: list[tuple[int, int]] = field(default_factory=list)
    #: whole DATA messages, in order
    messages: list[bytes] = field(default_factory=list)
    #: whole REQUEUE messages, in order
    requeued: list[bytes] = field(default_factory=list)
    #: messages counted (DATA, a continued one once, at its first piece)
    seq: int = 0
    #: why the session ended: "eof", "reset", "closed" (by the test), "bad: ..."
    ended: str | None = None
    reading: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self.reading.set()

    # -- what the test calls ---------------------------------------------------------

    @property
    def sending(self) -> bool:
        """A send of this peer is under way (it holds the session's send lock)."""
        return self._send_lock.locked()

    @property
    def max_packet(self) -> int:
        return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - PACKET_OVERHEAD

    def send_message(self, message: bytes, *, piece: int | None = None) -> int:
        """Send one DATA message, in pieces of ``piece`` bytes (default: as many as fit). Returns the packet count."""
        room = piece or self.max_packet - 1
        with self._send_lock:
            if len(message) <= room:
                self.sock.sendmsg([DATA_PREFIX, message])
                return 1
            view = memoryview(message)
            starts = range(0, len(message), room)
            for start in starts:
                prefix = DATA_MORE_PREFIX if start + room < len(message) else DATA_PREFIX
                self.sock.sendmsg([prefix, view[start : start + room]])
            return len(starts)

    def send_raw(self, packet: bytes) -> None:
        with self._send_lock:
            self.sock.send(packet)

    def send_notice(self, **body: Any) -> None:
        self.send_raw(b"\x01" + msgpack.packb(body))

    def shutdown(self, accepted: int | None = None) -> None:
        """The graceful stop: the ``shutdown`` notice (``accepted`` defaults to what was read), then close."""
        with self._lock:
            seq = self.seq if accepted is None else accepted
        self.send_raw(encode_notice(Notice(event="shutdown", details={"accepted": seq})))
        self.close()

    def close(self) -> None:
        """Close the socket without a word (a crash, as the client sees it)."""
        self.ended = self.ended or "closed"
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def pause(self) -> None:
        """Stop reading this client (its sends block once the socket is full)."""
        self.reading.clear()

    def resume(self) -> None:
        self.reading.set()

    def kinds(self) -> list[int]:
        with self._lock:
            return [k for k, _ in self.packets]

    def wait_messages(self, n: int, timeout: float = WAIT) -> list[bytes]:
        return wait_until(lambda: len(self.messages) >= n and list(self.messages), timeout, f"{n} messages at the peer")

    def wait_ended(self, timeout: float = WAIT) -> str:
        return wait_until(lambda: self.ended, timeout, "the session to end")

    # -- the serving thread ------------------------------------------------------------

    def serve(self) -> None:
        d = self.daemon
        if d.sink:  # benchmarks: read as fast as possible, record nothing
            buf = bytearray(max(d.max_message, 4096) + 2)
            while self.sock.recv_into(buf):
                pass
            return
        cap = max(d.max_message, 4096) + 1
        buf = bytearray(cap + 1)
        view = memoryview(buf)
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        joining: bytearray | None = None
        joining_kind = 0
        resets = 0
        try:
            while self.ended is None and not d.stopping:
                if not self.reading.is_set():
                    self.reading.wait(POLL_MS / 1000)
                    continue
                try:
                    n, _, flags, _ = self.sock.recvmsg_into([buf], 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    poll.poll(POLL_MS)
                    continue
                except ConnectionResetError:  # the client closed with our packets unread;
                    resets += 1  # what it sent before is still queued (docs/protocol.md, NOTICE)
                    if resets > 3:
                        self.ended = "reset"
                        return
                    continue
                if n == 0:
                    self.ended = self.ended or "eof"
                    return
                if flags & socket.MSG_TRUNC:
                    self.ended = f"bad: a packet longer than {cap} bytes"
                    return
                kind, body = buf[0], bytes(view[1:n])
                with self._lock:
                    self.packets.append((kind, len(body)))
                if kind in (KIND_DATA_MORE, KIND_REQUEUE_MORE, KIND_DATA, KIND_REQUEUE):
                    if joining is None:
                        joining, joining_kind = bytearray(), kind & ~KIND_MORE
                        if joining_kind == KIND_DATA:
                            with self._lock:
                                self.seq += 1
                    elif kind & ~KIND_MORE != joining_kind:
                        self.ended = f"bad: kind {kind:#04x} inside a continued message"
                        return
                    joining += body
                    if len(joining) > d.max_message:
                        self.ended = f"bad: a message over max_message ({len(joining)} bytes)"
                        return
                    if kind & KIND_MORE:
                        continue
                    message, joining = bytes(joining), None
                    if joining_kind == KIND_REQUEUE:
                        with self._lock:
                            self.requeued.append(message)
                        continue
                    with self._lock:
                        self.messages.append(message)
                    if d.echo:
                        self.send_message(message)
                elif kind == KIND_CONTROL:
                    if joining is not None:
                        self.ended = "bad: a CONTROL packet inside a continued message"
                        return
                    control = decode_control(body)
                    if control.op == "receive" and control.args["on"] is False:
                        self.send_notice(event="receive_off")
                else:
                    self.ended = f"bad: unknown kind {kind:#04x}"
                    return
        except OSError as exc:
            self.ended = self.ended or f"error: {exc}"
        finally:
            self.sock.close()


class ScriptedDaemon:
    """Listens on ``path`` until :meth:`close`; see the module docstring."""

    def __init__(
        self,
        path: str,
        *,
        max_message: int = 1 << 20,
        framing: Framing = PRESETS["u32be"],
        steering: str = "balance",
        up: bool = True,
        echo: bool = True,
        sndbuf: int | None = None,
        refuse: tuple[str, str] | None = None,
        sink: bool = False,
    ) -> None:
        self.path = path
        self.max_message = max_message
        self.framing = framing
        self.steering = steering
        self.up = up
        self.echo = echo
        self.sndbuf = sndbuf
        self.refuse = refuse
        self.sink = sink
        self.stopping = False
        self.sessions: list[PeerSession] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(path)
        self._listener.listen(64)
        self._listener.settimeout(POLL_MS / 1000)
        self._accepter = threading.Thread(target=self._accept, name=f"scripted:{path}", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        next_id = 1
        while not self.stopping:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            session = PeerSession(sock, self)
            if not self._handshake(session, next_id):
                sock.close()
                continue
            next_id += 1
            self.sessions.append(session)
            thread = threading.Thread(target=session.serve, name=f"scripted-client-{next_id}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handshake(self, session: PeerSession, client_id: int) -> bool:
        sock = session.sock
        if not select.select([sock], [], [], WAIT)[0]:
            return False
        hello = sock.recv(4096)
        if not hello:
            return False
        session.hello = msgpack.unpackb(hello)
        if self.refuse is not None:
            sock.send(encode_answer(Refused(*self.refuse)))
            return False
        if self.sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.max_message + 65536)
        answer = Accepted(group=session.hello["group"], client_id=client_id, max_message=self.max_message,
                          framing=self.framing, steering=self.steering, up=self.up)
        sock.send(encode_answer(answer))
        return True

    def wait_session(self, n: int = 1, timeout: float = WAIT) -> PeerSession:
        """The ``n``-th client (1-based) once it has attached."""
        return wait_until(lambda: len(self.sessions) >= n and self.sessions[n - 1], timeout, f"client {n} to attach")

    def close(self) -> None:
        self.stopping = True
        self._listener.close()
        self._accepter.join(WAIT)
        for s in list(self.sessions):
            s.close()
        for t in self._threads:
            t.join(WAIT)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _main() -> None:  # pragma: no cover - used by tools/client_bench.py
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--max-message", type=int, default=1 << 20)
    parser.add_argument("--no-echo", action="store_true")
    parser.add_argument("--sink", action="store_true", help="read and drop everything, as fast as possible")
    parser.add_argument("--flood", type=int, default=0, help="send this many 64-byte messages to the first client")
    args = parser.parse_args()
    peer = ScriptedDaemon(args.path, max_message=args.max_message, echo=not args.no_echo, sink=args.sink)
    print("ready", flush=True)
    if args.flood:
        session = peer.wait_session(1, timeout=60)
        message = (60).to_bytes(4, "big") + b"x" * 60
        send, packet = session.sock.send, DATA_PREFIX + message
        for _ in range(args.flood):
            send(packet)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        peer.close()


if __name__ == "__main__":
    _main()
