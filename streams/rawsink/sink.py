"""The raw sink's consuming loop: read a batch, write it, dead-letter what cannot be
written, and hand its offsets to the commit protocol (:mod:`streams.rawsink.commit`).

Parsing the next batch overlaps the database write of the previous one; at most one
batch is in flight and batches complete in order. A database outage is retried with
the shared backoff; nothing is committed to Kafka for a batch not in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from posflow.contracts import Kind
from posflow.kafkalag import ConsumerLag
from posflow.runtime import Backoff
from posflow.security.tls import kafka_ssl_options, postgres_dsn
from posflow.settings import Settings
from posflow.storage.deadletters import count_dead_letters
from posflow.storage.migrate import StoragePath
from posflow.topics import topic_names
from streams.rawsink.commit import DurableCommits, Written
from streams.rawsink.database import Refused, SinkDatabase, write_isolating
from streams.rawsink.metrics import RawSinkMetrics, observe_many
from streams.rawsink.records import (
    Rejection,
    Sorted,
    dead_letter,
    refused_by_database,
    sort_records,
)
from streams.rawsink.upkeep import Upkeep

__all__ = ["RawSink"]

log = logging.getLogger("posflow.rawsink")

_RETRY_FIRST_S = 0.5
_RETRY_MAX_S = 10.0
_READY_STALL_S = 30.0


class RawSink:
    """Consumes telemetry and transaction envelopes into the time-series tables."""

    def __init__(self, settings: Settings, metrics: RawSinkMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        # The consumer lag every posflow consumer exports under one name (dashboards' lag row).
        self.lag = ConsumerLag(metrics.registry, settings.rawsink.group)
        topics = topic_names(settings.kafka)
        self.telemetry_topic = topics.telemetry
        self.txn_topic = topics.txn
        self.deadletter_topic = topics.deadletter
        self.dsn = postgres_dsn(settings)
        self.db = SinkDatabase(self.dsn, "plain")
        self.upkeep = Upkeep(settings, self.dsn, metrics)
        ssl = kafka_ssl_options(settings)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap,
            group_id=settings.rawsink.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            **ssl,
        )
        self.producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            **ssl,
        )
        self.path: StoragePath = "plain"
        self.started = False
        self.db_ok = False
        self.last_loop = 0.0
        self.commits = DurableCommits(self.consumer, self.db, metrics.uncommitted)
        self._inflight: asyncio.Task[None] | None = None

    def is_ready(self) -> bool:
        return self.started and self.db_ok and time.monotonic() - self.last_loop < _READY_STALL_S

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Prepare the database (migrate, upkeep), then join the consumer group."""
        self.path = await asyncio.to_thread(self.upkeep.prepare)
        self.db.path = self.path
        await asyncio.to_thread(self.db.connect)
        self.db_ok = True
        await self.producer.start()
        # The dead-letter topic too: counted per minute and reason (deadletter_counts).
        self.consumer.subscribe([self.telemetry_topic, self.txn_topic, self.deadletter_topic])
        await self.consumer.start()
        self.started = True
        log.info(
            "raw sink: %s + %s -> telemetry, transactions (group %s, storage %s)",
            self.telemetry_topic, self.txn_topic, self.settings.rawsink.group, self.path,
        )  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; the batch in flight is written and committed first."""
        await self.start()
        upkeep = asyncio.create_task(self.upkeep.run_every_period(stop))
        try:
            while not stop.is_set():
                self.last_loop = time.monotonic()
                await self.step(stop)
            await self.finish_inflight()
            await self.commits.drain()
        finally:
            self.started = False
            if self._inflight is not None:  # an error elsewhere: its records are re-read
                self._inflight.cancel()
                with contextlib.suppress(BaseException):
                    await self._inflight
                self._inflight = None
            upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upkeep
            await self.consumer.stop()
            await self.producer.stop()
            await asyncio.to_thread(self.db.close)

    # --- one batch ----------------------------------------------------------------------------

    async def step(self, stop: asyncio.Event | None = None) -> int:
        """Read and parse one batch while the previous one is written; then start writing it.

        Decoding (in this thread) overlaps the previous batch's database write
        (PostgreSQL's work, in another process): at most one batch is in flight, and
        batches complete in order. Returns how many records the batch had.
        """
        batches = await self.consumer.getmany(
            timeout_ms=self.settings.rawsink.poll_ms, max_records=self.settings.rawsink.max_records
        )
        records = [r for recs in batches.values() for r in recs]
        batch = None
        if records:
            batch = sort_records(
                records,
                telemetry_topic=self.telemetry_topic,
                txn_topic=self.txn_topic,
                deadletter_topic=self.deadletter_topic,
            )
        await self.finish_inflight()
        if batch is not None:
            offsets = {tp: recs[-1].offset + 1 for tp, recs in batches.items() if recs}
            self._inflight = asyncio.create_task(self._store(batch, len(records), offsets, stop))
        await self.commits.commit_durable()
        await self.lag.update(self.consumer)
        return len(records)

    async def finish_inflight(self) -> None:
        """Wait for the batch being written (its errors are raised here)."""
        task, self._inflight = self._inflight, None
        if task is not None:
            await task

    async def _store(
        self,
        batch: Sorted,
        size: int,
        offsets: dict[TopicPartition, int],
        stop: asyncio.Event | None,
    ) -> None:
        """Write one batch, send its dead letters, queue its offsets for the commit."""
        started = time.monotonic()
        written = await self._write_retrying(batch, stop)
        if written is None:  # stopping while the database was down: nothing committed
            return
        lsn, refused = written
        committed = datetime.now(UTC)
        self.metrics.batch_seconds.observe(time.monotonic() - started)
        self.metrics.batch_size.observe(size)
        self.metrics.last_batch.set(time.time())
        self._observe_latency(batch, refused, committed)
        rejected = batch.rejected + [refused_by_database(batch, e, why) for e, why in refused]
        # Dead letters are in Kafka before the offsets move past their records.
        await self._send_dead_letters(rejected)
        self.commits.add(Written(lsn, offsets))

    async def _write_retrying(
        self, batch: Sorted, stop: asyncio.Event | None
    ) -> tuple[int, Refused] | None:
        """Write the batch, retrying a database outage until it succeeds or ``stop`` is set."""
        backoff = Backoff(first=_RETRY_FIRST_S, cap=_RETRY_MAX_S)
        while True:
            try:
                result = await asyncio.to_thread(self._write, batch)
            except psycopg.Error as exc:
                self.db_ok = False
                self.metrics.db_errors.inc()
                log.warning(
                    "batch write failed (%s: %s); retrying with backoff",
                    type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc) else "",
                )  # fmt: skip
                await backoff.sleep(stop)
                if stop is not None and stop.is_set():
                    return None
                continue
            self.db_ok = True
            return result

    def _write(self, batch: Sorted) -> tuple[int, Refused]:
        """Both writers, each its own transaction; returns the WAL position and refusals."""
        db = self.db
        try:
            db.ensure_connected()
            refused: Refused = []
            # Looked up at each call (not bound once): a refusal replaces the writers.
            tel = write_isolating(
                lambda e: db.telemetry.write(e),  # noqa: PLW0108
                batch.telemetry, refused, db,
            )  # fmt: skip
            txn = write_isolating(
                lambda e: db.transactions.write(e),  # noqa: PLW0108
                batch.transactions, refused, db,
            )  # fmt: skip
            # Looked up again: a refusal may have replaced the connection too.
            counted = count_dead_letters(db.ensure_connected(), batch.dead_letters)
            lsn = db.wal_insert_lsn()
        except psycopg.Error:
            db.close()  # reconnect, with fresh writers, on the next attempt
            raise
        refused_tel = sum(1 for e, _ in refused if e.kind is not Kind.TXN)
        self.metrics.rows.labels("telemetry").inc(tel)
        self.metrics.rows.labels("transactions").inc(txn)
        self.metrics.dead_letters_counted.inc(counted)
        self.metrics.replayed.labels("telemetry").inc(len(batch.telemetry) - refused_tel - tel)
        self.metrics.replayed.labels("transactions").inc(
            len(batch.transactions) - (len(refused) - refused_tel) - txn
        )
        return lsn, refused

    def _observe_latency(self, batch: Sorted, refused: Refused, committed: datetime) -> None:
        skip = {id(e) for e, _ in refused}
        now = committed.timestamp()
        for table, envelopes in (
            ("telemetry", batch.telemetry),
            ("transactions", batch.transactions),
        ):
            kept = [e for e in envelopes if id(e) not in skip] if skip else envelopes
            observe_many(
                self.metrics.end_to_end.labels(table, "received"),
                [max(now - e.received_at.timestamp(), 0.0) for e in kept],
            )
            observe_many(
                self.metrics.end_to_end.labels(table, "terminal"),
                [max(now - e.payload.ts.timestamp(), 0.0) for e in kept],
            )

    async def _send_dead_letters(self, rejected: list[Rejection]) -> None:
        if not rejected:
            return
        futures = []
        for rejection in rejected:
            letter = dead_letter(rejection)
            record = rejection.record
            self.metrics.dead_letters.labels(letter.reason.value).inc()
            # The reason is logged; the payload never is (it may hold card data).
            log.warning(
                "record %s/%d/%d dead-lettered: %s: %s", record.topic, record.partition,
                record.offset, letter.reason.value, letter.message,
            )  # fmt: skip
            futures.append(
                await self.producer.send(self.deadletter_topic, letter.to_json(), key=record.key)
            )
        await asyncio.gather(*futures)
