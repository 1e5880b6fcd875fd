"""kmuxd's benchmark: throughput, latency, CPU and memory, with peers side by side.

Theory of operation
-------------------
One run starts every party once (:mod:`.peers`): real memcached, a sink
backend, one kmuxd with a group per configuration, and the peers —
twemproxy in front of the same memcached, a ZeroMQ broker of kmuxd's shape,
a C relay of kmuxd's shape — then runs a plan of *cells* (:mod:`.workloads`),
one workload against one target each, and reports (:mod:`.report`).

Invariants
----------
* kmuxd is measured only from outside: its sockets, its log, ``/proc``.
* Every target is driven by the same C load generator (``loadgen.c``,
  built at start-up), so the clients cost the same on every row and little
  next to the proxy; except the rows that measure what a Python app sees
  and pays (:mod:`.appclient`: the ``kmux`` library against raw sockets),
  which say so (``client: python``).
* Every figure comes from one window per cell, inside the run; latencies of
  the open-loop cells count from each request's scheduled send time.
* A peer that cannot run here is skipped, and the output says why.
* Everything listens on 127.0.0.1 or on Unix sockets in a private run
  directory; every child is stopped when the run ends, however it ends.
"""

from .cli import main

__all__ = ["main"]
