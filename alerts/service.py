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
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from alerts.access import AlertAccess, Caller, ProblemError
from alerts.engine import Engine
from alerts.metrics import AlertMetrics
from alerts.notify import KafkaChannel, LogChannel, Notifier, Outbox, WebhookChannel
from alerts.rules import RuleSet, load_rules, parse_duration, read_rules_file
from alerts.store import AlertStore, AuditEntry
from posflow.errors import PosflowError
from posflow.kafkalag import ConsumerLag
from posflow.security.problems import Problem
from posflow.security.roles import Action, Target
from posflow.security.tls import kafka_ssl_options, postgres_dsn
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
    access: AlertAccess
    rules_sha256: str | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: bool = False
    last_rules_error: str | None = None
    _mtime: float | None = None
    _runner: web.AppRunner | None = None
    consumer: AIOKafkaConsumer | None = None
    # posflow_consumer_lag of the assigned partitions (group label: alerts.group).
    lag: ConsumerLag | None = None

    async def store_resolved(self, limit: int) -> list[dict[str, Any]]:
        """The newest resolved alerts, from the table (the engine keeps only open ones)."""
        async with self.access.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT alert_id, rule, severity, subject_kind, subject_id, merchant_id, state,"
                " summary, labels, annotations, started_at, fired_at, acknowledged_at,"
                " acknowledged_by, resolved_at, suppressed_by FROM alerts"
                " WHERE state = 'resolved' ORDER BY resolved_at DESC LIMIT %s",
                [limit],
            )
            names = [d.name for d in cur.description or ()]
            rows = await cur.fetchall()
        out = []
        for row in rows:
            item = dict(zip(names, row, strict=True))
            for key in ("started_at", "fired_at", "acknowledged_at", "resolved_at"):
                value = item[key]
                item[key] = None if value is None else value.timestamp()
            out.append(item)
        return out

    # --- rules hot reload -------------------------------------------------------------------

    def _file_mtime(self) -> float | None:
        if self.rules_file is None:
            return None
        try:
            return self.rules_file.stat().st_mtime
        except OSError:
            return None

    @property
    def rules_target(self) -> Target:
        return Target("rules", str(self.rules_file) if self.rules_file else "defaults")

    def _system(self, trigger: str, detail: dict[str, Any], outcome: Any = "ok") -> AuditEntry:
        return AuditEntry(
            actor=f"system:{trigger}",
            role="system",
            action=Action.RULE_CHANGE.value,
            target=str(self.rules_target),
            source=f"system:{socket.gethostname()}",
            outcome=outcome,
            detail=detail,
        )

    async def reload_rules(
        self, *, trigger: str = "file-reload", caller: Caller | None = None
    ) -> bool:
        """Load the rules again; on an error keep the last good ones and say why.

        A rule change is an administrative action: every reload is in the audit trail
        (actor ``system:<trigger>`` or the API caller, the file's SHA-256, the outcome),
        a successful one in the same transaction as the alerts it resolves.
        """
        self._mtime = self._file_mtime()
        sha: str | None = None
        try:
            text = None
            if self.rules_file is not None:
                text, sha = read_rules_file(self.rules_file)
            rules = load_rules(self.rules_file, text)
        except PosflowError as exc:
            self.last_rules_error = str(exc)
            self.metrics.reloads.labels("refused").inc()
            log.error("rules refused, keeping the last good rules: %s", exc)  # noqa: TRY400
            failed: dict[str, Any] = {
                "file_sha256": sha,
                "in_effect_sha256": self.rules_sha256,
                "reason": str(exc),
            }
            entry = (
                self._system(trigger, failed, "failed")
                if caller is None
                else caller.audit(Action.RULE_CHANGE, self.rules_target, failed, "failed")
            )
            await self.access.record(entry)
            return False
        detail: dict[str, Any] = {
            "file_sha256": sha,
            "previous_sha256": self.rules_sha256,
            "changed": sha != self.rules_sha256,
            "rules": len(rules.rules),
        }
        entry = (
            self._system(trigger, detail)
            if caller is None
            else caller.audit(Action.RULE_CHANGE, self.rules_target, detail)
        )
        async with self.lock:
            self.engine.set_rules(rules)
            await self._commit({}, [entry])
        self.rules_sha256 = sha
        self.last_rules_error = None
        self.metrics.reloads.labels("ok").inc()
        log.info("rules loaded: %d rules (file sha256 %s)", len(rules.rules), sha)
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

    async def _commit(
        self, offsets: dict[tuple[str, int], int], audit: list[AuditEntry] | None = None
    ) -> None:
        changes = self.engine.drain()
        if not changes and not offsets and not audit:
            return
        await asyncio.to_thread(self.store.write, changes, offsets, audit)
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
        await self.access.open()
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
        loop.add_signal_handler(
            signal.SIGHUP, lambda: asyncio.ensure_future(self.reload_rules(trigger="sighup"))
        )
        await self._start()
        await self.producer.start()
        consumer = self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
            **kafka_ssl_options(self.settings),
        )
        await consumer.start()
        tasks = [
            asyncio.create_task(self.outbox.run(self.stopping)),
            asyncio.create_task(self._watch_rules()),
            asyncio.create_task(self._refresh_reference()),
        ]
        if self.lag is not None:
            tasks.append(asyncio.create_task(self.lag.run(consumer, self.stopping)))
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
            await self.access.close()


Request = web.Request
_STATES = ("pending", "firing", "acknowledged", "resolved")


def _bad_request(request: Request, name: str, detail: str) -> ProblemError:
    return ProblemError(
        Problem(
            400,
            "invalid-parameter",
            "Invalid parameter",
            f"body field '{name}': {detail}",
            errors=[{"in": "body", "name": name, "detail": detail}],
        ),
        request.path,
    )


def _not_found(request: Request, what: str) -> ProblemError:
    return ProblemError(Problem(404, "not-found", "Not found", what), request.path)


async def start_api(service: AlertService) -> web.AppRunner:  # noqa: PLR0915 - one closure each
    """/metrics /healthz /readyz (open) plus the alerts API (staff keys, see alerts.access)."""
    access = service.access

    async def metrics(_: Request) -> web.Response:
        body = generate_latest(service.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: Request) -> web.Response:
        body = {"status": "ready" if service.ready else "not ready"}
        if service.last_rules_error:
            body["rules_error"] = service.last_rules_error
        return web.json_response(body, status=200 if service.ready else 503)

    async def list_alerts(request: Request) -> web.Response:
        await access.check(request, Action.ALERT_READ, Target("alerts", "*"))
        state = request.query.get("state")
        if state is not None and state not in _STATES:
            raise ProblemError(
                Problem(400, "invalid-parameter", "Invalid parameter",
                        f"query parameter 'state': one of {', '.join(_STATES)}",
                        errors=[{"in": "query", "name": "state", "detail": "unknown state"}]),
                request.path,
            )  # fmt: skip
        try:
            limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
        except ValueError:
            limit = 100
        if state == "resolved":  # history: only the database has it
            alerts = await service.store_resolved(limit)
        else:
            alerts = sorted(
                (a.as_dict() for a in service.engine.alerts.values()
                 if state is None or a.state == state),
                key=lambda a: -float(a["started_at"]),
            )[:limit]  # fmt: skip
        return web.json_response({"alerts": alerts})

    async def ack(request: Request) -> web.Response:
        alert_id = request.match_info["alert_id"]
        target = Target("alert", alert_id)
        caller = await access.check(request, Action.ALERT_ACKNOWLEDGE, target)
        async with service.lock:
            before = next(
                (a.state for a in service.engine.alerts.values() if a.alert_id == alert_id), None
            )
            try:
                alert = service.engine.ack(alert_id, caller.name)
            except KeyError:
                alert = None
            if alert is not None:
                detail = {"rule": alert.rule, "subject": alert.subject_id, "state_before": before}
                await service._commit({}, [caller.audit(Action.ALERT_ACKNOWLEDGE, target, detail)])
        if alert is None:
            why = f"no firing alert {alert_id}" + (f" (it is {before})" if before else "")
            await access.record(
                caller.audit(Action.ALERT_ACKNOWLEDGE, target, {"reason": why}, "failed")
            )
            raise _not_found(request, why)
        return web.json_response(alert.as_dict())

    async def list_silences(request: Request) -> web.Response:
        await access.check(request, Action.ALERT_READ, Target("silences", "*"))
        return web.json_response({"silences": [vars(s) for s in service.engine.silences.values()]})

    async def add_silence(request: Request) -> web.Response:
        caller = await access.check(request, Action.SILENCE_MANAGE, Target("silence", "new"))
        body = await _json_body(request)
        matchers = body.get("matchers")
        if not isinstance(matchers, dict) or not matchers:
            raise _bad_request(request, "matchers", "a non-empty object of label -> value")
        try:
            duration = parse_duration(body.get("duration", "1h"))
        except ValueError as exc:
            raise _bad_request(request, "duration", str(exc)) from None
        if duration <= 0:
            raise _bad_request(request, "duration", "must be longer than 0 s")
        clean = {str(k): str(v) for k, v in matchers.items()}
        comment = str(body.get("comment") or "")
        async with service.lock:
            silence = service.engine.add_silence(clean, duration, by=caller.name, comment=comment)
            detail = {
                "matchers": [f"{k}={v}" for k, v in sorted(clean.items())],
                "duration_s": round(duration),
                "ends_at": datetime.fromtimestamp(silence.ends_at, UTC).isoformat(),
                "comment": comment,
            }
            entry = caller.audit(
                Action.SILENCE_MANAGE, Target("silence", silence.silence_id), detail
            )
            await service._commit({}, [entry])
        return web.json_response(vars(silence), status=201)

    async def expire_silence(request: Request) -> web.Response:
        silence_id = request.match_info["silence_id"]
        target = Target("silence", silence_id)
        caller = await access.check(request, Action.SILENCE_MANAGE, target)
        async with service.lock:
            try:
                silence = service.engine.expire_silence(silence_id)
            except KeyError:
                silence = None
            if silence is not None:
                entry = caller.audit(Action.SILENCE_MANAGE, target, {"expired": True})
                await service._commit({}, [entry])
        if silence is None:
            why = f"no active silence {silence_id}"
            await access.record(
                caller.audit(Action.SILENCE_MANAGE, target, {"reason": why}, "failed")
            )
            raise _not_found(request, why)
        return web.json_response(vars(silence))

    async def get_rules(request: Request) -> web.Response:
        await access.check(request, Action.ALERT_READ, service.rules_target)
        return web.json_response(
            {
                "file": str(service.rules_file) if service.rules_file else None,
                "file_sha256": service.rules_sha256,
                "rules": sorted(service.engine.rules),
                "error": service.last_rules_error,
            }
        )

    async def reload_rules(request: Request) -> web.Response:
        caller = await access.check(request, Action.RULE_CHANGE, service.rules_target)
        if not await service.reload_rules(caller=caller):
            raise ProblemError(
                Problem(422, "rules-refused", "Rules refused",
                        f"{service.last_rules_error} (the last good rules stay in effect)"),
                request.path,
            )  # fmt: skip
        return web.json_response(
            {"file_sha256": service.rules_sha256, "rules": sorted(service.engine.rules)}
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/alerts", list_alerts)
    app.router.add_post("/alerts/{alert_id}/ack", ack)
    app.router.add_get("/silences", list_silences)
    app.router.add_post("/silences", add_silence)
    app.router.add_delete("/silences/{silence_id}", expire_silence)
    app.router.add_get("/rules", get_rules)
    app.router.add_post("/rules/reload", reload_rules)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    s = service.settings.services
    await web.TCPSite(runner, s.bind_host, s.alerts).start()
    return runner


async def _json_body(request: Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except json.JSONDecodeError:
        raise _bad_request(request, "(body)", "not JSON") from None
    if not isinstance(body, dict):
        raise _bad_request(request, "(body)", "a JSON object")
    return body


def build(settings: Settings) -> AlertService:
    """The composition root: rules, engine, store, outbox, channels."""
    a, k = settings.alerts, settings.kafka
    # A bad file at start is refused outright.
    text, sha = read_rules_file(a.rules_file) if a.rules_file else (None, None)
    rules: RuleSet = load_rules(a.rules_file, text)
    engine = Engine(rules, time.time, area_deg=a.area_deg)
    metrics = AlertMetrics()
    producer = AIOKafkaProducer(
        bootstrap_servers=k.bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        **kafka_ssl_options(settings),
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
    dsn = postgres_dsn(settings)
    conn: psycopg.Connection[tuple[Any, ...]] = psycopg.connect(dsn)
    store = AlertStore(conn, group=a.group, channels=[c.name for c in channels])
    outbox = Outbox(dsn, channels, list(a.retry_schedule_s), metrics)
    p = k.topic_prefix
    topics = [f"{p}.health.v1", f"{p}.status.v1", f"{p}.telemetry.v1", f"{p}.integrity.v1"]
    return AlertService(
        settings,
        engine,
        store,
        outbox,
        metrics,
        topics,
        producer,
        a.rules_file,
        AlertAccess(dsn),
        rules_sha256=sha,
        lag=ConsumerLag(metrics.registry, a.group),
    )


def run_service(settings: Settings) -> None:
    """Apply the migrations (the engine needs no partition maintenance), then run."""
    from posflow.storage.migrate import migrate

    with psycopg.connect(postgres_dsn(settings), autocommit=True) as conn:
        migrate(conn)

    async def main() -> None:
        await build(settings).run()

    asyncio.run(main())
