"""The settlement worker: pos.txn.v1 -> merchant ledger, balances, cash-flow events.

Built on :class:`posflow.storage.sink.LedgerSink` (aiokafka, offsets stored in the
database with the ledger) rather than a faust agent: faust commits offsets to Kafka,
so it cannot put them in the ledger's database transaction (DESIGN.md principle 2).

After each database commit the batch's cash-flow events go to ``pos.cashflow.v1``
and its integrity events to ``pos.integrity.v1``; an outbox watermark records what
Kafka acknowledged, and a timer re-sends whatever a crash left unsent (at least
once: consumers dedupe by ``(merchant_id, seq)`` / ``event_id``). Another timer
releases pending money whose daily cut-off passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from posflow.contracts import ContractError, DeadLetter, IngestEnvelope, Reason, Transaction
from posflow.contracts.money import FeePlan, IntegrityEvent
from posflow.http import start_http
from posflow.kafkalag import ConsumerLag
from posflow.security.tls import kafka_ssl_options, postgres_dsn
from posflow.settings import Settings
from posflow.storage.ledger import CashflowEvent, LedgerEntry, LedgerResult
from posflow.storage.settlement import (
    mark_cashflow_published,
    mark_integrity_published,
    release_due,
    unpublished_cashflow,
    unpublished_integrity,
)
from posflow.storage.sink import LedgerSink
from streams.fees import fee_minor

__all__ = ["SettlementMetrics", "SettlementWorker", "build", "to_entry"]

log = logging.getLogger("posflow.settlement")

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_NO_PLAN = FeePlan()
_UNSENT_BATCHES = 16  # committed batches that may wait for their Kafka send


class SettlementMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.ledger_writes = Counter(
            "posflow_settlement_ledger_writes", "new ledger rows", ["effect"], registry=r
        )
        self.duplicates = Counter(
            "posflow_settlement_duplicates_refused", "replayed transaction ids ignored", registry=r
        )
        self.quarantined = Counter(
            "posflow_settlement_quarantined", "reused ids with another body", registry=r
        )
        self.flagged = Counter(
            "posflow_settlement_flagged", "transactions recorded, not applied", registry=r
        )
        self.invalid = Counter(
            "posflow_settlement_invalid_records", "records sent to the dead-letter topic",
            ["reason"], registry=r,
        )  # fmt: skip
        self.cashflow_events = Counter(
            "posflow_settlement_cashflow_events", "cash-flow events written", ["kind"], registry=r
        )
        self.published = Counter(
            "posflow_settlement_published", "records acknowledged by Kafka", ["topic"], registry=r
        )
        self.publish_errors = Counter(
            "posflow_settlement_publish_errors", "failed sends (retried by the outbox)", registry=r
        )
        self.end_to_end = Histogram(
            "posflow_settlement_end_to_end_seconds",
            "bridge received the payment (envelope received_at) to its cash-flow event committed",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.publish_to_cashflow = Histogram(
            "posflow_settlement_publish_to_cashflow_seconds",
            "the terminal's payment timestamp (its publish, on the terminal's clock) to its "
            "cash-flow event committed",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "posflow_settlement_batch_seconds", "one ledger batch: decide and commit",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.last_batch = Gauge(
            "posflow_settlement_last_batch_timestamp", "unix time of the last batch", registry=r
        )


def to_entry(
    envelope: IngestEnvelope, plan: FeePlan, source: tuple[str, int, int] | None = None
) -> LedgerEntry:
    """A ledger entry for one transaction envelope, fee from the merchant's plan.

    gross = amount + tip. Sale and capture pay the plan's fee; a refund posts -amount
    without a fee; void/reversal take the original's amounts in the ledger writer.
    """
    txn = envelope.payload
    if not isinstance(txn, Transaction):
        raise ContractError(Reason.INVALID_VALUE, f"a {txn.kind} record on the transaction topic")
    gross = txn.amount_minor + txn.tip_minor
    fee = 0
    if txn.type in ("sale", "capture") and txn.status == "approved":
        fee = fee_minor(
            plan, gross=gross, currency=txn.currency, scheme=txn.scheme, entry_mode=txn.entry_mode
        )
    return LedgerEntry(
        txn_id=txn.txn_id, merchant_id=txn.merchant_id, terminal_id=txn.terminal_id,
        txn_type=txn.type, currency=txn.currency, gross_minor=gross, fee_minor=fee,
        net_minor=gross - fee, occurred_at=txn.ts, body=txn.model_dump(mode="json"),
        source=source, status=txn.status, original_txn_id=txn.original_txn_id,
        received_at=envelope.received_at,
    )  # fmt: skip


@dataclass
class _Converter:
    """Records -> ledger entries; bad records become dead letters (sent after the commit)."""

    conn: psycopg.Connection[tuple[Any, ...]]
    metrics: SettlementMetrics
    rejected: list[tuple[ConsumerRecord[bytes, bytes], ContractError]] = field(default_factory=list)

    def __call__(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> list[LedgerEntry]:
        parsed: list[tuple[IngestEnvelope, tuple[str, int, int]]] = []
        for record in records:
            try:
                envelope = IngestEnvelope.from_json(record.value or b"")
            except ContractError as exc:
                self.rejected.append((record, exc))
                continue
            if not isinstance(envelope.payload, Transaction):
                self.rejected.append(
                    (
                        record,
                        ContractError(
                            Reason.INVALID_VALUE,
                            f"a {envelope.kind} record on the transaction topic",
                            "kind",
                        ),
                    )
                )
                continue
            parsed.append((envelope, (record.topic, record.partition, record.offset)))
        # Fee plans read per batch: a plan set with `settlement set-plan` applies at once.
        merchants = sorted({e.merchant_id for e, _ in parsed})
        plans: dict[str, FeePlan] = {}
        if merchants:
            for merchant, raw in self.conn.execute(
                "SELECT merchant_id, fee_plan::text FROM merchants WHERE merchant_id = ANY(%s)",
                [merchants],
            ).fetchall():
                try:
                    plans[str(merchant)] = FeePlan.from_json(raw)
                except ContractError as exc:
                    log.error(  # noqa: TRY400 - the reason is the message
                        "merchant %s: invalid fee_plan (%s); charging no fee", merchant, exc
                    )
            self.conn.commit()
        return [to_entry(env, plans.get(env.merchant_id, _NO_PLAN), src) for env, src in parsed]


class SettlementWorker:
    """Consumes transactions into the ledger and publishes what changed."""

    def __init__(
        self,
        settings: Settings,
        metrics: SettlementMetrics,
        *,
        on_committed: Callable[[LedgerResult], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.on_committed = on_committed
        prefix = settings.kafka.topic_prefix
        self.txn_topic = f"{prefix}.txn.v1"
        self.cashflow_topic = f"{prefix}.cashflow.v1"
        self.integrity_topic = f"{prefix}.integrity.v1"
        self.deadletter_topic = f"{prefix}.deadletter.v1"
        dsn = postgres_dsn(settings)
        kafka_tls = kafka_ssl_options(settings)
        self.converter = _Converter(psycopg.connect(dsn), metrics)
        self.outbox = psycopg.connect(dsn)
        self.outbox_lock = asyncio.Lock()
        self.sink = LedgerSink(
            bootstrap=settings.kafka.bootstrap,
            topic=self.txn_topic,
            group=settings.settlement.group,
            dsn=dsn,
            to_entries=self.converter,
            max_records=settings.settlement.max_records,
            kafka_options=kafka_tls,
        )
        # posflow_consumer_lag of the txn partitions this worker holds (Kafka offsets are
        # informational here, so lag is measured from the consumer's own position).
        self.lag = ConsumerLag(metrics.registry, settings.settlement.group)
        self.producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            **kafka_tls,
        )
        self.started = False
        self.last_loop = 0.0
        # Committed batches waiting for their Kafka send, in commit order. Sending is off
        # the ledger's critical path: the next batch is read and written meanwhile.
        self._unsent: (
            asyncio.Queue[tuple[Sequence[CashflowEvent], Sequence[IntegrityEvent]] | None] | None
        ) = None

    def is_ready(self) -> bool:
        return (
            self.started
            and bool(self.sink.consumer.assignment())
            and time.monotonic() - self.last_loop < 30
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; the batch in flight finishes first."""
        await self.producer.start()
        await self.sink.start()
        self.started = True
        self._unsent = asyncio.Queue(maxsize=_UNSENT_BATCHES)
        sender = asyncio.create_task(self._sender(self._unsent))
        timers = [
            asyncio.create_task(self._every(self.settings.settlement.outbox_interval_s,
                                            self.sweep_outbox, stop)),
            asyncio.create_task(self._every(self.settings.settlement.release_interval_s,
                                            self.release, stop)),
            asyncio.create_task(self.lag.run(self.sink.consumer, stop)),
        ]  # fmt: skip
        try:
            while not stop.is_set():
                self.last_loop = time.monotonic()
                await self.step()
        finally:
            self.started = False
            # What is queued goes out before the producer stops (the outbox covers a crash).
            if not sender.done():
                await self._unsent.put(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sender, 30)
            self._unsent = None
            for task in timers:
                task.cancel()
            for task in timers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.sink.stop()
            await self.producer.stop()
            self.converter.conn.close()
            self.outbox.close()

    async def step(self) -> LedgerResult | None:
        """One batch: write it, then publish its events and dead letters."""
        started = time.monotonic()
        result = await self.sink.run_once(timeout_ms=self.settings.settlement.poll_ms)
        await self._send_deadletters()
        if result is None:
            return None
        committed = datetime.now(UTC)
        self._count(result, committed, time.monotonic() - started)
        if self.on_committed is not None:
            self.on_committed(result)
        if self._unsent is not None:
            # Bounded: if Kafka falls behind, the ledger waits here (backpressure).
            await self._unsent.put((result.events, result.integrity))
        else:
            await self.publish(result.events, result.integrity)
        return result

    async def _sender(
        self,
        queue: asyncio.Queue[tuple[Sequence[CashflowEvent], Sequence[IntegrityEvent]] | None],
    ) -> None:
        """Publish committed batches one after another, in commit order, until None."""
        while (item := await queue.get()) is not None:
            await self.publish(*item)

    def _count(self, result: LedgerResult, committed: datetime, seconds: float) -> None:
        m = self.metrics
        m.batch_seconds.observe(seconds)
        m.last_batch.set(time.time())
        m.duplicates.inc(result.duplicates)
        m.quarantined.inc(len(result.quarantined))
        m.flagged.inc(len(result.flagged))
        m.ledger_writes.labels("parked").inc(result.parked)
        m.ledger_writes.labels("flagged").inc(len(result.flagged))
        for ev in result.events:
            m.cashflow_events.labels(ev.kind).inc()
            if ev.received_at is not None:  # a payment's own event (not a release)
                m.end_to_end.observe((committed - ev.received_at).total_seconds())
                m.publish_to_cashflow.observe(
                    max(0.0, (committed - ev.occurred_at).total_seconds())
                )
        moved = sum(1 for ev in result.events if ev.kind not in ("flagged",))
        m.ledger_writes.labels("applied").inc(moved)
        other = result.applied - moved - len(result.flagged) - result.parked
        m.ledger_writes.labels("no_money").inc(max(other, 0))

    async def publish(
        self, events: Sequence[CashflowEvent], integrity: Sequence[IntegrityEvent]
    ) -> None:
        """Send to Kafka, then advance the outbox; a failure is left to the sweeper."""
        if not events and not integrity:
            return
        futures: list[Any] = []
        try:
            futures = [
                await self.producer.send(
                    self.cashflow_topic, ev.record().to_json(), key=ev.merchant_id.encode()
                )
                for ev in events
            ] + [
                await self.producer.send(
                    self.integrity_topic, ev.to_json(), key=ev.merchant_id.encode()
                )
                for ev in integrity
            ]
            await asyncio.gather(*futures)
        except Exception:
            self.metrics.publish_errors.inc()
            log.exception("publishing %d events failed; the outbox retries", len(futures))
            return
        self.metrics.published.labels(self.cashflow_topic).inc(len(events))
        self.metrics.published.labels(self.integrity_topic).inc(len(integrity))
        async with self.outbox_lock:
            await asyncio.to_thread(mark_cashflow_published, self.outbox, events)
            await asyncio.to_thread(
                mark_integrity_published, self.outbox, [e.event_id for e in integrity]
            )

    async def sweep_outbox(self) -> None:
        """Re-send what a crash, a failure or another process (payout, release) left unsent."""
        for _ in range(100):  # bounded: at most 100 pages per sweep
            async with self.outbox_lock:
                events = await asyncio.to_thread(unpublished_cashflow, self.outbox)
                integrity = await asyncio.to_thread(unpublished_integrity, self.outbox)
            if not events and not integrity:
                return
            await self.publish(events, integrity)

    async def release(self) -> None:
        async with self.outbox_lock:
            events = await asyncio.to_thread(release_due, self.outbox)
        if events:
            log.info("released pending money for %d merchant/currency pairs", len(events))
            self.metrics.cashflow_events.labels("release").inc(len(events))
            await self.publish(events, [])

    async def _every(self, period_s: float, job: Callable[[], Any], stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await job()
            except Exception:
                log.exception("settlement timer %s failed; retrying next period", job.__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period_s)

    async def _send_deadletters(self) -> None:
        rejected, self.converter.rejected = self.converter.rejected, []
        for record, exc in rejected:
            letter = DeadLetter(
                reason=exc.reason, message=exc.message, field=exc.field,
                original_topic=f"{record.topic}/{record.partition}/{record.offset}",
                received_at=datetime.now(UTC), payload_redacted=(record.value or b"")[:4096]
                .decode("utf-8", "replace"), payload_size=len(record.value or b""),
            )  # fmt: skip
            self.metrics.invalid.labels(exc.reason.value).inc()
            log.warning("record %s/%d/%d refused: %s", record.topic, record.partition,
                        record.offset, exc.message)  # fmt: skip
            await self.producer.send_and_wait(
                self.deadletter_topic, letter.to_json(), key=record.key
            )


@dataclass
class SettlementService:
    settings: Settings
    worker: SettlementWorker

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT; the batch in flight is committed first."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        host, port = self.settings.services.bind_host, self.settings.services.settlement
        runner = await start_http(host, port, self.worker.metrics.registry, self.worker.is_ready)
        log.info("settlement worker: metrics on http://%s:%d/metrics", host, port)
        try:
            await self.worker.run(stop)
        finally:
            await runner.cleanup()
        log.info("settlement worker stopped")


def build(
    settings: Settings, *, on_committed: Callable[[LedgerResult], None] | None = None
) -> SettlementService:
    """The composition root of the settlement worker."""
    worker = SettlementWorker(settings, SettlementMetrics(), on_committed=on_committed)
    return SettlementService(settings=settings, worker=worker)
