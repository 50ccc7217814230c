"""Each service of the local stack is real and configured as the pipeline needs."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from paho.mqtt.enums import CallbackAPIVersion
from psycopg import sql

from posflow.settings import Settings
from posflow.stack import Stack
from posflow.topics import pipeline_topics
from tests.conftest import unique


def eventually(probe: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(0.05)
    return probe()


# --- Kafka ------------------------------------------------------------------


async def test_kafka_record_round_trip_keeps_key_value_and_order(
    stack: Stack, settings: Settings
) -> None:
    topic = unique("test.roundtrip")
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        for i in range(50):
            await producer.send(topic, f"{i}".encode(), key=f"T-{i % 5}".encode())
        await producer.flush()
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=settings.kafka.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    seen: dict[bytes, list[int]] = {}
    try:
        async with asyncio.timeout(30):
            while sum(len(v) for v in seen.values()) < 50:
                batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    for record in records:
                        assert record.key is not None
                        assert record.value is not None
                        seen.setdefault(record.key, []).append(int(record.value))
    finally:
        await consumer.stop()
        await admin.delete_topics([topic])
        await admin.close()
    # Every key's records come back in the order they were produced.
    assert seen == {f"T-{k}".encode(): list(range(k, 50, 5)) for k in range(5)}


async def test_pipeline_topics_exist_with_partitions_and_cleanup_policy(
    stack: Stack, settings: Settings
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    try:
        specs = pipeline_topics(settings.kafka)
        described = await admin.describe_topics([t.name for t in specs])
        partitions = {d["topic"]: len(d["partitions"]) for d in described}
        assert partitions == {t.name: t.partitions for t in specs}
    finally:
        await admin.close()


async def test_status_topic_is_compacted_and_deadletters_are_kept(
    stack: Stack, settings: Settings
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    try:
        prefix = settings.kafka.topic_prefix
        responses = await admin.describe_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, f"{prefix}.status.v1"),
                ConfigResource(ConfigResourceType.TOPIC, f"{prefix}.deadletter.v1"),
            ]
        )
        configs = {}
        for response in responses:
            for resource in response.resources:
                name, entries = resource[3], resource[4]
                configs[name] = {entry[0]: entry[1] for entry in entries}
    finally:
        await admin.close()
    assert configs[f"{prefix}.status.v1"]["cleanup.policy"] == "compact"
    assert configs[f"{prefix}.deadletter.v1"]["cleanup.policy"] == "delete"
    assert configs[f"{prefix}.deadletter.v1"]["retention.ms"] == str(30 * 24 * 3600 * 1000)


# --- Mosquitto ----------------------------------------------------------------


def _client(user: str | None, password: str | None) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=unique("test"), protocol=mqtt.MQTTv5
    )
    if user is not None:
        client.username_pw_set(user, password)
    return client


def _connect(client: mqtt.Client, settings: Settings) -> int:
    """Connect and return the CONNACK reason code value (0 = accepted)."""
    codes: list[int] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: codes.append(reason.value)
    client.connect(settings.mosquitto.host, settings.mosquitto.port)
    client.loop_start()
    eventually(lambda: bool(codes), 5)
    return codes[0] if codes else -1


@pytest.fixture
def terminal(stack: Stack, settings: Settings) -> Iterator[tuple[str, str]]:
    """A fresh terminal account (username = terminal id), live in the broker."""
    name, password = unique("T"), unique("pw")
    stack.mosquitto.set_users({name: password})

    def accepted() -> bool:
        client = _client(name, password)
        try:
            return _connect(client, settings) == 0
        finally:
            client.loop_stop()
            client.disconnect()

    # The broker reloads its password file on SIGHUP, asynchronously.
    assert eventually(accepted, 10), "the broker never accepted the new terminal account"
    yield name, password
    stack.mosquitto.remove_users([name])


def test_terminal_publishes_under_its_own_topic_and_the_service_receives_it(
    settings: Settings, terminal: tuple[str, str]
) -> None:
    name, password = terminal
    merchant = unique("M")
    received: list[tuple[str, bytes]] = []
    service = _client(
        settings.mosquitto.service_user, settings.mosquitto.service_password.get_secret_value()
    )
    service.on_message = lambda _c, _u, msg: received.append((msg.topic, bytes(msg.payload)))
    assert _connect(service, settings) == 0
    service.subscribe(f"pos/v1/{merchant}/#", qos=1)
    time.sleep(0.3)  # let the SUBACK land before publishing
    device = _client(name, password)
    try:
        assert _connect(device, settings) == 0
        foreign = f"pos/v1/{merchant}/T-somebody-else/telemetry"
        own = f"pos/v1/{merchant}/{name}/telemetry"
        # The foreign publish goes first: if the ACL let it through, it would arrive first.
        device.publish(foreign, b'{"battery": 1}', qos=1).wait_for_publish(5)
        device.publish(own, b'{"battery": 87}', qos=1).wait_for_publish(5)
        assert eventually(lambda: len(received) >= 1, 10)
        time.sleep(0.5)
    finally:
        device.loop_stop()
        device.disconnect()
        service.loop_stop()
        service.disconnect()
    assert received == [(own, b'{"battery": 87}')]


@pytest.mark.parametrize(
    ("user", "password", "expected"),
    [
        # Mosquitto 2 answers every refused login with 135 "Not authorized".
        (None, None, 135),  # anonymous
        ("T-nobody", "wrong", 135),  # unknown account
        ("posflow-svc", "not-the-password", 135),  # known account, wrong password
    ],
)
def test_broker_refuses_anonymous_and_unknown_accounts(
    stack: Stack, settings: Settings, user: str | None, password: str | None, expected: int
) -> None:
    client = _client(user, password)
    try:
        assert _connect(client, settings) == expected
    finally:
        client.loop_stop()
        client.disconnect()


def test_terminal_last_will_is_delivered_on_its_status_topic(
    settings: Settings, terminal: tuple[str, str]
) -> None:
    name, password = terminal
    merchant = unique("M")
    status_topic = f"pos/v1/{merchant}/{name}/status"
    received: list[bytes] = []
    service = _client(
        settings.mosquitto.service_user, settings.mosquitto.service_password.get_secret_value()
    )
    service.on_message = lambda _c, _u, msg: received.append(bytes(msg.payload))
    assert _connect(service, settings) == 0
    service.subscribe(status_topic, qos=1)
    time.sleep(0.3)
    device = _client(name, password)
    device.will_set(status_topic, json.dumps({"state": "offline"}), qos=1, retain=True)
    assert _connect(device, settings) == 0
    device.loop_stop()
    sock = device.socket()
    assert sock is not None
    sock.close()  # an abrupt loss of the connection, not a clean DISCONNECT
    try:
        assert eventually(lambda: bool(received), 10)
    finally:
        service.loop_stop()
        service.disconnect()
    assert json.loads(received[0]) == {"state": "offline"}


# --- PostgreSQL ------------------------------------------------------------------


def test_postgres_round_trip_with_psycopg3_keeps_integer_money(
    stack: Stack, settings: Settings
) -> None:
    table = sql.Identifier(unique("t_roundtrip"))
    with psycopg.connect(settings.postgres.dsn()) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id text PRIMARY KEY, amount_minor bigint, ccy char(3))"
            ).format(table)
        )
        conn.execute(
            sql.SQL("INSERT INTO {} VALUES (%s, %s, %s)").format(table),
            ["tx-1", 9_007_199_254_740_993, "EUR"],
        )
        conn.commit()
        row = conn.execute(sql.SQL("SELECT id, amount_minor, ccy FROM {}").format(table)).fetchone()
        conn.execute(sql.SQL("DROP TABLE {}").format(table))
        assert conn.info.server_version // 10000 == 15
    # 2**53 + 1 survives exactly: no float anywhere on the way.
    assert row == ("tx-1", 9_007_199_254_740_993, "EUR")


def test_stack_status_reports_which_timescaledb_path_is_active(stack: Stack) -> None:
    rows = {row.name: row for row in stack.status()}
    assert rows["postgres"].state == "running"
    detail = rows["postgres"].detail
    assert detail.startswith(f"database {stack.settings.postgres.database}, ")
    assert "plain PostgreSQL (TimescaleDB extension not installed)" in detail or (
        "TimescaleDB 2" in detail
    )


# --- Prometheus -------------------------------------------------------------------


def test_prometheus_lists_itself_and_every_posflow_service_as_scrape_targets(
    stack: Stack, settings: Settings
) -> None:
    url = f"http://{settings.prometheus.host}:{settings.prometheus.port}/api/v1/targets"

    def targets() -> dict[str, str]:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        return {t["labels"]["job"]: t["health"] for t in body["data"]["activeTargets"]}

    assert set(targets()) == {
        "prometheus",
        "posflow-ingest",
        "posflow-streams",
        "posflow-alerts",
        "posflow-api",
        "posflow-simulator",
        "posflow-rawsink",
        "posflow-settlement",
        "posflow-webhooks",
    }
    # Prometheus scrapes itself: proof it really runs its scrape loop.
    assert eventually(lambda: targets()["prometheus"] == "up", 30)
