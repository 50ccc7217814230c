"""The settlement worker: pos.txn.v1 -> merchant ledger, balances, cash-flow events.

Built on :class:`posflow.storage.sink.LedgerSink` (aiokafka, offsets stored in the
database with the ledger) rather than a faust agent: faust commits offsets to Kafka,
so it cannot put them in the ledger's database transaction (DESIGN.md principle 2).

After each database commit the batch's events go to Kafka through the outbox
(:mod:`streams.settlement_outbox`); a timer re-sends whatever a crash left unsent,
another releases pending money whose daily cut-off passed. Records that are not
transactions are refused into the dead-letter topic (:mod:`streams.settlement_entries`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from aiokafka import AIOKafkaProducer

from posflow.contracts.money import IntegrityEvent
from posflow.cost import Handled
from posflow.kafkalag import ConsumerLag
from posflow.runtime import Endpoints, Service, cancel_tasks
from posflow.security.tls import kafka_ssl_options, postgres_dsn
from posflow.settings import Settings
from posflow.storage.ledger import CashflowEvent, LedgerResult
from posflow.storage.sink import LedgerSink
from posflow.topics import topic_names
from streams.settlement_entries import EntryConverter, refusal_letter
from streams.settlement_metrics import SettlementMetrics
from streams.settlement_outbox import Outbox

__all__ = ["SettlementWorker", "build"]

log = logging.getLogger("posflow.settlement")

_UNSENT_BATCHES = 16  # committed batches that may wait for their Kafka send

_Unsent = tuple[Sequence[CashflowEvent], Sequence[IntegrityEvent]]


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
        topics = topic_names(settings.kafka)
        self.txn_topic = topics.txn
        self.deadletter_topic = topics.deadletter
        dsn = postgres_dsn(settings)
        kafka_tls = kafka_ssl_options(settings)
        self.converter = EntryConverter(psycopg.connect(dsn))
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
        self.outbox = Outbox(psycopg.connect(dsn), self.producer, topics, metrics)
        self.started = False
        self.last_loop = 0.0
        # Committed batches waiting for their Kafka send, in commit order. Sending is off
        # the ledger's critical path: the next batch is read and written meanwhile.
        self._unsent: asyncio.Queue[_Unsent | None] | None = None

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
                                            self.outbox.sweep_outbox, stop)),
            asyncio.create_task(self._every(self.settings.settlement.release_interval_s,
                                            self.outbox.release, stop)),
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
            await cancel_tasks(timers)
            await self.sink.stop()
            await self.producer.stop()
            self.converter.conn.close()
            self.outbox.conn.close()

    async def step(self) -> LedgerResult | None:
        """One batch: write it, then publish its events and dead letters."""
        started = time.monotonic()
        result = await self.sink.run_once(timeout_ms=self.settings.settlement.poll_ms)
        await self._send_deadletters()
        if result is None:
            return None
        committed = datetime.now(UTC)
        self.metrics.observe_batch(result, committed, time.monotonic() - started)
        if self.on_committed is not None:
            self.on_committed(result)
        if self._unsent is not None:
            # Bounded: if Kafka falls behind, the ledger waits here (backpressure).
            await self._unsent.put((result.events, result.integrity))
        else:
            await self.outbox.publish(result.events, result.integrity)
        return result

    async def _sender(self, queue: asyncio.Queue[_Unsent | None]) -> None:
        """Publish committed batches one after another, in commit order, until None."""
        while (item := await queue.get()) is not None:
            await self.outbox.publish(*item)

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
            letter = refusal_letter(record, exc)
            self.metrics.invalid.labels(exc.reason.value).inc()
            log.warning("record %s/%d/%d refused: %s", record.topic, record.partition,
                        record.offset, exc.message)  # fmt: skip
            await self.producer.send_and_wait(
                self.deadletter_topic, letter.to_json(), key=record.key
            )


def build(
    settings: Settings, *, on_committed: Callable[[LedgerResult], None] | None = None
) -> Service:
    """The settlement worker wired whole; ``run()`` runs it until SIGTERM/SIGINT, and the
    batch in flight is committed first. Call it inside the running event loop (aiokafka
    clients)."""
    worker = SettlementWorker(settings, SettlementMetrics(), on_committed=on_committed)
    s = settings.services
    handled = Handled(
        "settlement", ("posflow_settlement_records", "posflow_settlement_invalid_records")
    )
    endpoints = Endpoints(
        s.bind_host, s.settlement, worker.metrics.registry, worker.is_ready, handled=handled
    )
    return Service("settlement worker", endpoints, worker.run)
