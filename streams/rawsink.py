"""The raw storage sink: pos.telemetry.v1 and pos.txn.v1 -> the time-series tables.

An aiokafka consumer group reads both topics in batches and writes each batch
through :class:`~posflow.storage.writers.TelemetryWriter` and
:class:`~posflow.storage.writers.TransactionWriter` (binary COPY, then
``INSERT ... ON CONFLICT DO NOTHING`` on the natural key, plus the 1-minute
rollup of exactly the inserted rows). Kafka offsets are committed only after the
database commit *and* after the commit is on disk: telemetry commits with
``synchronous_commit = off``, so the sink remembers the WAL position of each batch
and commits its offsets once PostgreSQL reports the WAL flushed past it. A crash
anywhere re-reads at most the uncommitted batches, and re-writing them inserts
nothing: at least once + idempotent writes = every record once in the tables.

A record that cannot be written (not JSON, breaks the contract, wrong kind for its
topic, card data, or refused by the database) goes to the dead-letter topic with a
reason before its offset is committed; the sink keeps going. On plain PostgreSQL the
upkeep (partitions ahead, hourly rollup, retention) runs at start and periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from posflow.contracts import ContractError, IngestEnvelope, Reason, Transaction
from posflow.errors import PosflowError
from posflow.http import start_http
from posflow.kafkalag import ConsumerLag
from posflow.security.tls import kafka_ssl_options, postgres_dsn
from posflow.settings import Settings
from posflow.storage.deadletters import count_dead_letters
from posflow.storage.jobs import JobStat, job_stats
from posflow.storage.maintenance import maintain
from posflow.storage.migrate import StoragePath
from posflow.storage.setup import prepare_database, retention_of
from posflow.storage.writers import TelemetryWriter, TransactionWriter
from streams.rawsink_records import Rejection, Sorted, dead_letter, sort_records

__all__ = ["RawSink", "RawSinkMetrics", "RawSinkService", "build"]

log = logging.getLogger("posflow.rawsink")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 25_000)
_RETRY_MAX_S = 10.0
_DRAIN_FLUSH_S = 5.0  # on SIGTERM, how long to wait for the WAL flush of the last batches
_READY_STALL_S = 30.0


class RawSinkMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rows = Counter(
            "posflow_rawsink_rows", "rows newly inserted, by table", ["table"], registry=r
        )
        self.replayed = Counter(
            "posflow_rawsink_replayed", "records already in the table (a replay), by table",
            ["table"], registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "posflow_rawsink_batch_records", "Kafka records per batch",
            buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_seconds = Histogram(
            "posflow_rawsink_batch_write_seconds", "one batch: both writers, to the DB commit",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.end_to_end = Histogram(
            "posflow_rawsink_end_to_end_seconds",
            "envelope received_at (since=received) or terminal ts (since=terminal) to the row "
            "committed",
            ["table", "since"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.dead_letters = Counter(
            "posflow_rawsink_dead_letters", "records sent to the dead-letter topic", ["reason"],
            registry=r,
        )  # fmt: skip
        self.dead_letters_counted = Counter(
            "posflow_rawsink_dead_letters_counted",
            "dead-letter topic records newly counted into deadletter_counts",
            registry=r,
        )
        self.db_errors = Counter(
            "posflow_rawsink_db_errors", "failed batch writes (retried)", registry=r
        )
        self.maintenance = Counter(
            "posflow_rawsink_maintenance_runs", "storage upkeep runs", ["outcome"], registry=r
        )
        self.storage_jobs = Counter(
            "posflow_rawsink_storage_job_runs",
            "TimescaleDB policy jobs run by the sink's upkeep, by job and outcome",
            ["job", "outcome"],
            registry=r,
        )
        self.scheduler_failures = Gauge(
            "posflow_rawsink_scheduler_job_failures",
            "failures TimescaleDB's background scheduler recorded for a policy job (job_stats)",
            ["job"],
            registry=r,
        )
        self.scheduler_last_success = Gauge(
            "posflow_rawsink_scheduler_job_last_success_timestamp",
            "unix time of a policy job's last successful scheduler run (0: never)",
            ["job"],
            registry=r,
        )
        self.last_batch = Gauge(
            "posflow_rawsink_last_batch_timestamp", "unix time of the last batch", registry=r
        )
        self.uncommitted = Gauge(
            "posflow_rawsink_batches_awaiting_flush",
            "batches written whose Kafka offsets wait for the WAL flush", registry=r,
        )  # fmt: skip

    def observe_job_stats(self, stats: list[JobStat]) -> None:
        for stat in stats:
            self.scheduler_failures.labels(stat.job).set(stat.total_failures)
            finish = stat.last_successful_finish
            self.scheduler_last_success.labels(stat.job).set(finish.timestamp() if finish else 0)


@dataclass(frozen=True)
class _Written:
    """A batch in the database; its offsets go to Kafka once the WAL is flushed past ``lsn``."""

    lsn: int
    offsets: dict[TopicPartition, int]


class _Database:
    """The sink's connection and writers; rebuilt after any failed write.

    A new writer per connection also resets the writers' staging-table flag, which a
    rolled-back first write would otherwise leave pointing at a table that is gone.
    """

    def __init__(self, dsn: str, path: StoragePath) -> None:
        self.dsn = dsn
        self.path = path
        self.conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self.telemetry: TelemetryWriter
        self.transactions: TransactionWriter

    def connect(self) -> None:
        self.close()
        self.conn = psycopg.connect(self.dsn, autocommit=True)
        self.telemetry = TelemetryWriter(self.conn, self.path)
        self.transactions = TransactionWriter(self.conn, self.path)

    def reset_writers(self) -> None:
        if self.conn is None or self.conn.closed:
            self.connect()
            return
        self.telemetry = TelemetryWriter(self.conn, self.path)
        self.transactions = TransactionWriter(self.conn, self.path)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def wal_insert_lsn(self) -> int:
        assert self.conn is not None  # noqa: S101 - connect() runs first
        row = self.conn.execute("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8").fetchone()
        return int(row[0]) if row else 0

    def wal_flush_lsn(self) -> int:
        if self.conn is None:
            self.connect()
        assert self.conn is not None  # noqa: S101
        row = self.conn.execute("SELECT (pg_current_wal_flush_lsn() - '0/0')::int8").fetchone()
        return int(row[0]) if row else 0


_RECORD_FAULTS = (psycopg.DataError, psycopg.IntegrityError)


Refused = list[tuple[IngestEnvelope, str]]


def _write_isolating(
    write: Callable[[Sequence[IngestEnvelope]], int],
    envelopes: Sequence[IngestEnvelope],
    refused: Refused,
    db: _Database,
) -> int:
    """Write ``envelopes``; if the database refuses the batch for its data, halve it until
    each refused record is alone (it lands in ``refused`` with the database's words).
    Returns the rows inserted."""
    if not envelopes:
        return 0
    try:
        return write(envelopes)
    except _RECORD_FAULTS as exc:
        db.reset_writers()
        if len(envelopes) == 1:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            refused.append((envelopes[0], f"{type(exc).__name__}: {detail}"))
            return 0
    half = len(envelopes) // 2
    first = _write_isolating(write, envelopes[:half], refused, db)
    return first + _write_isolating(write, envelopes[half:], refused, db)


class RawSink:
    """Consumes telemetry and transaction envelopes into the time-series tables."""

    def __init__(self, settings: Settings, metrics: RawSinkMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        # The consumer lag every posflow consumer exports under one name (dashboards' lag row).
        self.lag = ConsumerLag(metrics.registry, settings.rawsink.group)
        prefix = settings.kafka.topic_prefix
        self.telemetry_topic = f"{prefix}.telemetry.v1"
        self.txn_topic = f"{prefix}.txn.v1"
        self.deadletter_topic = f"{prefix}.deadletter.v1"
        self.dsn = postgres_dsn(settings)
        self.db = _Database(self.dsn, "plain")
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
        self._written: list[_Written] = []
        self._inflight: asyncio.Task[None] | None = None

    def is_ready(self) -> bool:
        return self.started and self.db_ok and time.monotonic() - self.last_loop < _READY_STALL_S

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Prepare the database (migrate, upkeep), then join the consumer group."""
        self.path = await asyncio.to_thread(self._prepare)
        self.db = _Database(self.dsn, self.path)
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

    def _prepare(self) -> StoragePath:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                path = prepare_database(conn, self.settings.storage)
        except psycopg.OperationalError as exc:
            pg = self.settings.postgres
            raise PosflowError(
                f"cannot connect to PostgreSQL at {pg.host}:{pg.port} database {pg.database}: "
                f"{str(exc).strip().splitlines()[0]}",
                fix="start it (`posflow stack up postgres`) or set POSFLOW_POSTGRES__HOST/__PORT",
            ) from None
        self.metrics.maintenance.labels("ok").inc()
        return path

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; the batch in flight is written and committed first."""
        await self.start()
        upkeep = asyncio.create_task(self._maintain_every(stop))
        try:
            while not stop.is_set():
                self.last_loop = time.monotonic()
                await self.step(stop)
            await self.finish_inflight()
            await self._drain()
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
            log.info("raw sink stopped")

    # --- one batch ----------------------------------------------------------------------------

    async def step(self, stop: asyncio.Event | None = None) -> int:
        """Read and parse one batch while the previous one is written; then start writing it.

        Parsing (pydantic, in this thread) overlaps the previous batch's database write
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
        await self._commit_durable()
        await self._update_lag()
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
        rejected = batch.rejected + [_refused(batch, env, why) for env, why in refused]
        # Dead letters are in Kafka before the offsets move past their records.
        await self._send_dead_letters(rejected)
        self._written.append(_Written(lsn, offsets))
        self.metrics.uncommitted.set(len(self._written))

    async def _write_retrying(
        self, batch: Sorted, stop: asyncio.Event | None
    ) -> tuple[int, Refused] | None:
        """Write the batch, retrying a database outage until it succeeds or ``stop`` is set."""
        delay = 0.5
        while True:
            try:
                result = await asyncio.to_thread(self._write, batch)
            except psycopg.Error as exc:
                self.db_ok = False
                self.metrics.db_errors.inc()
                log.warning(
                    "batch write failed (%s: %s); retrying in %.1f s",
                    type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc) else "",
                    delay,
                )  # fmt: skip
                if stop is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    if stop.is_set():
                        return None
                else:
                    await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            self.db_ok = True
            return result

    def _write(self, batch: Sorted) -> tuple[int, Refused]:
        """Both writers, each its own transaction; returns the WAL position and refusals."""
        db = self.db
        try:
            if db.conn is None or db.conn.closed:
                db.connect()
            refused: Refused = []
            # Looked up at each call (not bound once): a refusal replaces the writers.
            tel = _write_isolating(
                lambda e: db.telemetry.write(e),  # noqa: PLW0108
                batch.telemetry, refused, db,
            )  # fmt: skip
            txn = _write_isolating(
                lambda e: db.transactions.write(e),  # noqa: PLW0108
                batch.transactions, refused, db,
            )  # fmt: skip
            assert db.conn is not None  # noqa: S101 - connected above
            counted = count_dead_letters(db.conn, batch.dead_letters)
            lsn = db.wal_insert_lsn()
        except psycopg.Error:
            db.close()  # reconnect, with fresh writers, on the next attempt
            raise
        refused_tel = sum(1 for e, _ in refused if not isinstance(e.payload, Transaction))
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
        for table, envelopes in (
            ("telemetry", batch.telemetry),
            ("transactions", batch.transactions),
        ):
            received = self.metrics.end_to_end.labels(table, "received")
            terminal = self.metrics.end_to_end.labels(table, "terminal")
            for env in envelopes:
                if id(env) in skip:
                    continue
                received.observe(max((committed - env.received_at).total_seconds(), 0.0))
                terminal.observe(max((committed - env.payload.ts).total_seconds(), 0.0))

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

    # --- offsets ------------------------------------------------------------------------------

    async def _commit_durable(self, *, wait_s: float = 0.0) -> None:
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
        self.metrics.uncommitted.set(len(self._written))
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

    async def _drain(self) -> None:
        """On stop: commit what the last batches wrote, once the WAL is flushed."""
        for _ in range(100):  # bounded; each round waits at most _DRAIN_FLUSH_S
            if not self._written:
                return
            before = len(self._written)
            await self._commit_durable(wait_s=_DRAIN_FLUSH_S)
            if len(self._written) == before:
                log.warning("%d batches not flushed in time: re-read after restart", before)
                return

    async def _update_lag(self) -> None:
        await self.lag.update(self.consumer)

    # --- upkeep -------------------------------------------------------------------------------

    async def _maintain_every(self, stop: asyncio.Event) -> None:
        period = self.settings.rawsink.maintain_interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
            if stop.is_set():
                return
            try:
                await asyncio.to_thread(self._maintain_once)
                self.metrics.maintenance.labels("ok").inc()
            except psycopg.Error:
                self.metrics.maintenance.labels("failed").inc()
                log.exception("storage upkeep failed; retrying next period")

    def _maintain_once(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            result = maintain(conn, retention_of(self.settings.storage))
            if result["path"] == "timescaledb":
                for run in result["jobs"]:  # type: ignore[attr-defined]
                    self.metrics.storage_jobs.labels(run.job, "ok" if run.ok else "failed").inc()
                self.metrics.observe_job_stats(job_stats(conn))
        if result["path"] == "plain":
            log.info("storage upkeep: hourly rollup up to %s", result["rollup_1h_upto"])


def _refused(batch: Sorted, envelope: IngestEnvelope, why: str) -> Rejection:
    """The rejection of an envelope the database refused, with its record."""
    error = ContractError(
        Reason.INVALID_VALUE,
        f"the database refused the {envelope.kind.value} row of terminal "
        f"{envelope.terminal_id}: {why}",
    )
    return Rejection(batch.origin[id(envelope)], error)


@dataclass
class RawSinkService:
    settings: Settings
    sink: RawSink

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT; the batch in flight is written and committed first."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        host, port = self.settings.services.bind_host, self.settings.services.rawsink
        runner = await start_http(host, port, self.sink.metrics.registry, self.sink.is_ready)
        log.info("raw sink: metrics on http://%s:%d/metrics", host, port)
        try:
            await self.sink.run(stop)
        finally:
            await runner.cleanup()


def build(settings: Settings) -> RawSinkService:
    """The composition root; call it inside the running event loop (aiokafka clients)."""
    return RawSinkService(settings, RawSink(settings, RawSinkMetrics()))
