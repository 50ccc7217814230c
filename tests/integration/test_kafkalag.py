"""posflow_consumer_lag against the real broker: highwater - position per assigned partition."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import CollectorRegistry

from posflow.kafkalag import LAG_METRIC, ConsumerLag
from posflow.settings import Settings
from posflow.stack import Stack
from tests.conftest import unique


async def _topic(bootstrap: str, partitions: int) -> str:
    name = unique("lag").replace("-", "")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, replication_factor=1)])
    finally:
        await admin.close()
    return name


def _value(registry: CollectorRegistry, group: str, topic: str, partition: int) -> float | None:
    labels = {"group": group, "topic": topic, "partition": str(partition)}
    return registry.get_sample_value(LAG_METRIC, labels)


async def test_lag_is_highwater_minus_position_and_revoked_partitions_drop_out(
    settings: Settings, stack: Stack
) -> None:
    bootstrap = settings.kafka.bootstrap
    topic, group = await _topic(bootstrap, 2), unique("lag-group")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(7):
            await producer.send_and_wait(topic, b"x%d" % i, partition=0)
        for i in range(3):
            await producer.send_and_wait(topic, b"y%d" % i, partition=1)
    finally:
        await producer.stop()

    registry = CollectorRegistry()
    lag = ConsumerLag(registry, group)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest",
    )  # fmt: skip
    await consumer.start()
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    try:
        consumer.assign([tp0, tp1])
        # Before any fetch the highwater is unknown: no series rather than a false 0.
        assert await lag.update(consumer) == {}
        assert _value(registry, group, topic, 0) is None

        got = 0
        deadline = time.monotonic() + 20
        while got < 4 and time.monotonic() < deadline:
            batch = await consumer.getmany(tp0, timeout_ms=500, max_records=4 - got)
            got += sum(len(v) for v in batch.values())
        assert got == 4
        # Partition 1 was fetched alongside (its highwater known) but nothing handed out yet.
        while consumer.highwater(tp1) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await lag.update(consumer) == {(topic, 0): 3, (topic, 1): 3}
        assert _value(registry, group, topic, 0) == 3
        assert _value(registry, group, topic, 1) == 3

        rest = await consumer.getmany(tp0, timeout_ms=2000, max_records=10)
        assert sum(len(v) for v in rest.values()) == 3
        consumer.assign([tp0])  # partition 1 revoked; a new assignment starts unpositioned
        consumer.seek(tp0, 7)
        while consumer.highwater(tp0) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await lag.update(consumer) == {(topic, 0): 0}
        assert _value(registry, group, topic, 0) == 0
        assert _value(registry, group, topic, 1) is None
    finally:
        await consumer.stop()


async def test_run_updates_until_stopped(settings: Settings, stack: Stack) -> None:
    """The loop a service starts: measures at once, then every interval, ends on stop."""
    bootstrap = settings.kafka.bootstrap
    topic, group = await _topic(bootstrap, 1), unique("lag-group")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(topic, b"z%d" % i, partition=0)
    finally:
        await producer.stop()
    registry = CollectorRegistry()
    lag = ConsumerLag(registry, group)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    stop = asyncio.Event()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.getmany(timeout_ms=1000, max_records=2)
        task = asyncio.create_task(lag.run(consumer, stop, interval_s=0.1))
        deadline = time.monotonic() + 20
        while _value(registry, group, topic, 0) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        position = await consumer.position(TopicPartition(topic, 0))
        assert _value(registry, group, topic, 0) == 5 - position
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        await consumer.stop()
