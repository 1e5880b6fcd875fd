"""Secret files: where a credential name leads, the permission check, and the handshake file writer.

The writer's bytes are checked against memcached's binary protocol here;
tests/realservers/test_credentials.py authenticates with them against a
real memcached with SASL.
"""

from __future__ import annotations

import os
import pty
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kmux.errors import ConfigInvalid

from kmuxd.main import main as kmuxd_main
from kmuxd.system.credentials import credential_path, memcached_sasl_plain, secret_file_warning


def test_an_absolute_path_is_used_as_given() -> None:
    assert credential_path("/etc/kmuxd/mc-sasl", "k", {}) == Path("/etc/kmuxd/mc-sasl")


def test_a_relative_name_is_a_systemd_credential() -> None:
    env = {"CREDENTIALS_DIRECTORY": "/run/credentials/kmuxd.service"}
    assert credential_path("mc-sasl", "k", env) == Path("/run/credentials/kmuxd.service/mc-sasl")


def test_a_relative_name_without_credentials_directory_is_a_config_error() -> None:
    with pytest.raises(ConfigInvalid) as info:
        credential_path("mc-sasl", "groups.mc.handshake[0].send_file", {})
    err = info.value
    assert err.path == "groups.mc.handshake[0].send_file"
    assert "$CREDENTIALS_DIRECTORY is not set" in err.reason
    assert "LoadCredential=mc-sasl:" in err.reason and "absolute path" in err.reason


def test_execreload_reads_the_main_processs_credentials_when_its_own_are_hidden(tmp_path: Path) -> None:
    # systemd masks /run/credentials for ExecReload= (mode 000): root without capabilities cannot enter it.
    hidden = tmp_path / "credentials"
    hidden.mkdir(mode=0o000)
    probe = ("import sys; from kmuxd.system.credentials import credential_path; "
             "print(credential_path('mc', 'k', {'CREDENTIALS_DIRECTORY': sys.argv[1], 'MAINPID': '4242'}))")
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"] if os.geteuid() == 0 else []
    if drop and not shutil.which("setpriv"):
        pytest.skip("root, and no setpriv to drop the capabilities that would let it enter the directory")
    try:
        out = subprocess.run([*drop, sys.executable, "-c", probe, str(hidden)], capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip()
    finally:
        hidden.chmod(0o700)
    assert out == f"/proc/4242/root{hidden}/mc"
    env = {"CREDENTIALS_DIRECTORY": str(hidden), "MAINPID": "4242"}
    assert credential_path("mc", "k", env) == hidden / "mc"  # visible: its own


@pytest.mark.parametrize("value", ["sub/mc-sasl", "..", "", 7])
def test_what_is_neither_a_name_nor_an_absolute_path_is_refused(value: object) -> None:
    with pytest.raises(ConfigInvalid):
        credential_path(value, "k", {"CREDENTIALS_DIRECTORY": "/run/credentials/x"})


def test_a_group_or_world_readable_secret_draws_a_warning(tmp_path: Path) -> None:
    secret = tmp_path / "key.pem"
    secret.write_bytes(b"secret")
    secret.chmod(0o600)
    assert secret_file_warning(secret) is None
    secret.chmod(0o620)  # group-writable but not readable: not this check's business
    assert secret_file_warning(secret) is None
    secret.chmod(0o640)
    assert secret_file_warning(secret) == (f"{secret} is readable by its group (mode 0640); only root should read "
                                           f"it: chmod 600 {secret}")
    secret.chmod(0o604)
    assert "readable by everyone (mode 0604)" in secret_file_warning(secret)
    secret.chmod(0o644)
    assert "readable by its group and everyone (mode 0644)" in secret_file_warning(secret)
    assert secret_file_warning(tmp_path / "absent") is None


def test_memcached_sasl_plain_is_a_binary_sasl_auth_request() -> None:
    msg = memcached_sasl_plain("alice", b"s3cret")
    assert msg[:2] == b"\x80\x21"  # request magic, SASL_AUTH
    assert int.from_bytes(msg[2:4], "big") == 5 and msg[4] == 0  # key "PLAIN", no extras
    assert int.from_bytes(msg[8:12], "big") == len(msg) - 24
    assert msg[24:] == b"PLAIN" + b"\0alice\0s3cret"
    with pytest.raises(ValueError):
        memcached_sasl_plain("al\0ice", b"x")
    with pytest.raises(ValueError):
        memcached_sasl_plain("alice", b"")


def run_handshake(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kmuxd", "handshake", *args], input=stdin, capture_output=True,
                          timeout=30)


def test_the_writer_reads_the_password_from_a_file_or_stdin_and_writes_mode_0600(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_bytes(b"s3cret\n")
    out = tmp_path / "mc-sasl"
    proc = run_handshake("memcached-sasl-plain", "--user", "alice", "--password-file", str(pw), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == memcached_sasl_plain("alice", b"s3cret")  # the newline is not the password's
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert b"expect_offset = 6" in proc.stderr and b'expect_hex = "0000"' in proc.stderr
    again = run_handshake("memcached-sasl-plain", "--user", "alice", "--password-file", str(pw), "-o", str(out))
    assert again.returncode == 1 and b"File exists" in again.stderr  # never overwrites
    piped = run_handshake("memcached-sasl-plain", "--user", "alice", "--password-file", "-", stdin=b"s3cret\n")
    assert piped.returncode == 0 and piped.stdout == memcached_sasl_plain("alice", b"s3cret")


def test_there_is_no_way_to_put_the_password_on_the_command_line() -> None:
    proc = run_handshake("memcached-sasl-plain", "--user", "alice", "--password", "s3cret")
    assert proc.returncode == 2 and b"--password-file" in proc.stderr  # argparse: required, and no --password


def test_the_writer_refuses_a_terminal_for_its_binary_output(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_bytes(b"s3cret")
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "kmuxd", "handshake", "memcached-sasl-plain", "--user", "alice",
                               "--password-file", str(pw)], stdout=follower, stderr=subprocess.PIPE, timeout=30)
    finally:
        os.close(follower)
        os.close(leader)
    assert proc.returncode == 1 and b"standard output is a terminal" in proc.stderr


def test_kmuxd_main_dispatches_handshake(tmp_path: Path, capsysbinary: pytest.CaptureFixture) -> None:
    pw = tmp_path / "pw"
    pw.write_bytes(b"pw")
    out = tmp_path / "f"
    assert kmuxd_main(["handshake", "memcached-sasl-plain", "--user", "u", "--password-file", str(pw),
                       "-o", str(out)]) == 0
    assert out.read_bytes() == memcached_sasl_plain("u", b"pw")
