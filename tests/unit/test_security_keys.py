"""Master key loading and client TLS options (no services)."""

from __future__ import annotations

import base64
import ssl
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from posflow.errors import PosflowError
from posflow.security.keys import LocalMasterKey, master_key_from_settings
from posflow.security.pki import Pki
from posflow.security.tls import kafka_ssl_options, mqtt_tls_context, postgres_dsn
from posflow.settings import SecuritySettings, Settings, StackSettings

KEY = base64.b64encode(bytes(range(32))).decode()


def test_dev_profile_creates_a_private_master_key_once(tmp_path: Path) -> None:
    settings = Settings(stack=StackSettings(dir=tmp_path))
    first = master_key_from_settings(settings)
    path = tmp_path / "keys" / "master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert master_key_from_settings(settings).key_id == first.key_id  # same key next time
    assert KEY not in repr(first)


def test_production_without_master_key_is_refused(tmp_path: Path) -> None:
    settings = Settings(
        stack=StackSettings(dir=tmp_path), security=SecuritySettings(profile="production")
    )
    with pytest.raises(PosflowError, match="no master key configured"):
        master_key_from_settings(settings)


def test_master_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text(KEY)
    path.chmod(0o644)
    settings = Settings(
        stack=StackSettings(dir=tmp_path), security=SecuritySettings(master_key_file=path)
    )
    with pytest.raises(PosflowError, match="chmod 600"):
        master_key_from_settings(settings)
    path.chmod(0o600)
    assert master_key_from_settings(settings).key_id == LocalMasterKey(bytes(range(32))).key_id


def test_master_key_from_environment_and_short_key_refused(tmp_path: Path) -> None:
    env = Settings(
        stack=StackSettings(dir=tmp_path), security=SecuritySettings(master_key=SecretStr(KEY))
    )
    assert master_key_from_settings(env).key_id == LocalMasterKey(bytes(range(32))).key_id
    with pytest.raises(PosflowError, match="at least 32"):
        LocalMasterKey(b"short")


def test_hkdf_derivation_separates_merchants_and_versions() -> None:
    key = LocalMasterKey(bytes(range(32)))
    a1 = key.derive(salt=b"s" * 32, info=b'["posflow/v1/merchant-key","M-1",1]')
    assert a1 == key.derive(salt=b"s" * 32, info=b'["posflow/v1/merchant-key","M-1",1]')
    assert a1 != key.derive(salt=b"s" * 32, info=b'["posflow/v1/merchant-key","M-1",2]')
    assert a1 != key.derive(salt=b"s" * 32, info=b'["posflow/v1/merchant-key","M-2",1]')
    assert len(a1) == 32


def test_postgres_dsn_carries_tls_settings(tmp_path: Path) -> None:
    settings = Settings(
        stack=StackSettings(dir=tmp_path),
        security=SecuritySettings(
            postgres_sslmode="verify-full",
            postgres_sslrootcert=tmp_path / "ca dir" / "root.crt",
            postgres_sslcert=tmp_path / "c.crt",
            postgres_sslkey=tmp_path / "c.key",
        ),
    )
    dsn = postgres_dsn(settings)
    assert dsn.startswith(settings.postgres.dsn())
    assert f"sslmode=verify-full sslrootcert='{tmp_path}/ca dir/root.crt'" in dsn
    assert f"sslcert='{tmp_path}/c.crt' sslkey='{tmp_path}/c.key'" in dsn


def test_kafka_ssl_options(tmp_path: Path) -> None:
    assert kafka_ssl_options(Settings(stack=StackSettings(dir=tmp_path))) == {}
    pki = Pki(tmp_path / "pki")
    pki.issue("posflow-svc", kind="service")
    settings = Settings(
        stack=StackSettings(dir=tmp_path),
        security=SecuritySettings(
            kafka_security_protocol="SSL",
            kafka_ssl_cafile=pki.ca_cert_path,
            kafka_ssl_certfile=pki.cert_path("posflow-svc"),
            kafka_ssl_keyfile=pki.key_path("posflow-svc"),
        ),
    )
    options = kafka_ssl_options(settings)
    ctx = options["ssl_context"]
    assert options["security_protocol"] == "SSL"
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    bad = settings.model_copy(
        update={"security": settings.security.model_copy(update={"kafka_ssl_keyfile": tmp_path})}
    )
    with pytest.raises(PosflowError, match="cannot load TLS files"):
        kafka_ssl_options(bad)
    assert (
        mqtt_tls_context(
            pki.ca_cert_path, pki.cert_path("posflow-svc"), pki.key_path("posflow-svc")
        ).minimum_version
        == ssl.TLSVersion.TLSv1_2
    )
