"""TLS options of posflow's client connections: PostgreSQL, Kafka, MQTT.

The stack on loopback runs without TLS on Kafka and PostgreSQL; production points
these settings at the deployment's CA and client certificates (docs/operations.md).
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from typing import Any

from posflow.errors import PosflowError
from posflow.settings import Settings

__all__ = [
    "is_loopback",
    "kafka_ssl_options",
    "mqtt_tls_context",
    "postgres_dsn",
    "service_mqtt_endpoint",
    "terminal_mqtt_tls",
]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (where plain connections are fine)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def postgres_dsn(settings: Settings, *, database: str | None = None) -> str:
    """``settings.postgres.dsn()`` plus libpq's TLS parameters from ``settings.security``.

    Contains the password: never log it.
    """
    sec = settings.security
    parts = [settings.postgres.dsn(database=database), f"sslmode={sec.postgres_sslmode}"]
    for name, path in (
        ("sslrootcert", sec.postgres_sslrootcert),
        ("sslcert", sec.postgres_sslcert),
        ("sslkey", sec.postgres_sslkey),
    ):
        if path is not None:
            parts.append(f"{name}={_quote(str(path))}")
    return " ".join(parts)


def _client_context(
    cafile: Path | None, certfile: Path | None, keyfile: Path | None
) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        if certfile is not None:
            ctx.load_cert_chain(str(certfile), str(keyfile) if keyfile else None)
    except (OSError, ssl.SSLError) as exc:
        raise PosflowError(
            f"cannot load TLS files (ca {cafile}, cert {certfile}, key {keyfile}): {exc}",
            fix="check the paths and that the key matches the certificate",
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def kafka_ssl_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for aiokafka's producer/consumer (empty for PLAINTEXT).

    faust: ``faust.App(..., broker_credentials=kafka_ssl_options(s)["ssl_context"])``.
    """
    sec = settings.security
    if sec.kafka_security_protocol == "PLAINTEXT":
        return {}
    return {
        "security_protocol": "SSL",
        "ssl_context": _client_context(
            sec.kafka_ssl_cafile, sec.kafka_ssl_certfile, sec.kafka_ssl_keyfile
        ),
    }


def mqtt_tls_context(cafile: Path, certfile: Path, keyfile: Path) -> ssl.SSLContext:
    """A terminal's or a service's context for Mosquitto's TLS listener (TLS 1.2+, mTLS).

    paho: ``client.tls_set_context(ctx)``; aiomqtt: ``Client(..., tls_context=ctx)``.
    """
    return _client_context(cafile, certfile, keyfile)


def service_mqtt_endpoint(settings: Settings) -> tuple[int, ssl.SSLContext | None]:
    """(port, TLS context) a posflow service connects to Mosquitto with.

    ``security.mqtt_client_tls`` off: the password listener and no context. On: the
    TLS listener with the service account's certificate (its common name is the MQTT
    username), by default the one `posflow pki issue <service_user> --kind service` wrote.
    """
    m, sec = settings.mosquitto, settings.security
    if not sec.mqtt_client_tls:
        return m.port, None
    from posflow.security.pki import Pki

    pki = Pki.from_settings(settings)
    cafile = sec.mqtt_client_cafile or pki.ca_cert_path
    certfile = sec.mqtt_client_certfile or pki.cert_path(m.service_user)
    keyfile = sec.mqtt_client_keyfile or (
        certfile.with_suffix(".key") if sec.mqtt_client_certfile else pki.key_path(m.service_user)
    )
    for what, path in (("CA certificate", cafile), ("certificate", certfile), ("key", keyfile)):
        if not path.exists():
            raise PosflowError(
                f"MQTT over TLS: the service account's {what} {path} does not exist",
                fix=f"issue it: `posflow pki issue {m.service_user} --kind service`, or set "
                "POSFLOW_SECURITY__MQTT_CLIENT_CAFILE / _CERTFILE / _KEYFILE",
            )
    return m.tls_port, mqtt_tls_context(cafile, certfile, keyfile)


def terminal_mqtt_tls(settings: Settings, name: str) -> ssl.SSLContext:
    """A simulated terminal's (or gateway's) context: its own certificate from the PKI."""
    from posflow.security.pki import Pki

    pki = Pki.from_settings(settings)
    cafile = settings.security.mqtt_client_cafile or pki.ca_cert_path
    certfile, keyfile = pki.cert_path(name), pki.key_path(name)
    if not certfile.exists() or not keyfile.exists():
        raise PosflowError(
            f"MQTT over TLS: no certificate for {name} at {certfile}",
            fix="register the fleet with certificates: `posflow fleet register --certificates`",
        )
    return mqtt_tls_context(cafile, certfile, keyfile)
