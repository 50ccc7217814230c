"""The settlement worker's outbox: committed events go to Kafka, then their watermark.

Cash-flow events go to ``pos.cashflow.v1`` and integrity events to
``pos.integrity.v1`` after the ledger's commit; once Kafka acknowledges them the
outbox watermark in the database moves past them. What a crash, a failed send or
another process (payout, release) left unsent is found by :meth:`Outbox.sweep_outbox`
and sent again: at least once, consumers dedupe by ``(merchant_id, seq)`` /
``event_id``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from aiokafka import AIOKafkaProducer

from posflow.contracts.money import IntegrityEvent
from posflow.storage.ledger import CashflowEvent
from posflow.storage.settlement import (
    mark_cashflow_published,
    mark_integrity_published,
    release_due,
    unpublished_cashflow,
    unpublished_integrity,
)
from posflow.topics import TopicNames
from streams.settlement_metrics import SettlementMetrics

__all__ = ["Outbox"]

log = logging.getLogger("posflow.settlement")


class Outbox:
    """Publishes committed events and keeps the watermark of what Kafka acknowledged."""

    def __init__(
        self,
        conn: psycopg.Connection[tuple[Any, ...]],
        producer: AIOKafkaProducer,
        topics: TopicNames,
        metrics: SettlementMetrics,
    ) -> None:
        self.conn = conn
        self.producer = producer
        self.cashflow_topic = topics.cashflow
        self.integrity_topic = topics.integrity
        self.metrics = metrics
        self.lock = asyncio.Lock()  # one user of the connection at a time

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
        async with self.lock:
            await asyncio.to_thread(mark_cashflow_published, self.conn, events)
            await asyncio.to_thread(
                mark_integrity_published, self.conn, [e.event_id for e in integrity]
            )

    async def sweep_outbox(self) -> None:
        """Re-send what a crash, a failure or another process (payout, release) left unsent."""
        for _ in range(100):  # bounded: at most 100 pages per sweep
            async with self.lock:
                events = await asyncio.to_thread(unpublished_cashflow, self.conn)
                integrity = await asyncio.to_thread(unpublished_integrity, self.conn)
            if not events and not integrity:
                return
            await self.publish(events, integrity)

    async def release(self) -> None:
        """Release pending money whose daily cut-off passed, and publish its events."""
        async with self.lock:
            events = await asyncio.to_thread(release_due, self.conn)
        if events:
            log.info("released pending money for %d merchant/currency pairs", len(events))
            self.metrics.cashflow_events.labels("release").inc(len(events))
            await self.publish(events, [])
