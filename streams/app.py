"""The faust-streaming health app: `posflow streams worker`.

Topology (all keyed by terminal id, all with the same partition count, so a
terminal's events and its state live in one partition of one worker):

    pos.telemetry.v1 ─┐
    pos.status.v1 ────┼─▶ health agent ──▶ table "terminal-state" (changelog topic)
    <app>-txn (internal, re-keyed from pos.txn.v1 by the txn router) ─┘
                                    │
                                    ├─▶ pos.health.v1 (final windows, online/offline changes)
                                    └─▶ terminal_health, terminal_state (database, upserts)

A timer closes the windows of silent terminals and marks terminals offline.
Scale out: start more workers with the same app id; Kafka spreads the
partitions (and the table's changelog partitions) over them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from time import monotonic
from typing import Any

import faust
import orjson
from faust.sensors.monitor import Monitor
from faust.serializers.codecs import Codec

from posflow.cost import Handled
from posflow.kafkalag import ConsumerLag
from posflow.security.tls import kafka_ssl_options, postgres_dsn
from posflow.settings import Settings
from posflow.topics import rekeyed_txn_topic, topic_names
from streams.changelog import BulkChangelog, bulk_commit_consumer
from streams.health import HealthApp, Send
from streams.metrics import StreamMetrics
from streams.sink import HealthSink
from streams.state import decode_state, encode_state
from streams.window import WindowConfig

__all__ = ["HealthMonitor", "StateCodec", "build", "run", "run_worker"]

log = logging.getLogger("posflow.streams")


class HealthMonitor(Monitor):
    """faust's monitor for this app: without its per-event bookkeeping, with the commit hook.

    faust calls its sensors four times an event (message in, stream event in and out,
    message out) and on every table read and send; its own monitor keeps counters and
    timings there that nothing of posflow reads (the worker's metrics are its own, on
    /metrics), except the time each partition's stream last took an event, which faust's
    consumer thread checks to report stalled partitions: that one is kept. Being the app's
    only sensor also spares faust's delegate a second call.

    The commit hook: faust calls ``on_commit_initiated`` before it picks the offsets to
    commit, then flushes its producer (changelog included) before committing. Most changed
    states were written in bulk just before (:mod:`streams.changelog`); this writes those
    changed while that write was in flight, through faust's per-key table path. So every
    committed offset's effect is in the changelog, and a terminal that sent ten messages
    since the last commit costs one changelog record, not ten.
    """

    health: HealthApp | None = None
    table: Any = None

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        return None

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
        # The one thing faust itself reads from its monitor: its consumer thread's check
        # for partitions whose stream stopped ("Stream has not started processing TP").
        self.stream_inbound_time[tp] = monotonic()

    def on_stream_event_out(
        self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None
    ) -> None:
        return None

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        return None

    def on_table_get(self, table: Any, key: Any) -> None:
        return None

    def on_table_set(self, table: Any, key: Any, value: Any) -> None:
        return None

    def on_send_initiated(
        self, producer: Any, topic: str, message: Any, keysize: int, valsize: int
    ) -> None:
        return None

    def on_send_completed(self, producer: Any, state: Any, metadata: Any) -> None:
        return None

    def on_commit_initiated(self, consumer: Any) -> Any:
        if self.health is not None:
            self.health.flush_dirty(self.table)
        return super().on_commit_initiated(consumer)


class StateCodec(Codec):
    """The table's changelog codec: typed state in the compact form of streams/state.py;
    reads the previous worker's JSON objects too (see :func:`~streams.state.decode_state`)."""

    def _dumps(self, obj: Any) -> bytes:
        return encode_state(obj)

    def _loads(self, s: bytes) -> Any:
        return decode_state(s)


def _sender(app: faust.App, topic: str) -> Send:
    """Sends to ``topic`` through faust's producer itself, not a faust topic: the record is
    in the producer's queue when this returns, and faust flushes that producer before it
    commits offsets (so at-least-once holds), without faust's per-record path
    (``Topic.send`` → its buffer → sensors → callbacks), several times the cost here."""
    producer = app.producer

    async def send(key: bytes, value: bytes) -> None:
        await producer.send(topic, key, value, None, None, None)

    return send


def _wire_changelog(settings: Settings, health: HealthApp, table: Any) -> None:
    """Changed states go to the changelog in bulk at the start of each commit (one batch
    per partition, streams/changelog.py); what changes during that write takes faust's
    own path through the commit hook of the app's monitor."""
    app = health.app
    changelog = health.changelog = BulkChangelog(settings, table.changelog_topic.get_topic_name())
    transport: Any = app.transport  # its consumer class, for this app only
    transport.Consumer = bulk_commit_consumer(transport.Consumer, health.write_changelog)
    monitor: Any = app.monitor
    monitor.health, monitor.table = health, table

    async def stop_changelog(sender: Any, **kwargs: Any) -> None:
        # after faust stopped its consumer (and made its last commit), before its producer
        await changelog.stop()

    before_shutdown: Any = app.on_before_shutdown
    before_shutdown.connect(stop_changelog)


def build(settings: Settings) -> HealthApp:
    """The composition root of the health workers: the faust app with its topics, table,
    agents, timers, metrics endpoint and monitor (its commit hook), all wired. Nothing is connected
    yet (the unit tests build it without Kafka or a database)."""
    k, s = settings.kafka, settings.streams
    app = faust.App(
        s.app_id,
        broker=f"kafka://{k.bootstrap}",
        store="memory://",
        datadir=str(s.data_dir),
        topic_partitions=k.default_partitions,
        topic_replication_factor=1,
        web_enabled=False,
        monitor=HealthMonitor(),
        processing_guarantee="at_least_once",
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        # Changed states go to the changelog once per commit (FlushBeforeCommit), and each
        # changelog record costs far more in faust's producer path than the event itself:
        # 3 s coalesces a busy terminal's events (measured: 360 against 462 µs CPU an event
        # at 1 s, docs/benchmarks/streams.md). A crash replays up to 3 s; replays are
        # recognised by seq / txn id (streams/window.py).
        broker_commit_interval=3.0,
        # A dead worker's partitions move to the others after this long (faust's default: 60 s).
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        producer_linger_ms=5,
        # TLS to Kafka when security.kafka_security_protocol is SSL (faust takes the context).
        broker_credentials=kafka_ssl_options(settings).get("ssl_context"),
    )
    topics = topic_names(k)
    rekeyed = rekeyed_txn_topic(s.app_id, k.default_partitions)
    sources = app.topic(
        topics.telemetry,
        topics.status,
        rekeyed.name,
        key_serializer="raw",
        value_serializer="raw",
        partitions=k.default_partitions,
    )
    txn_in = app.topic(topics.txn, key_serializer="raw", value_serializer="raw")
    table: Any = app.Table(
        "terminal-state",
        key_type=bytes,
        default=None,
        partitions=k.default_partitions,
        use_partitioner=True,  # the timer writes too; keys hash like the source topics'
    )
    # Typed state in the changelog, in a compact form: faust made the changelog topic with
    # its JSON codec already, so it is made again with this one (before anything started).
    table.value_serializer = StateCodec()
    table.changelog_topic = table._new_changelog_topic()
    metrics = StreamMetrics()
    cfg = WindowConfig(
        window_s=s.window_s,
        grace_s=s.grace_s,
        offline_factor=s.offline_factor,
        drain_span_s=s.drain_span_s,
        max_ahead_s=s.max_ahead_s,
    )

    send_health, send_dead_letter = _sender(app, topics.health), _sender(app, topics.deadletter)
    send_rekeyed = _sender(app, rekeyed.name)

    health = HealthApp(
        settings,
        app,
        metrics,
        HealthSink(postgres_dsn(settings), metrics),
        cfg,
        publish_to=send_health,
        dead_letters_to=send_dead_letter,
        table=table,
    )
    _wire_changelog(settings, health, table)

    @app.agent(txn_in, name="txn-router")
    async def route_txn(stream: Any) -> None:
        """Payments arrive keyed by merchant; health needs them by terminal."""
        async for batch in stream.take(s.batch_max, within=s.batch_within_s):
            for value in batch:
                envelope = orjson.loads(value)
                p = envelope["payload"]
                compact = {
                    "kind": "txn",
                    "terminal_id": p["terminal_id"],
                    "merchant_id": p["merchant_id"],
                    "ts": p["ts"],
                    "seq": p["seq"],  # orders it against status messages (streams/window.py)
                    "txn_id": p["txn_id"],
                    "status": p["status"],
                    "auth_latency_ms": p["auth_latency_ms"],
                }
                await send_rekeyed(p["terminal_id"].encode(), orjson.dumps(compact))

    @app.agent(sources, name="health")
    async def process(stream: Any) -> None:
        async for batch in stream.take(s.batch_max, within=s.batch_within_s):
            started = time.perf_counter()
            health.process(batch, table, time.time())
            metrics.batch_seconds.observe(time.perf_counter() - started)
            await health.publish()

    @app.timer(s.tick_s)
    async def tick() -> None:
        health.tick(table, time.time())
        await health.publish()

    @app.timer(s.sink_flush_s)
    async def flush() -> None:
        health.write_provisional()
        rows = health.sink.take()
        if rows:
            await asyncio.to_thread(health.sink.write, rows)

    # faust's position is its fetcher's (a little ahead of the agents); close enough for lag.
    lag = ConsumerLag(metrics.registry, s.app_id)

    @app.timer(5.0)
    async def consumer_lag() -> None:
        await lag.update(app.consumer)

    @app.task
    async def serve_metrics() -> None:
        # faust owns the loop and the signals here, so only the endpoints of
        # posflow.runtime's service skeleton apply (they close with the loop).
        from posflow.http import start_http

        # Per-message debug records of aiokafka and faust cost ~10% even when not shown.
        for name in ("aiokafka", "faust", "mode"):
            logging.getLogger(name).setLevel(logging.WARNING)

        await start_http(
            settings.services.bind_host,
            settings.services.streams,
            metrics.registry,
            lambda: True,
            handled=Handled("health", ("posflow_streams_events",)),
        )

    return health


def run(health: HealthApp) -> None:
    """Run a built worker until SIGTERM (faust handles the signals and the loop).

    First what it needs outside itself: the database's tables and the internal topic
    of re-keyed payments (co-partitioned with the terminal-keyed topics).
    """
    import psycopg

    from posflow.stack.kafka import ensure_topics
    from posflow.storage.setup import prepare_database

    settings = health.settings
    with psycopg.connect(postgres_dsn(settings), autocommit=True) as conn:
        prepare_database(conn, settings.storage)
    internal = rekeyed_txn_topic(settings.streams.app_id, settings.kafka.default_partitions)
    asyncio.run(ensure_topics(settings, [internal]))
    worker = faust.Worker(health.app, loglevel=settings.streams.log_level)
    worker.execute_from_commandline()


def run_worker(settings: Settings) -> None:
    """`posflow streams worker`: build one worker, then run it."""
    run(build(settings))
