"""TLS options of posflow's client connections: PostgreSQL, Kafka, MQTT.

The stack on loopback runs without TLS on Kafka and PostgreSQL; production points
these settings at the deployment's CA and client certificates (docs/operations.md).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from posflow.errors import PosflowError
from posflow.settings import Settings

__all__ = ["kafka_ssl_options", "mqtt_tls_context", "postgres_dsn"]


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
