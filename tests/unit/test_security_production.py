"""The production profile refuses the repo's development defaults, naming each."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from pydantic import SecretStr

from posflow.errors import PosflowError
from posflow.security.production import dev_default_settings, refuse_dev_defaults
from posflow.settings import (
    MosquittoSettings,
    PostgresSettings,
    SecuritySettings,
    Settings,
    StackSettings,
)


def test_dev_profile_passes_with_defaults(tmp_path: Path) -> None:
    refuse_dev_defaults(Settings(stack=StackSettings(dir=tmp_path)))


def test_production_names_every_dev_default_and_never_the_value(tmp_path: Path) -> None:
    settings = Settings(
        stack=StackSettings(dir=tmp_path), security=SecuritySettings(profile="production")
    )
    with pytest.raises(PosflowError) as err:
        refuse_dev_defaults(settings)
    message = str(err.value)
    for name in (
        "POSFLOW_POSTGRES__PASSWORD",
        "POSFLOW_MOSQUITTO__SERVICE_PASSWORD",
        "POSFLOW_SECURITY__MQTT_PASSWORD_AUTH",
        "POSFLOW_SECURITY__MQTT_CLIENT_TLS",
        "POSFLOW_SECURITY__MASTER_KEY_FILE",
    ):
        assert name in message
    assert "posflow-dev" not in message
    assert "posflow-svc-dev" not in message


def test_production_with_real_settings_passes(tmp_path: Path) -> None:
    key = tmp_path / "master.key"
    key.write_text(base64.b64encode(b"k" * 32).decode())
    key.chmod(0o600)
    base = Settings(stack=StackSettings(dir=tmp_path))
    # Any secret a section adds later is covered: set every SecretStr to a non-default.
    overrides: dict[str, object] = {}
    for section_name in type(base).model_fields:
        section = getattr(base, section_name)
        changed = {
            name: SecretStr(f"prod-{name}")
            for name in type(section).model_fields
            if isinstance(getattr(section, name), SecretStr)
        }
        if changed:
            overrides[section_name] = section.model_copy(update=changed)
    settings = base.model_copy(
        update={
            **overrides,
            "security": SecuritySettings(
                profile="production",
                mqtt_password_auth=False,
                mqtt_client_tls=True,
                master_key_file=key,
            ),
        }
    )
    assert dev_default_settings(settings) == []
    refuse_dev_defaults(settings)


def test_remote_postgres_needs_verified_tls(tmp_path: Path) -> None:
    settings = Settings(
        stack=StackSettings(dir=tmp_path),
        postgres=PostgresSettings(host="db.internal", password=SecretStr("x")),
        mosquitto=MosquittoSettings(service_password=SecretStr("y")),
        security=SecuritySettings(profile="production", postgres_sslmode="require"),
    )
    assert any("POSTGRES_SSLMODE" in name for name in dev_default_settings(settings))
