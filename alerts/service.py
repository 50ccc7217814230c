"""The alert engine service, put together: Kafka in, PostgreSQL state, notifications out.

One process (guarded by a PostgreSQL advisory lock, :mod:`alerts.live`) reads every
partition of the health, status, telemetry and integrity topics (:mod:`alerts.consumer`).
Group rules (a merchant's terminals, a carrier in an area, the fleet) need every
terminal's facts in one place, and 50,000 terminals take a fraction of one core
(docs/benchmarks/alerts.md); a second instance waits on the lock as a hot standby.

:func:`build` wires every part and opens no connection; :meth:`AlertService.run` opens
them and runs until the stop event; :func:`run_service` (``posflow alerts run``) applies
the migrations, then serves it through :func:`posflow.runtime.run_service`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from alerts.access import AlertAccess
from alerts.consumer import AlertConsumer
from alerts.engine import Engine
from alerts.http_api import alert_routes
from alerts.live import LiveEngine
from alerts.metrics import AlertMetrics
from alerts.notify import KafkaChannel, LogChannel, Notifier, Outbox, WebhookChannel
from alerts.reload import RulesReloader
from alerts.rules import load_rules, read_rules_file
from alerts.store import AlertStore
from posflow import runtime
from posflow.cost import Handled
from posflow.kafkalag import ConsumerLag
from posflow.runtime import Endpoints, cancel_tasks
from posflow.security.tls import kafka_ssl_options, postgres_dsn
from posflow.settings import Settings
from posflow.topics import topic_names

__all__ = ["AlertService", "build", "run_service"]

log = logging.getLogger("posflow.alerts")


@dataclass
class AlertService:
    settings: Settings
    live: LiveEngine
    consumer: AlertConsumer
    reloader: RulesReloader
    access: AlertAccess
    producer: AIOKafkaProducer

    @property
    def ready(self) -> bool:
        return self.consumer.ready

    def readiness(self) -> Mapping[str, object]:
        """/readyz's extra field: why the rules file was refused, while it is."""
        error = self.reloader.last_error
        return {"rules_error": error} if error else {}

    def endpoints(self) -> Endpoints:
        """/metrics /healthz /readyz (open) plus the staff API (see alerts.access)."""
        s = self.settings.services
        return Endpoints(
            s.bind_host,
            s.alerts,
            self.live.metrics.registry,
            lambda: self.ready,
            alert_routes(self.live, self.reloader, self.access),
            ready_detail=self.readiness,
            handled=Handled("alerts", ("posflow_alerts_records",)),
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Take the single-instance lock, restore the state, then consume, evaluate, store
        and notify until ``stop``; every connection is opened here and closed on the way
        out (the HTTP API's pool is opened by :meth:`serve`, before the endpoints)."""
        live, a = self.live, self.settings.alerts
        self.reloader.on_sighup()
        tasks: list[asyncio.Task[None]] = []
        try:
            await asyncio.to_thread(live.store.open)
            if not await live.take_lock(stop):
                return
            await live.restore()
            await self.producer.start()
            tasks = [
                asyncio.create_task(live.outbox.run(stop)),
                asyncio.create_task(self.reloader.watch(stop)),
                asyncio.create_task(live.refresh_reference(a.reference_refresh_s, stop)),
            ]
            await self.consumer.run(stop)
        finally:
            stop.set()
            await cancel_tasks(tasks)
            await self.producer.stop()
            for channel in live.outbox.channels.values():
                if isinstance(channel, WebhookChannel):
                    await channel.close()
            live.outbox.close()
            live.store.close()

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Until SIGTERM / SIGINT (or ``stop``): the endpoints, the API and :meth:`run`."""
        await self.access.open()
        try:
            await runtime.run_service("alert engine", self.endpoints(), self.run, stop=stop)
        finally:
            await self.access.close()


def build(settings: Settings) -> AlertService:
    """The composition root: rules, engine, store, outbox, channels, consumer, API.

    Opens no connection (call it inside the event loop: aiokafka's clients bind to it).
    A bad rules file at start is refused outright.
    """
    a, k = settings.alerts, settings.kafka
    topics = topic_names(k)
    text, sha = read_rules_file(a.rules_file) if a.rules_file else (None, None)
    engine = Engine(load_rules(a.rules_file, text), time.time, area_deg=a.area_deg)
    metrics = AlertMetrics()
    producer = AIOKafkaProducer(
        bootstrap_servers=k.bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        **kafka_ssl_options(settings),
    )
    channels: list[Notifier] = [KafkaChannel(producer, topics.alerts)]
    if a.webhook_url:
        channels.append(
            WebhookChannel(
                a.webhook_url, a.webhook_secret.get_secret_value().encode(), a.webhook_timeout_s
            )
        )
    if a.log_notifications:
        channels.append(LogChannel())
    dsn = postgres_dsn(settings)
    store = AlertStore(dsn, group=a.group, channels=[c.name for c in channels])
    outbox = Outbox(dsn, channels, list(a.retry_schedule_s), metrics)
    live = LiveEngine(engine, store, outbox, metrics)
    access = AlertAccess(dsn)
    consumer = AlertConsumer(
        live,
        AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
            **kafka_ssl_options(settings),
        ),
        sources={
            topics.health: "health",
            topics.status: "status",
            topics.telemetry: "telemetry",
            topics.integrity: "integrity",
        },
        max_records=a.max_records,
        tick_s=a.tick_s,
        lag=ConsumerLag(metrics.registry, a.group),
    )
    reloader = RulesReloader(live, access, a.rules_file, a.reload_poll_s, rules_sha256=sha)
    return AlertService(settings, live, consumer, reloader, access, producer)


def migrate_database(settings: Settings) -> None:
    """The engine's tables, before it starts (it needs no partition maintenance)."""
    from posflow.storage.migrate import migrate

    with psycopg.connect(postgres_dsn(settings), autocommit=True) as conn:
        migrate(conn)


def run_service(settings: Settings) -> None:
    """``posflow alerts run``: migrate, build, serve until SIGTERM / SIGINT."""
    migrate_database(settings)

    async def main() -> None:
        await build(settings).serve()

    asyncio.run(main())
