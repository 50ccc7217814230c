"""Client TLS settings reach the real clients (libpq, aiokafka).

The local stack's PostgreSQL and Kafka run without TLS, so these tests prove the
settings are passed through: libpq refuses the plain server when TLS is required, and
aiokafka performs a mutually authenticated TLS handshake with the options (against a
TLS endpoint of this test's own, since there is no TLS Kafka broker here).
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from posflow.security.pki import Pki
from posflow.security.tls import kafka_ssl_options, postgres_dsn
from posflow.settings import PostgresSettings, SecuritySettings, Settings
from tests.conftest import free_port


def test_postgres_sslmode_reaches_libpq(settings: Settings, pg: PostgresSettings) -> None:
    base = settings.model_copy(update={"postgres": pg})
    prefer = base.model_copy(update={"security": SecuritySettings(postgres_sslmode="prefer")})
    with psycopg.connect(postgres_dsn(prefer)) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (pg.database,)
    require = base.model_copy(update={"security": SecuritySettings(postgres_sslmode="require")})
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
        psycopg.connect(postgres_dsn(require))


async def test_kafka_ssl_options_make_a_mutual_tls_connection(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.ensure_server_cert(["127.0.0.1", "localhost"])
    pki.issue("posflow-svc", kind="service")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(pki.server_cert_path), str(pki.server_key_path))
    server_ctx.load_verify_locations(str(pki.ca_cert_path))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    peers: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cert = writer.get_extra_info("peercert")
        peers.append(dict(x[0] for x in cert["subject"])["commonName"])
        writer.close()  # not a Kafka broker: the client gives up after the handshake

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=server_ctx)
    settings = Settings(
        security=SecuritySettings(
            kafka_security_protocol="SSL",
            kafka_ssl_cafile=pki.ca_cert_path,
            kafka_ssl_certfile=pki.cert_path("posflow-svc"),
            kafka_ssl_keyfile=pki.key_path("posflow-svc"),
        )
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=f"127.0.0.1:{port}",
        request_timeout_ms=3000,
        **kafka_ssl_options(settings),
    )
    try:
        with pytest.raises(Exception):  # noqa: B017, PT011 - any failure after the handshake
            await asyncio.wait_for(producer.start(), timeout=10)
    finally:
        await producer.stop()
        server.close()
        await server.wait_closed()
    assert set(peers) == {"posflow-svc"}
