"""A soak client process: sessions that connect, send, and leave, until a deadline.

    python -m kmuxd.tools.soak.client SPEC_JSON

Started by the soak driver (:mod:`.driver`), several at once. Each runs
*sessions* one after another with the real blocking client library
(:func:`kmux.connect`), each on a group picked at random (seeded):

* request/response groups (``id``, ``fifo``): a sending thread keeps at most
  ``window`` requests outstanding while a receiving thread takes responses
  and notices; everything goes through one :class:`~.ledger.RequestLedger`
  under one lock. The request is registered before ``send()`` (its answer may
  come first). Some receiving threads stop reading for a while (a slow
  consumer) or switch receiving off and on.
* ``balance`` groups: a pure sender (``receive=False``) in bursts, reading
  the notices that may come back between bursts (:class:`~.ledger.OneWayLedger`).

A session sends 0 to a few thousand messages, then leaves *gracefully*
(waits, at most :data:`GRACEFUL_WAIT` s, until every request has its outcome)
or *abruptly* (closes with requests outstanding: they are abandoned and owed
nothing). Each finished session is appended as one JSON line to the result
file named in the spec, so a process that dies loses only its current
session; the last line is ``{"proc": N, "done": true}``.

Bounds: sessions per process (:data:`MAX_SESSIONS`), messages per session
(:data:`LONG_SESSION`), the window, every wait (connect, window, graceful
wait, receive poll), and the process's own deadline.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from typing import Any, Callable

import kmux
from kmux.errors import ClientClosed, DaemonShutdown, KmuxError

from .frames import frame_size, make_frame
from .ledger import OneWayLedger, RequestLedger

__all__ = ["run_process", "session_id", "MAX_SESSIONS"]

#: Session numbers: proc * MAX_SESSIONS + k, so every session in a run has its own.
MAX_SESSIONS = 100_000
#: Session lengths in messages: (share of sessions, smallest, largest).
SESSION_SHAPES = ((0.20, 0, 3), (0.60, 5, 200), (0.20, 200, 2000))
LONG_SESSION = 2000
#: Share of sessions that leave with requests outstanding.
ABRUPT_SHARE = 0.25
#: Seconds a client waits for its connect and handshake.
CONNECT_TIMEOUT = 5.0
#: Seconds a graceful one-way sender waits for the daemon to read its last messages
#: (an endpoint outage lasts at most 2.5 s, then the reconnect back-off).
FLUSH_TIMEOUT = 15.0
#: Seconds a graceful session waits for its last outcomes (request_timeout
#: bounds it in a healthy daemon; this only stops a broken one hanging the run).
GRACEFUL_WAIT = 20.0
#: Seconds the sender waits for room in its window before it gives up.
WINDOW_WAIT = 30.0
#: The receiving thread's poll: how quickly it sees "stop".
RECV_POLL = 0.05
#: Share of request sessions whose receiving thread stops reading once, for PAUSE seconds
#: (uniform): the daemon must hold that client's responses and their connection waits.
PAUSE_SHARE = 0.15
PAUSE = (0.1, 1.5)
#: Share of request sessions that switch receiving off (and on again TOGGLE_SPAN polls
#: later): in id/fifo every response still belongs to its requester.
TOGGLE_SHARE = 0.1
TOGGLE_SPAN = 20
#: Balance senders: messages per burst, then a pause (seconds) to read notices.
BALANCE_BURST = 32
BALANCE_PAUSE = 0.004
#: Seconds between sessions of one process, at most.
SESSION_GAP = 0.1


def session_id(proc: int, k: int) -> int:
    return proc * MAX_SESSIONS + k


def _session_length(rng: random.Random) -> int:
    r = rng.random()
    for share, low, high in SESSION_SHAPES:
        if r < share:
            return rng.randint(low, high)
        r -= share
    return rng.randint(SESSION_SHAPES[-1][1], SESSION_SHAPES[-1][2])


class _Spec:
    """The driver's instructions (see :meth:`kmuxd.tools.soak.driver.Soak.client_spec`)."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.socket: str = raw["socket"]
        self.proc: int = raw["proc"]
        self.seed: int = raw["seed"]
        #: time.monotonic() at which sessions stop sending (the same clock in every process)
        self.end: float = raw["end"]
        self.groups: list[dict[str, Any]] = raw["groups"]  # {name, mode, weight}
        self.window_max: int = raw["window_max"]
        self.max_size: int = raw["max_size"]
        self.queue_timeout: float = raw["queue_timeout"]
        self.result: str = raw["result"]


def _wait(cond: threading.Condition, pred: Callable[[], bool], timeout: float) -> bool:
    return cond.wait_for(pred, timeout)


def run_request_session(spec: _Spec, group: str, mode: str, session: int, rng: random.Random,
                        end: float) -> dict[str, Any]:
    ledger = RequestLedger(session, mode)
    count = _session_length(rng)
    window = rng.randint(1, spec.window_max)
    abrupt = rng.random() < ABRUPT_SHARE
    leave_after = rng.randint(0, count) if abrupt else count
    cond = threading.Condition()
    stop = threading.Event()
    client = kmux.connect(group, spec.socket, name=f"soak{session}", timeout=CONNECT_TIMEOUT)

    # The receiving thread's own choices, drawn here so the plan does not depend on thread timing.
    pause_after = rng.randint(1, 100) if rng.random() < PAUSE_SHARE else None
    pause_for = rng.uniform(*PAUSE)
    toggle_after = rng.randint(1, 100) if rng.random() < TOGGLE_SHARE else None

    def receive() -> None:
        got = 0
        while not stop.is_set():
            got += 1
            if got == pause_after:
                stop.wait(pause_for)  # reads nothing meanwhile: its responses block their connection
            if got == toggle_after:
                client.set_receive(False)  # id/fifo: its responses are still its own
            elif toggle_after is not None and got == toggle_after + TOGGLE_SPAN:
                client.set_receive(True)
            try:
                msg = client.recv(timeout=RECV_POLL)
            except TimeoutError:
                continue
            except (DaemonShutdown, ClientClosed) as exc:
                with cond:
                    ledger.client_error(f"receive: {exc}")
                    cond.notify_all()
                return
            except KmuxError as exc:
                with cond:
                    ledger.notice(exc.code, exc.seq, dict(exc.details))
                    cond.notify_all()
                continue
            except OSError as exc:
                with cond:
                    ledger.client_error(f"receive: {exc!r}")
                    cond.notify_all()
                return
            with cond:
                ledger.response(msg)
                cond.notify_all()

    receiver = threading.Thread(target=receive, name=f"rx{session}", daemon=True)
    receiver.start()
    send_failed = False
    try:
        for seq in range(1, leave_after + 1):
            if time.monotonic() >= end:
                break
            size = frame_size(rng, spec.max_size)
            rid = rng.randint(1, window + 2) if mode == "id" else 0  # ids collide: rewrite must cope
            frame = make_frame(session, seq, rid, size, rng)
            with cond:
                if not _wait(cond, lambda: len(ledger.outstanding) < window, WINDOW_WAIT):
                    ledger.client_error(f"window of {window} never opened in {WINDOW_WAIT}s")
                    send_failed = True
                    break
                ledger.will_send(seq, rid, size)
            got = client.send(frame)
            if got != seq:
                with cond:
                    ledger.client_error(f"send returned seq {got}, expected {seq}")
        if abrupt:
            time.sleep(rng.uniform(0, 0.02))  # leave at a random point of the answers' arrival
        else:
            with cond:
                _wait(cond, lambda: not ledger.outstanding, GRACEFUL_WAIT)
    except (DaemonShutdown, ClientClosed, OSError) as exc:
        with cond:
            ledger.client_error(f"send: {exc!r}")
        send_failed = True
    finally:
        stop.set()
        receiver.join(RECV_POLL * 20)
        with cond:
            ledger.close(graceful=not abrupt and not send_failed)
        client.close()
    return {**ledger.summary(), "client_id": client.client_id, "departure": "abrupt" if abrupt else "graceful"}


def run_oneway_session(spec: _Spec, group: str, session: int, rng: random.Random, end: float) -> dict[str, Any]:
    ledger = OneWayLedger(session)
    count = _session_length(rng)
    abrupt = rng.random() < ABRUPT_SHARE
    client = kmux.connect(group, spec.socket, receive=False, name=f"soak{session}", timeout=CONNECT_TIMEOUT)

    def read_notices(timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                ledger.data(client.recv(timeout=max(left, 0.001)))
            except TimeoutError:
                if left <= 0:
                    return
            except (DaemonShutdown, ClientClosed) as exc:
                ledger.client_error(f"receive: {exc}")
                return
            except KmuxError as exc:
                ledger.notice(exc.code, exc.seq, dict(exc.details))

    try:
        for seq in range(1, count + 1):
            if time.monotonic() >= end:
                break
            size = frame_size(rng, spec.max_size)
            frame = make_frame(session, seq, 0, size, rng)
            ledger.will_send(seq, size)
            if client.send(frame) != seq:
                ledger.client_error(f"send returned another seq than {seq}")
            if seq % BALANCE_BURST == 0:
                read_notices(0)
                time.sleep(BALANCE_PAUSE)
        if not abrupt:
            # close() drops what the daemon has not read yet (push-back during an
            # outage): a graceful sender waits until it has read everything.
            client.flush(timeout=FLUSH_TIMEOUT)
        # With queue_timeout on, a refusal may come up to queue_timeout after the last send.
        read_notices(0 if abrupt or not spec.queue_timeout else spec.queue_timeout + 1.0)
    except (DaemonShutdown, ClientClosed, OSError) as exc:
        ledger.client_error(f"send: {exc!r}")
    finally:
        client.close()
    return {**ledger.summary(), "client_id": client.client_id, "departure": "abrupt" if abrupt else "graceful"}


def run_process(spec: _Spec) -> int:
    rng = random.Random(spec.seed * 1_000_003 + spec.proc)
    end = spec.end
    names = [g["name"] for g in spec.groups]
    weights = [g["weight"] for g in spec.groups]
    modes = {g["name"]: g["mode"] for g in spec.groups}
    with open(spec.result, "a", buffering=1) as out:
        k = 0
        while time.monotonic() < end and k < MAX_SESSIONS - 1:
            k += 1
            session = session_id(spec.proc, k)
            group = rng.choices(names, weights)[0]
            mode = modes[group]
            t0 = time.monotonic()
            record: dict[str, Any] = {"proc": spec.proc, "group": group, "mode": mode, "session": session}
            try:
                if mode == "balance":
                    record.update(run_oneway_session(spec, group, session, rng, end))
                else:
                    record.update(run_request_session(spec, group, mode, session, rng, end))
            except (KmuxError, OSError, TimeoutError) as exc:  # connect failed: the driver counts it
                record["connect_error"] = f"{type(exc).__name__}: {exc}"
            record["seconds"] = round(time.monotonic() - t0, 3)
            out.write(json.dumps(record) + "\n")
            time.sleep(rng.uniform(0, SESSION_GAP))
        out.write(json.dumps({"proc": spec.proc, "done": True, "sessions": k}) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m kmuxd.tools.soak.client SPEC_JSON (started by the soak driver)", file=sys.stderr)
        return 2
    return run_process(_Spec(json.loads(argv[0])))


if __name__ == "__main__":
    sys.exit(main())
