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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg
import psycopg.errors
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from posflow.storage.ledger import LedgerEntry, LedgerResult, LedgerWriter

__all__ = ["LedgerSink"]

log = logging.getLogger("posflow.storage")

_WRITE_ATTEMPTS = 5
_RETRYABLE = (
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
    psycopg.errors.UniqueViolation,
)

ToEntries = Callable[[Sequence[ConsumerRecord[bytes, bytes]]], list[LedgerEntry]]


class _SeekToStored(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sink: LedgerSink) -> None:
        self.sink = sink

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # A rebalance can start while a batch is being written: let it land first.
        async with self.sink.writing:
            for tp in revoked:
                self.sink.next_offsets.pop((tp.topic, tp.partition), None)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # Offsets read while a batch is in flight would be one batch behind: wait for it.
        async with self.sink.writing:
            stored = await asyncio.to_thread(self.sink.writer.load_offsets)
        for tp in assigned:
            offset = stored.get((tp.topic, tp.partition))
            self.sink.next_offsets[(tp.topic, tp.partition)] = offset or 0
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
        kafka_options: Mapping[str, Any] | None = None,  # TLS (posflow.security.tls)
    ) -> None:
        self.topic = topic
        self.to_entries = to_entries
        self.max_records = max_records
        self.after_db_commit = after_db_commit
        self.conn: psycopg.Connection[tuple[Any, ...]] = psycopg.connect(dsn)
        # Held while a batch is written and committed; rebalances wait on it.
        self.writing = asyncio.Lock()
        # (topic, partition) -> next offset not yet in the database, for assigned partitions.
        self.next_offsets: dict[tuple[str, int], int] = {}
        self.writer = LedgerWriter(self.conn, consumer_group=group)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            **(kafka_options or {}),
        )

    async def start(self) -> None:
        self.consumer.subscribe([self.topic], listener=_SeekToStored(self))
        await self.consumer.start()

    async def run_once(self, timeout_ms: int = 1000) -> LedgerResult | None:
        """Consume one batch and apply it; None when nothing came."""
        batches = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=self.max_records)
        async with self.writing:
            # A fetch that raced the seek to the stored offsets (or a partition that came
            # back) can deliver records the database already holds: drop them here.
            fresh = {
                (tp.topic, tp.partition): [
                    r
                    for r in recs
                    if r.offset >= self.next_offsets.get((tp.topic, tp.partition), 0)
                ]
                for tp, recs in batches.items()
                if (tp.topic, tp.partition) in self.next_offsets
            }
            records = [r for recs in fresh.values() for r in recs]
            if not records:
                return None
            offsets = {key: recs[-1].offset + 1 for key, recs in fresh.items() if recs}
            result = await asyncio.to_thread(self._write, records, offsets)
            self.next_offsets.update(offsets)
            if self.after_db_commit is not None:
                self.after_db_commit(result)
        try:
            # Informational only (lag dashboards): the stored offsets are the truth.
            await self.consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
        except KafkaError as exc:  # e.g. a rebalance took the partition meanwhile
            log.warning("Kafka offset commit (for lag only) failed: %s", exc)
        return result

    def _write(
        self, records: Sequence[ConsumerRecord[bytes, bytes]], offsets: dict[tuple[str, int], int]
    ) -> LedgerResult:
        entries = self.to_entries(records)
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            try:
                return self.writer.write(entries, offsets)
            except _RETRYABLE as exc:
                # Another writer took the same rows (a rebalance overlap, a payout, a
                # release, or the same new txn id in another partition): the transaction
                # rolled back as a whole; deciding again sees what the other committed.
                if attempt == _WRITE_ATTEMPTS:
                    raise
                log.warning("ledger batch retried after %s (attempt %d)", type(exc).__name__,
                            attempt)  # fmt: skip
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        await self.consumer.stop()
        self.conn.close()
