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
from collections.abc import AsyncIterator, Awaitable, Callable

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


class _Recheck:
    """Asks, at most every ``period_s``, whether the caller's key is still accepted."""

    def __init__(self, check: Callable[[], Awaitable[str | None]] | None, period_s: float):
        self.check = check
        self.period_s = period_s
        self.at = time.monotonic()

    def remaining(self, wait_s: float) -> float:
        if self.check is None:
            return wait_s
        return max(0.01, min(wait_s, self.period_s - (time.monotonic() - self.at)))

    async def refused(self) -> str | None:
        if self.check is None or time.monotonic() - self.at < self.period_s:
            return None
        self.at = time.monotonic()
        return await self.check()


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
    recheck: Callable[[], Awaitable[str | None]] | None = None,
    recheck_s: float = 15.0,
) -> AsyncIterator[str]:
    """The stream's text; ends when the server closes it (the client then resumes).

    ``recheck`` (every ``recheck_s``, at the latest one heartbeat later) says why the
    caller's key is no longer accepted (key or merchant revoked): the stream then
    ends with ``event: close`` and that reason, and a reconnect gets 401.
    """
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
            rechecks = _Recheck(recheck, recheck_s)
            while True:
                refused = await rechecks.refused()
                ended = refused or sub.closed
                if ended:
                    yield _close(ended, metrics, "unauthorized" if refused else "shutdown")
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
                    await sub.wait(rechecks.remaining(heartbeat_s - idle))
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
