"""Certificates made when the tests run, with the ``openssl`` command line.

:func:`make_pki` makes a test CA and, signed by it, a server certificate for
``server.kmux.test`` and 127.0.0.1 and a client certificate; plus a second
CA that signed nothing the servers use ("the wrong CA"). :meth:`Pki.issue`
makes more (an expired one, one for another name). Keys are written mode
0600, as an operator would keep them. Nothing is cached between runs.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVER_NAME = "server.kmux.test"
#: Seconds one openssl command may take.
OPENSSL_TIMEOUT = 30


def _openssl(*args: str) -> None:
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=OPENSSL_TIMEOUT)
    assert r.returncode == 0, f"openssl {' '.join(args)} failed:\n{r.stderr}"


def _new_key_and_csr(key: Path, csr: Path, cn: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
    key.chmod(0o600)


@dataclass
class Pki:
    dir: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    #: A CA that signed none of the above.
    other_ca: Path

    def issue(self, name: str, cn: str, *, days: int = 30, san: str = f"DNS:{SERVER_NAME},IP:127.0.0.1",
              client: bool = False, ca: Path | None = None, ca_key: Path | None = None) -> tuple[Path, Path]:
        """A certificate (and its key) signed by the test CA; ``days=-1``: already expired."""
        key, csr, cert = (self.dir / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        _new_key_and_csr(key, csr, cn)
        ext = self.dir / f"{name}.ext"
        usage = "clientAuth" if client else "serverAuth"
        ext.write_text(f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else ""))
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca or self.ca), "-CAkey", str(ca_key or self.ca_key),
                 "-CAcreateserial", "-out", str(cert), "-days", str(days), "-extfile", str(ext))
        return cert, key


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", "30", "-subj", f"/CN=kmux test {name}")
    key.chmod(0o600)
    return cert, key


def make_pki(directory: Path) -> Pki:
    """A fresh CA, a server and a client certificate, and a second CA, in ``directory``."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (./dev.sh test installs the Debian package 'openssl')")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _make_ca(directory, "ca")
    other_ca, _ = _make_ca(directory, "other-ca")
    pki = Pki(directory, ca, ca_key, Path(), Path(), Path(), Path(), other_ca)
    pki.server_cert, pki.server_key = pki.issue("server", SERVER_NAME)
    pki.client_cert, pki.client_key = pki.issue("client", "kmuxd-client", client=True, san="")
    return pki
