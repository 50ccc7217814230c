"""Kafka, TimescaleDB and Mosquitto from a Docker engine (``POSFLOW_TEST_BACKEND``).

The images are docker-compose.yml's where testcontainers can drive them (its Kafka
module needs the Confluent image). Mosquitto runs the configuration the local stack's
own code writes (accounts, ACL), mounted at the same path and on the host's network, so
the settings name it as they name the stack's broker. A broker account added later
(``Stack.mosquitto.set_users``) reaches it when it restarts, not by SIGHUP: tests that
register fleets while it runs need the local stack.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql

from posflow.settings import PostgresSettings, Settings
from posflow.stack import Stack
from posflow.stack.mosquitto import mqtt_login_works
from posflow.storage.databases import TIMESCALEDB_TEMPLATE

__all__ = ["container_services"]

KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
TIMESCALEDB_IMAGE = "timescale/timescaledb:2.28.3-pg15"
MOSQUITTO_IMAGE = "eclipse-mosquitto:2.0.20"


def _timescaledb_template(pg: PostgresSettings) -> None:
    """What `posflow stack up` makes: the template new databases copy to have TimescaleDB."""
    name = sql.Identifier(TIMESCALEDB_TEMPLATE)
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(name))
        with psycopg.connect(pg.dsn(database=TIMESCALEDB_TEMPLATE), autocommit=True) as tmpl:
            tmpl.execute("CREATE EXTENSION timescaledb")
        conn.execute(
            sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(name)
        )


@contextlib.contextmanager
def container_services(base: Settings, port: int) -> Iterator[Settings]:
    """``base`` pointed at fresh containers (Mosquitto on ``port``); stopped on exit."""
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.core.container import DockerContainer
    from testcontainers.postgres import PostgresContainer

    with contextlib.ExitStack() as stop:
        kafka = stop.enter_context(KafkaContainer(KAFKA_IMAGE).with_kraft())
        kafka_host, kafka_port = kafka.get_bootstrap_server().rsplit(":", 1)
        pg = base.postgres
        password = pg.password.get_secret_value()
        db = stop.enter_context(
            PostgresContainer(
                TIMESCALEDB_IMAGE, username=pg.user, password=password, dbname=pg.database
            )
        )
        host, port_5432 = db.get_container_host_ip(), int(db.get_exposed_port(5432))
        postgres = pg.model_copy(update={"host": host, "port": port_5432})
        _timescaledb_template(postgres)
        settings = base.model_copy(
            update={
                "kafka": base.kafka.model_copy(
                    update={"host": kafka_host, "port": int(kafka_port)}
                ),
                "postgres": postgres,
                "mosquitto": base.mosquitto.model_copy(update={"port": port}),
            }
        )
        broker = Stack(settings).mosquitto
        broker.configure()
        conf = Path(broker.dir).resolve()
        stop.enter_context(
            DockerContainer(MOSQUITTO_IMAGE)
            .with_volume_mapping(str(conf), str(conf), "rw")
            .with_command(f"mosquitto -c {conf / 'mosquitto.conf'}")
            .with_kwargs(network_mode="host")
        )
        _wait_for_broker(settings, timeout_s=30)
        yield settings


def _wait_for_broker(settings: Settings, timeout_s: float) -> None:
    m = settings.mosquitto
    deadline = time.monotonic() + timeout_s
    while not mqtt_login_works(
        m.host, m.port, m.service_user, m.service_password.get_secret_value()
    ):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Mosquitto container did not answer on {m.host}:{m.port}")
        time.sleep(0.5)
