"""Fixtures: real memcached and dnsmasq processes on loopback, and kmuxd in front of them.

``memcached``, ``unbound`` and ``dnsmasq`` each start the Debian-packaged server on
127.0.0.1 at a free port, wait (bounded) until it answers a real request
sent straight to it, and kill it at teardown. A test is skipped only when
the server's binary is not installed (``./dev.sh test`` installs them).

``daemon_factory`` / ``short_dir`` are the integration suite's fixtures:
they write a TOML config and run ``kmuxd --config`` as a subprocess.
``start_kmuxd(daemon_factory, server, **group)`` starts kmuxd with one group
``g`` on the server and waits until all its TCP connections are up, so the
load really spreads over them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.integration.conftest import daemon_factory, short_dir  # noqa: F401 - fixtures reused here
from kmux.control import ControlClient
from tests.integration.helpers import Daemon, wait_until

from . import MC_HEADER, OP_VERSION, dns_parse, dns_query, mc_parse, mc_request, recv_exact

START_TIMEOUT = 10.0


def find_binary(name: str) -> str | None:
    """The server binary, also in the sbin directories a non-root PATH may lack."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    return None


def free_port() -> int:
    """A port that is free on 127.0.0.1 for both TCP and UDP right now (DNS servers bind both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise AssertionError("found no free loopback port")


class ServerProcess:
    """A server subprocess with its output in a file; :meth:`stop` always ends it."""

    def __init__(self, argv: list[str], log_path: Path, port: int) -> None:
        self.argv = argv
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing until :meth:`resume`.
        Returns once every thread of it is stopped (the signal takes effect asynchronously)."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        wait_until(lambda: all(state in ("T", "t") for state in self._thread_states()), 2.0,
                   f"{self.argv[0]} to stop", interval=0.001)

    def _thread_states(self) -> list[str]:
        states = []
        task = Path(f"/proc/{self.proc.pid}/task")
        for t in task.iterdir():
            try:
                stat = (t / "stat").read_text()
            except OSError:
                continue  # the thread just ended
            states.append(stat[stat.rindex(")") + 2])
        return states

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Kill the server's whole process group (dnsmasq forks a child per TCP connection)."""
        if self.proc.returncode is None:
            try:  # SIGKILL also ends a stopped (paused) process, without letting it run again first
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
                pass
        self._log.close()


def wait_serving(server: ServerProcess, probe: Callable[[], Any], what: str) -> Any:
    """Call ``probe`` until it succeeds (bounded); AssertionError with the server's output if not."""
    deadline = time.monotonic() + START_TIMEOUT
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise AssertionError(f"{what} exited with {server.proc.returncode}:\n{server.output()}")
        try:
            return probe()
        except (OSError, AssertionError) as exc:
            last = exc
            time.sleep(0.02)
    raise AssertionError(f"{what} did not answer within {START_TIMEOUT}s ({last!r}):\n{server.output()}")


# -- memcached ---------------------------------------------------------------------------------


def response_over(s: Any) -> Any:
    """One binary-protocol response read from a connected socket (plain or TLS)."""
    head = recv_exact(s, MC_HEADER.size)
    (bodylen,) = struct.unpack_from(">I", head, 8)
    return mc_parse(head + recv_exact(s, bodylen))


def version_over(s: Any) -> str:
    """memcached's binary-protocol VERSION on a connected socket (plain or TLS)."""
    s.sendall(mc_request(OP_VERSION, opaque=0xDEADBEEF))
    r = response_over(s)
    assert r.status == 0 and r.opaque == 0xDEADBEEF, r
    return r.value.decode()


class Memcached(ServerProcess):
    def version(self, timeout: float = 2.0) -> str:
        """A binary-protocol VERSION request straight to the server (not through kmuxd)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            return version_over(s)


def start_memcached(short_dir: Path, *extra: str) -> Memcached:
    """memcached on a free loopback port (binary protocol only); ``extra``: more options,
    e.g. ``"-o", "idle_timeout=2"``. Skips the test if memcached is not installed."""
    binary = find_binary("memcached")
    if binary is None:
        pytest.skip("memcached is not installed (./dev.sh test installs the Debian package 'memcached')")
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    for attempt in range(3):
        port = free_port()
        # -U 0: no UDP; -t 2 threads; -m 64 MB; -B binary: the tests speak only the binary protocol.
        server = Memcached([binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-t", "2", "-m", "64",
                            "-c", "256", "-B", "binary", *user, *extra], short_dir / f"memcached-{port}.log", port)
        try:
            wait_serving(server, server.version, "memcached")
        except AssertionError:
            server.stop()
            if attempt == 2 or "bind" not in server.output().lower():
                raise
            continue  # lost the race for the port: try another one
        return server
    raise AssertionError("unreachable")


@pytest.fixture
def memcached(short_dir: Path) -> Memcached:  # noqa: F811 - the imported fixture
    server = start_memcached(short_dir)
    try:
        yield server
    finally:
        server.stop()


# -- DNS servers -------------------------------------------------------------------------------

ZONE_DOMAIN = "kmux.test"
ZONE_SIZE = 2048


def zone_records(n: int = ZONE_SIZE) -> dict[str, str]:
    """``host{i}.kmux.test -> 10.x.y.z``: plain data served by the DNS server, nothing is sent there."""
    return {f"host{i}.{ZONE_DOMAIN}": f"10.{i % 7}.{i // 250}.{i % 250 + 1}" for i in range(n)}


class DnsServer(ServerProcess):
    records: dict[str, str]
    #: unbound with tls=: its DNS-over-TLS port (0: none).
    tls_port: int = 0

    def query(self, name: str, qid: int = 0x4242, timeout: float = 2.0) -> tuple[str, ...]:
        """One DNS-over-TCP query straight to the server (not through kmuxd); its A records."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(dns_query(qid, name))
            head = recv_exact(s, 2)
            answer = dns_parse(head + recv_exact(s, struct.unpack(">H", head)[0]))
        assert answer.id == qid and answer.rcode == 0, answer
        return answer.addresses


def start_dns_server(make_argv: Callable[[int], list[str]], log_prefix: Path, what: str) -> DnsServer:
    """Start a DNS server on a free port; retried on another port if it lost the race for one."""
    records = zone_records()
    first = next(iter(records))
    for attempt in range(3):
        port = free_port()
        server = DnsServer(make_argv(port), Path(f"{log_prefix}-{attempt}.log"), port)
        server.records = records
        try:
            got = wait_serving(server, lambda: server.query(first), what)
        except AssertionError:
            server.stop()
            if attempt == 2 or "in use" not in server.output().lower():
                raise
            continue
        if got != (records[first],):
            server.stop()
            raise AssertionError(f"{what} answered {got} for {first}:\n{server.output()}")
        return server
    raise AssertionError("unreachable")


#: unbound's tcp-idle-timeout (ms) by default here: long, so connections stay up during a test.
UNBOUND_TCP_IDLE_MS = 120_000


def start_unbound(short_dir: Path, tcp_idle_timeout_ms: int = UNBOUND_TCP_IDLE_MS,
                  tls: tuple[Path, Path] | None = None) -> DnsServer:
    """unbound, serving the zone as a static local zone (names outside it: NXDOMAIN, nothing forwarded).

    unbound keeps a client's TCP connection for any number of pipelined queries, until
    ``tcp_idle_timeout_ms`` of silence; then it closes it (a FIN). With ``tls``
    (certificate, key) it also serves DNS over TLS on a second port, ``server.tls_port``
    (``tls-port``, ``tls-service-pem``, ``tls-service-key``). Skips the test if
    unbound is not installed.
    """
    binary = find_binary("unbound")
    if binary is None:
        pytest.skip("unbound is not installed (./dev.sh test installs the Debian package 'unbound')")
    zone = "".join(f'    local-data: "{name}. 60 IN A {addr}"\n' for name, addr in zone_records().items())

    tls_port = free_port() if tls is not None else 0
    tls_lines = "" if tls is None else (
        f"    interface: 127.0.0.1@{tls_port}\n"
        f"    tls-port: {tls_port}\n"
        f"    tls-service-pem: \"{tls[0]}\"\n"
        f"    tls-service-key: \"{tls[1]}\"\n"
    )

    def argv(port: int) -> list[str]:
        conf = short_dir / f"unbound-{port}.conf"
        conf.write_text(
            "server:\n"
            "    interface: 127.0.0.1\n"
            + tls_lines
            + f"    port: {port}\n"
            "    do-ip6: no\n"
            "    do-daemonize: no\n"
            "    use-syslog: no\n"
            '    logfile: ""\n'
            "    verbosity: 1\n"
            '    username: ""\n'  # stay the user that runs the tests
            '    chroot: ""\n'
            f'    directory: "{short_dir}"\n'
            '    pidfile: ""\n'
            "    num-threads: 2\n"
            "    access-control: 127.0.0.0/8 allow\n"
            '    module-config: "iterator"\n'  # no DNSSEC validator: no trust anchor needed
            f"    tcp-idle-timeout: {tcp_idle_timeout_ms}\n"
            "    incoming-num-tcp: 64\n"
            f'    local-zone: "{ZONE_DOMAIN}." static\n'
            + zone
            + "remote-control:\n"
            "    control-enable: no\n"
        )
        return [binary, "-d", "-p", "-c", str(conf)]

    server = start_dns_server(argv, short_dir / f"unbound-{tcp_idle_timeout_ms}", "unbound")
    server.tls_port = tls_port
    return server


@pytest.fixture
def unbound(short_dir: Path) -> DnsServer:  # noqa: F811 - the imported fixture
    """unbound with a long tcp-idle-timeout (see :func:`start_unbound`)."""
    server = start_unbound(short_dir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dnsmasq(short_dir: Path) -> DnsServer:  # noqa: F811 - the imported fixture
    """dnsmasq, serving the zone from a hosts file. Note: dnsmasq closes a TCP connection after
    100 queries (TCP_MAX_QUERIES, fixed at compile time), and answers one TCP connection at a
    time in --no-daemon mode, hence --keep-in-foreground."""
    binary = find_binary("dnsmasq")
    if binary is None:
        pytest.skip("dnsmasq is not installed (./dev.sh test installs the Debian package 'dnsmasq-base')")
    hosts = short_dir / "zone.hosts"
    hosts.write_text("".join(f"{addr} {name}\n" for name, addr in zone_records().items()))
    hosts.chmod(0o644)
    short_dir.chmod(0o755)  # dnsmasq reads the hosts file after dropping root to 'nobody'

    def argv(port: int) -> list[str]:
        return [
            binary,
            "--keep-in-foreground",
            "--log-facility=-",  # log to stderr (our file)
            f"--pid-file={short_dir / 'dnsmasq.pid'}",
            "--conf-file=/dev/null",
            f"--port={port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            f"--addn-hosts={hosts}",
            f"--local=/{ZONE_DOMAIN}/",  # answers the zone itself, never forwards anything
            "--local-ttl=60",
            *(["--user=nobody"] if os.geteuid() == 0 else []),
        ]

    server = start_dns_server(argv, short_dir / "dnsmasq", "dnsmasq")
    try:
        yield server
    finally:
        server.stop()


# -- kmuxd in front ------------------------------------------------------------------------------


def start_kmuxd(factory: Callable[..., Daemon], server: ServerProcess, **group: Any) -> Daemon:
    """kmuxd with one group ``g`` on ``server``; waits until all its connections are up."""
    cfg: dict[str, Any] = {
        "endpoints": [server.address],
        "connections": 4,
        "max_message": 65536,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.2,
        "connect_timeout": 2.0,
    }
    cfg.update(group)
    daemon = factory({"g": cfg})
    daemon.wait_log("connected", count=cfg["connections"], timeout=10)
    return daemon


def group_stats(daemon: Daemon) -> dict[str, Any]:
    """Group ``g``'s record from the daemon's ``stats`` answer (the control socket, as kmux-cli asks)."""
    with ControlClient(daemon.control_socket, timeout=5.0) as c:
        answer = c.request("stats")
    (g,) = [g for g in answer["groups"] if g["name"] == "g"]
    return g


REQUEST_COUNTERS = ("unmatched_responses", "late_responses", "dropped_responses", "requests_failed",
                    "requests_timed_out")


def assert_request_counters(daemon: Daemon, **expected: int) -> dict[str, Any]:
    """Once nothing is in flight, the group's request counters are ``expected`` (0 unless named);
    ``None`` skips a counter. No ``unmatched_response`` was logged unless some were expected."""
    g = wait_until(lambda: (g := group_stats(daemon))["requests_in_flight"] == 0 and g, 5.0,
                   "no requests in flight")
    for name in REQUEST_COUNTERS:
        want = expected.get(name, 0)
        if want is not None:
            assert g[name] == want, f"stats: {name} = {g[name]}, expected {want} ({g})"
    if not expected.get("unmatched_responses"):
        assert not daemon.logs("unmatched_response"), daemon.logs("unmatched_response")
    return g

