"""Periodic storage upkeep: partitions, rollups, compression, retention.

On plain PostgreSQL :func:`maintain` creates the daily partitions ahead,
refreshes the hourly rollup and drops expired partitions. On TimescaleDB,
chunks are automatic and the work is TimescaleDB's own policy jobs (continuous
aggregate refresh, compression, retention; see ``policies.py``), which
:func:`maintain` runs from its session rather than trusting the background
scheduler alone (see ``jobs.py``). The raw sink calls it every few minutes
and ``posflow db maintain`` runs it by hand.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime, timedelta

import psycopg

from posflow.storage.jobs import run_policy_jobs
from posflow.storage.migrate import detect_path
from posflow.storage.partitions import drop_expired_partitions, ensure_partitions

__all__ = ["RetentionDays", "maintain", "refresh_hourly_rollup"]

log = logging.getLogger("posflow.storage")

RetentionDays = dict[str, int]

# Hours behind the watermark recomputed at every refresh, for late telemetry
# (the same role as a continuous-aggregate policy's start_offset).
_REFRESH_GRACE = timedelta(hours=2)


def refresh_hourly_rollup(
    conn: psycopg.Connection[tuple[object, ...]], *, now: datetime | None = None
) -> datetime:
    """Materialise every closed hour from the 1-minute rollup; returns the new watermark.

    Each refreshed hour is recomputed whole from its minutes, so refreshing
    twice, or after late data, gives exact figures.
    """
    now = now or datetime.now(UTC)
    upto = now.replace(minute=0, second=0, microsecond=0)  # the current hour stays live
    with conn.transaction():
        row = conn.execute(
            "SELECT upto FROM rollup_watermarks WHERE rollup = 'telemetry_1h' FOR UPDATE"
        ).fetchone()
        previous = row[0] if row else None
        start = previous - _REFRESH_GRACE if isinstance(previous, datetime) else upto
        conn.execute(
            "DELETE FROM telemetry_rollup_1h WHERE bucket >= %s AND bucket < %s", [start, upto]
        )
        conn.execute(
            """
            INSERT INTO telemetry_rollup_1h (bucket, terminal_id, merchant_id, samples,
                battery_samples, battery_sum, battery_min, battery_max, signal_samples,
                signal_sum, signal_min_dbm, signal_max_dbm, charging_samples)
            SELECT date_trunc('hour', bucket, 'UTC'), terminal_id, max(merchant_id),
                   sum(samples), sum(battery_samples), sum(battery_sum), min(battery_min),
                   max(battery_max), sum(signal_samples), sum(signal_sum), min(signal_min_dbm),
                   max(signal_max_dbm), sum(charging_samples)
              FROM telemetry_rollup_1m
             WHERE bucket >= %s AND bucket < %s
             GROUP BY 1, terminal_id
            """,
            [start, upto],
        )
        conn.execute("UPDATE rollup_watermarks SET upto = %s WHERE rollup = 'telemetry_1h'", [upto])
    return upto


# pg_advisory_lock key for maintenance: first 8 bytes of sha256("posflow.maintenance").
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"posflow.maintenance").digest()[:8], "big", signed=True)


def maintain(
    conn: psycopg.Connection[tuple[object, ...]],
    retention: RetentionDays,
    *,
    now: datetime | None = None,
) -> dict[str, object]:
    """Plain: partitions ahead, hourly rollup refreshed, expired partitions dropped.
    TimescaleDB: every refresh, compression and retention policy job run once, now.

    Every service runs this at start: a session advisory lock makes concurrent
    starts take turns (the second one finds the partitions already there).
    """
    now = now or datetime.now(UTC)
    if detect_path(conn) == "timescaledb":
        return _maintain_timescaledb(conn)
    conn.execute("SELECT pg_advisory_lock(%s)", [_LOCK_KEY])
    try:
        created = ensure_partitions(conn, today=now.date())
        watermark = refresh_hourly_rollup(conn, now=now)
        dropped = drop_expired_partitions(conn, retention, today=now.date())
        # On a connection outside autocommit the work is one open transaction: it must be
        # committed while the lock is still held. (It used to be rolled back here and the
        # lock released, so the next service created the same partitions again.)
        if not conn.autocommit:
            conn.commit()
    except BaseException:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
        raise
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", [_LOCK_KEY])
        if not conn.autocommit:
            conn.commit()
    if created or dropped:
        log.info("partitions created %s, dropped %s", created, dropped)
    return {"path": "plain", "created": created, "dropped": dropped, "rollup_1h_upto": watermark}


def _maintain_timescaledb(conn: psycopg.Connection[tuple[object, ...]]) -> dict[str, object]:
    if not conn.autocommit:
        conn.commit()
        conn.autocommit = True
    conn.execute("SELECT pg_advisory_lock(%s)", [_LOCK_KEY])
    try:
        runs = run_policy_jobs(conn)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", [_LOCK_KEY])
    failed = [r for r in runs if not r.ok]
    log.info(
        "TimescaleDB policy jobs run: %d ok, %d failed%s",
        len(runs) - len(failed),
        len(failed),
        "".join(f"; {r.job}: {r.error}" for r in failed),
    )
    return {"path": "timescaledb", "jobs": runs, "failed": failed}


def default_retention(days_raw: int, days_rollup: int) -> RetentionDays:
    return {
        "telemetry": days_raw,
        "transactions": days_rollup,
        "terminal_health": days_rollup,
        "telemetry_rollup_1m": days_rollup,
        "telemetry_rollup_1h": max(days_rollup, 365),
    }
