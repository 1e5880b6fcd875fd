"""Children that die with the tool that started them.

The tools start their children (the daemon, peers, load generators, demo
apps) in their own sessions, so that a Ctrl-C in a terminal reaches only the
tool, which then stops them in order. The cost of that is a leak: when the
tool itself is killed outright (SIGKILL, an OOM kill, a CI timeout), nothing
stops the children, and they live on with ppid 1, holding ports, CPU and
files. :func:`preexec` closes that hole with the kernel's parent-death
signal (``PR_SET_PDEATHSIG``): the child gets SIGTERM the moment its parent
goes, whatever killed it.

Invariant, and the caveat that comes with it: the kernel sends the signal
when the *thread* that forked the child exits, not the process. Use this
only for children started from a thread that outlives them (the main
thread, in the bench and the demo); a tool that spawns from worker threads
(the soak's chaos thread restarts children) must not.
"""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Callable

#: ``prctl`` option (linux/prctl.h).
PR_SET_PDEATHSIG = 1


def preexec(cpu: int | None = None) -> Callable[[], None]:
    """A ``preexec_fn``: die with the parent (SIGTERM), and pin to ``cpu`` if one is given."""
    parent = os.getpid()

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        # The parent may have died between fork and prctl: then nothing will signal us.
        if os.getppid() != parent:
            os._exit(1)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return run
