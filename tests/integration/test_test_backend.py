"""The services a test gets answer, whichever backend they come from (tests/backends.py).

With ``POSFLOW_TEST_BACKEND=testcontainers`` (or ``auto`` where a Docker engine answers)
they are containers; without an engine that path is skipped, its reason naming what is
missing. On the local stack (CI) the same round trips run on the stack's services.
"""

from __future__ import annotations

import asyncio

import psycopg

from posflow.settings import Settings
from posflow.stack import Stack, ensure_topics
from posflow.stack.mosquitto import mqtt_login_works
from posflow.storage.databases import timescaledb_template_exists
from posflow.topics import topic_names
from tests.backends import Choice
from tests.conftest import unique


async def test_the_backends_kafka_postgres_and_mosquitto_answer(
    settings: Settings, stack: Stack, test_backend: Choice
) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    assert test_backend.backend in ("stack", "testcontainers"), test_backend.reason
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as conn:
        assert timescaledb_template_exists(conn)
    m = settings.mosquitto
    assert mqtt_login_works(m.host, m.port, m.service_user, m.service_password.get_secret_value())

    own = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"topic_prefix": unique("be")})}
    )
    await ensure_topics(own)
    topic = topic_names(own.kafka).txn
    producer = AIOKafkaProducer(bootstrap_servers=own.kafka.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"ping", partition=0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=own.kafka.bootstrap)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.seek_to_beginning()
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
    finally:
        await consumer.stop()
    assert record.value == b"ping"
