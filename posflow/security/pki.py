"""The project's certificate authority: terminal certificates, the broker's, the CRL.

Files live under the PKI directory (``<stack>/pki`` by default)::

    ca.key  ca.crt            the CA (EC P-256); ca.key is 0600 and never leaves here
    server.key  server.crt    Mosquitto's TLS listener
    crl.pem                   revoked certificates, re-signed at every revocation
    terminals/<id>.key .crt   one per terminal; the common name is the terminal id
    registry.json             every certificate issued: serial, name, dates, status

Private keys are written 0600 through an ``O_EXCL`` temp file, never world-readable
even for a moment. Issuing or revoking is serialised by an exclusive file lock so two
operators cannot interleave registry updates.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from posflow.errors import PosflowError
from posflow.settings import Settings

__all__ = [
    "CertRecord",
    "Pki",
    "pki_dir",
]

_TERMINAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CA_DAYS = 3650
_SERVER_DAYS = 825
_CRL_DAYS = 30

CertKind = Literal["terminal", "service", "server"]


def pki_dir(settings: Settings) -> Path:
    """Where the CA and certificates live (``security.pki_dir`` or ``<stack>/pki``)."""
    return (settings.security.pki_dir or settings.stack.dir / "pki").resolve()


@dataclass(frozen=True)
class CertRecord:
    """One issued certificate as the registry keeps it."""

    serial: str  # hex
    name: str  # common name: terminal id, service account or broker host
    kind: CertKind
    not_before: str
    not_after: str
    status: Literal["valid", "revoked"]
    revoked_at: str | None = None
    reason: str | None = None


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file created 0600 from the first byte, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    tmp.replace(path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Pki:
    """The CA and what it issued, in one directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @classmethod
    def from_settings(cls, settings: Settings) -> Pki:
        return cls(pki_dir(settings))

    # -- paths -------------------------------------------------------------------------
    @property
    def ca_key_path(self) -> Path:
        return self.dir / "ca.key"

    @property
    def ca_cert_path(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def crl_path(self) -> Path:
        return self.dir / "crl.pem"

    @property
    def server_cert_path(self) -> Path:
        return self.dir / "server.crt"

    @property
    def server_key_path(self) -> Path:
        return self.dir / "server.key"

    @property
    def registry_path(self) -> Path:
        return self.dir / "registry.json"

    def cert_path(self, name: str) -> Path:
        return self.dir / "terminals" / f"{name}.crt"

    def key_path(self, name: str) -> Path:
        return self.dir / "terminals" / f"{name}.key"

    # -- locking and registry ----------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        with (self.dir / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def records(self) -> list[CertRecord]:
        """Every certificate issued, oldest first."""
        try:
            raw = json.loads(self.registry_path.read_text())
        except FileNotFoundError:
            return []
        return [CertRecord(**item) for item in raw]

    def _save(self, records: Sequence[CertRecord]) -> None:
        _write_public(
            self.registry_path, json.dumps([asdict(r) for r in records], indent=1).encode()
        )

    # -- the CA ------------------------------------------------------------------------
    def ensure_ca(self) -> bool:
        """Create the CA (and an empty CRL) once; True if it was created now."""
        with self._locked():
            if self.ca_key_path.exists() and self.ca_cert_path.exists():
                if not self.crl_path.exists():
                    self._write_crl(self.records())
                return False
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "posflow"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "posflow terminal CA"),
                ]
            )
            now = _now()
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5))
                .not_valid_after(now + timedelta(days=_CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=True,
                        crl_sign=True,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
                )
                .sign(key, hashes.SHA256())
            )
            _write_private(self.ca_key_path, _key_pem(key))
            _write_public(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
            self._write_crl(self.records())
            return True

    def _ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        try:
            key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), None)
            cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        except FileNotFoundError:
            raise PosflowError(
                f"no certificate authority in {self.dir}",
                fix="run `posflow pki init` (or `posflow stack up`) first",
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PosflowError(f"{self.ca_key_path} is not an EC private key")
        return key, cert

    def ca_certificate(self) -> x509.Certificate:
        return self._ca()[1]

    # -- issuing -----------------------------------------------------------------------
    def _issue(
        self,
        name: str,
        kind: CertKind,
        *,
        days: int,
        hosts: Sequence[str] = (),
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        ca_key, ca_cert = self._ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "posflow"),
                        x509.NameAttribute(NameOID.COMMON_NAME, name),
                    ]
                )
            )
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH]
                    if kind == "server"
                    else [ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if hosts:
            alt: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    alt.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert, key

    def ensure_server_cert(self, hosts: Sequence[str]) -> bool:
        """The broker's certificate for these host names / addresses; True if (re)issued."""
        self.ensure_ca()
        with self._locked():
            if self.server_cert_path.exists() and self.server_key_path.exists():
                cert = x509.load_pem_x509_certificate(self.server_cert_path.read_bytes())
                fresh = cert.not_valid_after_utc > _now() + timedelta(days=30)
                if fresh and cert.issuer == self.ca_certificate().subject:
                    return False
            cert, key = self._issue(hosts[0], "server", days=_SERVER_DAYS, hosts=hosts)
            _write_private(self.server_key_path, _key_pem(key))
            _write_public(self.server_cert_path, cert.public_bytes(serialization.Encoding.PEM))
            records = self.records()
            records.append(_record(cert, hosts[0], "server"))
            self._save(records)
            return True

    def issue(self, name: str, *, kind: CertKind = "terminal", days: int = 397) -> CertRecord:
        """Issue a client certificate whose common name is ``name`` (the MQTT username).

        A name with a valid certificate is refused: revoke it first, so two live
        certificates never speak for one terminal.
        """
        if not _TERMINAL_ID.match(name):
            raise PosflowError(
                f"invalid terminal id {name!r} for a certificate: use letters, digits, "
                "'.', '_' or '-' (at most 64, starting with a letter or digit)"
            )
        self.ensure_ca()
        with self._locked():
            records = self.records()
            live = [r for r in records if r.name == name and r.status == "valid"]
            if live and kind != "server":
                raise PosflowError(
                    f"{name} already has a valid certificate (serial {live[-1].serial})",
                    fix=f"revoke it first: `posflow pki revoke {name}`",
                )
            cert, key = self._issue(name, kind, days=days)
            _write_private(self.key_path(name), _key_pem(key))
            _write_public(self.cert_path(name), cert.public_bytes(serialization.Encoding.PEM))
            record = _record(cert, name, kind)
            records.append(record)
            self._save(records)
            return record

    def issue_missing(
        self, names: Sequence[str], *, kind: CertKind = "terminal", days: int = 397
    ) -> list[CertRecord]:
        """Issue a certificate to each name that has no valid one yet (a fleet at once:
        one lock and one registry write); returns the new ones."""
        for name in names:
            if not _TERMINAL_ID.match(name):
                raise PosflowError(f"invalid terminal id {name!r} for a certificate")
        self.ensure_ca()
        with self._locked():
            records = self.records()
            live = {r.name for r in records if r.status == "valid" and r.kind != "server"}
            issued = []
            for name in names:
                if name in live and self.cert_path(name).exists():
                    continue
                cert, key = self._issue(name, kind, days=days)
                _write_private(self.key_path(name), _key_pem(key))
                _write_public(self.cert_path(name), cert.public_bytes(serialization.Encoding.PEM))
                issued.append(_record(cert, name, kind))
                live.add(name)
            if issued:
                self._save([*records, *issued])
            return issued

    def revoke(self, name: str, *, reason: str = "unspecified") -> list[CertRecord]:
        """Revoke every valid certificate of ``name`` and re-sign the CRL; returns them."""
        with self._locked():
            records = self.records()
            now = _now().isoformat()
            revoked: list[CertRecord] = []
            updated: list[CertRecord] = []
            for r in records:
                if r.name == name and r.status == "valid" and r.kind != "server":
                    r = replace(r, status="revoked", revoked_at=now, reason=reason)  # noqa: PLW2901
                    revoked.append(r)
                updated.append(r)
            if not revoked:
                raise PosflowError(
                    f"no valid certificate for {name!r} to revoke",
                    fix="`posflow pki list` shows the certificates issued",
                )
            self._save(updated)
            self._write_crl(updated)
            self.key_path(name).unlink(missing_ok=True)
            return revoked

    def _write_crl(self, records: Sequence[CertRecord]) -> None:
        ca_key, ca_cert = self._ca()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - timedelta(minutes=5))
            .next_update(now + timedelta(days=_CRL_DAYS))
        )
        for r in records:
            if r.status != "revoked" or r.revoked_at is None:
                continue
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(r.serial, 16))
                .revocation_date(datetime.fromisoformat(r.revoked_at))
                .build()
            )
        crl = builder.sign(ca_key, hashes.SHA256())
        _write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))

    def refresh_crl(self) -> None:
        """Re-sign the CRL (its next-update is 30 days out: refresh it at least monthly)."""
        with self._locked():
            self._write_crl(self.records())

    def revoked_serials(self) -> set[int]:
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        return {entry.serial_number for entry in crl}


def _record(cert: x509.Certificate, name: str, kind: CertKind) -> CertRecord:
    return CertRecord(
        serial=f"{cert.serial_number:x}",
        name=name,
        kind=kind,
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
        status="valid",
    )
