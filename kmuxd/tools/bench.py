"""``python -m kmuxd.tools.bench``: kmuxd's throughput next to apps writing TCP directly.

Method
------
One run starts a sink backend (:mod:`kmuxd.tools.backend`, readiness + drain,
counting frames without copying), one kmuxd with a group of
``--connections`` TCP connections to that sink, and ``--clients`` sender
processes that stay alive for the whole run. For each message size, and each
repeat, the same senders take two turns of equal length:

* **kmuxd**: each sender joins the group with the real client library and
  calls ``kmux.Client.send(msg)`` in a loop;
* **direct**: each sender opens its own TCP connection to the sink
  (``TCP_NODELAY``) and calls ``socket.send(msg)`` in a loop, one send per
  message, as an app without kmuxd would.

Every sender starts at the same instant (a shared start time) and sends as
fast as it can for ``--seconds`` plus a guard interval at each end. The
throughput is what the *sink* counted inside the measured window, between
two snapshots it takes itself (``mark`` on its control pipe, with its own
clock), divided by the window's length. Start-up and the tail are outside
the window. The sink is drained before the next turn, so no backlog of one
turn is counted in the next. Modes alternate order between repeats; each
figure is the median of ``--repeat`` turns.

CPU placement is part of the result on a 2-core machine: senders, kmuxd and
the sink all compete for the same two cores unless ``--pin`` is given, and
the output says so, along with the CPU time each party used in the window.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .backend import BackendProcess, stop_children
from .demo import DaemonProcess, write_config

__all__ = ["main"]

GROUP = "bench"
ECHO_GROUP = "echo"
MODES = ("kmuxd", "direct")
DEFAULT_SIZES = (64, 1024)
DEFAULT_CLIENTS = 8
DEFAULT_CONNECTIONS = 4
DEFAULT_SECONDS = 3.0
DEFAULT_REPEAT = 3
#: Seconds from "go" to the senders' common start: time to read the command.
START_DELAY = 0.3
#: Seconds sent before and after the measured window (ramp-up, tail).
GUARD = 0.25
#: Messages sent between two looks at the clock.
CHECK_EVERY = 64
#: Seconds a sender waits for its next command before assuming we are gone.
WORKER_IDLE_TIMEOUT = 600.0
#: Seconds for a sender to connect and say ready.
WORKER_READY_TIMEOUT = 15.0
#: Seconds past its stop time a sender may take to report (a send may be blocked).
WORKER_DONE_TIMEOUT = 20.0
#: Sink drain: poll interval, and the most time to wait for it to go quiet.
QUIESCE_POLL = 0.05
QUIESCE_TIMEOUT = 10.0
#: Latency mode: most round trips per measurement, and the reply timeout.
LATENCY_MAX_ROUNDS = 200_000
LATENCY_REPLY_TIMEOUT = 5.0
LATENCY_WARMUP = 200
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- sender processes -------------------------------------------------------------------


def _frame(size: int) -> bytes:
    if size < 5:
        raise ValueError("a u32be message needs at least 5 bytes")
    return struct.pack(">I", size - 4) + b"x" * (size - 4)


def _worker(index: int, pipe, socket_path: str, port: int) -> None:
    """One sender process: obey commands from the parent until "quit"."""
    import kmux

    # Ctrl-C is the parent's to handle: it stops us in order (quit, then kill).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while pipe.poll(WORKER_IDLE_TIMEOUT):
        cmd = pipe.recv()
        if cmd[0] != "prepare":
            return
        _, mode, size = cmd
        msg = _frame(size)
        if mode == "kmuxd":
            client = kmux.connect(GROUP, socket_path, receive=False, name=f"bench-{index}")
            send_one, close = client.send, client.close
            sendall = None
        else:
            sock = socket.create_connection(("127.0.0.1", port), timeout=WORKER_READY_TIMEOUT)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            send_one, close, sendall = sock.send, sock.close, sock.sendall
        pipe.send(("ready",))
        if not pipe.poll(WORKER_READY_TIMEOUT):
            close()
            return
        cmd = pipe.recv()
        if cmd[0] != "go":
            close()
            return
        _, start_at, stop_at = cmd
        delay = start_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent = 0
        cpu0 = time.process_time()
        monotonic = time.monotonic
        if sendall is None:
            while monotonic() < stop_at:  # bounded by the clock
                for _ in range(CHECK_EVERY):
                    send_one(msg)
                sent += CHECK_EVERY
        else:
            view = memoryview(msg)
            while monotonic() < stop_at:
                for _ in range(CHECK_EVERY):
                    n = send_one(msg)
                    if n != size:  # a blocking send may still be partial
                        sendall(view[n:])
                sent += CHECK_EVERY
        cpu = time.process_time() - cpu0
        close()
        pipe.send(("done", sent, cpu))


class Senders:
    """The sender processes, kept for the whole run (no start-up cost per turn)."""

    def __init__(self, count: int, socket_path: str, port: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipes = []
        self.procs = []
        for i in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(i, child, socket_path, port), daemon=True, name=f"sender-{i}")
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _expect(self, what: str, timeout: float) -> list[tuple]:
        deadline = time.monotonic() + timeout
        answers = []
        for i, pipe in enumerate(self.pipes):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"sender {i} did not answer {what!r} within {timeout} s")
            answer = pipe.recv()
            if answer[0] != what:
                raise RuntimeError(f"sender {i}: expected {what!r}, got {answer!r}")
            answers.append(answer)
        return answers

    def prepare(self, mode: str, size: int) -> None:
        for pipe in self.pipes:
            pipe.send(("prepare", mode, size))
        self._expect("ready", WORKER_READY_TIMEOUT)

    def go(self, start_at: float, stop_at: float) -> None:
        for pipe in self.pipes:
            pipe.send(("go", start_at, stop_at))

    def wait_done(self, stop_at: float) -> list[tuple]:
        return self._expect("done", max(0.0, stop_at - time.monotonic()) + WORKER_DONE_TIMEOUT)

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("quit",))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(2.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)


def _cpu_seconds(pids: list[int]) -> float:
    """utime + stime of processes, from /proc (0 for one that is gone)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / _CLK_TCK


def _system_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    busy = sum(fields[:8]) - idle - steal  # guest time is already inside user
    return busy / _CLK_TCK, steal / _CLK_TCK


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# -- one turn ---------------------------------------------------------------------------------


def run_turn(mode: str, size: int, seconds: float, senders: Senders, sink: BackendProcess,
             daemon: DaemonProcess) -> dict[str, Any]:
    senders.prepare(mode, size)
    start_at = time.monotonic() + START_DELAY
    window_start = start_at + GUARD
    window_end = window_start + seconds
    stop_at = window_end + GUARD
    senders.go(start_at, stop_at)
    _sleep_until(window_start)
    m1 = sink.mark()
    d1, c1, s1 = _cpu_seconds([daemon.pid]), _cpu_seconds(senders.pids()), _system_cpu()
    _sleep_until(window_end)
    m2 = sink.mark()
    d2, c2, s2 = _cpu_seconds([daemon.pid]), _cpu_seconds(senders.pids()), _system_cpu()
    done = senders.wait_done(stop_at)
    _quiesce(sink)
    msgs, nbytes, elapsed = m2[0] - m1[0], m2[1] - m1[1], m2[2] - m1[2]
    return {
        "mode": mode,
        "size": size,
        "window_s": round(elapsed, 4),
        "msgs": msgs,
        "bytes": nbytes,
        "msgs_per_s": msgs / elapsed,
        "mb_per_s": nbytes / elapsed / 1e6,
        "sent_by_clients": sum(d[1] for d in done),
        "cpu_sink": (m2[3] - m1[3]) / elapsed,
        "cpu_daemon": (d2 - d1) / elapsed,
        "cpu_clients": (c2 - c1) / elapsed,
        # The whole machine, softirq (loopback TCP) included; 2.0 = both cores busy.
        "cpu_machine": (s2[0] - s1[0]) / elapsed,
        "cpu_steal": (s2[1] - s1[1]) / elapsed,
    }


def _quiesce(sink: BackendProcess) -> None:
    """Wait until the sink's count stops moving: the turn's backlog is drained."""
    deadline = time.monotonic() + QUIESCE_TIMEOUT
    last = sink.mark()[0]
    stable = 0
    while stable < 2 and time.monotonic() < deadline:
        time.sleep(QUIESCE_POLL)
        now = sink.mark()[0]
        stable = stable + 1 if now == last else 0
        last = now


# -- latency (optional) -------------------------------------------------------------------------


def measure_latency(size: int, seconds: float, socket_path: str, echo_port: int) -> dict[str, Any]:
    """Single client ping-pong: through kmuxd's echo group, then straight to the echo backend."""
    import kmux

    msg = _frame(size)
    out: dict[str, Any] = {"size": size}
    with kmux.connect(ECHO_GROUP, socket_path, name="bench-latency") as client:

        def kmux_round() -> None:
            client.send(msg)
            client.recv(timeout=LATENCY_REPLY_TIMEOUT)

        out["kmuxd"] = _ping_pong(kmux_round, seconds)
    sock = socket.create_connection(("127.0.0.1", echo_port), timeout=LATENCY_REPLY_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(size)
    view = memoryview(buf)
    try:

        def direct_round() -> None:
            sock.sendall(msg)
            got = 0
            while got < size:
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError("echo backend closed the connection")
                got += n

        out["direct"] = _ping_pong(direct_round, seconds)
    finally:
        sock.close()
    return out


def _ping_pong(round_trip, seconds: float) -> dict[str, float]:
    for _ in range(LATENCY_WARMUP):
        round_trip()
    samples = []
    perf = time.perf_counter_ns
    deadline = time.monotonic() + seconds
    while len(samples) < LATENCY_MAX_ROUNDS and time.monotonic() < deadline:
        t0 = perf()
        round_trip()
        samples.append(perf() - t0)
    samples.sort()
    q = lambda p: samples[min(len(samples) - 1, int(p * len(samples)))] / 1000  # noqa: E731
    return {"rounds": len(samples), "p50_us": q(0.50), "p99_us": q(0.99), "mean_us": statistics.fmean(samples) / 1000}


# -- reporting -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def summarize(turns: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        row: dict[str, Any] = {"size": size}
        for mode in MODES:
            mine = [t for t in turns if t["size"] == size and t["mode"] == mode]
            for key in ("msgs_per_s", "mb_per_s", "cpu_sink", "cpu_daemon", "cpu_clients", "cpu_machine", "cpu_steal"):
                row[f"{mode}_{key}"] = statistics.median(t[key] for t in mine)
            row[f"{mode}_runs"] = [round(t["msgs_per_s"]) for t in mine]
        row["ratio"] = row["kmuxd_msgs_per_s"] / row["direct_msgs_per_s"] if row["direct_msgs_per_s"] else 0.0
        rows.append(row)
    return rows


def _size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| size | kmuxd msgs/s | direct msgs/s | kmuxd / direct | kmuxd MB/s | direct MB/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {_size_label(r['size'])} | {r['kmuxd_msgs_per_s']:,.0f} | {r['direct_msgs_per_s']:,.0f} | "
            f"{r['ratio']:.2f} | {r['kmuxd_mb_per_s']:,.1f} | {r['direct_mb_per_s']:,.1f} |"
        )
    return "\n".join(lines)


def cpu_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| size | mode | senders CPU | kmuxd CPU | sink CPU | whole machine | steal | runs (msgs/s) |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        for mode in MODES:
            lines.append(
                f"| {_size_label(r['size'])} | {mode} | {r[f'{mode}_cpu_clients']:.0%} | "
                f"{r[f'{mode}_cpu_daemon']:.0%} | {r[f'{mode}_cpu_sink']:.0%} | "
                f"{r[f'{mode}_cpu_machine']:.0%} | {r[f'{mode}_cpu_steal']:.0%} | "
                f"{', '.join(f'{x:,}' for x in r[f'{mode}_runs'])} |"
            )
    return "\n".join(lines)


def latency_table(results: list[dict[str, Any]]) -> str:
    lines = ["| size | kmuxd p50 µs | kmuxd p99 µs | direct p50 µs | direct p99 µs |", "|---:|---:|---:|---:|---:|"]
    for r in results:
        k, d = r["kmuxd"], r["direct"]
        lines.append(f"| {_size_label(r['size'])} | {k['p50_us']:.0f} | {k['p99_us']:.0f} | "
                     f"{d['p50_us']:.0f} | {d['p99_us']:.0f} |")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1024 if part.endswith("k") else 1
        value = int(part.rstrip("k")) * mult
        if not 5 <= value <= 1024 * 1024:
            raise argparse.ArgumentTypeError(f"size {part} is not 5..1048576 bytes")
        sizes.append(value)
    return sizes


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kmuxd.tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_sizes, default=list(DEFAULT_SIZES),
                        help="message sizes, header included, comma-separated, 'k' = KiB (default 64,1k)")
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS, help="sender processes (default 8)")
    parser.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS,
                        help="TCP connections in kmuxd's group (default 4)")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="measured window per turn (default 3)")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, help="turns per cell; the median is shown")
    parser.add_argument("--pin", action="store_true", help="pin kmuxd to CPU 0 and the sink to CPU 1 "
                        "(senders stay unpinned); default: nothing pinned")
    parser.add_argument("--latency", action="store_true", help="also measure single-client round trips (p50/p99)")
    parser.add_argument("--json", help="also write all results to this JSON file")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 256 or not 1 <= args.connections <= 1024 or not 1 <= args.repeat <= 100:
        parser.error("--clients 1..256, --connections 1..1024, --repeat 1..100")
    if not 0.1 <= args.seconds <= 600:
        parser.error("--seconds must be 0.1..600")
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) < 2:
        parser.error("--pin needs 2 usable CPUs")
    daemon_cpu, sink_cpu = (cpus[0], cpus[1]) if args.pin else (None, None)

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    info = machine()
    placement = (f"kmuxd pinned to CPU {daemon_cpu}, sink pinned to CPU {sink_cpu}, senders unpinned"
                 if args.pin else "nothing pinned: senders, kmuxd and the sink share all CPUs")
    print(f"kmuxd bench: {args.clients} senders, kmuxd group of {args.connections} TCP connections vs "
          f"{args.clients} direct TCP connections, sink backend; {args.seconds:g} s window, median of {args.repeat}")
    print(f"machine: {info['cpus']} CPUs ({info['cpu_model']}), Linux {info['kernel']}, Python {info['python']}; "
          f"{placement}")
    sys.stdout.flush()

    tmp = Path(tempfile.mkdtemp(prefix="kmuxd-bench-"))
    sink = echo = daemon = senders = None
    turns: list[dict[str, Any]] = []
    latency: list[dict[str, Any]] = []
    try:
        sink = BackendProcess("sink", report=tmp / "sink.json", stderr=open(tmp / "sink.log", "wb"), cpu=sink_cpu)
        config = tmp / "kmuxd.toml"
        socket_path = str(tmp / "kmuxd.sock")
        write_config(config, socket_path, GROUP, sink.port, args.connections)
        if args.latency:
            echo = BackendProcess("echo", report=tmp / "echo.json", stderr=open(tmp / "echo.log", "wb"), cpu=sink_cpu)
            with open(config, "a") as f:
                f.write(f'\n[groups.{ECHO_GROUP}]\nendpoints = ["127.0.0.1:{echo.port}"]\nconnections = 1\n'
                        'framing = "u32be"\n')
        daemon = DaemonProcess(config, tmp / "kmuxd.system.log", cpu=daemon_cpu)
        ready = daemon.wait_ready()
        senders = Senders(args.clients, socket_path, sink.port)
        print(f"kmuxd ready ({ready.get('connections_up')} connections up); running "
              f"{args.repeat * len(args.sizes) * len(MODES)} turns of ~{args.seconds + 2 * GUARD + START_DELAY:g} s")
        for rep in range(args.repeat):
            for size in args.sizes:
                order = MODES if rep % 2 == 0 else MODES[::-1]
                for mode in order:
                    turn = run_turn(mode, size, args.seconds, senders, sink, daemon)
                    turn["repeat"] = rep + 1
                    turns.append(turn)
                    print(f"  [{rep + 1}/{args.repeat}] {_size_label(size):>6} {mode:<6} "
                          f"{turn['msgs_per_s']:>11,.0f} msgs/s {turn['mb_per_s']:>8.1f} MB/s  "
                          f"cpu: senders {turn['cpu_clients']:.0%} kmuxd {turn['cpu_daemon']:.0%} "
                          f"sink {turn['cpu_sink']:.0%} machine {turn['cpu_machine']:.0%}")
                    sys.stdout.flush()
        if args.latency:
            for size in args.sizes:
                latency.append(measure_latency(size, args.seconds, socket_path, echo.port))
        finals = daemon.stop()
        report = sink.stop()
        rows = summarize(turns, args.sizes)
        print()
        print(markdown_table(rows))
        print()
        print(cpu_table(rows))
        if latency:
            print()
            print(latency_table(latency))
        print()
        print(f"sink total {report['total_msgs']:,} msgs in {len(report['connections'])} connections; "
              f"kmuxd wrote {sum(g['tx_msgs'] for g in finals):,} msgs; sink framing errors {report['errors']}")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "command": " ".join([Path(sys.executable).name, "-m", "kmuxd.tools.bench", *(argv or sys.argv[1:])]),
                "machine": info, "placement": placement, "args": {k: v for k, v in vars(args).items()},
                "summary": rows, "turns": turns, "latency": latency, "group_final": finals,
            }, indent=2) + "\n")
            print(f"wrote {args.json}")
        return 0 if report["errors"] == 0 else 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        if daemon is not None:
            print(f"kmuxd log tail:\n{daemon.log_tail()}", file=sys.stderr)
        return 1
    finally:
        if senders is not None:
            senders.close()
        stop_children(daemon, sink, echo)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
