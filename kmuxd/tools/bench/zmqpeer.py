"""The ZeroMQ peer: a broker of kmuxd's shape, and the service behind it.

    python -m kmuxd.tools.bench.zmqpeer broker --ipc PATH --backend-port PORT
    python -m kmuxd.tools.bench.zmqpeer echo|sink

* ``broker``: ``zmq.proxy(ROUTER, DEALER)``. The ROUTER binds ``ipc://PATH``
  (a Unix stream socket: the apps' side, as kmuxd's SEQPACKET socket); the
  DEALER connects to ``tcp://127.0.0.1:PORT`` (the service's side). libzmq
  does the relaying in C on its I/O thread and the proxy loop (also C); the
  Python process only sets it up. Prints ``listening`` once bound and
  connected.
* ``echo``: the service for request/response: a ROUTER on tcp, forwarded to
  itself with ``zmq.proxy(router, router)`` (libzmq sends each message back
  on the socket it came from, in C).
* ``sink``: the service for the one-way flood: a ROUTER on tcp that counts
  messages and bytes, in Python (``recv_multipart`` per message). It speaks
  the backend's control protocol (:mod:`kmuxd.tools.backend`): ``listening
  PORT``, then ``mark`` on stdin answers ``mark MSGS BYTES MONOTONIC CPU``.
  Being Python, it may cap the zmq flood at small sizes; the bench reports
  its CPU so that shows.

The load generator speaks ZMTP 3.0 to the broker as a DEALER (loadgen.c).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import zmq

#: Messages buffered per socket before back-pressure (libzmq's high-water
#: mark; its default). The bench lowers it for large messages (--hwm), so
#: the queues hold a bounded number of bytes.
DEFAULT_HWM = 1000
#: Sink: seconds between looks at the control pipe when idle.
POLL_MS = 100


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def broker(ipc: str, backend_port: int, hwm: int) -> None:
    ctx = zmq.Context(io_threads=1)
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.DEALER)
    for s in (front, back):
        s.setsockopt(zmq.SNDHWM, hwm)
        s.setsockopt(zmq.RCVHWM, hwm)
        s.setsockopt(zmq.LINGER, 0)
    front.bind(f"ipc://{ipc}")
    back.connect(f"tcp://127.0.0.1:{backend_port}")
    _say("listening")
    zmq.proxy(front, back)


def echo(hwm: int) -> None:
    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    _say(f"listening {port}")
    zmq.proxy(sock, sock)


def sink(hwm: int) -> None:
    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.RCVHWM, hwm)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    os.set_blocking(sys.stdin.fileno(), False)
    _say(f"listening {port}")
    msgs = nbytes = 0
    pending = b""
    recv = sock.recv_multipart
    while True:
        ready = dict(poller.poll(POLL_MS))
        if sock in ready:
            try:
                for _ in range(10_000):  # bounded: the control pipe gets its turn
                    frames = recv(zmq.NOBLOCK, copy=False)
                    msgs += 1
                    nbytes += len(frames[-1])  # the payload; frame 0 is the broker's routing id
            except zmq.Again:
                pass
        if sys.stdin.fileno() in ready:
            chunk = os.read(sys.stdin.fileno(), 4096)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.strip() == b"mark":
                    t = os.times()
                    _say(f"mark {msgs} {nbytes} {time.monotonic():.6f} {t.user + t.system:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kmuxd.tools.bench.zmqpeer",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("role", choices=("broker", "echo", "sink"))
    parser.add_argument("--ipc", help="broker: the apps' ipc socket path")
    parser.add_argument("--backend-port", type=int, help="broker: the service's TCP port on 127.0.0.1")
    parser.add_argument("--hwm", type=int, default=DEFAULT_HWM, help="messages queued per socket and direction")
    args = parser.parse_args(argv)
    if not 1 <= args.hwm <= 1_000_000:
        parser.error("--hwm: 1..1000000")
    if args.role == "broker":
        if not args.ipc or not args.backend_port:
            parser.error("broker needs --ipc and --backend-port")
        broker(args.ipc, args.backend_port, args.hwm)
    elif args.role == "echo":
        echo(args.hwm)
    else:
        sink(args.hwm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
