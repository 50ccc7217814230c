"""The raw sink's commit protocol: Kafka offsets move only once the rows are on disk.

Telemetry commits with ``synchronous_commit = off``, so a database commit alone does
not make a batch durable. Each written batch is remembered with the WAL position its
writes ended at; its offsets go to Kafka once PostgreSQL reports the WAL flushed past
that position, in batch order. A crash re-reads at most the batches not yet
committed, and re-writing them inserts nothing (idempotent writes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import Gauge

from streams.rawsink.database import SinkDatabase

__all__ = ["DurableCommits", "Written"]

log = logging.getLogger("posflow.rawsink")

_DRAIN_FLUSH_S = 5.0  # on stop, how long to wait for the WAL flush of the last batches


@dataclass(frozen=True)
class Written:
    """A batch in the database; its offsets go to Kafka once the WAL is flushed past ``lsn``."""

    lsn: int
    offsets: dict[TopicPartition, int]


class DurableCommits:
    """Written batches waiting for the WAL flush, and the offset commits that follow it."""

    def __init__(self, consumer: AIOKafkaConsumer, db: SinkDatabase, waiting: Gauge) -> None:
        self.consumer = consumer
        self.db = db
        self.waiting = waiting  # how many batches wait for their flush
        self._written: list[Written] = []

    def __len__(self) -> int:
        return len(self._written)

    def add(self, written: Written) -> None:
        self._written.append(written)
        self.waiting.set(len(self._written))

    async def commit_durable(self, *, wait_s: float = 0.0) -> None:
        """Commit the offsets of every written batch whose WAL is flushed (in order)."""
        if not self._written:
            return
        deadline = time.monotonic() + wait_s
        while True:
            try:
                flushed = await asyncio.to_thread(self.db.wal_flush_lsn)
            except psycopg.Error as exc:
                self.db.close()
                log.warning("WAL flush position unknown (%s); offsets wait", type(exc).__name__)
                return
            durable = [w for w in self._written if w.lsn <= flushed]
            if durable or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        if not durable:
            return
        del self._written[: len(durable)]
        self.waiting.set(len(self._written))
        offsets: dict[TopicPartition, int] = {}
        for w in durable:
            offsets.update(w.offsets)
        assigned = self.consumer.assignment()
        # A partition taken by a rebalance meanwhile: its new owner re-reads, idempotently.
        mine = {tp: o for tp, o in offsets.items() if tp in assigned}
        if not mine:
            return
        try:
            await self.consumer.commit(mine)
        except KafkaError as exc:
            log.warning("Kafka offset commit failed (records will be re-read): %s", exc)

    async def drain(self) -> None:
        """On stop: commit what the last batches wrote, once the WAL is flushed."""
        for _ in range(100):  # bounded; each round waits at most _DRAIN_FLUSH_S
            if not self._written:
                return
            before = len(self._written)
            await self.commit_durable(wait_s=_DRAIN_FLUSH_S)
            if len(self._written) == before:
                log.warning("%d batches not flushed in time: re-read after restart", before)
                return
