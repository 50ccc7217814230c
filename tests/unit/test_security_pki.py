"""The CA, terminal certificates and the CRL (files, modes, contents); no broker."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from posflow.errors import PosflowError
from posflow.security.pki import Pki
from posflow.stack.mosquitto import TlsListener, render_config


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_and_terminal_certificate(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    assert pki.ensure_ca() is True
    assert pki.ensure_ca() is False  # idempotent: the CA is never replaced
    record = pki.issue("T-0193")
    cert = x509.load_pem_x509_certificate(pki.cert_path("T-0193").read_bytes())
    ca = pki.ca_certificate()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "T-0193"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    cert.verify_directly_issued_by(ca)
    assert record.serial == f"{cert.serial_number:x}"
    assert _mode(pki.ca_key_path) == 0o600
    assert _mode(pki.key_path("T-0193")) == 0o600
    assert [r.name for r in pki.records()] == ["T-0193"]


def test_second_live_certificate_for_a_terminal_is_refused(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    pki.issue("T-1")
    with pytest.raises(PosflowError, match="already has a valid certificate"):
        pki.issue("T-1")


def test_revocation_lands_in_the_signed_crl_and_deletes_the_key(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    first = pki.issue("T-1")
    pki.issue("T-2")
    revoked = pki.revoke("T-1", reason="stolen")
    assert [r.serial for r in revoked] == [first.serial]
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.is_signature_valid(pki.ca_certificate().public_key())  # type: ignore[arg-type]
    assert {f"{e.serial_number:x}" for e in crl} == {first.serial}
    assert not pki.key_path("T-1").exists()
    assert {r.name: r.status for r in pki.records()} == {"T-1": "revoked", "T-2": "valid"}
    pki.issue("T-1")  # a replacement may be issued after revocation
    with pytest.raises(PosflowError, match="no valid certificate"):
        pki.revoke("T-unknown")


@pytest.mark.parametrize("name", ["", "../etc", "a b", "x" * 65, "-lead"])
def test_bad_terminal_ids_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(PosflowError, match="invalid terminal id"):
        Pki(tmp_path).issue(name)


def test_production_config_has_no_password_listener(tmp_path: Path) -> None:
    tls = TlsListener(
        "10.0.0.5", 8883, tmp_path / "ca", tmp_path / "crt", tmp_path / "key", tmp_path / "crl"
    )
    conf = render_config(
        host="127.0.0.1",
        port=1883,
        directory=tmp_path,
        max_connections=-1,
        max_queued_messages=10,
        max_inflight_messages=10,
        tls=tls,
        password_auth=False,
    )
    assert "password_file" not in conf
    assert "listener 1883" not in conf
    assert "listener 8883 10.0.0.5" in conf
    assert "acl_file" in conf
    with pytest.raises(PosflowError, match="no listener"):
        render_config(
            host="h",
            port=1,
            directory=tmp_path,
            max_connections=1,
            max_queued_messages=1,
            max_inflight_messages=1,
            password_auth=False,
        )
