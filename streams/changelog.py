"""Changed terminal states to the table's changelog in bulk, before each offset commit.

faust writes a table's changelog one record at a time (``Table.__setitem__`` →
``send_changelog`` → ``send_soon`` → its producer buffer → aiokafka), about 250 µs
of CPU a record here (docs/benchmarks/streams.md); a worker with thousands of
terminals changes thousands of states between two commits. :class:`BulkChangelog`
writes them instead as one aiokafka batch per partition, from its own producer,
and waits for the brokers' acknowledgement.

When (the order is what keeps "every committed offset's effect is in the
changelog"): :func:`bulk_commit_consumer` makes faust's consumer call
:meth:`HealthApp.write_changelog` at the start of every commit, before faust
picks the offsets to commit. States that change while that write is in flight
(the agent keeps processing) are still dirty when faust picks the offsets; the
commit hook of the app's monitor (:class:`streams.app.HealthMonitor`) writes those few through
faust's own path, which faust flushes before it commits. If the bulk write fails,
its states go back to the dirty set and take that path too.

The records are the ones faust would write: the raw key, the state in the table's
codec (:func:`streams.state.encode_state`), and the partition aiokafka's default
partitioner gives the key (the one faust's ``use_partitioner`` table uses, and the
bridge's), so faust's recovery reads them as its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaProducer

from posflow.partitioning import KeyPartitioner
from posflow.security.tls import kafka_ssl_options
from posflow.settings import Settings
from streams.state import TerminalState, encode_state

__all__ = ["BulkChangelog", "bulk_commit_consumer"]

log = logging.getLogger("posflow.streams")


class BulkChangelog:
    """Writes states to one changelog topic, a batch per partition, and waits for the acks."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self._producer: AIOKafkaProducer | None = None
        self._partitions: list[int] = []
        self._partition_for = KeyPartitioner()

    async def _started(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.kafka.bootstrap,
                acks="all",
                client_id=f"{self.settings.streams.app_id}-changelog",
                **kafka_ssl_options(self.settings),
            )
            await producer.start()
            self._producer = producer
        if not self._partitions:
            found = await self._producer.partitions_for(self.topic)
            self._partitions = sorted(found)
        return self._producer

    async def write(self, table: Any, states: Mapping[bytes, TerminalState]) -> int:
        """Set ``states`` in the table's store (no per-key changelog send) and write them to
        the changelog; returns the records written once every one is acknowledged.

        The store is set and the values encoded before the first ``await``: the agent
        reading a state while the write is in flight finds it in the table, and a state it
        changes meanwhile is dirty again (and written at the next commit or by the sensor).
        """
        if not states:
            return 0
        data = table.data
        records: list[tuple[bytes, bytes]] = []
        for key, state in states.items():
            data[key] = state
            records.append((key, encode_state(state)))
        producer = await self._started()
        partitions, partition_for, topic = self._partitions, self._partition_for, self.topic
        batches: dict[int, Any] = {}
        sent: list[Awaitable[Any]] = []
        for key, value in records:
            partition = partition_for(key, partitions)
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:  # full
                sent.append(await producer.send_batch(batch, topic, partition=partition))
                batch = batches[partition] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        for partition, batch in batches.items():
            sent.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*sent)
        return len(records)

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()


def bulk_commit_consumer(base: type, before_commit: Callable[[], Awaitable[None]]) -> type:
    """faust's consumer class with ``before_commit`` awaited at the start of every commit
    (periodic, on rebalance, on shutdown), before faust picks the offsets to commit."""

    class BulkCommitConsumer(base):  # type: ignore[misc]
        async def force_commit(
            self, topics: Any = None, start_new_transaction: bool = True
        ) -> bool:
            await before_commit()
            done: bool = await super().force_commit(
                topics, start_new_transaction=start_new_transaction
            )
            return done

    return BulkCommitConsumer
