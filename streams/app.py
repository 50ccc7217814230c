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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import faust
import orjson

from posflow.contracts import DeadLetter, Reason
from posflow.kafkalag import ConsumerLag
from posflow.security.tls import kafka_ssl_options, postgres_dsn
from posflow.settings import Settings
from streams.metrics import StreamMetrics
from streams.sink import HealthSink
from streams.window import (
    State,
    WindowConfig,
    check_offline,
    close_due,
    heal,
    new_state,
    on_status,
    on_telemetry,
    on_txn,
    open_records,
)

__all__ = ["HealthApp", "build"]

log = logging.getLogger("posflow.streams")


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _event_time(event: dict[str, Any], now: float, cfg: WindowConfig) -> float | str:
    """The event's time in epoch seconds, or why it can't be used."""
    body = event if event["kind"] == "txn" else event["payload"]
    try:
        ts = _epoch(body["ts"])
    except (KeyError, TypeError, ValueError, OverflowError):
        return f"field ts: {str(body.get('ts'))[:40]!r} is not an RFC 3339 timestamp"
    if ts > now + cfg.max_ahead_s:
        return (
            f"field ts: {body['ts']} is more than {cfg.max_ahead_s} s ahead of the worker's "
            "clock; refused so it cannot hold the terminal's windows open"
        )
    return ts


@dataclass
class HealthApp:
    """The faust app and what its agents share."""

    settings: Settings
    app: faust.App
    metrics: StreamMetrics
    sink: HealthSink
    cfg: WindowConfig
    outbox: list[tuple[bytes, bytes]] = field(default_factory=list)
    # Records refused with their reason, for the dead-letter topic (key, dead letter).
    refused: list[tuple[bytes, bytes]] = field(default_factory=list)
    # States changed since the last offset commit: written to the table (and so to its
    # changelog) once per commit, not once per batch; see FlushBeforeCommit.
    dirty: dict[bytes, State] = field(default_factory=dict)
    # Where final windows and state changes go (the health topic; a test may capture them).
    publish_to: Callable[[bytes, bytes], Awaitable[None]] | None = None
    table: Any = None  # the faust table "terminal-state"
    agents: tuple[Any, ...] = ()  # (txn router, health agent)

    def state_of(self, table: Any, key: bytes) -> State | None:
        state: State | None = self.dirty.get(key)
        return state if state is not None else table.get(key)

    def flush_dirty(self, table: Any) -> None:
        dirty, self.dirty = self.dirty, {}
        for key, state in dirty.items():
            table[key] = state

    # --- processing (pure Python over the table; called from the agents) -------------

    def process(self, batch: list[bytes], table: Any, now: float) -> None:
        touched: dict[str, State] = {}
        for value in batch:
            event = orjson.loads(value)
            kind, terminal = event["kind"], event["terminal_id"]
            ts = _event_time(event, now, self.cfg)
            if isinstance(ts, str):
                self._refuse(terminal, kind, value, ts)
                continue
            state = touched.get(terminal)
            if state is None:
                state = self.state_of(table, terminal.encode()) or new_state(
                    terminal, event["merchant_id"]
                )
                self._heal(state, now)
                touched[terminal] = state
            late = state["late"]
            if kind == "telemetry":
                outcome = on_telemetry(state, event["payload"], ts, now, self.cfg)
            elif kind == "txn":
                outcome = on_txn(state, event, ts, now, self.cfg)
            else:
                outcome = on_status(state, event["payload"], ts, now)
            self.metrics.events.labels(kind).inc()
            if state["late"] > late:  # also when a late message brought it back online
                self.metrics.late.inc()
            if outcome == "replay":
                self.metrics.replays.inc()
            elif outcome in ("online", "offline"):
                self._state_change(state, outcome, now)
        for terminal, state in touched.items():
            self._settle(state, now)
            self.dirty[terminal.encode()] = state

    def tick(self, table: Any, now: float) -> None:
        """Close windows of silent terminals; mark terminals silent too long offline."""
        count = 0
        keys = set(table.keys()) | set(self.dirty)
        for key in keys:
            state = self.state_of(table, key)
            if state is None:
                continue
            count += 1
            self._heal(state, now)
            changed = check_offline(state, now, self.cfg)
            if changed:
                self._state_change(state, "offline", now)
            closed = close_due(state, now, self.cfg) if state["windows"] else []
            if closed:
                self._publish_closed(state, closed)
            if changed or closed:
                self.sink.add_state(state)
                self.dirty[key] = state
        self.metrics.terminals.set(count)

    def _refuse(self, terminal: str, kind: str, value: bytes, why: str) -> None:
        self.metrics.refused.labels(Reason.IMPLAUSIBLE_TIMESTAMP.value).inc()
        log.warning("%s record of terminal %s refused: %s", kind, terminal, why)
        letter = DeadLetter(
            reason=Reason.IMPLAUSIBLE_TIMESTAMP,
            message=why,
            field="ts",
            original_topic=f"{self.settings.kafka.topic_prefix}.{kind}.v1",
            received_at=datetime.now(UTC),
            payload_redacted=value[:4096].decode("utf-8", "replace"),
            payload_size=len(value),
        )
        self.refused.append((terminal.encode(), letter.to_json()))

    def _heal(self, state: State, now: float) -> None:
        dropped = heal(state, now, self.cfg)
        if dropped:
            log.warning(
                "terminal %s: dropped %d window(s) more than %d s in the future from its "
                "restored state",
                state["terminal_id"],
                dropped,
                self.cfg.max_ahead_s,
            )

    def _publish_closed(self, state: State, closed: list[dict[str, Any]]) -> None:
        for record in closed:
            self.metrics.windows_closed.inc()
            self.sink.add_window(record)
            state["health_score"] = record["score"]
            self.outbox.append(
                (state["terminal_id"].encode(), orjson.dumps({"type": "window", **record}))
            )

    def _settle(self, state: State, now: float) -> None:
        self._publish_closed(state, close_due(state, now, self.cfg))
        for record in open_records(state, self.cfg):
            self.sink.add_window(record)
            state["health_score"] = record["score"]
        if not state["online"]:
            state["health_score"] = 0
        self.sink.add_state(state)

    def _state_change(self, state: State, to: str, now: float) -> None:
        state["status_changed_at"] = now
        self.metrics.state_changes.labels(to).inc()
        self.sink.add_state(state)
        self.outbox.append(
            (
                state["terminal_id"].encode(),
                orjson.dumps(
                    {
                        "type": "state",
                        "terminal_id": state["terminal_id"],
                        "merchant_id": state["merchant_id"],
                        "online": state["online"],
                        "reason": state["offline_reason"],
                        "at": now,
                    }
                ),
            )
        )


class FlushBeforeCommit(faust.Sensor):
    """Writes the changed states to the table just before faust commits offsets.

    faust calls sensors' ``on_commit_initiated`` before it picks the offsets to
    commit, then flushes the producer (changelog included) before committing.
    So every committed offset's effect is in the changelog, while a terminal
    that sent ten messages since the last commit costs one changelog record,
    not ten.
    """

    def __init__(self, health: HealthApp, table: Any) -> None:
        super().__init__()
        self.health = health
        self.table = table

    def on_commit_initiated(self, consumer: Any) -> Any:
        self.health.flush_dirty(self.table)
        return super().on_commit_initiated(consumer)


def build(settings: Settings) -> HealthApp:
    """The composition root of the health workers."""
    k, s = settings.kafka, settings.streams
    app = faust.App(
        s.app_id,
        broker=f"kafka://{k.bootstrap}",
        store="memory://",
        datadir=str(s.data_dir),
        topic_partitions=k.default_partitions,
        topic_replication_factor=1,
        web_enabled=False,
        processing_guarantee="at_least_once",
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # A dead worker's partitions move to the others after this long (faust's default: 60 s).
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        producer_linger_ms=5,
        # TLS to Kafka when security.kafka_security_protocol is SSL (faust takes the context).
        broker_credentials=kafka_ssl_options(settings).get("ssl_context"),
    )
    prefix = k.topic_prefix
    sources = app.topic(
        f"{prefix}.telemetry.v1",
        f"{prefix}.status.v1",
        f"{s.app_id}-txn",
        key_serializer="raw",
        value_serializer="raw",
        partitions=k.default_partitions,
    )
    txn_in = app.topic(f"{prefix}.txn.v1", key_serializer="raw", value_serializer="raw")
    txn_by_terminal = app.topic(
        f"{s.app_id}-txn",
        key_serializer="raw",
        value_serializer="raw",
        partitions=k.default_partitions,
        internal=True,
    )
    health_out = app.topic(f"{prefix}.health.v1", key_serializer="raw", value_serializer="raw")
    table = app.Table(
        "terminal-state",
        key_type=bytes,
        default=None,
        partitions=k.default_partitions,
        use_partitioner=True,  # the timer writes too; keys hash like the source topics'
    )
    metrics = StreamMetrics()
    cfg = WindowConfig(
        window_s=s.window_s,
        grace_s=s.grace_s,
        offline_factor=s.offline_factor,
        drain_span_s=s.drain_span_s,
        max_ahead_s=s.max_ahead_s,
    )
    health = HealthApp(settings, app, metrics, HealthSink(postgres_dsn(settings), metrics), cfg)
    health.table = table

    async def send_health(key: bytes, value: bytes) -> None:
        await health_out.send(key=key, value=value)

    health.publish_to = send_health

    deadletters = app.topic(f"{prefix}.deadletter.v1", key_serializer="raw", value_serializer="raw")

    async def publish() -> None:
        outbox, health.outbox = health.outbox, []
        sender = health.publish_to or send_health
        for key, value in outbox:
            await sender(key, value)
        refused, health.refused = health.refused, []
        for key, value in refused:
            await deadletters.send(key=key, value=value)

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
                await txn_by_terminal.send(
                    key=p["terminal_id"].encode(), value=orjson.dumps(compact)
                )

    @app.agent(sources, name="health")
    async def process(stream: Any) -> None:
        async for batch in stream.take(s.batch_max, within=s.batch_within_s):
            started = time.perf_counter()
            health.process(batch, table, time.time())
            metrics.batch_seconds.observe(time.perf_counter() - started)
            await publish()

    @app.timer(s.tick_s)
    async def tick() -> None:
        health.tick(table, time.time())
        await publish()

    @app.timer(s.sink_flush_s)
    async def flush() -> None:
        if health.sink.pending():
            await asyncio.to_thread(health.sink.flush)

    # faust's position is its fetcher's (a little ahead of the agents); close enough for lag.
    lag = ConsumerLag(metrics.registry, s.app_id)

    @app.timer(5.0)
    async def consumer_lag() -> None:
        await lag.update(app.consumer)

    @app.task
    async def serve_metrics() -> None:
        from posflow.http import start_http

        # Per-message debug records of aiokafka and faust cost ~10% even when not shown.
        for name in ("aiokafka", "faust", "mode"):
            logging.getLogger(name).setLevel(logging.WARNING)

        await start_http(
            settings.services.bind_host,
            settings.services.streams,
            metrics.registry,
            lambda: True,
        )

    health.agents = (route_txn, process)
    return health


def run_worker(settings: Settings) -> None:
    """Run one worker until SIGTERM (faust handles the signals and the loop)."""
    import psycopg

    from posflow.stack.kafka import ensure_topics
    from posflow.storage.setup import prepare_database
    from posflow.topics import TopicSpec

    with psycopg.connect(postgres_dsn(settings), autocommit=True) as conn:
        prepare_database(conn, settings.storage)
    # The re-keyed payments: co-partitioned with the terminal-keyed topics.
    internal = TopicSpec(
        f"{settings.streams.app_id}-txn",
        settings.kafka.default_partitions,
        {"cleanup.policy": "delete", "retention.ms": str(24 * 3600 * 1000)},
    )
    asyncio.run(ensure_topics(settings, [internal]))
    health = build(settings)
    health.app.sensors.add(FlushBeforeCommit(health, health.table))
    worker = faust.Worker(health.app, loglevel=settings.streams.log_level)
    worker.execute_from_commandline()
