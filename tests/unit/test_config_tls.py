"""[groups.NAME.tls] and [[groups.NAME.handshake]]: validation with key paths, warnings, reload comparison.

The files are real (a test PKI made with openssl, handshake files written
here); nothing runs but the configuration loader and ``kmuxd --check``.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kmux.errors import ConfigInvalid

from kmuxd.io.daemon import plan_reload
from kmuxd.system.config import parse_config

from tests.integration.certs import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def config(**group) -> dict:
    return {"version": 1, "groups": {"g": {"endpoints": ["127.0.0.1:9"], **group}}}


def problems(raw: dict) -> list[list[str]]:
    with pytest.raises(ConfigInvalid) as info:
        parse_config(raw)
    return info.value.problems


def mutual(pki) -> dict:
    return {"ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key), "server_name": "mc.test"}


def test_a_full_tls_table_loads(pki):
    c = parse_config(config(tls={**mutual(pki), "min_version": "1.3"}))
    tls = c.groups["g"].tls
    assert (tls.ca, tls.cert, tls.key, tls.server_name, tls.verify, tls.min_version) == (
        str(pki.ca), str(pki.client_cert), str(pki.client_key), "mc.test", True, "1.3")
    assert len(tls.fingerprint) == 64 and c.warnings == ()


def test_an_empty_tls_table_means_the_system_store_and_verify(pki):
    tls = parse_config(config(tls={})).groups["g"].tls
    assert tls.ca is None and tls.verify and tls.min_version == "1.2"


def test_verify_false_is_a_loud_warning():
    c = parse_config(config(tls={"verify": False}))
    (warning,) = c.warnings
    assert warning.startswith("groups.g.tls.verify: is false") and "NOT checked" in warning


@pytest.mark.parametrize("tls, path, text", [
    ({"bogus": 1}, "groups.g.tls.bogus", "unknown key"),
    ({"ca": "/nonexistent/ca.pem"}, "groups.g.tls.ca", "does not exist"),
    ({"min_version": "1.1"}, "groups.g.tls.min_version", "must be one of '1.2', '1.3'"),
    ({"verify": "yes"}, "groups.g.tls.verify", "true or false"),
    ({"server_name": "bad name!"}, "groups.g.tls.server_name", "host name"),
])
def test_tls_errors_name_the_key(tls, path, text):
    ((where, why),) = problems(config(tls=tls))
    assert where == path and text in why, (where, why)


def test_a_key_needs_its_certificate(pki):
    ((where, why),) = problems(config(tls={"key": str(pki.client_key)}))
    assert where == "groups.g.tls.key" and "needs cert" in why


def test_files_openssl_refuses_are_config_errors_naming_the_key(pki, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    ((where, why),) = problems(config(tls={"ca": str(bad)}))
    assert where == "groups.g.tls.ca" and "OpenSSL refused it" in why
    # a key that is not the certificate's
    ((where, why),) = problems(config(tls={"cert": str(pki.client_cert), "key": str(pki.server_key)}))
    assert where == "groups.g.tls.key" and "KEY_VALUES_MISMATCH" in why


def test_a_key_others_can_read_is_a_warning(pki, tmp_path):
    key = tmp_path / "client.key"
    key.write_bytes(pki.client_key.read_bytes())
    key.chmod(0o640)
    c = parse_config(config(tls={"cert": str(pki.client_cert), "key": str(key)}))
    (warning,) = c.warnings
    assert warning == (f"groups.g.tls.key: {key} is readable by its group (mode 0640); only root should read it: "
                       f"chmod 600 {key}")


def test_a_changed_certificate_file_is_a_reconfiguration(pki, tmp_path):
    cert = tmp_path / "client.pem"
    cert.write_bytes(pki.client_cert.read_bytes())
    raw = config(tls={"ca": str(pki.ca), "cert": str(cert), "key": str(pki.client_key)})
    before = parse_config(raw)
    assert parse_config(raw) == before
    new_cert, new_key = pki.issue("renewed", "kmuxd-client", client=True, san="")
    cert.write_bytes(new_cert.read_bytes())
    raw["groups"]["g"]["tls"]["key"] = str(new_key)
    after = parse_config(raw)
    assert after.groups["g"].tls.fingerprint != before.groups["g"].tls.fingerprint
    plan = plan_reload(before, after)
    assert plan.reconfigured == ("g",) and plan.replaced == ()


# -- [[groups.NAME.handshake]] ------------------------------------------------------------------

def step_file(path: Path, payload: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(struct.pack(">I", len(payload)) + payload)
    path.chmod(mode)
    return path


def test_steps_load_with_their_messages_kept_out_of_repr(tmp_path):
    f = step_file(tmp_path / "login", b"LOGIN hunter2")
    c = parse_config(config(handshake=[{"send_file": str(f), "expect_offset": 4, "expect_hex": "0000"}],
                            auth_timeout=2.5))
    (step,) = c.groups["g"].handshake
    assert step.message == f.read_bytes() and step.expect == b"\0\0" and step.expect_offset == 4
    assert "hunter2" not in repr(c) and c.groups["g"].auth_timeout == 2.5


def test_step_errors_name_the_key(tmp_path):
    f = step_file(tmp_path / "login", b"x")
    cases = [
        ({"expect_hex": "00"}, "groups.g.handshake[0].send_file", "is required"),
        ({"send_file": str(f), "expect_hex": "zz"}, "groups.g.handshake[0].expect_hex", "hex string"),
        ({"send_file": str(f), "expect_offset": 4}, "groups.g.handshake[0].expect_hex", "required with expect_offset"),
        ({"send_file": str(tmp_path / "missing")}, "groups.g.handshake[0].send_file", "cannot read"),
        ({"send_file": str(f), "oops": 1}, "groups.g.handshake[0].oops", "unknown key"),
    ]
    for step, path, text in cases:
        ((where, why),) = problems(config(handshake=[step]))
        assert where == path and text in why, (step, where, why)
    ((where, why),) = problems(config(handshake={"send_file": str(f)}))
    assert where == "groups.g.handshake" and "array of tables" in why


def test_a_file_that_is_not_one_whole_message_is_refused(tmp_path):
    f = tmp_path / "login"
    f.write_bytes(struct.pack(">I", 10) + b"short")
    ((where, why),) = problems(config(handshake=[{"send_file": str(f)}]))
    assert where == "groups.g.handshake[0].send_file" and "is not one whole u32be message" in why


def test_a_relative_file_is_looked_up_in_the_credentials_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    ((where, why),) = problems(config(handshake=[{"send_file": "mc-sasl"}]))
    assert where == "groups.g.handshake[0].send_file" and "$CREDENTIALS_DIRECTORY" in why and "LoadCredential=" in why
    step_file(tmp_path / "mc-sasl", b"AUTH")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    (step,) = parse_config(config(handshake=[{"send_file": "mc-sasl"}])).groups["g"].handshake
    assert step.path == str(tmp_path / "mc-sasl") and step.send_file == "mc-sasl"


def test_a_changed_handshake_file_is_a_reconfiguration(tmp_path):
    f = step_file(tmp_path / "login", b"old password")
    raw = config(handshake=[{"send_file": str(f)}])
    before = parse_config(raw)
    step_file(f, b"new password")
    plan = plan_reload(before, parse_config(raw))
    assert plan.reconfigured == ("g",)


def test_check_prints_the_warnings(tmp_path):
    f = step_file(tmp_path / "login", b"AUTH", mode=0o644)
    cfg = tmp_path / "kmuxd.toml"
    cfg.write_text(f'version = 1\n[groups.g]\nendpoints = ["127.0.0.1:9"]\n'
                   f'handshake = [{{send_file = "{f}"}}]\ntls = {{verify = false}}\n')
    r = subprocess.run([sys.executable, "-m", "kmuxd", "--config", str(cfg), "--check"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"kmuxd: warning: groups.g.handshake[0].send_file: {f} is readable by its group and everyone (mode 0644)" in r.stderr
    assert "kmuxd: warning: groups.g.tls.verify: is false" in r.stderr
