"""Real servers that want TLS or credentials: memcached with TLS, memcached with SASL.

* :func:`start_memcached_tls`: Debian's memcached with ``-Z`` (TLS on its
  port): ``ssl_chain_cert``, ``ssl_key``, ``ssl_ca_cert`` and
  ``ssl_verify_mode`` (2: a client certificate is required), and the
  server-side session cache so sessions can be resumed.
* :func:`start_memcached_sasl`: memcached with ``-S`` (SASL required, the
  ASCII protocol off). Its users live in a sasldb made with ``saslpasswd2``
  (sasl2-bin); memcached looks a user up as ``user@<gethostname()>``, so
  the user is created with ``-u`` set to the host name; ``SASL_CONF_PATH``
  names the directory of ``memcached.conf`` (``mech_list: plain``).
* :func:`sasl_plain_auth`: the binary protocol's SASL_AUTH request (opcode
  0x21) for PLAIN, written from memcached's protocol documentation:
  key ``PLAIN``, value ``\\0user\\0password``. The tests write it to the
  group's handshake file.

Each waits (bounded) until the server answers a real request sent straight
to it, as the plaintext fixtures in ``conftest.py`` do, and is stopped by
the caller (``server.stop()``).
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.integration.certs import SERVER_NAME, Pki

from . import mc_request
from .conftest import Memcached, find_binary, free_port, response_over, version_over, wait_serving

OP_SASL_AUTH = 0x21
STATUS_AUTH_ERROR = 0x20
#: The SASL user the tests create, and the one password that is right.
SASL_USER = "kmuxuser"
SASL_PASSWORD = "s3cret-for-kmux"


class TlsMemcached(Memcached):
    pki: Pki | None

    def version(self, timeout: float = 2.0) -> str:
        """VERSION over TLS with the test client certificate, straight to the server (whose own
        certificate is not checked here: some tests give it a bad one on purpose)."""
        assert self.pki is not None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as s:
                return version_over(s)


def _memcached(short_dir: Path, cls: type, extra: list[str], env: dict[str, str] | None = None,
               pki: Pki | None = None) -> Memcached:
    binary = find_binary("memcached")
    if binary is None:
        pytest.skip("memcached is not installed (./dev.sh test installs the Debian package 'memcached')")
    # memcached reads its certificates and key before it drops to 'nobody'.
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []  # env execs: the pid is memcached's
    for attempt in range(3):
        port = free_port()
        argv = [*prefix, binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-t", "2", "-m", "64", "-c", "256",
                "-B", "binary", *user, *extra]
        server = cls(argv, short_dir / f"memcached-{port}.log", port)
        server.pki = pki
        try:
            wait_serving(server, server.version, "memcached")
        except AssertionError:
            server.stop()
            if attempt == 2 or "bind" not in server.output().lower():
                raise
            continue
        return server
    raise AssertionError("unreachable")


def start_memcached_tls(short_dir: Path, pki: Pki, *, cert: Path | None = None, key: Path | None = None,
                        verify_mode: int = 2) -> TlsMemcached:
    """memcached speaking TLS only, requiring a client certificate signed by ``pki.ca`` (verify_mode 2),
    with its session cache on (sessions can be resumed)."""
    opts = (f"ssl_chain_cert={cert or pki.server_cert},ssl_key={key or pki.server_key},ssl_ca_cert={pki.ca},"
            f"ssl_verify_mode={verify_mode},ssl_session_cache")
    return _memcached(short_dir, TlsMemcached, ["-Z", "-o", opts], pki=pki)  # type: ignore[return-value]


def sasl_plain_auth(user: str, password: str, opaque: int = 0) -> bytes:
    """memcached binary SASL_AUTH, mechanism PLAIN (RFC 4616: authzid NUL authcid NUL password)."""
    return mc_request(OP_SASL_AUTH, key=b"PLAIN", value=b"\0" + user.encode() + b"\0" + password.encode(),
                      opaque=opaque)


class SaslMemcached(Memcached):
    def version(self, timeout: float = 2.0) -> str:
        """SASL_AUTH with the right password, then VERSION, straight to the server."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(sasl_plain_auth(SASL_USER, SASL_PASSWORD, opaque=1))
            r = response_over(s)
            assert r.status == 0, f"SASL_AUTH answered {r.status:#x} {r.value!r}"
            return version_over(s)


def start_memcached_sasl(short_dir: Path) -> SaslMemcached:
    """memcached that wants SASL PLAIN before anything, with one user (SASL_USER, SASL_PASSWORD)."""
    saslpasswd2 = find_binary("saslpasswd2")
    if saslpasswd2 is None:
        pytest.skip("saslpasswd2 is not installed (./dev.sh test installs the Debian package 'sasl2-bin')")
    conf = short_dir / "sasl"
    conf.mkdir()
    db = conf / "sasldb"
    r = subprocess.run([saslpasswd2, "-p", "-a", "memcached", "-c", "-f", str(db), "-u", socket.gethostname(),
                        SASL_USER], input=SASL_PASSWORD, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"saslpasswd2 failed: {r.stderr}"
    (conf / "memcached.conf").write_text(f"mech_list: plain\nsasldb_path: {db}\n")
    for path in (short_dir, conf, db, conf / "memcached.conf"):  # read by memcached as 'nobody', at each login
        path.chmod(0o755 if path.is_dir() else 0o644)
    return _memcached(short_dir, SaslMemcached, ["-S"], env={"SASL_CONF_PATH": str(conf)})  # type: ignore[return-value]
