"""The MQTT -> Kafka bridge.

Flow of one message, all on one asyncio loop (see ``_mqtt.py`` for why):

1. paho parses it (manual acknowledgement: no PUBACK yet); it takes a place in
   the bounded in-flight window, is validated (pure, never raises) and queued.
   When the window is full the bridge stops reading the socket: backpressure
   reaches the broker (which holds the messages for our session), not memory.
2. The idempotent producer (acks=all) batches it to Kafka (``forwarder.py``).
3. When Kafka acknowledged it, the PUBACK goes to the MQTT broker and the
   place is freed. A failed produce is retried until Kafka takes it; until
   then the broker keeps the message for this session, so a crash loses
   nothing (a retry after a crash may write a record twice: at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest._mqtt import BufferedClient, LoopDriver
from ingest.forwarder import KafkaForwarder, PendingRecord
from ingest.metrics import BridgeMetrics
from posflow.contracts import Accepted, Kind, validate_message
from posflow.contracts.internal import BRIDGE_HEADER
from posflow.runtime import Backoff
from posflow.security.tls import service_mqtt_endpoint
from posflow.settings import Settings
from posflow.topics import topic_names

__all__ = ["Bridge", "PendingRecord"]

log = logging.getLogger("posflow.ingest")


class Bridge:
    """Subscribes on the shared subscription and forwards every message to Kafka."""

    def __init__(self, settings: Settings, metrics: BridgeMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or BridgeMetrics()
        cfg = settings.ingest
        names = topic_names(settings.kafka)
        self.topics = {Kind.TELEMETRY: names.telemetry, Kind.TXN: names.txn,
                       Kind.STATUS: names.status}  # fmt: skip
        self.deadletter_topic = names.deadletter
        self._max_inflight = cfg.max_inflight
        self._clock_ahead = timedelta(seconds=cfg.clock_ahead_s)
        self._clock_behind = timedelta(seconds=cfg.clock_behind_s)
        self._driver: LoopDriver | None = None
        self._acks: list[int] = []
        self._drained = asyncio.Event()
        # Metric children looked up once, not per message.
        self._received = {k: self.metrics.received.labels(k.value) for k in self.topics}
        self.kafka = KafkaForwarder(
            settings,
            self.metrics,
            [*self.topics.values(), self.deadletter_topic],
            on_delivered=self._delivered,
            on_health=self._update_ready,
        )
        self._inflight = 0
        self._draining = False
        self._mqtt_connected = asyncio.Event()
        # Password listener, or the TLS listener with the service's certificate.
        self._mqtt_port, self._mqtt_tls = service_mqtt_endpoint(settings)
        self.client = self._make_client()

    # --- state ------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return self._inflight

    def is_ready(self) -> bool:
        """Ready = connected to MQTT, Kafka answering, not draining."""
        return self._mqtt_connected.is_set() and self.kafka.ok and not self._draining

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
            self._received[envelope.kind].inc()
            record = PendingRecord(
                topic=self.topics[envelope.kind],
                key=envelope.kafka_key(),
                value=envelope.to_json(),
                mid=mid,
                qos=qos,
                received=received,
                # Validated here, once: consumers decode it without validating it again.
                headers=[BRIDGE_HEADER],
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
        self.metrics.inflight.set(self._inflight)
        self.kafka.add(record)

    def _room(self) -> int:
        """Backpressure: how many more messages the in-flight window takes now."""
        return 0 if self._draining else self._max_inflight - self._inflight

    # --- Kafka's acknowledgements -------------------------------------------------------

    def _delivered(self, record: PendingRecord) -> None:
        """Kafka has the record: acknowledge it to the broker and free its place."""
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

    def _update_ready(self) -> None:
        self.metrics.ready.set(1 if self.is_ready() else 0)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to Kafka, then to MQTT; returns once both are up."""
        await self.kafka.start()
        m = self.settings.mosquitto
        self._driver = LoopDriver(self.client, self._handle, self._room)
        self._driver.start()
        retry = self.settings.ingest.retry_backoff_s
        backoff = Backoff(first=retry, cap=retry)
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
                await backoff.sleep()
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
        await self.kafka.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Forward until ``stop`` is set, then drain (the body of ``posflow ingest``)."""
        await self.start()
        log.info("bridge running")
        await stop.wait()
        log.info("stopping: draining in-flight messages")
        await self.stop()
