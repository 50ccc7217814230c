"""listen_forever against the stack's PostgreSQL: notifications arrive, a lost connection
comes back (and says so through on_state, so callers can catch up)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import psycopg

from posflow.runtime import Backoff, listen_forever
from posflow.settings import Settings
from posflow.stack import Stack
from tests.conftest import unique


async def _notify(dsn: str, channel: str, payload: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SELECT pg_notify(%s, %s)", [channel, payload])


async def _until(what: str, check: Callable[[], bool], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@dataclass
class Listener:
    """A running ``listen_forever`` on a channel of its own, and what it reported."""

    channel: str
    payloads: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    states: list[bool] = field(default_factory=list)


@asynccontextmanager
async def listening(dsn: str, backoff: Backoff | None = None) -> AsyncIterator[Listener]:
    heard = Listener(unique("runtime").replace("-", "_"))
    task = asyncio.create_task(
        listen_forever(
            dsn, heard.channel, heard.payloads.put_nowait, on_state=heard.states.append,
            backoff=backoff,
        )
    )  # fmt: skip
    try:
        await _until("the LISTEN connection", lambda: heard.states == [True])
        yield heard
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_listen_forever_hands_each_notification_payload_to_on_notify(
    settings: Settings, stack: Stack
) -> None:
    dsn = settings.postgres.dsn()
    async with listening(dsn) as heard:
        await _notify(dsn, heard.channel, "merchant-1")
        await _notify(dsn, heard.channel, "merchant-2")
        got = [await asyncio.wait_for(heard.payloads.get(), 10) for _ in range(2)]
        assert got == ["merchant-1", "merchant-2"]
        assert heard.states == [True]


async def test_listen_forever_reconnects_after_the_server_ends_its_connection(
    settings: Settings, stack: Stack
) -> None:
    dsn = settings.postgres.dsn()
    async with listening(dsn, Backoff(first=0.05, cap=0.2)) as heard:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
            cur = await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query = %s AND pid <> pg_backend_pid()",
                [f"LISTEN {heard.channel}"],
            )
            assert await cur.fetchall() == [(True,)]
        await _until("the reconnect", lambda: heard.states == [True, False, True])
        await _notify(dsn, heard.channel, "after-reconnect")
        assert await asyncio.wait_for(heard.payloads.get(), 10) == "after-reconnect"
