"""Health rows and terminal state into the database, in batches.

Open windows are upserted as they fill (so a person sees a terminal's minute
within a second), and their final record replaces them at close; the
terminal's current state is upserted alongside. Every write is an upsert on
its key, so a replay after a worker restart writes the same rows again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg

from streams.metrics import StreamMetrics

__all__ = ["HealthSink"]


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


_COPY_WINDOWS = (
    "COPY health_stage (window_start, window_end, terminal_id, merchant_id, score,"
    " signal_score, battery_score, txn_score, printer_score, details) FROM STDIN"
)
_UPSERT_WINDOWS = """
    INSERT INTO terminal_health AS h SELECT * FROM health_stage
    ON CONFLICT (terminal_id, window_start) DO UPDATE SET
        score = excluded.score, signal_score = excluded.signal_score,
        battery_score = excluded.battery_score, txn_score = excluded.txn_score,
        printer_score = excluded.printer_score, details = excluded.details
    WHERE NOT coalesce((h.details->>'final')::boolean, false)
       OR coalesce((excluded.details->>'final')::boolean, false)
"""
_COPY_STATES = (
    "COPY state_stage (terminal_id, merchant_id, online, last_seen, status_changed_at,"
    " battery_level_pct, charging, signal_type, signal_dbm, carrier, printer_paper,"
    " lat, lon, app_version, firmware_version, health_score) FROM STDIN"
)
_UPSERT_STATES = """
    INSERT INTO terminal_state SELECT * FROM state_stage
    ON CONFLICT (terminal_id) DO UPDATE SET
        merchant_id = excluded.merchant_id, online = excluded.online,
        last_seen = excluded.last_seen,
        status_changed_at = coalesce(excluded.status_changed_at,
                                     terminal_state.status_changed_at),
        battery_level_pct = excluded.battery_level_pct, charging = excluded.charging,
        signal_type = excluded.signal_type, signal_dbm = excluded.signal_dbm,
        carrier = excluded.carrier, printer_paper = excluded.printer_paper,
        lat = excluded.lat, lon = excluded.lon, app_version = excluded.app_version,
        firmware_version = excluded.firmware_version,
        health_score = coalesce(excluded.health_score, terminal_state.health_score),
        updated_at = now()
"""


def _window_row(r: dict[str, Any]) -> tuple[Any, ...]:
    c = r["components"]
    return (
        _ts(r["window_start"]), _ts(r["window_end"]), r["terminal_id"],
        r["merchant_id"], r["score"], c["signal"], c["battery"], c["txn"],
        c["printer"],
        orjson.dumps({"final": r["final"], "reasons": r["reasons"],
                      **r["facts"]}).decode(),
    )  # fmt: skip


def _state_row(s: dict[str, Any]) -> tuple[Any, ...]:
    c = s.get("current", {})
    changed = s.get("status_changed_at")
    return (
        s["terminal_id"], s["merchant_id"], s["online"],
        _ts(s["watermark"] or s["last_heard"]),
        _ts(changed) if changed else None,
        c.get("battery"), c.get("charging"), c.get("signal_type"),
        c.get("signal_dbm"), c.get("carrier"), c.get("printer"),
        c.get("lat"), c.get("lon"), c.get("app_version"),
        c.get("firmware_version"), s.get("health_score"),
    )  # fmt: skip


def _copy_then_upsert(
    conn: psycopg.Connection[tuple[Any, ...]],
    copy_sql: str,
    rows: Iterable[tuple[Any, ...]],
    upsert_sql: str,
) -> None:
    """COPY into a staging table, then one upsert: far cheaper than array parameters."""
    with conn.cursor() as cur:
        with cur.copy(copy_sql) as copy:
            for row in rows:
                copy.write_row(row)
        cur.execute(upsert_sql)


class HealthSink:
    def __init__(self, dsn: str, metrics: StreamMetrics) -> None:
        self.dsn = dsn
        self.metrics = metrics
        self._windows: dict[tuple[str, int], dict[str, Any]] = {}
        self._states: dict[str, dict[str, Any]] = {}
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def add_window(self, record: dict[str, Any]) -> None:
        key = (record["terminal_id"], record["window_start"])
        if self._windows.get(key, {}).get("final") and not record.get("final"):
            return  # never replace a final record with a provisional one
        self._windows[key] = record

    def add_state(self, state: dict[str, Any]) -> None:
        self._states[state["terminal_id"]] = state

    def pending(self) -> int:
        return len(self._windows) + len(self._states)

    def flush(self) -> int:
        """Write what is buffered in one transaction (blocking: run it in a thread)."""
        windows, self._windows = self._windows, {}
        states, self._states = self._states, {}
        if not windows and not states:
            return 0
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn)
            # Session-local staging tables, emptied at every commit.
            for stage, table in (
                ("health_stage", "terminal_health"),
                ("state_stage", "terminal_state"),
            ):
                self._conn.execute(
                    f"CREATE TEMP TABLE {stage} (LIKE {table} INCLUDING DEFAULTS)"
                    " ON COMMIT DELETE ROWS"
                )
            self._conn.commit()
        conn = self._conn
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = off")
            if windows:
                self._write_windows(conn, list(windows.values()))
            if states:
                self._write_states(conn, list(states.values()))
        committed = time.time()
        for r in windows.values():
            if r.get("last_ts"):
                self.metrics.end_to_end.observe(max(0.0, committed - r["last_ts"]))
        self.metrics.sink_rows.labels("terminal_health").inc(len(windows))
        self.metrics.sink_rows.labels("terminal_state").inc(len(states))
        return len(windows) + len(states)

    @staticmethod
    def _write_windows(
        conn: psycopg.Connection[tuple[Any, ...]], rows: list[dict[str, Any]]
    ) -> None:
        _copy_then_upsert(conn, _COPY_WINDOWS, map(_window_row, rows), _UPSERT_WINDOWS)

    @staticmethod
    def _write_states(
        conn: psycopg.Connection[tuple[Any, ...]], states: list[dict[str, Any]]
    ) -> None:
        _copy_then_upsert(conn, _COPY_STATES, map(_state_row, states), _UPSERT_STATES)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
