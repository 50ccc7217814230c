"""The engine's Kafka input: every partition of its topics, offsets stored with the state.

The engine reads every partition of the health, status, telemetry and integrity topics
by manual assignment (group rules need every terminal's facts in one place), seeking to
the offsets stored with its state; each batch is evaluated and committed, with the next
offsets, in one transaction (:meth:`alerts.live.LiveEngine.commit`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from alerts.live import LiveEngine
from posflow.errors import PosflowError
from posflow.kafkalag import ConsumerLag

__all__ = ["AlertConsumer", "parse_record"]

log = logging.getLogger("posflow.alerts")


def parse_record(source: str, value: bytes | None) -> tuple[str, dict[str, Any]] | None:
    """(kind, record) of a record from the ``source`` stream (health, status, telemetry,
    integrity); None for one the engine does not use; ValueError if unreadable."""
    record = orjson.loads(value or b"")
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 (one error kind for bad input)
    kind = _kind_of(source, record)
    if kind is None:
        return None
    if kind in ("status", "telemetry") and "payload" not in record:
        raise ValueError("an envelope without payload")
    return kind, record


def _kind_of(source: str, value: dict[str, Any]) -> str | None:
    if source == "health":
        if value.get("type") == "window":
            return "window" if value.get("final", True) else None
        return "state" if value.get("type") == "state" else None
    if source == "integrity":
        for name in ("merchant_id", "txn_id"):
            if not isinstance(value.get(name), str):
                raise ValueError(f"integrity event without {name}")  # noqa: TRY004
        return "integrity"
    kind = value.get("kind")
    if kind in ("status", "telemetry"):
        return str(kind)
    raise ValueError(f"unexpected record kind {kind!r}")


@dataclass
class AlertConsumer:
    """Consume, evaluate, store: one batch at a time, until the stop event."""

    live: LiveEngine
    consumer: AIOKafkaConsumer
    # topic name -> the stream it carries (health, status, telemetry, integrity)
    sources: Mapping[str, str]
    max_records: int
    tick_s: float
    # posflow_consumer_lag of the assigned partitions (group label: alerts.group).
    lag: ConsumerLag | None = None
    ready: bool = False

    def apply(self, topic: str, partition: int, offset: int, value: bytes | None) -> None:
        """One record into the engine; an unreadable one is counted, logged and skipped."""
        source = self.sources[topic]
        metrics = self.live.metrics
        try:
            parsed = parse_record(source, value)
            if parsed is None:
                return
            self.live.engine.on_record(*parsed)
            metrics.records.labels(source).inc()
        except (ValueError, KeyError, TypeError) as exc:
            # Still in Kafka at this offset; counted and logged, the engine carries on.
            metrics.bad_records.labels(source).inc()
            log.error(  # noqa: TRY400 (bad input, not a bug: no traceback)
                "skipped unreadable record %s[%d]@%d: %s", topic, partition, offset, exc
            )

    async def _assign(self) -> None:
        consumer = self.consumer
        await consumer._client.force_metadata_update()
        parts = [
            TopicPartition(t, p)
            for t in self.sources
            for p in consumer.partitions_for_topic(t) or ()
        ]
        if not parts:
            raise PosflowError(
                f"none of the topics {', '.join(self.sources)} exist",
                fix="run `posflow stack up` (it creates the pipeline topics)",
            )
        consumer.assign(parts)
        stored = await asyncio.to_thread(self.live.store.load_offsets)
        for tp in parts:
            offset = stored.get((tp.topic, tp.partition))
            if offset is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)

    async def run(self, stop: asyncio.Event) -> None:
        """Assign, then consume until ``stop``; the consumer is stopped on the way out."""
        await self.consumer.start()
        lag = None
        if self.lag is not None:
            lag = asyncio.create_task(self.lag.run(self.consumer, stop))
        try:
            await self._assign()
            self.ready = True
            engine = self.live.engine
            log.info(
                "alert engine running: %d terminals, %d open alerts",
                len(engine.terminals),
                len(engine.alerts),
            )
            while not stop.is_set():
                await self._batch()
        finally:
            self.ready = False
            if lag is not None:
                lag.cancel()
                await asyncio.gather(lag, return_exceptions=True)
            await self.consumer.stop()

    async def _batch(self) -> None:
        live, engine = self.live, self.live.engine
        batches = await self.consumer.getmany(
            timeout_ms=int(self.tick_s * 1000), max_records=self.max_records
        )
        started = time.perf_counter()
        before = engine.evaluations
        async with live.lock:
            offsets = {}
            for tp, records in batches.items():
                for r in records:
                    self.apply(tp.topic, tp.partition, r.offset, r.value)
                offsets[(tp.topic, tp.partition)] = records[-1].offset + 1
            engine.tick()
            await live.commit(offsets)
        live.metrics.evaluations.inc(engine.evaluations - before)
        if batches:
            live.metrics.batch_seconds.observe(time.perf_counter() - started)
