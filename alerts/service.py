"""The alert engine service: Kafka in, PostgreSQL state, notifications out.

One process (guarded by a PostgreSQL advisory lock) reads every partition of the
health, status, telemetry and integrity topics by manual assignment, seeking to
the offsets stored with its state. Group rules (a merchant's terminals, a
carrier in an area, the fleet) need every terminal's facts in one place, and
50,000 terminals take a fraction of one core (docs/benchmarks/alerts.md); a
second instance waits on the lock as a hot standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from alerts.engine import Engine
from alerts.metrics import AlertMetrics
from alerts.notify import KafkaChannel, LogChannel, Notifier, Outbox, WebhookChannel
from alerts.rules import RuleSet, load_rules, parse_duration
from alerts.store import AlertStore
from posflow.errors import PosflowError
from posflow.settings import Settings

__all__ = ["AlertService", "build"]

log = logging.getLogger("posflow.alerts")
_LOCK = 0x706F73616C657274  # "posalert"


def _parse(topic: str, value: bytes | None) -> tuple[str, dict[str, Any]] | None:
    """(kind, record), None for a record the engine does not use; ValueError if unreadable."""
    record = json.loads(value or b"")
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 (one error kind for bad input)
    kind = _kind_of(topic, record)
    if kind is None:
        return None
    if kind in ("status", "telemetry") and "payload" not in record:
        raise ValueError("an envelope without payload")
    return kind, record


def _kind_of(topic: str, value: dict[str, Any]) -> str | None:
    if topic.endswith(".health.v1"):
        if value.get("type") == "window":
            return "window" if value.get("final", True) else None
        return "state" if value.get("type") == "state" else None
    if topic.endswith(".integrity.v1"):
        for name in ("merchant_id", "txn_id"):
            if not isinstance(value.get(name), str):
                raise ValueError(f"integrity event without {name}")  # noqa: TRY004
        return "integrity"
    kind = value.get("kind")
    if kind in ("status", "telemetry"):
        return str(kind)
    raise ValueError(f"unexpected record kind {kind!r}")


@dataclass
class AlertService:
    settings: Settings
    engine: Engine
    store: AlertStore
    outbox: Outbox
    metrics: AlertMetrics
    topics: list[str]
    producer: AIOKafkaProducer
    rules_file: Path | None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: bool = False
    last_rules_error: str | None = None
    _mtime: float | None = None
    _runner: web.AppRunner | None = None
    consumer: AIOKafkaConsumer | None = None

    # --- rules hot reload -------------------------------------------------------------------

    def _file_mtime(self) -> float | None:
        if self.rules_file is None:
            return None
        try:
            return self.rules_file.stat().st_mtime
        except OSError:
            return None

    async def reload_rules(self) -> bool:
        """Load the rules again; on an error keep the last good ones and say why."""
        self._mtime = self._file_mtime()
        try:
            rules = load_rules(self.rules_file)
        except PosflowError as exc:
            self.last_rules_error = str(exc)
            self.metrics.reloads.labels("refused").inc()
            log.error("rules refused, keeping the last good rules: %s", exc)  # noqa: TRY400
            return False
        async with self.lock:
            self.engine.set_rules(rules)
            await self._commit({})
        self.last_rules_error = None
        self.metrics.reloads.labels("ok").inc()
        log.info("rules loaded: %d rules", len(rules.rules))
        return True

    async def _watch_rules(self) -> None:
        while not self.stopping.is_set():
            await asyncio.sleep(self.settings.alerts.reload_poll_s)
            if self._file_mtime() != self._mtime:
                await self.reload_rules()

    async def _refresh_reference(self) -> None:
        while not self.stopping.is_set():
            await asyncio.sleep(self.settings.alerts.reference_refresh_s)
            try:
                merchants, terminals = await asyncio.to_thread(self.store.load_reference)
            except psycopg.Error as exc:
                log.error("reference data refresh failed: %s", exc)  # noqa: TRY400
                continue
            async with self.lock:
                self.engine.set_reference(merchants, terminals)

    # --- the loop ---------------------------------------------------------------------------

    async def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        changes = self.engine.drain()
        if not changes and not offsets:
            return
        await asyncio.to_thread(self.store.write, changes, offsets)
        for n in changes.notifications:
            rule = n.payload["alert"]["rule"]
            self.metrics.transitions.labels(rule, n.event).inc()
        if changes.notifications:
            self.outbox.wake.set()
        if changes.alerts or changes.dropped:
            self.metrics.alerts.clear()
            counts: dict[tuple[str, str], int] = {}
            for a in self.engine.alerts.values():
                counts[(a.rule, a.state)] = counts.get((a.rule, a.state), 0) + 1
            for (rule, state), count in counts.items():
                self.metrics.alerts.labels(rule, state).set(count)

    def _apply(self, topic: str, partition: int, offset: int, value: bytes | None) -> None:
        source = topic.rsplit(".", 2)[-2]
        try:
            parsed = _parse(topic, value)
            if parsed is None:
                return
            self.engine.on_record(*parsed)
            self.metrics.records.labels(source).inc()
        except (ValueError, KeyError, TypeError) as exc:
            # Still in Kafka at this offset; counted and logged, the engine carries on.
            self.metrics.bad_records.labels(source).inc()
            log.error(  # noqa: TRY400 (bad input, not a bug: no traceback)
                "skipped unreadable record %s[%d]@%d: %s", topic, partition, offset, exc
            )

    async def _assign(self, consumer: AIOKafkaConsumer) -> None:
        await consumer._client.force_metadata_update()
        parts = [
            TopicPartition(t, p)
            for t in self.topics
            for p in consumer.partitions_for_topic(t) or ()
        ]
        if not parts:
            raise PosflowError(
                f"none of the topics {', '.join(self.topics)} exist",
                fix="run `posflow stack up` (it creates the pipeline topics)",
            )
        consumer.assign(parts)
        stored = await asyncio.to_thread(self.store.load_offsets)
        for tp in parts:
            offset = stored.get((tp.topic, tp.partition))
            if offset is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)

    async def _start(self) -> None:
        """Endpoints up, the single-instance lock taken, the stored state loaded."""
        self._runner = await start_api(self)
        got = await asyncio.to_thread(
            lambda: self.store.conn.execute("SELECT pg_try_advisory_lock(%s)", [_LOCK]).fetchone()
        )
        while not (got and got[0]) and not self.stopping.is_set():
            log.warning("another alert engine holds the lock; standing by")
            await asyncio.sleep(2)
            got = await asyncio.to_thread(
                lambda: self.store.conn.execute(
                    "SELECT pg_try_advisory_lock(%s)", [_LOCK]
                ).fetchone()
            )
        self.store.conn.commit()
        terminals, alerts, silences = await asyncio.to_thread(self.store.load_state)
        merchants, registered = await asyncio.to_thread(self.store.load_reference)
        self.engine.set_reference(merchants, registered)
        self.engine.restore(terminals, alerts, silences)
        self._mtime = self._file_mtime()

    async def run(self) -> None:
        """Until SIGTERM / SIGINT: consume, evaluate, store, notify."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload_rules()))
        await self._start()
        await self.producer.start()
        consumer = self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await consumer.start()
        tasks = [
            asyncio.create_task(self.outbox.run(self.stopping)),
            asyncio.create_task(self._watch_rules()),
            asyncio.create_task(self._refresh_reference()),
        ]
        try:
            await self._assign(consumer)
            self.ready = True
            log.info(
                "alert engine running: %d terminals, %d open alerts",
                len(self.engine.terminals),
                len(self.engine.alerts),
            )
            max_records = self.settings.alerts.max_records
            tick_ms = int(self.settings.alerts.tick_s * 1000)
            while not self.stopping.is_set():
                batches = await consumer.getmany(timeout_ms=tick_ms, max_records=max_records)
                started = time.perf_counter()
                before = self.engine.evaluations
                async with self.lock:
                    offsets = {}
                    for tp, records in batches.items():
                        for r in records:
                            self._apply(tp.topic, tp.partition, r.offset, r.value)
                        offsets[(tp.topic, tp.partition)] = records[-1].offset + 1
                    self.engine.tick()
                    await self._commit(offsets)
                self.metrics.evaluations.inc(self.engine.evaluations - before)
                if batches:
                    self.metrics.batch_seconds.observe(time.perf_counter() - started)
        finally:
            self.ready = False
            self.stopping.set()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await consumer.stop()
            await self.producer.stop()
            for channel in self.outbox.channels.values():
                if isinstance(channel, WebhookChannel):
                    await channel.close()
            self.outbox.close()
            self.store.conn.close()
            if self._runner is not None:
                await self._runner.cleanup()


async def start_api(service: AlertService) -> web.AppRunner:
    """/metrics /healthz /readyz plus the alerts API (list, ack, silences)."""

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(service.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        body = {"status": "ready" if service.ready else "not ready"}
        if service.last_rules_error:
            body["rules_error"] = service.last_rules_error
        return web.json_response(body, status=200 if service.ready else 503)

    async def list_alerts(request: web.Request) -> web.Response:
        state = request.query.get("state")
        alerts = [
            a.as_dict() for a in service.engine.alerts.values() if state is None or a.state == state
        ]
        return web.json_response({"alerts": alerts})

    async def ack(request: web.Request) -> web.Response:
        body = await _json_body(request)
        by = str(body.get("by") or "api")
        async with service.lock:
            try:
                alert = service.engine.ack(request.match_info["alert_id"], by)
            except KeyError:
                return web.json_response(
                    {"error": f"no firing alert {request.match_info['alert_id']}"}, status=404
                )
            await service._commit({})
        return web.json_response(alert.as_dict())

    async def list_silences(_: web.Request) -> web.Response:
        return web.json_response({"silences": [vars(s) for s in service.engine.silences.values()]})

    async def add_silence(request: web.Request) -> web.Response:
        body = await _json_body(request)
        matchers = body.get("matchers")
        if not isinstance(matchers, dict) or not matchers:
            return web.json_response(
                {"error": "matchers: a non-empty object of label -> value"}, status=400
            )
        try:
            duration = parse_duration(body.get("duration", "1h"))
        except ValueError as exc:
            return web.json_response({"error": f"duration: {exc}"}, status=400)
        async with service.lock:
            silence = service.engine.add_silence(
                {str(k): str(v) for k, v in matchers.items()},
                duration,
                by=str(body.get("by") or "api"),
                comment=str(body.get("comment") or ""),
            )
            await service._commit({})
        return web.json_response(vars(silence), status=201)

    async def expire_silence(request: web.Request) -> web.Response:
        async with service.lock:
            try:
                silence = service.engine.expire_silence(request.match_info["silence_id"])
            except KeyError:
                return web.json_response({"error": "no such active silence"}, status=404)
            await service._commit({})
        return web.json_response(vars(silence))

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/alerts", list_alerts)
    app.router.add_post("/alerts/{alert_id}/ack", ack)
    app.router.add_get("/silences", list_silences)
    app.router.add_post("/silences", add_silence)
    app.router.add_delete("/silences/{silence_id}", expire_silence)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    s = service.settings.services
    await web.TCPSite(runner, s.bind_host, s.alerts).start()
    return runner


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except json.JSONDecodeError:
        raise web.HTTPBadRequest(text="body: not JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body: a JSON object")
    return body


def build(settings: Settings) -> AlertService:
    """The composition root: rules, engine, store, outbox, channels."""
    a, k = settings.alerts, settings.kafka
    rules: RuleSet = load_rules(a.rules_file)  # a bad file at start is refused outright
    engine = Engine(rules, time.time, area_deg=a.area_deg)
    metrics = AlertMetrics()
    producer = AIOKafkaProducer(
        bootstrap_servers=k.bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    channels: list[Notifier] = [KafkaChannel(producer, f"{k.topic_prefix}.alerts.v1")]
    if a.webhook_url:
        channels.append(
            WebhookChannel(
                a.webhook_url, a.webhook_secret.get_secret_value().encode(), a.webhook_timeout_s
            )
        )
    if a.log_notifications:
        channels.append(LogChannel())
    dsn = settings.postgres.dsn()
    conn: psycopg.Connection[tuple[Any, ...]] = psycopg.connect(dsn)
    store = AlertStore(conn, group=a.group, channels=[c.name for c in channels])
    outbox = Outbox(dsn, channels, list(a.retry_schedule_s), metrics)
    p = k.topic_prefix
    topics = [f"{p}.health.v1", f"{p}.status.v1", f"{p}.telemetry.v1", f"{p}.integrity.v1"]
    return AlertService(settings, engine, store, outbox, metrics, topics, producer, a.rules_file)


def run_service(settings: Settings) -> None:
    """Apply the migrations (the engine needs no partition maintenance), then run."""
    from posflow.storage.migrate import migrate

    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as conn:
        migrate(conn)

    async def main() -> None:
        await build(settings).run()

    asyncio.run(main())
