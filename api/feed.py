"""The live cash-flow feed: one LISTEN per process, fan-out to the streams in it.

The settlement writer appends ``cashflow_events`` and runs
``pg_notify('posflow_cashflow', merchant_id)`` in the same transaction, so the
notification arrives after the rows are visible. Per merchant with open
streams, the hub keeps a cursor (the highest ``seq`` it has read), reads
``seq > cursor`` once per (coalesced) notification and hands the rows to
every stream of that merchant. A poll every ``sse_poll_s`` covers a missed
notification (for instance while the LISTEN connection reconnects).

The database is the buffer, the in-memory queues only a shortcut: a stream
whose queue overflows (a slow client) drops its queue and reads what it
missed from ``cashflow_events`` at its own pace, so memory stays bounded and
nobody is disconnected for being slow. Each stream delivers ``seq`` strictly
increasing and skips anything at or below the last id it sent, so events
arrive exactly once, including across a reconnect with ``Last-Event-ID``.

Assumption on the writer (true of posflow.storage.ledger): a merchant's seq is
assigned under a row lock held until commit, so its events commit in seq
order and ``seq > last`` never skips one that commits later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from api.metrics import ApiMetrics
from posflow.runtime import listen_forever

__all__ = ["CHANNEL", "EventRow", "FeedHub", "Subscription"]

log = logging.getLogger("posflow.api.feed")

CHANNEL = "posflow_cashflow"


@dataclass(frozen=True)
class EventRow:
    seq: int
    recorded_at: datetime
    data: str  # the event as JSON, serialised once for every stream


def _row(record: tuple[Any, ...]) -> EventRow:
    seq, txn_id, kind, currency, amount, pending, available, paid_out, occurred, recorded = record
    body = {
        "seq": seq,
        "txn_id": txn_id,
        "kind": kind,
        "currency": str(currency).strip(),
        "amount_minor": amount,
        "pending_minor": pending,
        "available_minor": available,
        "paid_out_minor": paid_out,
        "occurred_at": occurred.isoformat(),
        "recorded_at": recorded.isoformat(),
    }
    return EventRow(int(seq), recorded, json.dumps(body, separators=(",", ":")))


async def fetch_events(
    pool: AsyncConnectionPool, merchant_id: str, after: int, limit: int
) -> list[EventRow]:
    """A merchant's cash-flow events with ``seq > after``, oldest first."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            """
            SELECT seq, txn_id, kind, currency, amount_minor, pending_minor, available_minor,
                   paid_out_minor, occurred_at, recorded_at
              FROM cashflow_events
             WHERE merchant_id = %s AND seq > %s
             ORDER BY seq
             LIMIT %s
            """,
            [merchant_id, after, limit],
        )
        return [_row(r) for r in await cur.fetchall()]


class Subscription:
    """One open stream's inbox: batches from the hub, bounded by event count."""

    def __init__(self, merchant_id: str, last: int, max_events: int) -> None:
        self.merchant_id = merchant_id
        self.last = last  # the highest seq this stream has sent (its Last-Event-ID)
        self.max_events = max_events
        self.behind = False  # the queue overflowed: read the rest from the database
        self.closed: str | None = None  # why the server ends this stream
        self._batches: deque[tuple[int, list[EventRow]]] = deque()
        self._count = 0
        self._wake = asyncio.Event()

    def offer(self, after: int, rows: list[EventRow]) -> None:
        """Rows with seq > ``after``, in order (``after`` lets the stream spot a gap)."""
        if self.closed or self.behind:
            return
        if self._count + len(rows) > self.max_events:
            self._batches.clear()
            self._count = 0
            self.behind = True
        else:
            self._batches.append((after, rows))
            self._count += len(rows)
        self._wake.set()

    def reset(self) -> None:
        """Forget the queue: the stream is about to read the database from ``last``."""
        self.behind = False
        self._batches.clear()
        self._count = 0

    def close(self, reason: str) -> None:
        self.closed = reason
        self._wake.set()

    def take(self) -> tuple[int, list[EventRow]] | None:
        if not self._batches:
            return None
        after, rows = self._batches.popleft()
        self._count -= len(rows)
        return after, rows

    async def wait(self, seconds: float) -> None:
        """Until something arrives, the stream is closed, or ``seconds`` pass."""
        if self._batches or self.behind or self.closed:
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)


@dataclass
class _Topic:
    subs: set[Subscription] = field(default_factory=set)
    cursor: int | None = None
    running: bool = False
    again: bool = False


class FeedHub:
    """LISTENs on ``posflow_cashflow`` and feeds the streams of this process."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        conninfo: str,
        metrics: ApiMetrics,
        *,
        poll_s: float,
        page: int = 1000,
    ) -> None:
        self.pool = pool
        self.conninfo = conninfo
        self.metrics = metrics
        self.poll_s = poll_s
        self.page = page
        self.listening = False
        self._topics: dict[str, _Topic] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._spawn(
            listen_forever(self.conninfo, CHANNEL, self._notified, on_state=self._listening)
        )
        self._spawn(self._poll_loop())

    def close_streams(self, reason: str) -> None:
        """End every open stream (shutdown); clients reconnect with Last-Event-ID."""
        self._stopping = True
        for topic in self._topics.values():
            for sub in topic.subs:
                sub.close(reason)

    async def stop(self) -> None:
        self.close_streams("server shutting down")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.listening = False
        self.metrics.listening.set(0)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- streams ---------------------------------------------------------------------

    def subscribe(self, merchant_id: str, last: int, max_events: int) -> Subscription:
        sub = Subscription(merchant_id, last, max_events)
        if self._stopping:
            sub.close("server shutting down")
        self._topics.setdefault(merchant_id, _Topic()).subs.add(sub)
        return sub

    def caught_up(self, sub: Subscription) -> None:
        """The stream has read the database up to ``sub.last``: start the live fan-out.

        The first stream of a merchant sets the hub's cursor; any later stream
        subscribed before its own catch-up read, so it missed nothing.
        """
        topic = self._topics.get(sub.merchant_id)
        if topic is None:
            return
        if topic.cursor is None:
            topic.cursor = sub.last
            self._kick(sub.merchant_id)
        elif sub.last < topic.cursor:
            # The hub read past this stream's catch-up before it subscribed: read again.
            sub.behind = True

    def unsubscribe(self, sub: Subscription) -> None:
        topic = self._topics.get(sub.merchant_id)
        if topic is None:
            return
        topic.subs.discard(sub)
        if not topic.subs and not topic.running:
            del self._topics[sub.merchant_id]

    async def fetch(self, merchant_id: str, after: int) -> list[EventRow]:
        return await fetch_events(self.pool, merchant_id, after, self.page)

    # --- fan-out ---------------------------------------------------------------------

    def _kick(self, merchant_id: str) -> None:
        """Read new rows for a merchant soon; notifications during a read coalesce."""
        topic = self._topics.get(merchant_id)
        if topic is None or topic.cursor is None:
            return
        if topic.running:
            topic.again = True
            return
        topic.running = True
        self._spawn(self._refresh(merchant_id, topic))

    async def _refresh(self, merchant_id: str, topic: _Topic) -> None:
        try:
            while True:
                topic.again = False
                while topic.subs and topic.cursor is not None:
                    after = topic.cursor
                    rows = await self.fetch(merchant_id, after)
                    if rows:
                        for sub in list(topic.subs):
                            sub.offer(after, rows)
                        topic.cursor = rows[-1].seq
                    if len(rows) < self.page:
                        break
                if not topic.again:
                    break
        except (psycopg.Error, OSError) as exc:
            # The streams keep their place; the next notification or poll retries.
            log.warning("reading cash-flow events of %s failed: %s", merchant_id, exc)
        finally:
            topic.running = False
            if not topic.subs and self._topics.get(merchant_id) is topic:
                del self._topics[merchant_id]

    def _notified(self, merchant_id: str) -> None:
        self.metrics.notifications.inc()
        self._kick(merchant_id)

    def _listening(self, up: bool) -> None:
        self.listening = up
        self.metrics.listening.set(1 if up else 0)
        if up:
            # Whatever was committed while we were not listening.
            for merchant_id in list(self._topics):
                self._kick(merchant_id)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            for merchant_id in list(self._topics):
                self._kick(merchant_id)
