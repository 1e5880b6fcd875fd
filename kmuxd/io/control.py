"""The control socket: statistics and operator actions for ``kmux-cli``.

Theory of operation
-------------------
One SEQPACKET packet in (a msgpack map), one packet out, in order, on any
number of connections. :func:`parse_request` validates a request against
:data:`REQUESTS` (the op, its required and optional arguments and their
types, and the privilege it needs) with no I/O, so every malformed request
gets a ``bad_request`` answer and never reaches the daemon.
:func:`authorize` then decides from the peer's credentials, again with no
I/O. :class:`ControlServer` is the thin shell: accept, read the peer's
credentials once (``SO_PEERCRED`` is fixed at ``connect()``), read,
check, dispatch to the daemon, answer. Answers carry the ``statistics()``
records as maps; nothing here reads daemon internals. A ``stats`` answer
also carries this server's own :class:`ControlStatistics` as ``control``.

Privileges
----------
Two levels, one per op in :data:`REQUESTS` (data, not scattered conditions):

* :attr:`Privilege.READ` (``ping``, ``stats``; ``kmux-cli metrics`` uses
  ``stats``): whoever may connect. The socket is root-only (0600) unless
  ``control_group`` names a group (0660, that group); under socket
  activation the unit's ``SocketMode=``/``SocketGroup=`` decide. The
  kernel enforces the mode, so a refused user never reaches this code.
* :attr:`Privilege.ATTACH` (``attach``, ``unattach``): root, kmuxd's own
  uid, or a peer the group's ``attach_users``/``attach_groups`` admits
  (:func:`kmuxd.core.attach.may_attach`, on ``SO_PEERCRED`` and
  ``SO_PEERGROUPS``), decided once the group is known. ``attach`` is the
  one op that carries a descriptor (``SCM_RIGHTS``): at most
  :data:`PASSED_FDS_MAX` are received per packet (the kernel closes the
  rest), and every descriptor received is closed unless it joins a pool,
  whatever the op and whatever the answer.
* :attr:`Privilege.ADMIN` (``reconnect``, ``drain``, ``reload``): uid 0,
  checked with ``SO_PEERCRED`` whatever the file mode, so letting a group
  look never lets it act. kmuxd's own uid (when it does not run as root)
  counts as admin too: a process with that uid can signal or ptrace the
  daemon anyway, and refusing it would leave a non-root kmuxd unmanageable.

A refusal is an answer (``permission_denied``, naming the op and the
rule), counted per op in :class:`ControlStatistics` and logged as
``control_refused`` with the peer's uid, pid and comm, at most once per
:data:`REFUSAL_LOG_INTERVAL` per uid (the rest are counted in the next
line's ``suppressed``).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import grp
import os
import reprlib
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import msgpack
import trio

from kmux.errors import AttachRefused, BadRequest, KmuxError, PermissionDenied

from kmuxd.core.attach import may_attach

from kmuxd.system.log import RateLimit
from .attach import adopt
from .peercred import PeerCred
from .listen import AcceptingServer, bind_seqpacket
from .sockerr import SocketErrors

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = [
    "ControlRequest",
    "ControlServer",
    "ControlStatistics",
    "OpSpec",
    "Privilege",
    "authorize",
    "parse_request",
    "REQUESTS",
    "to_wire",
]

#: Largest request packet; requests are tiny.
REQUEST_MAX = 4096
#: Largest answer packet (a stats answer with thousands of clients).
ANSWER_MAX = 16 * 1024 * 1024
#: Default and largest drain timeout a request may ask for, seconds.
DRAIN_TIMEOUT_DEFAULT = 10.0
DRAIN_TIMEOUT_MAX = 600.0
#: Seconds between two ``control_refused`` log lines for one uid (all are counted).
REFUSAL_LOG_INTERVAL = 10.0
#: Uids whose refusal log rate is tracked at once; the least recent is forgotten first.
REFUSAL_LOG_UIDS = 256
#: Key of :attr:`ControlStatistics.requests` for requests that did not parse.
INVALID_OP = "invalid"
#: Descriptors read from one request packet (``attach`` takes one); the kernel closes any beyond.
PASSED_FDS_MAX = 4
_ANC_SIZE = socket.CMSG_SPACE(PASSED_FDS_MAX * 4)


class Privilege(enum.Enum):
    #: Whoever the socket's file mode lets connect (root, or ``control_group``).
    READ = "read"
    #: uid 0 (or kmuxd's own uid), checked with SO_PEERCRED whatever the file mode.
    ADMIN = "admin"
    #: Root, kmuxd's own uid, or whom the group's attach_users/attach_groups admit.
    ATTACH = "attach"


_NUMBER = (int, float)


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One op of the control protocol: its arguments and who may ask for it."""

    #: {argument: type} that must be present / may be present.
    required: Mapping[str, Any]
    optional: Mapping[str, Any]
    privilege: Privilege


READ, ADMIN, ATTACH = Privilege.READ, Privilege.ADMIN, Privilege.ATTACH
REQUESTS: dict[str, OpSpec] = {
    "ping": OpSpec({}, {}, READ),
    "stats": OpSpec({}, {"group": str}, READ),
    "reconnect": OpSpec({"group": str}, {"conn": int}, ADMIN),
    "drain": OpSpec({"group": str, "conn": int}, {"timeout": _NUMBER}, ADMIN),
    "reload": OpSpec({}, {}, ADMIN),
    # A descriptor rides along (SCM_RIGHTS); the answer names the connection it became.
    "attach": OpSpec({"group": str}, {}, ATTACH),
    "unattach": OpSpec({"group": str, "conn": int}, {}, ATTACH),
}


@dataclass(frozen=True, slots=True)
class ControlRequest:
    op: str
    args: dict[str, Any]


def parse_request(packet: bytes) -> ControlRequest:
    """Validate one request packet. Raises BadRequest with the reason."""
    if len(packet) > REQUEST_MAX:
        raise BadRequest(f"request is {len(packet)} bytes, the limit is {REQUEST_MAX}")
    try:
        data = msgpack.unpackb(packet, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadRequest(f"request is not valid msgpack: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("request must be a msgpack map")
    op = data.pop("op", None)
    if op is None and "kmux" in data and "group" in data:
        raise BadRequest(
            f"an app's hello (group {reprlib.repr(data['group'])}) on the control socket: "
            "apps connect to the app socket ([daemon] socket), not the control socket"
        )
    if not isinstance(op, str) or op not in REQUESTS:  # a list op is unhashable
        # reprlib: a value nested ~1000 deep would overflow the stack in repr().
        raise BadRequest(f"unknown op {reprlib.repr(op)} (ops: {', '.join(sorted(REQUESTS))})")
    spec = REQUESTS[op]
    for key in spec.required:
        if key not in data:
            raise BadRequest(f"op {op!r} needs {key!r}")
    for key, value in data.items():
        kind = spec.required.get(key) or spec.optional.get(key)
        if kind is None:
            raise BadRequest(f"op {op!r} takes no {key!r}")
        if isinstance(value, bool) or not isinstance(value, kind):
            raise BadRequest(f"{op}.{key} has the wrong type: {reprlib.repr(value)}")
    if op == "drain":
        timeout = data.get("timeout", DRAIN_TIMEOUT_DEFAULT)
        if not 0 < timeout <= DRAIN_TIMEOUT_MAX:
            raise BadRequest(f"drain.timeout must be in (0, {DRAIN_TIMEOUT_MAX}]")
        data["timeout"] = float(timeout)
    return ControlRequest(op, data)


def privilege_rule(privilege: Privilege, *, control_group: str = "", daemon_uid: int = 0) -> str:
    """The rule of a privilege level in words, for answers, logs and docs."""
    if privilege is Privilege.READ:
        who = f"root, or members of group {control_group!r}" if control_group else "root"
        return f"whoever the control socket's file mode lets connect ({who})"
    if privilege is Privilege.ATTACH:
        return "root, kmuxd's own uid, or a user or group in the group's attach_users / attach_groups"
    admins = "uid 0 (root)" if daemon_uid == 0 else f"uid 0 (root) or kmuxd's own uid {daemon_uid}"
    return f"{admins}, whatever the socket's file mode"


def authorize(op: str, uid: int, *, daemon_uid: int = 0, control_group: str = "") -> None:
    """Raise PermissionDenied unless a peer with ``uid`` may ask for ``op``.

    READ ops pass: the kernel already applied the file mode when the peer
    connected. ADMIN ops need uid 0 or ``daemon_uid``. ATTACH ops pass here:
    the group decides (:func:`kmuxd.core.attach.may_attach`).
    """
    privilege = REQUESTS[op].privilege
    if privilege is not Privilege.ADMIN or uid in (0, daemon_uid):
        return
    rule = privilege_rule(privilege, control_group=control_group, daemon_uid=daemon_uid)
    raise PermissionDenied(f"{op} needs {rule}; you are uid {uid}", op=op, rule=rule)


def to_wire(record: Any) -> Any:
    """A statistics record (nested frozen dataclasses) as plain maps."""
    if dataclasses.is_dataclass(record):
        return {f.name: to_wire(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if isinstance(record, (list, tuple)):
        return [to_wire(r) for r in record]
    return record


def encode_answer(answer: dict[str, Any]) -> bytes:
    return msgpack.packb({"ok": True, **answer})


def encode_error(err: KmuxError) -> bytes:
    return msgpack.packb({"ok": False, **err.to_wire()})


def bind_control(path: str, group: str) -> socket.socket:
    """Root only (0600), or 0660 owned by ``group`` when one is configured."""
    sock = bind_seqpacket(path, 0o660 if group else 0o600)
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    return sock


@dataclass(frozen=True, slots=True)
class ControlStatistics:
    """The control server's own counters (in every ``stats`` answer as ``control``)."""

    #: Control connections open now, and accepted since start.
    connections: int
    connections_total: int
    #: Requests received, by op; those that did not parse count under "invalid".
    requests: dict[str, int]
    #: Requests refused with permission_denied, by op.
    refused: dict[str, int]
    #: Requests answered with any other error (bad_request, unknown_group, ...).
    errors: int


class ControlServer(AcceptingServer):
    """Serves the control socket for a :class:`~kmuxd.io.daemon.Daemon` (see the module doc)."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.log = daemon.log.bind(component="control")
        self.daemon_uid = os.geteuid()
        self.connections = 0
        self.connections_total = 0
        self._requests: collections.Counter[str] = collections.Counter()
        self._refused: collections.Counter[str] = collections.Counter()
        self.errors = 0
        self._refusal_logs: collections.OrderedDict[int, RateLimit] = collections.OrderedDict()
        #: Control connections that ended on a socket error (counted, logged rate-limited).
        self.socket_errors = SocketErrors(self.log, "control_socket_error")

    @property
    def requests(self) -> int:
        return sum(self._requests.values())

    def statistics(self) -> ControlStatistics:
        return ControlStatistics(
            connections=self.connections,
            connections_total=self.connections_total,
            requests=dict(self._requests),
            refused=dict(self._refused),
            errors=self.errors,
        )

    async def _handle(self, sock: socket.socket) -> None:
        """One control connection: requests answered in order until it closes."""
        sock.setblocking(False)
        self.connections += 1
        self.connections_total += 1
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, ANSWER_MAX)
        except OSError as exc:
            # Answers up to the default buffer still go out; a larger one fails and is logged below.
            self.socket_errors.note("set_sndbuf", exc, None)
        try:
            cred = PeerCred.of(sock)
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    packet, anc, flags, _ = sock.recvmsg(REQUEST_MAX + 1, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
                except BlockingIOError:
                    continue
                fds = _passed_fds(anc)
                if not packet:
                    _close_fds(fds)
                    return
                try:
                    answer = await self._answer(packet, flags, cred, fds)
                finally:
                    _close_fds(fds)  # whatever no pool took
                await _send_packet(sock, answer)
        except OSError as exc:  # the peer left mid-request (debug), or a real failure (warning)
            self.socket_errors.note("serve", exc, sock)
            return
        finally:
            self.connections -= 1
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _answer(self, packet: bytes, flags: int, cred: PeerCred, fds: list[int]) -> bytes:
        op = INVALID_OP
        try:
            if flags & int(socket.MSG_TRUNC):
                raise BadRequest(f"request is over {REQUEST_MAX} bytes")
            request = parse_request(packet)
            op = request.op
            self._requests[op] += 1
            authorize(op, cred.uid, daemon_uid=self.daemon_uid, control_group=self.daemon.config.daemon.control_group)
            if REQUESTS[op].privilege is Privilege.ATTACH:
                result = await self._attach_op(request, cred, fds)
            elif fds:
                raise BadRequest(f"op {op!r} takes no descriptor (only attach does); it was closed")
            else:
                result = await self.daemon.control(request)
            if op == "stats":
                result["control"] = to_wire(self.statistics())
            answer = encode_answer(result)
            if len(answer) > ANSWER_MAX:
                raise BadRequest(f"answer of {len(answer)} bytes is over {ANSWER_MAX}; ask for one group")
            return answer
        except PermissionDenied as err:
            self._refused[op] += 1
            self._log_refusal(cred, op, err)
            return encode_error(err)
        except KmuxError as err:
            if op == INVALID_OP:
                self._requests[op] += 1
            self.errors += 1
            self.log.info("control_error", error_code=err.code, error=err.message, pid=cred.pid, comm=cred.comm)
            return encode_error(err)

    async def _attach_op(self, request: ControlRequest, cred: PeerCred, fds: list[int]) -> dict:
        """``attach`` (takes the one descriptor out of ``fds``) or ``unattach``."""
        group = self.daemon.group(request.args["group"])
        policy = group.cfg.attach
        if not may_attach(policy, cred.uid, cred.gid, cred.groups, daemon_uid=self.daemon_uid):
            rule = privilege_rule(Privilege.ATTACH)
            raise PermissionDenied(
                f"{request.op} to group {group.cfg.name!r} needs {rule}"
                + ("" if policy is not None else " (this group sets neither)") + f"; you are uid {cred.uid}",
                op=request.op, rule=rule)
        if request.op == "unattach":
            if fds:
                raise BadRequest("op 'unattach' takes no descriptor; it was closed")
            return await group.attached.unattach(request.args["conn"])
        if len(fds) != 1:
            raise AttachRefused(f"attach needs exactly one descriptor (SCM_RIGHTS), got {len(fds)}",
                                reason="no_descriptor")
        sock = adopt(fds.pop())
        slot = group.attached.attach(sock, cred)
        return {"conn": slot.index, "remote": str(slot.peer)}

    def _log_refusal(self, cred: PeerCred, op: str, err: PermissionDenied) -> None:
        """``control_refused``, rate-limited per uid with a bounded table of limiters."""
        limiter = self._refusal_logs.pop(cred.uid, None) or RateLimit(REFUSAL_LOG_INTERVAL)
        self._refusal_logs[cred.uid] = limiter  # most recent last
        while len(self._refusal_logs) > REFUSAL_LOG_UIDS:
            self._refusal_logs.popitem(last=False)
        if limiter.allow():
            self.log.warning(
                "control_refused", op=op, uid=cred.uid, pid=cred.pid, comm=cred.comm,
                rule=err.details.get("rule"), suppressed=limiter.take_suppressed(),
            )


def _passed_fds(anc: list) -> list[int]:
    """The descriptors an ``SCM_RIGHTS`` message brought (now ours to close)."""
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
    return fds


def _close_fds(fds: list[int]) -> None:
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass  # closed whatever close() says


async def _send_packet(sock: socket.socket, packet: bytes) -> None:
    while True:
        try:
            sock.send(packet)
            return
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
