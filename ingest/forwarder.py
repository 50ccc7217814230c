"""The Kafka side of the bridge: validated records to the idempotent producer, each
acknowledgement back to the MQTT side, and a retry for every record Kafka did not take.

Records are queued by :meth:`KafkaForwarder.add` and handed over in batches by one
sender task; Kafka's acknowledgement arrives in a callback and goes to
``on_delivered`` (the bridge's PUBACK and in-flight accounting). A record Kafka
refused is sent again after ``ingest.retry_backoff_s``, as often as it takes: the
MQTT broker keeps the message for the bridge's session until it is acknowledged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ingest.metrics import BridgeMetrics
from posflow.partitioning import KeyPartitioner
from posflow.runtime import Backoff
from posflow.security.tls import kafka_ssl_options
from posflow.settings import Settings

__all__ = ["KafkaForwarder", "PendingRecord"]

log = logging.getLogger("posflow.ingest")


@dataclass(slots=True)
class PendingRecord:
    """A validated message waiting for Kafka's acknowledgement."""

    topic: str
    key: bytes
    value: bytes
    mid: int
    qos: int
    received: float  # time.monotonic() at receipt
    # Kafka record headers: an envelope carries the bridge's mark (contracts/internal.py).
    # aiokafka's record builder takes a list (a tuple is refused) or None.
    headers: list[tuple[str, bytes]] | None = None


class KafkaForwarder:
    """Sends records to Kafka until each is acknowledged; tells ``on_delivered`` of each."""

    def __init__(
        self,
        settings: Settings,
        metrics: BridgeMetrics,
        topics: Iterable[str],
        *,
        on_delivered: Callable[[PendingRecord], None],
        on_health: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._on_delivered = on_delivered
        self._on_health = on_health  # Kafka's health (``ok``) may have changed
        self._queue: collections.deque[PendingRecord] = collections.deque()
        self._work = asyncio.Event()
        self._partitioner = KeyPartitioner()
        # Metric children looked up once, not per message.
        self._produced = {t: metrics.produced.labels(t) for t in topics}
        self._producer: AIOKafkaProducer | None = None
        # Receipt time of each record waiting for Kafka, oldest first (insertion order).
        self._pending: dict[int, float] = {}
        self._last_ack = time.monotonic()
        self._watchdog: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._retries: set[asyncio.Future[None]] = set()
        self.ok = False  # Kafka acknowledges (or answers a probe)

    def add(self, record: PendingRecord) -> None:
        self._queue.append(record)
        self._work.set()

    # --- sending --------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        """Hand queued records to the producer in batches; acks arrive in callbacks.

        Records are grouped per topic partition (the same murmur2 partitioning
        as Kafka's Java client, so keys land where every other client puts
        them) into the producer's own batch builders: one future per batch
        instead of one coroutine and one future per record.
        """
        while True:
            await self._work.wait()
            records = list(self._queue)
            self._queue.clear()
            self._work.clear()
            try:
                await self._send_batches(records)
            except KafkaError as exc:  # metadata unavailable: one by one, with retries
                for record in records:
                    if id(record) not in self._pending:
                        self._failed(record, exc)

    async def _send_batches(self, records: list[PendingRecord]) -> None:
        assert self._producer is not None  # noqa: S101 - started in start()
        groups: dict[tuple[str, int], list[PendingRecord]] = {}
        partitions: dict[str, list[int]] = {}
        for record in records:
            if record.topic not in partitions:
                partitions[record.topic] = sorted(await self._producer.partitions_for(record.topic))
            every = partitions[record.topic]
            partition = self._partitioner(record.key, every)
            groups.setdefault((record.topic, partition), []).append(record)
        for (topic, partition), group in groups.items():
            builder = self._producer.create_batch()
            chunk: list[PendingRecord] = []
            for record in group:
                self._pending[id(record)] = record.received
                if self._append(builder, record) is None:
                    await self._submit(builder, topic, partition, chunk)
                    builder, chunk = self._producer.create_batch(), []
                    self._append(builder, record)
                chunk.append(record)
            await self._submit(builder, topic, partition, chunk)

    @staticmethod
    def _append(builder: Any, record: PendingRecord) -> object:
        """The record into the batch; None if the batch is full."""
        return builder.append(
            key=record.key, value=record.value, timestamp=None, headers=record.headers
        )

    async def _submit(
        self, builder: Any, topic: str, partition: int, chunk: list[PendingRecord]
    ) -> None:
        assert self._producer is not None  # noqa: S101
        try:
            future = await self._producer.send_batch(builder, topic, partition=partition)
        except KafkaError as exc:
            for record in chunk:
                self._failed(record, exc)
            return
        future.add_done_callback(lambda f, c=chunk: self._on_batch(c, f))

    def _on_batch(self, chunk: list[PendingRecord], future: asyncio.Future[object]) -> None:
        exc = future.exception()
        for record in chunk:
            if exc is None:
                self._complete(record)
            else:
                self._failed(record, exc)

    async def _send(self, record: PendingRecord) -> None:
        assert self._producer is not None  # noqa: S101 - started in start()
        self._pending[id(record)] = record.received
        try:
            future = await self._producer.send(
                record.topic, record.value, key=record.key, headers=record.headers
            )
        except KafkaError as exc:
            self._failed(record, exc)
            return
        future.add_done_callback(lambda f, r=record: self._on_delivery(r, f))

    def _on_delivery(self, record: PendingRecord, future: asyncio.Future[object]) -> None:
        exc = future.exception()
        if exc is not None:
            self._failed(record, exc)
            return
        self._complete(record)

    def _complete(self, record: PendingRecord) -> None:
        del self._pending[id(record)]
        self._last_ack = time.monotonic()
        if not self.ok:
            log.info("Kafka acknowledges again")
            self.ok = True
            self._on_health()
        self._produced[record.topic].inc()
        self.metrics.produce_latency.observe(self._last_ack - record.received)
        self._on_delivered(record)

    def _failed(self, record: PendingRecord, exc: BaseException) -> None:
        """Not in Kafka: keep the slot and the MQTT message, try again after a pause."""
        self.metrics.kafka_errors.labels(type(exc).__name__).inc()
        if self.ok:
            log.warning("Kafka produce failed (%s); retrying until it works", exc)
        self.ok = False
        self._on_health()
        self._pending.pop(id(record), None)
        task = asyncio.ensure_future(self._retry(record))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry(self, record: PendingRecord) -> None:
        await asyncio.sleep(self.settings.ingest.retry_backoff_s)
        await self._send(record)

    # --- Kafka's health -------------------------------------------------------------------

    async def _watch(self) -> None:
        """Kafka's health as the bridge sees it.

        The producer retries internally while the broker is away, so a failure
        may never surface as an error: a record waiting longer than the stall
        limit marks Kafka unhealthy, and an idle bridge probes the cluster.
        """
        stall = self.settings.ingest.kafka_stall_s
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            oldest = next(iter(self._pending.values()), None)
            if oldest is not None and now - oldest > stall:
                if self.ok:
                    log.warning(
                        "Kafka has not acknowledged a record for %.1f s; not ready", now - oldest
                    )
                self.ok = False
            elif oldest is None and now - self._last_ack > stall:
                self.ok = await self._probe()
                if self.ok:
                    self._last_ack = now
            self._on_health()

    async def _probe(self) -> bool:
        assert self._producer is not None  # noqa: S101
        try:
            async with asyncio.timeout(self.settings.ingest.kafka_stall_s):
                await self._producer.client.fetch_all_metadata()
        except (KafkaError, TimeoutError, OSError):
            return False
        return True

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to Kafka (retrying until it answers), then start sending."""
        k = self.settings.kafka
        cfg = self.settings.ingest
        self._producer = AIOKafkaProducer(
            bootstrap_servers=k.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=cfg.linger_ms,
            max_batch_size=256 * 1024,
            request_timeout_ms=10_000,
            retry_backoff_ms=200,
            client_id=cfg.client_id,
            **kafka_ssl_options(self.settings),
        )
        backoff = Backoff(first=cfg.retry_backoff_s, cap=cfg.retry_backoff_s)
        while True:
            try:
                await self._producer.start()
                break
            except KafkaError as exc:
                log.warning("Kafka not reachable at %s (%s); retrying", k.bootstrap, exc)
                await backoff.sleep()
        self.ok = True
        self._watchdog = asyncio.create_task(self._watch())
        self._sender = asyncio.create_task(self._send_loop())

    async def stop(self) -> None:
        """Stop sending and retrying (what is not acknowledged stays with the broker)."""
        for task in (self._watchdog, self._sender, *self._retries):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._producer is not None:
            with contextlib.suppress(KafkaError):
                await self._producer.stop()
