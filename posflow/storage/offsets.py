"""Kafka offsets kept in PostgreSQL (``consumer_offsets``), next to the data they produced.

A consumer that stores its next offsets in the transaction that wrote a batch's
effects resumes from :func:`load_offsets` and neither skips nor repeats a record
(DESIGN.md principle 2). The ledger writer and the alert engine both keep theirs
here, each under its own consumer group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg

__all__ = ["load_offsets", "store_offsets"]

Conn = psycopg.Connection[tuple[Any, ...]]


def load_offsets(conn: Conn, group: str) -> dict[tuple[str, int], int]:
    """(topic, partition) -> the next offset to consume, as committed with the data.

    Commits, so the read holds no snapshot open while the consumer runs.
    """
    rows = conn.execute(
        "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer_group = %s",
        [group],
    ).fetchall()
    conn.commit()
    return {(str(t), int(p)): int(o) for t, p, o in rows}


def store_offsets(conn: Conn, group: str, offsets: Mapping[tuple[str, int], int]) -> None:
    """Store the next offsets of ``group``; call inside the transaction of the data."""
    if not offsets:
        return
    items = sorted(offsets.items())
    conn.execute(
        """
        INSERT INTO consumer_offsets AS o (consumer_group, topic, partition, next_offset)
        SELECT %s, * FROM unnest(%s::text[], %s::int[], %s::bigint[])
        ON CONFLICT (consumer_group, topic, partition)
        DO UPDATE SET next_offset = excluded.next_offset, updated_at = now()
        """,
        [group, [t for (t, _), _ in items], [p for (_, p), _ in items], [o for _, o in items]],
    )
