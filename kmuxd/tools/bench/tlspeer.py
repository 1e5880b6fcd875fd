"""The benchmark's TLS parties: certificates made for the run, and a TLS terminator for the flood.

TLS rows put kmuxd's TLS groups next to its plaintext ones in the same run
(docs/benchmark.md, "TLS"):

* request/response goes to a second memcached started with ``-Z`` (its
  own TLS, in C), preloaded like the plaintext one;
* the flood goes to this module's terminator, which takes TLS on one port
  and forwards the plaintext to the run's sink, so the sink counts the TLS
  rows' messages exactly as it counts the others'.

    python -m kmuxd.tools.bench.tlspeer --cert PEM --key PEM --upstream PORT

It prints ``listening PORT``. One thread serves every connection: readiness
once (``selectors``), then each ready TLS socket is drained record after
record into one buffer (never once per message), and the plaintext is
written upstream with one ``sendall`` per buffer; a slow sink pushes back
through it to kmuxd. One way only (client to upstream): the flood needs no
more. It runs until killed.

:func:`make_certs` writes a CA and a server certificate for ``localhost``
and 127.0.0.1 with the ``openssl`` command line (RuntimeError if it is
missing: the TLS rows are then skipped with that reason).
"""

from __future__ import annotations

import argparse
import selectors
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

__all__ = ["make_certs", "SERVER_NAME", "serve"]

SERVER_NAME = "localhost"
#: Bytes gathered from one TLS connection before they are written upstream.
FORWARD_CHUNK = 256 * 1024
#: Seconds one openssl command may take.
OPENSSL_TIMEOUT = 30


def _openssl(*args: str) -> None:
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=OPENSSL_TIMEOUT)
    if r.returncode:
        raise RuntimeError(f"openssl {args[0]} failed: {r.stderr.strip()[-300:]}")


def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) for SERVER_NAME and 127.0.0.1, valid 2 days."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is not installed (the Debian package 'openssl')")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr, ext = (directory / n for n in ("server.pem", "server.key", "server.csr", "server.ext"))
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", "/CN=kmux bench CA")
    _openssl("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={SERVER_NAME}")
    ext.write_text(f"subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(cert), "-days", "2", "-extfile", str(ext))
    for k in (ca_key, key):
        k.chmod(0o600)
    return ca, cert, key


class _Link:
    __slots__ = ("tls", "up", "ready")

    def __init__(self, tls: ssl.SSLSocket, up: socket.socket) -> None:
        self.tls = tls
        self.up = up
        self.ready = False


def serve(listener: socket.socket, ctx: ssl.SSLContext, upstream: int) -> None:
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    buf = bytearray(FORWARD_CHUNK + 16384)
    view = memoryview(buf)

    def close(link: _Link) -> None:
        sel.unregister(link.tls)
        link.tls.close()
        link.up.close()

    while True:
        for key, _ in sel.select():
            if key.data is None:
                try:
                    raw, _ = listener.accept()
                except BlockingIOError:
                    continue
                raw.setblocking(False)
                up = socket.create_connection(("127.0.0.1", upstream))
                up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tls = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                sel.register(tls, selectors.EVENT_READ, _Link(tls, up))
                continue
            link: _Link = key.data
            if not link.ready:
                try:
                    link.tls.do_handshake()
                    link.ready = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    continue
                except (ssl.SSLError, OSError):
                    close(link)
                    continue
            n = 0
            ended = False
            while True:
                try:
                    k = link.tls.recv_into(view[n : n + 16384])
                except ssl.SSLWantReadError:
                    break
                except (ssl.SSLError, OSError):
                    ended = True
                    break
                if k == 0:
                    ended = True
                    break
                n += k
                if n >= FORWARD_CHUNK:  # drain what TLS holds, in chunks: nothing waits inside it
                    link.up.sendall(view[:n])
                    n = 0
            if n:
                link.up.sendall(view[:n])
            if ended:
                close(link)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m kmuxd.tools.bench.tlspeer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--upstream", type=int, required=True, help="the plaintext service's port on 127.0.0.1")
    a = ap.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    print(f"listening {listener.getsockname()[1]}", flush=True)
    serve(listener, ctx, a.upstream)


if __name__ == "__main__":
    main()
