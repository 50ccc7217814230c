"""TimescaleDB policies: compression and retention ages from the settings.

Applied after the migrations (and again whenever the settings change): each
policy is removed and added with the configured age, so the database always
matches the settings. On plain PostgreSQL, ``maintenance.py`` does this work.
"""

from __future__ import annotations

import hashlib

import psycopg

from posflow.settings import StorageSettings

__all__ = ["apply_timescaledb_policies"]

# Segment by terminal, newest first (migrations 0002 and 0010). The ledger, the audit
# trail and every other plain table have no policy: they are never compressed or expired.
_COMPRESSED = ("telemetry", "terminal_health")
_RETENTION = {
    "telemetry": "raw",
    "terminal_health": "raw",
    "transactions": "rollup",
}


# Services start together and each applies the policies: without a lock their
# remove/add pairs interleave and one fails with "tuple concurrently deleted".
# pg_advisory_xact_lock key: the first 8 bytes of sha256("posflow.policies"), fixed.
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"posflow.policies").digest()[:8], "big", signed=True)

# Continuous aggregates (migrations 0002 and 0011): kept as long as the rollups.
_ROLLUPS = ("telemetry_1m", "telemetry_1h", "fleet_battery_1m", "fleet_signal_1m")


def apply_timescaledb_policies(
    conn: psycopg.Connection[tuple[object, ...]], storage: StorageSettings
) -> None:
    """Compression of telemetry and health windows (segment by terminal) and retention."""
    days = {"raw": storage.raw_retention_days, "rollup": storage.rollup_retention_days}
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])
        for table in _COMPRESSED:
            conn.execute("SELECT remove_compression_policy(%s, if_exists => true)", [table])
            conn.execute(
                "SELECT add_compression_policy(%s, compress_after => make_interval(days => %s))",
                [table, storage.compress_after_days],
            )
        for table, kind in _RETENTION.items():
            conn.execute("SELECT remove_retention_policy(%s, if_exists => true)", [table])
            conn.execute(
                "SELECT add_retention_policy(%s, drop_after => make_interval(days => %s))",
                [table, days[kind]],
            )
        for view in _ROLLUPS:
            conn.execute("SELECT remove_retention_policy(%s, if_exists => true)", [view])
            conn.execute(
                "SELECT add_retention_policy(%s, drop_after => make_interval(days => %s))",
                [view, storage.rollup_retention_days],
            )
