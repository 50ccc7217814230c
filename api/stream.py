"""One merchant's server-sent-event stream: catch up from the database, then live.

Wire format (https://html.spec.whatwg.org/multipage/server-sent-events.html)::

    retry: 1000

    id: 42
    event: cashflow
    data: {"seq":42,"txn_id":"...","kind":"sale","currency":"EUR","amount_minor":1234,...}

    : keepalive

    event: close
    data: {"reason":"server shutting down"}

``id`` is the event's ``seq``; a client reconnecting with ``Last-Event-ID: 42``
gets every event after 42 exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import psycopg

from api.feed import EventRow, FeedHub, Subscription
from api.metrics import ApiMetrics

__all__ = ["event_stream"]


class _Writer:
    def __init__(self, sub: Subscription, metrics: ApiMetrics) -> None:
        self.sub = sub
        self.metrics = metrics
        self.last_sent = time.monotonic()

    def events(self, rows: list[EventRow]) -> str:
        """The SSE text of the rows this stream has not sent yet (strictly increasing seq)."""
        parts = []
        now = time.time()
        for row in rows:
            if row.seq <= self.sub.last:
                continue
            parts.append(f"id: {row.seq}\nevent: cashflow\ndata: {row.data}\n\n")
            self.sub.last = row.seq
            self.metrics.delivery_latency.observe(max(0.0, now - row.recorded_at.timestamp()))
        if parts:
            self.metrics.events_delivered.inc(len(parts))
            self.last_sent = time.monotonic()
        return "".join(parts)


async def _catch_up(hub: FeedHub, writer: _Writer) -> AsyncIterator[str]:
    """Everything after ``sub.last`` that the database holds now."""
    sub = writer.sub
    sub.reset()
    while True:
        rows = await hub.fetch(sub.merchant_id, sub.last)
        text = writer.events(rows)
        if text:
            yield text
        if len(rows) < hub.page:
            return


def _close(reason: str, metrics: ApiMetrics, label: str) -> str:
    metrics.sse_closed.labels(label).inc()
    return f"event: close\ndata: {json.dumps({'reason': reason})}\n\n"


async def event_stream(
    hub: FeedHub,
    merchant_id: str,
    last: int,
    metrics: ApiMetrics,
    *,
    queue_max: int,
    heartbeat_s: float,
    retry_ms: int,
) -> AsyncIterator[str]:
    """The stream's text; ends when the server closes it (the client then resumes)."""
    # Subscribed before the catch-up read, so nothing committed meanwhile is missed.
    sub = hub.subscribe(merchant_id, last, queue_max)
    writer = _Writer(sub, metrics)
    metrics.sse_clients.inc()
    try:
        yield f"retry: {retry_ms}\n\n"
        try:
            async for text in _catch_up(hub, writer):
                yield text
            hub.caught_up(sub)
            while True:
                if sub.closed:
                    yield _close(sub.closed, metrics, "shutdown")
                    return
                if sub.behind:
                    metrics.sse_catchups.labels("slow_client").inc()
                    async for text in _catch_up(hub, writer):
                        yield text
                    continue
                item = sub.take()
                if item is None:
                    idle = time.monotonic() - writer.last_sent
                    if idle >= heartbeat_s:
                        writer.last_sent = time.monotonic()
                        yield ": keepalive\n\n"
                        continue
                    await sub.wait(heartbeat_s - idle)
                    continue
                after, rows = item
                if after > sub.last:
                    # A batch starts past what this stream sent: fill from the database.
                    metrics.sse_catchups.labels("gap").inc()
                    async for text in _catch_up(hub, writer):
                        yield text
                    continue
                text = writer.events(rows)
                if text:
                    yield text
        except (psycopg.Error, OSError) as exc:
            # The client resumes from its Last-Event-ID once the database is back.
            yield _close(f"database unavailable: {type(exc).__name__}", metrics, "database")
    finally:
        hub.unsubscribe(sub)
        metrics.sse_clients.dec()
