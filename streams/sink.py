"""Health rows and terminal state into the database, in batches.

Open windows are upserted as they fill (so a person sees a terminal's minute
within a second), and their final record replaces them at close; the
terminal's current state is upserted alongside. Every write is an upsert on
its key, so a replay after a worker restart writes the same rows again.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import psycopg

from streams.metrics import StreamMetrics

__all__ = ["HealthSink"]


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


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
        conn = self._conn
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = off")
            if windows:
                rows = list(windows.values())
                conn.execute(
                    """
                    INSERT INTO terminal_health AS h (window_start, window_end, terminal_id,
                        merchant_id, score, signal_score, battery_score, txn_score,
                        printer_score, details)
                    SELECT * FROM unnest(%s::timestamptz[], %s::timestamptz[], %s::text[],
                        %s::text[], %s::smallint[], %s::smallint[], %s::smallint[],
                        %s::smallint[], %s::smallint[], %s::jsonb[])
                    ON CONFLICT (terminal_id, window_start) DO UPDATE SET
                        score = excluded.score, signal_score = excluded.signal_score,
                        battery_score = excluded.battery_score, txn_score = excluded.txn_score,
                        printer_score = excluded.printer_score, details = excluded.details
                    WHERE NOT coalesce((h.details->>'final')::boolean, false)
                       OR coalesce((excluded.details->>'final')::boolean, false)
                    """,
                    [
                        [_ts(r["window_start"]) for r in rows],
                        [_ts(r["window_end"]) for r in rows],
                        [r["terminal_id"] for r in rows],
                        [r["merchant_id"] for r in rows],
                        [r["score"] for r in rows],
                        [r["components"]["signal"] for r in rows],
                        [r["components"]["battery"] for r in rows],
                        [r["components"]["txn"] for r in rows],
                        [r["components"]["printer"] for r in rows],
                        [
                            json.dumps({"final": r["final"], "reasons": r["reasons"], **r["facts"]})
                            for r in rows
                        ],
                    ],
                )
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
    def _write_states(
        conn: psycopg.Connection[tuple[Any, ...]], states: list[dict[str, Any]]
    ) -> None:
        cur = [s.get("current", {}) for s in states]
        conn.execute(
            """
            INSERT INTO terminal_state (terminal_id, merchant_id, online, last_seen,
                status_changed_at, battery_level_pct, charging, signal_type, signal_dbm, carrier,
                printer_paper, lat, lon, app_version, firmware_version, health_score, updated_at)
            SELECT *, now() FROM unnest(%s::text[], %s::text[], %s::boolean[],
                %s::timestamptz[], %s::timestamptz[], %s::smallint[], %s::boolean[], %s::text[],
                %s::smallint[], %s::text[], %s::text[], %s::float8[], %s::float8[], %s::text[],
                %s::text[], %s::smallint[])
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
            """,
            [
                [s["terminal_id"] for s in states],
                [s["merchant_id"] for s in states],
                [s["online"] for s in states],
                [_ts(s["watermark"] or s["last_heard"]) for s in states],
                [_ts(s["status_changed_at"]) if s.get("status_changed_at") else None
                 for s in states],
                [c.get("battery") for c in cur],
                [c.get("charging") for c in cur],
                [c.get("signal_type") for c in cur],
                [c.get("signal_dbm") for c in cur],
                [c.get("carrier") for c in cur],
                [c.get("printer") for c in cur],
                [c.get("lat") for c in cur],
                [c.get("lon") for c in cur],
                [c.get("app_version") for c in cur],
                [c.get("firmware_version") for c in cur],
                [s.get("health_score") for s in states],
            ],
        )  # fmt: skip

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
