"""Who may use a group: the access policy, decided from a peer's credentials, with no I/O.

Theory of operation
-------------------
kmuxd runs as root and speaks for unprivileged apps, so the socket's file
mode (who may *connect*) is only the outer wall. Each group may narrow it:

* A group with neither ``allow_users`` nor ``allow_groups`` is **open**:
  every process that can open the apps' socket may use it.
* Otherwise a peer is admitted when its uid is in ``allow_users``, or its
  primary gid or any of its supplementary gids is in ``allow_groups``.
  An empty list admits nobody through that list.

The shell reads the peer's credentials from the kernel at the hello
(``SO_PEERCRED`` for uid, gid and pid, ``SO_PEERGROUPS`` for the
supplementary groups) and asks :meth:`AccessPolicy.admits`. Names were
resolved to ids when the configuration loaded, so the check is a set
lookup and a user renamed later does not change who is admitted until the
next reload.

Invariant: a refusal never names a group the caller may not use; the
policy's :meth:`~AccessPolicy.describe` is for operators (``kmux-cli``), not
for the refused app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

__all__ = ["AccessPolicy", "Principal", "OPEN"]


@dataclass(frozen=True, slots=True)
class Principal:
    """A user or group named in a policy: its id and how the operator wrote it."""

    id: int
    label: str

    def __str__(self) -> str:
        return self.label if self.label == str(self.id) else f"{self.label}({self.id})"


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    #: Admitted uids, or None when ``allow_users`` is not set.
    users: tuple[Principal, ...] | None = None
    #: Admitted gids (primary or supplementary), or None when ``allow_groups`` is not set.
    groups: tuple[Principal, ...] | None = None

    @property
    def open(self) -> bool:
        return self.users is None and self.groups is None

    def admits(self, uid: int, gid: int, supplementary: Iterable[int] = ()) -> bool:
        if self.open:
            return True
        if self.users is not None and any(p.id == uid for p in self.users):
            return True
        if self.groups is not None:
            ids = {p.id for p in self.groups}
            if gid in ids or not ids.isdisjoint(supplementary):
                return True
        return False

    def describe(self) -> str:
        """``open``, or who is allowed, for kmux-cli and logs."""
        if self.open:
            return "open"
        parts = []
        if self.users is not None:
            parts.append("users " + (", ".join(map(str, self.users)) or "(none)"))
        if self.groups is not None:
            parts.append("groups " + (", ".join(map(str, self.groups)) or "(none)"))
        return "; ".join(parts)

    def to_wire(self) -> dict:
        return {
            "open": self.open,
            "users": None if self.users is None else [[p.id, p.label] for p in self.users],
            "groups": None if self.groups is None else [[p.id, p.label] for p in self.groups],
            "text": self.describe(),
        }


OPEN = AccessPolicy()
