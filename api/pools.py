"""The API's database pools: autocommit, one connection kept, opened by their owner."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

__all__ = ["async_pool", "sync_pool"]

Conn = psycopg.Connection[tuple[Any, ...]]


def _options(max_size: int, name: str) -> dict[str, Any]:
    return {
        "min_size": 1,
        "max_size": max_size,
        "open": False,
        "kwargs": {"autocommit": True},
        "name": name,
    }


def async_pool(conninfo: str, *, max_size: int, name: str) -> AsyncConnectionPool:
    """An asyncio pool of up to ``max_size`` connections; ``await pool.open()`` it."""
    return AsyncConnectionPool(conninfo, **_options(max_size, name))


def sync_pool(
    conninfo: str,
    *,
    max_size: int,
    name: str,
    check: Callable[[Conn], None] | None = None,
) -> ConnectionPool[Conn]:
    """A pool for threads of up to ``max_size`` connections (``check``: how a connection
    is tested when taken); ``pool.open()`` it."""
    return ConnectionPool(conninfo, check=check, **_options(max_size, name))
