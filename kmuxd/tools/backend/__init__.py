"""The one loopback TCP backend: the demo's and benchmark's service, the tests' server, the soak's chaos.

Theory of operation
-------------------
Every TCP server kmuxd's tools and tests talk to is this one, in three
layers:

* :mod:`.loop` and :mod:`.conn`: one event loop per process (a thread of
  a test, or a process's main thread) serving any number of listeners,
  with timers and calls from other threads; connections that drain their
  non-blocking sockets into buffers allocated once, queue writes with
  push-back, pause or limit reads, and close three ways (close, reset,
  graceful FIN);
* :mod:`.protocols`: what a connection does with its frames: count them
  (echo or sink, fast enough for the benchmark), record them (the tests),
  or misbehave on a plan of faults (FIN, RST, stalls, late and trickled
  answers, unasked frames), which the soak draws at random and the tests
  script;
* the servers built from them: :mod:`.counting` (``python -m
  kmuxd.tools.backend``, with :mod:`.process` on the caller's side) and
  :mod:`.recording` (``tests/integration``'s ``Backend``). The soak's
  chaos backends (:mod:`kmuxd.tools.soak.backends`) and the tests' fault
  server (``tests/integration/reqresp.py``) subclass the faulty protocols.
"""

from .counting import CountingBackend, DEFAULT_MAX_MESSAGE, main
from .conn import Conn, Listener
from .loop import Loop
from .process import BackendProcess, LineReader, stop_children
from .protocols import CALM, Counting, FaultyEcho, FaultySink, Plan, Recording
from .recording import ConnInfo, RecordingBackend

__all__ = ["Loop", "Listener", "Conn", "Counting", "Recording", "Plan", "CALM", "FaultyEcho", "FaultySink",
           "CountingBackend", "RecordingBackend", "ConnInfo", "BackendProcess", "LineReader", "stop_children",
           "DEFAULT_MAX_MESSAGE", "main"]
