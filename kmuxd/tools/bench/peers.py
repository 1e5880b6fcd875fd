"""The parties of one benchmark run: the services, kmuxd, and its peers.

All of them start once per run and stay up; each cell only points clients
at one of them. Every one listens on 127.0.0.1 or a Unix socket in the run
directory, nowhere else. A peer that cannot run here (package missing, no
compiler) is recorded in :attr:`Parties.skipped` with the reason, and every
cell that needs it is skipped with that reason.

* ``memcached`` (Debian package), protocol auto-detected (binary for kmuxd,
  direct clients and nothing else; ASCII for twemproxy, which speaks only
  that), preloaded with the keys the requests read.
* ``sink``: :mod:`kmuxd.tools.backend` in sink mode (u32be), for the flood.
* ``kmuxd``: one daemon for the whole run, one group per configuration:
  ``flood1``/``flood4`` (u32be, balance, to the sink) and
  ``{balance,fifo,id}{1,4}`` (memcached-binary to memcached; ``id`` steers
  on the 4-byte opaque at offset 12 with rewrite), so no restart between cells.
* ``twemproxy`` (Debian ``nutcracker``): pools ``mc1``/``mc4`` with
  ``server_connections`` 1 and 4 to the same memcached, on TCP; and
  ``mcunix`` (4 connections) on a Unix socket, for the Python clients' rows
  (a local app's way in, as kmuxd's).
* ``zmq``: two brokers (:mod:`.zmqpeer`), one in front of a zmq echo service,
  one in front of a zmq sink.
* ``crelay``: ``relay.c``, built by the bench with the system compiler, to the sink.
* ``tls`` (:mod:`.tlspeer`): kmuxd's TLS groups ``flood4tls`` (to a TLS
  terminator in front of the same sink) and ``{steering}4tls`` (to a second
  memcached with ``-Z``), with certificates made for the run.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmux.control import ControlClient

from ..backend import BackendProcess
from ..demo import DaemonProcess
from .procs import Child, build_c, find_binary, free_port
from .tlspeer import SERVER_NAME, make_certs

HERE = Path(__file__).parent
STEERINGS = ("balance", "fifo", "id")
CONNECTION_COUNTS = (1, 4)
#: memcached: threads, memory (MB), most connections (idle and churn clients go to kmuxd, not here).
MEMCACHED_ARGS = ("-t", "2", "-m", "64", "-c", "4096", "-U", "0")
#: Request/response messages are 64 bytes each way: a binary GET with a
#: 40-byte key (24 + 40) answered by 4 bytes of flags and a 36-byte value
#: (24 + 4 + 36); twemproxy gets the ASCII GET of a 58-byte key (also 64 bytes).
BIN_KEY = b"kmux-bench:" + b"k" * 29
ASCII_KEY = b"kmux-bench:" + b"a" * 47
VALUE = b"v" * 36
#: Clients kmuxd must accept at once (the idle workload) and its hello timeout.
KMUXD_MAX_CLIENTS = 20_000
#: Bytes the zmq broker and sink may queue per socket and direction: the
#: high-water mark (in messages) is this over the largest flood message,
#: at most libzmq's default of 1000.
ZMQ_QUEUE_BYTES = 32 * 1024 * 1024
ZMQ_MAX_HWM = 1000
#: Seconds to wait until every connection of every group is up.
CONNECT_TIMEOUT = 15.0
CONNECT_POLL = 0.05


def mc_request(opcode: int, key: bytes, value: bytes = b"", extras: bytes = b"", opaque: int = 0) -> bytes:
    """A memcached binary-protocol request."""
    body = len(extras) + len(key) + len(value)
    return struct.pack(">BBHBBHIIQ", 0x80, opcode, len(key), len(extras), 0, 0, body, opaque, 0) + extras + key + value


GET_REQUEST = mc_request(0x00, BIN_KEY)
ASCII_GET_REQUEST = b"get " + ASCII_KEY + b"\r\n"
assert len(GET_REQUEST) == 64 and len(ASCII_GET_REQUEST) == 64


def group_name(steering: str, connections: int) -> str:
    return f"{steering}{connections}"


@dataclass
class Parties:
    run_dir: Path
    loadgen: Path | None = None
    memcached: Child | None = None
    memcached_port: int = 0
    sink: BackendProcess | None = None
    daemon: DaemonProcess | None = None
    socket_path: str = ""
    twemproxy: Child | None = None
    twemproxy_ports: dict[int, int] = field(default_factory=dict)
    twemproxy_unix: str = ""
    zmq_echo: Child | None = None
    zmq_sink: Child | None = None
    zmq_broker_rr: Child | None = None
    zmq_broker_flood: Child | None = None
    zmq_ipc_rr: str = ""
    zmq_ipc_flood: str = ""
    crelay: Child | None = None
    crelay_path: str = ""
    tls_term: Child | None = None
    tls_term_port: int = 0
    memcached_tls: Child | None = None
    memcached_tls_port: int = 0
    tls_ca: str = ""
    skipped: dict[str, str] = field(default_factory=dict)

    def children(self) -> list[Any]:
        # Stop order: clients' side first, services last (so queues drain into them).
        return [self.crelay, self.zmq_broker_flood, self.zmq_broker_rr, self.zmq_sink, self.zmq_echo,
                self.twemproxy, self.daemon, self.tls_term, self.sink, self.memcached, self.memcached_tls]

    def stop(self) -> list[dict[str, Any]]:
        finals: list[dict[str, Any]] = []
        for child in self.children():
            if child is None:
                continue
            try:
                result = child.stop()
                if child is self.daemon:
                    finals = result
            except RuntimeError:
                pass
            if child.proc.poll() is None:
                child.kill()
        return finals


# -- starting ---------------------------------------------------------------------------------


def start_all(run_dir: Path, want: set[str], largest_message: int = 64, daemon_cpu: int | None = None,
              tls: bool = True) -> Parties:
    """Start what the selected workloads need; peers that cannot run go to ``skipped``.
    If anything needed fails to start, what did start is stopped before the error propagates."""
    p = Parties(run_dir)
    try:
        _start(p, want, largest_message, daemon_cpu, tls)
    except BaseException:
        p.stop()
        raise
    return p


def _start(p: Parties, want: set[str], largest_message: int, daemon_cpu: int | None, tls: bool) -> None:
    run_dir = p.run_dir
    loadgen, why = build_c(HERE / "loadgen.c", run_dir / "loadgen")
    if loadgen is None:
        raise RuntimeError(f"cannot build the load generator: {why}")
    p.loadgen = loadgen
    with open(run_dir / "sink.log", "wb") as sink_log:  # the child keeps its own descriptor
        p.sink = BackendProcess("sink", report=run_dir / "sink.json", stderr=sink_log)
    needs_rr = bool(want & {"rr", "open", "latency", "app"})
    if needs_rr:
        _start_memcached(p)
    if tls:
        _start_tls(p, flood="flood" in want, rr=needs_rr)
    p.socket_path = str(run_dir / "kmuxd.sock")
    config = run_dir / "kmuxd.toml"
    config.write_text(kmuxd_config(p.socket_path, p.sink.port, p.memcached_port, p))
    p.daemon = DaemonProcess(config, run_dir / "kmuxd.log", cpu=daemon_cpu)
    p.daemon.wait_ready(CONNECT_TIMEOUT)
    _wait_groups_up(str(run_dir / "control.sock"))
    if needs_rr:
        _start_twemproxy(p)
    _start_zmq(p, flood="flood" in want, rr=needs_rr,
               hwm=max(1, min(ZMQ_MAX_HWM, ZMQ_QUEUE_BYTES // max(64, largest_message))))
    if "flood" in want:
        _start_crelay(p)


def kmuxd_config(socket_path: str, sink_port: int, memcached_port: int, tls: Parties | None = None) -> str:
    lines = [
        "# Written by kmuxd's benchmark; safe to delete.",
        "version = 1",
        "[daemon]",
        f"socket = {json.dumps(socket_path)}",
        'socket_mode = "0600"',
        'log_format = "json"',
        f"max_clients = {KMUXD_MAX_CLIENTS}",
        "max_clients_per_uid = 0",
    ]
    for n in CONNECTION_COUNTS:
        lines += [f"[groups.flood{n}]", f'endpoints = ["127.0.0.1:{sink_port}"]', f"connections = {n}",
                  'framing = "u32be"', 'steering = "balance"']
    if memcached_port:
        for steering in STEERINGS:
            for n in CONNECTION_COUNTS:
                lines += [f"[groups.{group_name(steering, n)}]", f'endpoints = ["127.0.0.1:{memcached_port}"]',
                          f"connections = {n}", 'framing = "memcached-binary"', f'steering = "{steering}"',
                          "max_message = 65536"]
                if steering != "balance":
                    lines += ['unmatched = "drop"', "request_timeout = 10.0"]
                if steering == "id":
                    lines += [f"[groups.{group_name(steering, n)}.id]", "request_offset = 12", "response_offset = 12",
                              "size = 4", "rewrite = true"]
    if tls is not None:
        lines += _tls_groups(tls)
    return "\n".join(lines) + "\n"


def _tls_groups(p: Parties) -> list[str]:
    """The TLS twins of flood4 and {steering}4, same settings plus [tls]; a group per party that runs."""
    lines: list[str] = []
    tls_table = ["ca = " + json.dumps(p.tls_ca), f'server_name = "{SERVER_NAME}"']
    if p.tls_term_port:
        lines += ["[groups.flood4tls]", f'endpoints = ["127.0.0.1:{p.tls_term_port}"]', "connections = 4",
                  'framing = "u32be"', 'steering = "balance"', "[groups.flood4tls.tls]", *tls_table]
    if p.memcached_tls_port:
        for steering in STEERINGS:
            name = group_name(steering, 4) + "tls"
            lines += [f"[groups.{name}]", f'endpoints = ["127.0.0.1:{p.memcached_tls_port}"]', "connections = 4",
                      'framing = "memcached-binary"', f'steering = "{steering}"', "max_message = 65536"]
            if steering != "balance":
                lines += ['unmatched = "drop"', "request_timeout = 10.0"]
            lines += [f"[groups.{name}.tls]", *tls_table]
            if steering == "id":
                lines += [f"[groups.{name}.id]", "request_offset = 12", "response_offset = 12", "size = 4",
                          "rewrite = true"]
    return lines


def _wait_groups_up(control_path: str) -> None:
    deadline = time.monotonic() + CONNECT_TIMEOUT
    last: Any = None
    while time.monotonic() < deadline:
        try:
            with ControlClient(control_path, timeout=5.0) as c:
                groups = c.request("stats")["groups"]
            last = {g["name"]: (g["connections_up"], g["connections_total"]) for g in groups}
            if all(up == total for up, total in last.values()):
                return
        except Exception as exc:  # noqa: BLE001 -- not up yet (no socket, no answer): retry, and say it if time runs out
            last = exc
        time.sleep(CONNECT_POLL)
    raise RuntimeError(f"kmuxd's groups did not all connect within {CONNECT_TIMEOUT} s: {last}")


def _start_memcached(p: Parties) -> None:
    binary = find_binary("memcached")
    if binary is None:
        raise RuntimeError("memcached is not installed (./dev.sh bench installs the Debian package)")
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    p.memcached_port = free_port()
    p.memcached = Child("memcached", [binary, "-l", "127.0.0.1", "-p", str(p.memcached_port), *MEMCACHED_ARGS,
                                      *user], p.run_dir / "memcached.log")
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        try:
            _preload(p.memcached_port)
            return
        except OSError as exc:
            if time.monotonic() > deadline or p.memcached.proc.poll() is not None:
                raise RuntimeError(f"memcached did not answer: {exc}\n{p.memcached.log_tail()}") from None
            time.sleep(CONNECT_POLL)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("memcached closed the connection")
        out += chunk
    return out


def _preload(port: int, tls: ssl.SSLContext | None = None) -> None:
    """SET the binary key (binary protocol) and the ASCII key (ASCII protocol), then check both.
    With ``tls`` (memcached -Z): over TLS, and the binary key only (twemproxy is not behind TLS)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as raw:
        s = tls.wrap_socket(raw, server_hostname=SERVER_NAME) if tls is not None else raw
        s.sendall(mc_request(0x01, BIN_KEY, VALUE, extras=struct.pack(">II", 0, 0)))
        head = _recv_exact(s, 24)
        _recv_exact(s, struct.unpack_from(">I", head, 8)[0])
        if struct.unpack_from(">H", head, 6)[0] != 0:
            raise OSError(f"memcached refused the binary SET: {head!r}")
        s.sendall(GET_REQUEST)
        head = _recv_exact(s, 24)
        body = _recv_exact(s, struct.unpack_from(">I", head, 8)[0])
        if len(head) + len(body) != 64 or body[4:] != VALUE:
            raise OSError(f"memcached GET answered {len(head) + len(body)} bytes, not the 64 planned")
    if tls is not None:
        return
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
        s.sendall(b"set " + ASCII_KEY + b" 0 0 %d\r\n" % len(VALUE) + VALUE + b"\r\n")
        if _recv_exact(s, 8) != b"STORED\r\n":
            raise OSError("memcached refused the ASCII set")


def _start_tls(p: Parties, flood: bool, rr: bool) -> None:
    """Certificates, the flood's TLS terminator and memcached -Z; ``skipped["tls"]`` says why not."""
    try:
        ca, cert, key = make_certs(p.run_dir / "tls")
    except (RuntimeError, OSError) as exc:
        p.skipped["tls"] = str(exc)
        return
    p.tls_ca = str(ca)
    if flood:
        p.tls_term = Child("TLS terminator", [sys.executable, "-m", "kmuxd.tools.bench.tlspeer", "--cert", str(cert),
                                              "--key", str(key), "--upstream", str(p.sink.port)],
                           p.run_dir / "tlspeer.log", pipe_stdout=True)
        try:
            p.tls_term_port = int(p.tls_term.expect("listening ").split()[1])
        except RuntimeError as exc:
            p.skipped["tls"] = f"the TLS terminator did not start: {exc}"
            return
    if rr:
        binary = find_binary("memcached")
        assert binary is not None  # the plaintext memcached started
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        p.memcached_tls_port = free_port()
        p.memcached_tls = Child("memcached -Z", [binary, "-l", "127.0.0.1", "-p", str(p.memcached_tls_port),
                                                 *MEMCACHED_ARGS, *user, "-Z", "-o",
                                                 f"ssl_chain_cert={cert},ssl_key={key}"],
                                p.run_dir / "memcached-tls.log")
        ctx = ssl.create_default_context(cafile=str(ca))
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            try:
                _preload(p.memcached_tls_port, ctx)
                return
            except OSError as exc:  # ssl.SSLError included
                if time.monotonic() > deadline or p.memcached_tls.proc.poll() is not None:
                    p.skipped["tls"] = f"memcached -Z did not answer: {exc}: {p.memcached_tls.log_tail(3)}"
                    p.memcached_tls_port = 0
                    return
                time.sleep(CONNECT_POLL)


def _start_twemproxy(p: Parties) -> None:
    binary = find_binary("nutcracker")
    if binary is None:
        p.skipped["twemproxy"] = "nutcracker is not installed (./dev.sh bench installs the Debian package)"
        return
    conf = p.run_dir / "nutcracker.yml"
    p.twemproxy_unix = str(p.run_dir / "twemproxy.sock")
    text = ""
    for name, listen, n in [*((f"mc{n}", f"127.0.0.1:{free_port()}", n) for n in CONNECTION_COUNTS),
                            ("mcunix", f"{p.twemproxy_unix} 0600", 4)]:
        if name != "mcunix":
            p.twemproxy_ports[n] = int(listen.rsplit(":", 1)[1])
        text += (f"{name}:\n  listen: {listen}\n  hash: fnv1a_64\n  distribution: ketama\n"
                 f"  timeout: 10000\n  redis: false\n  server_connections: {n}\n  preconnect: true\n"
                 f"  servers:\n   - 127.0.0.1:{p.memcached_port}:1\n")
    conf.write_text(text)
    stats = free_port()
    p.twemproxy = Child("twemproxy", [binary, "-c", str(conf), "-s", str(stats), "-a", "127.0.0.1", "-v", "4"],
                        p.run_dir / "twemproxy.log")
    deadline = time.monotonic() + CONNECT_TIMEOUT
    for where in [*p.twemproxy_ports.values(), p.twemproxy_unix]:
        while True:
            try:
                with _dial(where) as s:
                    s.sendall(ASCII_GET_REQUEST)
                    got = b""
                    while not got.endswith(b"END\r\n"):
                        chunk = s.recv(4096)
                        if not chunk:
                            raise OSError("closed")
                        got += chunk
                    if VALUE not in got:
                        raise OSError(f"twemproxy answered {got!r}")
                break
            except OSError as exc:
                if time.monotonic() > deadline or p.twemproxy.proc.poll() is not None:
                    p.skipped["twemproxy"] = f"twemproxy did not serve: {exc}: {p.twemproxy.log_tail(3)}"
                    p.twemproxy.stop()
                    p.twemproxy = None
                    return
                time.sleep(CONNECT_POLL)


def _dial(where: int | str) -> socket.socket:
    """A stream to a TCP port on 127.0.0.1, or to a Unix socket's path."""
    if isinstance(where, int):
        return socket.create_connection(("127.0.0.1", where), timeout=2.0)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(where)
    except OSError:
        s.close()
        raise
    return s


def _start_zmq(p: Parties, flood: bool, rr: bool, hwm: int) -> None:
    try:
        import zmq  # noqa: F401
    except ImportError:
        p.skipped["zmq"] = "pyzmq is not installed (pip install -e '.[bench]'; ./dev.sh bench does)"
        return
    peer = [sys.executable, "-m", "kmuxd.tools.bench.zmqpeer", "--hwm", str(hwm)]
    d = p.run_dir
    try:
        # Services first (both at once: each takes a moment to import zmq), then the brokers.
        if rr:
            p.zmq_echo = Child("zmq echo", [*peer, "echo"], d / "zmq-echo.log", pipe_stdout=True)
        if flood:
            p.zmq_sink = Child("zmq sink", [*peer, "sink"], d / "zmq-sink.log", pipe_stdout=True, pipe_stdin=True)
        if rr:
            port = int(p.zmq_echo.expect("listening ").split()[1])
            p.zmq_ipc_rr = str(d / "zmq-rr.ipc")
            p.zmq_broker_rr = Child("zmq broker", [*peer, "broker", "--ipc", p.zmq_ipc_rr, "--backend-port",
                                                   str(port)], d / "zmq-broker-rr.log", pipe_stdout=True)
        if flood:
            port = int(p.zmq_sink.expect("listening ").split()[1])
            p.zmq_ipc_flood = str(d / "zmq-flood.ipc")
            p.zmq_broker_flood = Child("zmq broker", [*peer, "broker", "--ipc", p.zmq_ipc_flood, "--backend-port",
                                                      str(port)], d / "zmq-broker-flood.log", pipe_stdout=True)
        for broker in (p.zmq_broker_rr, p.zmq_broker_flood):
            if broker is not None:
                broker.expect("listening")
    except RuntimeError as exc:
        p.skipped["zmq"] = f"the zmq peer did not start: {exc}"


def _start_crelay(p: Parties) -> None:
    binary, why = build_c(HERE / "relay.c", p.run_dir / "relay")
    if binary is None:
        p.skipped["crelay"] = why
        return
    p.crelay_path = str(p.run_dir / "relay.sock")
    p.crelay = Child("C relay", [str(binary), "--path", p.crelay_path, "--port", str(p.sink.port),
                                 "--connections", "4"], p.run_dir / "relay.log", pipe_stdout=True)
    try:
        p.crelay.expect("listening")
    except RuntimeError as exc:
        p.skipped["crelay"] = f"the C relay did not start: {exc}"
        p.crelay.stop()
        p.crelay = None


def mark(sink: Any) -> tuple[int, int, float, float]:
    """A sink's snapshot (msgs, bytes, monotonic, cpu), for the Python sink and the zmq sink alike."""
    if isinstance(sink, BackendProcess):
        return sink.mark()
    sink.proc.stdin.write(b"mark\n")
    sink.proc.stdin.flush()
    _, msgs, nbytes, t, cpu = sink.expect("mark ", 5.0).split()
    return int(msgs), int(nbytes), float(t), float(cpu)
