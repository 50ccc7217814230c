"""The production profile: services refuse to start with the repo's development defaults."""

from __future__ import annotations

from pydantic import BaseModel, SecretStr

from posflow.errors import PosflowError
from posflow.security.tls import is_loopback
from posflow.settings import Settings

__all__ = ["dev_default_settings", "refuse_dev_defaults"]


def dev_default_settings(settings: Settings) -> list[str]:
    """The environment variables that still hold development defaults (values never shown)."""
    found: list[str] = []
    for section_name in type(settings).model_fields:
        section = getattr(settings, section_name)
        if not isinstance(section, BaseModel):
            continue
        for field_name, info in type(section).model_fields.items():
            value, default = getattr(section, field_name), info.default
            if (
                isinstance(value, SecretStr)
                and isinstance(default, SecretStr)
                and value.get_secret_value() == default.get_secret_value()
            ):
                found.append(f"POSFLOW_{section_name}__{field_name}".upper())
    sec = settings.security
    if sec.mqtt_password_auth:
        found.append("POSFLOW_SECURITY__MQTT_PASSWORD_AUTH (password listener: development only)")
    if not sec.mqtt_client_tls:
        found.append(
            "POSFLOW_SECURITY__MQTT_CLIENT_TLS (services reach the broker by password: "
            "development only; production has no password listener)"
        )
    if sec.master_key is None and sec.master_key_file is None:
        found.append("POSFLOW_SECURITY__MASTER_KEY_FILE (no master key configured)")
    if not is_loopback(settings.postgres.host) and sec.postgres_sslmode not in (
        "verify-ca",
        "verify-full",
    ):
        found.append("POSFLOW_SECURITY__POSTGRES_SSLMODE (remote PostgreSQL without verified TLS)")
    if not is_loopback(settings.kafka.host) and sec.kafka_security_protocol != "SSL":
        found.append("POSFLOW_SECURITY__KAFKA_SECURITY_PROTOCOL (remote Kafka without TLS)")
    return found


def refuse_dev_defaults(settings: Settings) -> None:
    """In the production profile, raise PosflowError naming every development default left.

    The command line calls it once, in ``posflow.cli_support.service_settings``, for every
    command that runs a service or handles secrets; the dev profile passes untouched.
    """
    if settings.security.profile != "production":
        return
    offending = dev_default_settings(settings)
    if offending:
        raise PosflowError(
            "the production profile refuses development defaults: " + ", ".join(offending),
            fix="set each of these (see docs/operations.md, 'Production configuration')",
        )
