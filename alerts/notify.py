"""Notification channels and the outbox drainer.

The engine writes notifications to ``alert_notifications`` (one row per channel) in
the same transaction as its state; :class:`Outbox` delivers due rows, marks them
delivered, or reschedules them with the next backoff step, and after the last
step marks them ``dead`` (the dead letter, kept in the table with its last error).
A receiver deduplicates by ``X-Posflow-Notification-Id``: a crash between a
delivery and its mark re-sends the same id, never a new one.

Webhook signature: ``X-Posflow-Signature: sha256=<hex HMAC-SHA256(secret,
"<X-Posflow-Timestamp>.<body>")>``; receivers reject stale timestamps (replays).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import httpx
import psycopg

from alerts.metrics import AlertMetrics
from posflow.runtime import Backoff

__all__ = ["KafkaChannel", "LogChannel", "Notifier", "Outbox", "WebhookChannel", "sign"]

log = logging.getLogger("posflow.alerts.notify")


class Notifier(Protocol):
    name: str

    async def send(self, notification_id: str, payload: dict[str, Any]) -> None:
        """Deliver or raise (any exception means: retry later)."""


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return (
        "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    )


class WebhookChannel:
    name = "webhook"

    def __init__(self, url: str, secret: bytes, timeout_s: float) -> None:
        self.url = url
        self.secret = secret
        self.client = httpx.AsyncClient(timeout=timeout_s)

    async def send(self, notification_id: str, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, sort_keys=True).encode()
        stamp = str(int(time.time()))
        response = await self.client.post(
            self.url,
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-Posflow-Notification-Id": notification_id,
                "X-Posflow-Timestamp": stamp,
                "X-Posflow-Signature": sign(self.secret, stamp, body),
            },
        )
        if response.status_code >= 300:
            raise RuntimeError(f"webhook answered HTTP {response.status_code}")

    async def close(self) -> None:
        await self.client.aclose()


class LogChannel:
    name = "log"

    async def send(self, notification_id: str, payload: dict[str, Any]) -> None:
        alert = payload["alert"]
        log.warning(
            "alert %s %s [%s] %s (%s)",
            payload["event"],
            alert["rule"],
            alert["severity"],
            alert["summary"],
            notification_id,
        )


class KafkaChannel:
    """The alerts topic, keyed by alert id (all events of one alert in order)."""

    name = "kafka"

    def __init__(self, producer: Any, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    async def send(self, notification_id: str, payload: dict[str, Any]) -> None:
        await self.producer.send_and_wait(
            self.topic,
            json.dumps(payload, sort_keys=True).encode(),
            key=payload["alert"]["alert_id"].encode(),
            headers=[("notification_id", notification_id.encode())],
        )


class Outbox:
    """Drains due outbox rows channel by channel, with retries and a dead letter."""

    def __init__(
        self,
        dsn: str,
        channels: list[Notifier],
        schedule_s: list[float],
        metrics: AlertMetrics,
    ) -> None:
        self.dsn = dsn
        self.channels = {c.name: c for c in channels}
        self.schedule_s = schedule_s
        self.metrics = metrics
        self.wake = asyncio.Event()
        self.conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def _due(self) -> list[tuple[Any, ...]]:
        if self.conn is None:
            raise RuntimeError("outbox not connected")
        rows = self.conn.execute(
            "SELECT notification_id, channel, payload, attempts, created_at"
            " FROM alert_notifications WHERE state = 'pending' AND next_attempt_at <= now()"
            " ORDER BY created_at, notification_id LIMIT 200"
        ).fetchall()
        self.conn.commit()
        return rows

    def _mark(self, nid: str, channel: str, attempts: int, error: str | None) -> str:
        if self.conn is None:
            raise RuntimeError("outbox not connected")
        if error is None:
            self.conn.execute(
                "UPDATE alert_notifications SET state = 'delivered', attempts = %s,"
                " delivered_at = now(), last_error = NULL"
                " WHERE notification_id = %s AND channel = %s",
                [attempts, nid, channel],
            )
            state = "delivered"
        elif attempts > len(self.schedule_s):
            self.conn.execute(
                "UPDATE alert_notifications SET state = 'dead', attempts = %s, last_error = %s"
                " WHERE notification_id = %s AND channel = %s",
                [attempts, error[:500], nid, channel],
            )
            state = "dead"
        else:
            wait = timedelta(seconds=self.schedule_s[attempts - 1])
            self.conn.execute(
                "UPDATE alert_notifications SET attempts = %s, last_error = %s,"
                " next_attempt_at = now() + %s WHERE notification_id = %s AND channel = %s",
                [attempts, error[:500], wait, nid, channel],
            )
            state = "retry"
        self.conn.commit()
        return state

    async def run_once(self) -> int:
        """Try every due row once; returns how many were delivered."""
        if self.conn is None:
            self.conn = await asyncio.to_thread(psycopg.connect, self.dsn)
        rows = await asyncio.to_thread(self._due)
        delivered = 0
        failed_channels: set[str] = set()
        for nid, channel_name, payload, attempts, created_at in rows:
            channel = self.channels.get(channel_name)
            if channel is None or channel_name in failed_channels:
                continue  # a channel that just failed is not hammered within one pass
            error: str | None = None
            try:
                await channel.send(nid, payload)
            except Exception as exc:  # any failure: retry by the schedule
                error = f"{type(exc).__name__}: {exc}"
                failed_channels.add(channel_name)
            state = await asyncio.to_thread(self._mark, nid, channel_name, attempts + 1, error)
            if state == "delivered":
                delivered += 1
                age = (datetime.now(UTC) - created_at).total_seconds()
                self.metrics.notify_seconds.labels(channel_name).observe(max(0.0, age))
            else:
                self.metrics.notify_failures.labels(channel_name).inc()
                if state == "dead":
                    self.metrics.dead_letters.labels(channel_name).inc()
                    log.error("notification %s to %s dead-lettered: %s", nid, channel_name, error)
        return delivered

    async def run(self, stopping: asyncio.Event, poll_s: float = 0.5) -> None:
        """Deliver what is due every ``poll_s`` (or when woken) until ``stopping``; a lost
        database connection is reopened after a growing pause."""
        reconnect = Backoff(first=poll_s, cap=5.0)
        while not stopping.is_set():
            try:
                await self.run_once()
                reconnect.reset()
            except psycopg.Error as exc:
                log.error("outbox: database error %s; retrying", exc)  # noqa: TRY400
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                await reconnect.sleep(stopping)
                continue
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=poll_s)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
