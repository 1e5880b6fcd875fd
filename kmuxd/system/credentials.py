"""Secrets the daemon holds for its groups: where their files are, who may read them, and how to write one.

Theory of operation
-------------------
Apps never see a backend's password or a TLS key: the daemon reads them
(``[[groups.NAME.handshake]] send_file``, ``[groups.NAME.tls] key``) and
apps only name the group. Three things keep that promise honest:

* **Where a file is** (:func:`credential_path`). A relative name is a
  systemd credential: it is looked up in ``$CREDENTIALS_DIRECTORY``, which
  systemd fills from ``LoadCredential=`` (a file) or
  ``LoadCredentialEncrypted=`` (sealed with the host key or the TPM), so the
  secret lives outside ``/etc/kmuxd`` and only the service sees it. An
  absolute path is used as given. A relative name without the variable is a
  configuration error that says both ways out; it never falls back to the
  working directory. systemd copies the credentials at start (whether a
  reload refreshes what the running service sees depends on its version),
  so a changed credential is sure to apply after ``systemctl restart``.
  ``kmuxd --check`` run as ``ExecReload=`` reads the main process's
  credentials, which systemd hides from it (:func:`_hidden_from_reload`).
* **Who may read it** (:func:`secret_file_warning`). ``kmuxd --check`` warns
  when a secret is group- or world-readable: the daemon still runs, but the
  operator learns that local users can read what the apps were meant never
  to see. One check, used for handshake files and TLS keys alike.
* **How to write one** (``kmuxd handshake KIND``). A handshake file is one
  raw protocol message; :func:`memcached_sasl_plain` builds memcached's
  binary ``SASL_AUTH`` with the ``PLAIN`` mechanism. The password is read
  from a file or standard input, never from the command line (where ``ps``
  and the shell's history would show it), and the output is created mode
  0600 (``--output``) or refused on a terminal.
"""

from __future__ import annotations

import argparse
import os
import stat
import struct
import sys
from pathlib import Path
from typing import Any, Mapping

from kmux.errors import ConfigInvalid

__all__ = [
    "CREDENTIALS_ENV", "credential_path", "secret_file_warning", "memcached_sasl_plain", "MEMCACHED_SASL_EXPECT",
    "build_parser", "main",
]

#: The variable systemd sets for a unit with LoadCredential=/LoadCredentialEncrypted=.
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
#: Largest password accepted by ``kmuxd handshake`` (bytes; memcached's SASL takes far less).
PASSWORD_MAX = 4096


def credential_path(value: Any, path: str, env: Mapping[str, str] | None = None) -> Path:
    """The file a ``send_file``-like setting names; ConfigInvalid naming ``path`` if it cannot be one.

    Absolute: as given. Relative: a credential name in ``$CREDENTIALS_DIRECTORY``.
    Whether the file exists and can be read is the caller's check (it reads it).
    """
    env = os.environ if env is None else env
    if not isinstance(value, str) or not value:
        raise ConfigInvalid(path, f"must be an absolute path or a credential name, not {value!r}")
    if value.startswith("/"):
        return Path(value)
    if "/" in value or value in (".", ".."):
        raise ConfigInvalid(path, f"{value!r} is relative, so it must be a credential name (no '/'), "
                                  "or give an absolute path")
    directory = env.get(CREDENTIALS_ENV)
    if not directory:
        raise ConfigInvalid(
            path,
            f"{value!r} is a credential name, but ${CREDENTIALS_ENV} is not set: run kmuxd under systemd with "
            f"LoadCredential={value}:/path/to/file (or LoadCredentialEncrypted=) in a drop-in "
            "(docs/systemd.md, \"Credentials\"), or give an absolute path",
        )
    if _hidden_from_reload(directory, env):
        return Path(f"/proc/{env['MAINPID']}/root") / directory.lstrip("/") / value
    return Path(directory) / value


def _hidden_from_reload(directory: str, env: Mapping[str, str]) -> bool:
    """True in ``ExecReload=`` of a unit with a mount namespace, where systemd hides the credentials.

    systemd (252 at least, systemd#35227) sets ``$CREDENTIALS_DIRECTORY`` for
    ``ExecReload=`` but masks ``/run/credentials`` in its namespace. It also
    sets ``$MAINPID``; the main process's own view, through
    ``/proc/MAINPID/root``, is exactly what the daemon will read when it
    reloads, so the check reads that.
    """
    main_pid = env.get("MAINPID", "")
    return main_pid.isdigit() and not os.access(directory, os.X_OK)


def secret_file_warning(path: Path) -> str | None:
    """A warning when ``path`` is group- or world-readable; None when it is private (or cannot be stat'ed).

    The one check for every secret the configuration names (handshake
    ``send_file``, TLS ``key``): ``kmuxd --check`` prints it, the daemon logs it.
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # reading it fails with a clearer error elsewhere
    readable = [who for who, bit in (("its group", stat.S_IRGRP), ("everyone", stat.S_IROTH)) if mode & bit]
    if not readable:
        return None
    return (f"{path} is readable by {' and '.join(readable)} (mode {stat.S_IMODE(mode):04o}); "
            f"only root should read it: chmod 600 {path}")


# -- handshake files --------------------------------------------------------------------

#: memcached binary protocol: request magic, SASL_AUTH opcode, header layout.
_MC_REQUEST, _MC_SASL_AUTH = 0x80, 0x21
_MC_HEADER = struct.Struct(">BBHBBHIIQ")
#: The reply to check: its status (bytes 6..7) is 0x0000 on success, 0x0020 on an auth error.
MEMCACHED_SASL_EXPECT = {"expect_offset": 6, "expect_hex": "0000"}


def memcached_sasl_plain(user: str, password: bytes, *, authzid: str = "") -> bytes:
    """memcached's binary ``SASL_AUTH`` request, mechanism ``PLAIN`` (RFC 4616: authzid NUL authcid NUL passwd)."""
    if "\0" in user or "\0" in authzid or b"\0" in password:
        raise ValueError("a SASL PLAIN user, authzid or password cannot contain a NUL byte")
    if not user or not password:
        raise ValueError("SASL PLAIN needs a user and a password")
    key = b"PLAIN"
    value = authzid.encode() + b"\0" + user.encode() + b"\0" + password
    header = _MC_HEADER.pack(_MC_REQUEST, _MC_SASL_AUTH, len(key), 0, 0, 0, len(key) + len(value), 0, 0)
    return header + key + value


def _read_password(name: str) -> bytes:
    """The password from a file (``-``: standard input); one trailing newline is not part of it."""
    if name == "-":
        data = sys.stdin.buffer.read(PASSWORD_MAX + 2)
    else:
        with open(name, "rb") as f:
            data = f.read(PASSWORD_MAX + 2)
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if len(data) > PASSWORD_MAX:
        raise ValueError(f"the password is longer than {PASSWORD_MAX} bytes")
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmuxd handshake",
        allow_abbrev=False,  # "--password X" must not pass for --password-file X
        description="write a handshake file ([[groups.NAME.handshake]] send_file) without a hex editor",
    )
    sub = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    mc = sub.add_parser(
        "memcached-sasl-plain",
        description="memcached binary SASL_AUTH, mechanism PLAIN; check the reply with expect_offset = 6, "
                    "expect_hex = \"0000\"",
        help="memcached binary SASL_AUTH with the PLAIN mechanism",
        allow_abbrev=False,
    )
    mc.add_argument("--user", required=True, help="the SASL user name (memcached adds @hostname itself)")
    mc.add_argument("--password-file", required=True, metavar="FILE",
                    help="file holding the password (one trailing newline ignored); - reads standard input. "
                         "There is no --password: a command line is visible to every local user")
    mc.add_argument("--output", "-o", metavar="FILE",
                    help="write here, created with mode 0600 (refused if it exists); default standard output")
    return parser


def _write(data: bytes, output: str | None) -> None:
    if output is None:
        if sys.stdout.isatty():
            raise ValueError("standard output is a terminal: redirect it to a file (umask 077 first), or use --output")
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        password = _read_password(args.password_file)
        data = memcached_sasl_plain(args.user, password)
        _write(data, args.output)
    except (OSError, ValueError) as exc:
        reason = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"kmuxd handshake: {reason}", file=sys.stderr)
        return 1
    expect = MEMCACHED_SASL_EXPECT
    print(f"kmuxd handshake: wrote {len(data)} bytes; in the group: send_file = ..., "
          f"expect_offset = {expect['expect_offset']}, expect_hex = \"{expect['expect_hex']}\"", file=sys.stderr)
    return 0
