"""A Kafka consumer whose offsets live in the database, next to the data they produced.

The consumer never relies on Kafka's committed offsets: on every partition
assignment it seeks to the offsets stored by :class:`LedgerWriter` in the
same transaction as the data. It still commits to Kafka afterwards, for lag
monitoring only. A crash anywhere (before the database commit, between it
and Kafka's commit, after both) therefore neither repeats nor skips a record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from posflow.storage.ledger import LedgerEntry, LedgerResult, LedgerWriter

__all__ = ["LedgerSink"]

log = logging.getLogger("posflow.storage")

ToEntries = Callable[[Sequence[ConsumerRecord[bytes, bytes]]], list[LedgerEntry]]


class _SeekToStored(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sink: LedgerSink) -> None:
        self.sink = sink

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # A rebalance can start while a batch is being written: let it land first.
        async with self.sink.writing:
            pass  # only waiting for it

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # Offsets read while a batch is in flight would be one batch behind: wait for it.
        async with self.sink.writing:
            stored = await asyncio.to_thread(self.sink.writer.load_offsets)
        for tp in assigned:
            offset = stored.get((tp.topic, tp.partition))
            if offset is None:
                await self.sink.consumer.seek_to_beginning(tp)
            else:
                self.sink.consumer.seek(tp, offset)


class LedgerSink:
    """Consumes a money topic into the ledger, exactly once by the database's word."""

    def __init__(
        self,
        *,
        bootstrap: str,
        topic: str,
        group: str,
        dsn: str,
        to_entries: ToEntries,
        max_records: int = 500,
        after_db_commit: Callable[[LedgerResult], None] | None = None,
    ) -> None:
        self.topic = topic
        self.to_entries = to_entries
        self.max_records = max_records
        self.after_db_commit = after_db_commit
        self.conn: psycopg.Connection[tuple[Any, ...]] = psycopg.connect(dsn)
        # Held while a batch is written and committed; rebalances wait on it.
        self.writing = asyncio.Lock()
        self.writer = LedgerWriter(self.conn, consumer_group=group)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )

    async def start(self) -> None:
        self.consumer.subscribe([self.topic], listener=_SeekToStored(self))
        await self.consumer.start()

    async def run_once(self, timeout_ms: int = 1000) -> LedgerResult | None:
        """Consume one batch and apply it; None when nothing came."""
        batches = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=self.max_records)
        records = [r for part in batches.values() for r in part]
        if not records:
            return None
        offsets = {(tp.topic, tp.partition): recs[-1].offset + 1 for tp, recs in batches.items()}
        entries = self.to_entries(records)
        async with self.writing:
            result = await asyncio.to_thread(self.writer.write, entries, offsets)
            if self.after_db_commit is not None:
                self.after_db_commit(result)
        # Informational only (lag dashboards): the stored offsets are the truth.
        await self.consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
        return result

    async def stop(self) -> None:
        await self.consumer.stop()
        self.conn.close()
