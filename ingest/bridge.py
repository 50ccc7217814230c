"""The MQTT -> Kafka bridge.

Flow of one message, all on one asyncio loop (see ``_mqtt.py`` for why):

1. paho parses it (manual acknowledgement: no PUBACK yet); it takes a place in
   the bounded in-flight window, is validated (pure, never raises) and queued.
   When the window is full the bridge stops reading the socket: backpressure
   reaches the broker (which holds the messages for our session), not memory.
2. The idempotent producer (acks=all) batches it to Kafka.
3. When Kafka acknowledged it, the PUBACK goes to the MQTT broker and the
   place is freed. A failed produce is retried until Kafka takes it; until
   then the broker keeps the message for this session, so a crash loses
   nothing (a retry after a crash may write a record twice: at least once).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest._mqtt import BufferedClient, LoopDriver
from ingest.metrics import BridgeMetrics
from posflow.contracts import Accepted, validate_message
from posflow.security.tls import kafka_ssl_options, service_mqtt_endpoint
from posflow.settings import Settings

__all__ = ["Bridge", "PendingRecord"]

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


class Bridge:
    """Subscribes on the shared subscription and forwards every message to Kafka."""

    def __init__(self, settings: Settings, metrics: BridgeMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or BridgeMetrics()
        cfg = settings.ingest
        prefix = settings.kafka.topic_prefix
        self.topics = {
            "telemetry": f"{prefix}.telemetry.v1",
            "txn": f"{prefix}.txn.v1",
            "status": f"{prefix}.status.v1",
        }
        self.deadletter_topic = f"{prefix}.deadletter.v1"
        self._max_inflight = cfg.max_inflight
        self._clock_ahead = timedelta(seconds=cfg.clock_ahead_s)
        self._clock_behind = timedelta(seconds=cfg.clock_behind_s)
        self._queue: collections.deque[PendingRecord] = collections.deque()
        self._driver: LoopDriver | None = None
        self._acks: list[int] = []
        self._drained = asyncio.Event()
        self._partitioner = DefaultPartitioner()
        # Metric children looked up once, not per message.
        self._received = {k: self.metrics.received.labels(k) for k in self.topics}
        every_topic = [*self.topics.values(), self.deadletter_topic]
        self._produced = {t: self.metrics.produced.labels(t) for t in every_topic}
        self._producer: AIOKafkaProducer | None = None
        self._inflight = 0
        # Receipt time of each record waiting for Kafka, oldest first (insertion order).
        self._pending: dict[int, float] = {}
        self._last_ack = time.monotonic()
        self._watchdog: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._work = asyncio.Event()
        self._retries: set[asyncio.Future[None]] = set()
        self._draining = False
        self._mqtt_connected = asyncio.Event()
        self._kafka_ok = False
        # Password listener, or the TLS listener with the service's certificate.
        self._mqtt_port, self._mqtt_tls = service_mqtt_endpoint(settings)
        self.client = self._make_client()

    # --- state ------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return self._inflight

    def is_ready(self) -> bool:
        """Ready = connected to MQTT, Kafka answering, not draining."""
        return self._mqtt_connected.is_set() and self._kafka_ok and not self._draining

    # --- MQTT side ---------------------------------------------------------------------

    def _make_client(self) -> BufferedClient:
        cfg = self.settings.ingest
        m = self.settings.mosquitto
        client = BufferedClient(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if self._mqtt_tls is not None:
            # The certificate's common name is the MQTT username (use_identity_as_username).
            client.tls_set_context(self._mqtt_tls)
        else:
            client.username_pw_set(m.service_user, m.service_password.get_secret_value())
        client.max_inflight_messages_set(cfg.max_inflight)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        # A persistent session: unacknowledged QoS 1 messages wait for us across restarts.
        props.SessionExpiryInterval = self.settings.ingest.session_expiry_s
        # The broker never sends more unacknowledged messages than our window holds.
        props.ReceiveMaximum = self.settings.ingest.max_inflight
        return props

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        _flags: object,
        reason: object,
        _props: object,
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.error("MQTT broker refused the connection: %s", reason)
            return
        cfg = self.settings.ingest
        # Ready only once the broker has acknowledged the subscription (_on_subscribe): a
        # terminal that publishes after /readyz said 200 is never missed by the bridge.
        client.subscribe(f"$share/{cfg.share_group}/{cfg.topic_filter}", qos=1)
        log.info("connected to MQTT, subscribing to $share/%s/%s", cfg.share_group,
                 cfg.topic_filter)  # fmt: skip

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: object, _mid: int, reasons: list[Any], _p: object
    ) -> None:
        refused = [r for r in reasons if getattr(r, "is_failure", False)]
        if refused:
            log.error("MQTT broker refused the subscription: %s", refused)
            return
        self._mqtt_connected.set()
        self._update_ready()
        cfg = self.settings.ingest
        log.info("subscribed to $share/%s/%s", cfg.share_group, cfg.topic_filter)

    def _on_disconnect(self, *_args: object) -> None:
        self._mqtt_connected.clear()
        self._update_ready()
        if not self._draining:
            log.warning("MQTT connection lost; paho reconnects with backoff")

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        """A PUBLISH that came through paho's own path (see ``_mqtt.py``)."""
        self._handle(msg.topic, bytes(msg.payload), msg.qos, msg.mid)

    def _handle(self, topic: str, payload: bytes, qos: int, mid: int) -> None:
        if self._draining:
            return  # not acknowledged: the broker redelivers it to this session later
        received = time.monotonic()
        result = validate_message(
            topic,
            payload,
            received_at=datetime.now(UTC),
            mqtt_mid=mid,
            max_bytes=self.settings.ingest.max_payload_bytes,
            clock_ahead=self._clock_ahead,
            clock_behind=self._clock_behind,
        )
        if isinstance(result, Accepted):
            envelope = result.envelope
            self._received[envelope.kind.value].inc()
            record = PendingRecord(
                topic=self.topics[envelope.kind.value],
                key=envelope.kafka_key(),
                value=envelope.to_json(),
                mid=mid,
                qos=qos,
                received=received,
            )
        else:
            dead = result.dead_letter
            self.metrics.received.labels("invalid").inc()
            self.metrics.dead_lettered.labels(dead.reason.value).inc()
            # The reason is logged; the payload never is (it may hold card data), and the
            # topic only as the dead letter shows it (card data redacted).
            shown = dead.original_topic
            log.info("dead letter %s from %s: %s", dead.reason.value, shown, dead.message)
            record = PendingRecord(
                topic=self.deadletter_topic,
                key=shown.encode("utf-8", errors="replace")[:256],
                value=dead.to_json(),
                mid=mid,
                qos=qos,
                received=received,
            )
        self._enqueue(record)

    def _enqueue(self, record: PendingRecord) -> None:
        self._inflight += 1
        self._queue.append(record)
        self.metrics.inflight.set(self._inflight)
        self._work.set()

    def _room(self) -> int:
        """Backpressure: how many more messages the in-flight window takes now."""
        return 0 if self._draining else self._max_inflight - self._inflight

    # --- Kafka side (asyncio loop) -----------------------------------------------------

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
            partition = self._partitioner(record.key, every, every)
            groups.setdefault((record.topic, partition), []).append(record)
        for (topic, partition), group in groups.items():
            builder = self._producer.create_batch()
            chunk: list[PendingRecord] = []
            for record in group:
                self._pending[id(record)] = record.received
                if builder.append(key=record.key, value=record.value, timestamp=None) is None:
                    await self._submit(builder, topic, partition, chunk)
                    builder, chunk = self._producer.create_batch(), []
                    builder.append(key=record.key, value=record.value, timestamp=None)
                chunk.append(record)
            await self._submit(builder, topic, partition, chunk)

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
            future = await self._producer.send(record.topic, record.value, key=record.key)
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
        if not self._kafka_ok:
            log.info("Kafka acknowledges again")
            self._kafka_ok = True
            self._update_ready()
        self._produced[record.topic].inc()
        self.metrics.produce_latency.observe(self._last_ack - record.received)
        if record.qos > 0:
            self._acks.append(record.mid)
            if len(self._acks) == 1:
                # One write for all the acknowledgements of this turn of the loop.
                asyncio.get_running_loop().call_soon(self._flush_acks)
        self._inflight -= 1
        self.metrics.inflight.set(self._inflight)
        if self._draining and self._inflight == 0:
            self._drained.set()
        if self._driver is not None and not self._draining:
            self._driver.resume()

    def _flush_acks(self) -> None:
        acks, self._acks = self._acks, []
        self.client.send_pubacks(acks)

    def _failed(self, record: PendingRecord, exc: BaseException) -> None:
        """Not in Kafka: keep the slot and the MQTT message, try again after a pause."""
        self.metrics.kafka_errors.labels(type(exc).__name__).inc()
        if self._kafka_ok:
            log.warning("Kafka produce failed (%s); retrying until it works", exc)
        self._kafka_ok = False
        self._update_ready()
        self._pending.pop(id(record), None)
        task = asyncio.ensure_future(self._retry(record))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry(self, record: PendingRecord) -> None:
        await asyncio.sleep(self.settings.ingest.retry_backoff_s)
        await self._send(record)

    async def _watch_kafka(self) -> None:
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
                if self._kafka_ok:
                    log.warning(
                        "Kafka has not acknowledged a record for %.1f s; not ready", now - oldest
                    )
                self._kafka_ok = False
            elif oldest is None and now - self._last_ack > stall:
                self._kafka_ok = await self._probe_kafka()
                if self._kafka_ok:
                    self._last_ack = now
            self._update_ready()

    async def _probe_kafka(self) -> bool:
        assert self._producer is not None  # noqa: S101
        try:
            async with asyncio.timeout(self.settings.ingest.kafka_stall_s):
                await self._producer.client.fetch_all_metadata()
        except (KafkaError, TimeoutError, OSError):
            return False
        return True

    def _update_ready(self) -> None:
        self.metrics.ready.set(1 if self.is_ready() else 0)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to Kafka, then to MQTT; returns once both are up."""
        k = self.settings.kafka
        self._producer = AIOKafkaProducer(
            bootstrap_servers=k.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=self.settings.ingest.linger_ms,
            max_batch_size=256 * 1024,
            request_timeout_ms=10_000,
            retry_backoff_ms=200,
            client_id=self.settings.ingest.client_id,
            **kafka_ssl_options(self.settings),
        )
        while True:
            try:
                await self._producer.start()
                break
            except KafkaError as exc:
                log.warning("Kafka not reachable at %s (%s); retrying", k.bootstrap, exc)
                await asyncio.sleep(self.settings.ingest.retry_backoff_s)
        self._kafka_ok = True
        self._watchdog = asyncio.create_task(self._watch_kafka())
        self._sender = asyncio.create_task(self._send_loop())
        m = self.settings.mosquitto
        self._driver = LoopDriver(self.client, self._handle, self._room)
        self._driver.start()
        while True:
            try:
                self.client.connect(
                    m.host,
                    self._mqtt_port,
                    keepalive=30,
                    clean_start=False,
                    properties=self._connect_properties(),
                )
                break
            except OSError as exc:
                log.warning(
                    "MQTT broker unreachable at %s:%d (%s); retrying", m.host, self._mqtt_port, exc
                )
                await asyncio.sleep(self.settings.ingest.retry_backoff_s)
        async with asyncio.timeout(30):
            await self._mqtt_connected.wait()

    async def stop(self) -> None:
        """Stop taking messages, wait for in-flight ones to reach Kafka, then disconnect."""
        self._draining = True
        self._update_ready()
        if self._driver is not None:
            self._driver.pause()
        if self._inflight:
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.ingest.drain_timeout_s):
                    await self._drained.wait()
        if self._inflight:
            log.warning("%d messages not drained: the broker redelivers them", self._inflight)
        self._flush_acks()
        self.client.loop_write()  # the last PUBACKs
        self.client.disconnect()
        self.client.loop_write()
        if self._driver is not None:
            await self._driver.stop()
        for task in (self._watchdog, self._sender, *self._retries):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._producer is not None:
            with contextlib.suppress(KafkaError):
                await self._producer.stop()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        await stop.wait()
        await self.stop()
