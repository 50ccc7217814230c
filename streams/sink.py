"""Health rows and terminal state into the database, in batches.

Open windows are upserted as they fill, at the sink's cadence (so a person sees a
terminal's minute within a second), and their final record replaces them at close;
the terminal's current state is upserted alongside. Every write is an upsert on
its key, so a replay after a worker restart writes the same rows again.

:meth:`HealthSink.take` turns what is buffered into rows on the event loop's thread
(the states are the worker's live objects, changed by the agents);
:meth:`HealthSink.write` sends them, blocking, from a thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg

from streams.metrics import StreamMetrics
from streams.state import TerminalState

__all__ = ["HealthSink", "Rows"]


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


def _window_row(r: dict[str, Any]) -> tuple[Any, ...]:
    c = r["components"]
    return (
        _ts(r["window_start"]), _ts(r["window_end"]), r["terminal_id"], r["merchant_id"],
        r["score"], c["signal"], c["battery"], c["txn"], c["printer"],
        orjson.dumps({"final": r["final"], "reasons": r["reasons"], **r["facts"]}).decode(),
    )  # fmt: skip


def _state_row(s: TerminalState | Mapping[str, Any]) -> tuple[Any, ...]:
    if isinstance(s, TerminalState):
        c = s.current
        changed = s.status_changed_at
        return (
            s.terminal_id, s.merchant_id, s.online, _ts(s.watermark or s.last_heard),
            _ts(changed) if changed else None, c.battery, c.charging, c.signal_type,
            c.signal_dbm, c.carrier, c.printer, c.lat, c.lon, c.app_version,
            c.firmware_version, s.health_score,
        )  # fmt: skip
    m = s.get("current", {})  # a state given as a mapping (tests, tools)
    changed = s.get("status_changed_at")
    return (
        s["terminal_id"], s["merchant_id"], s["online"], _ts(s["watermark"] or s["last_heard"]),
        _ts(changed) if changed else None, m.get("battery"), m.get("charging"),
        m.get("signal_type"), m.get("signal_dbm"), m.get("carrier"), m.get("printer"),
        m.get("lat"), m.get("lon"), m.get("app_version"), m.get("firmware_version"),
        s.get("health_score"),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Rows:
    """One flush's rows, ready for COPY, and the windows' last event times (latency)."""

    windows: list[tuple[Any, ...]]
    states: list[tuple[Any, ...]]
    last_ts: list[float]

    def __len__(self) -> int:
        return len(self.windows) + len(self.states)


class HealthSink:
    def __init__(self, dsn: str, metrics: StreamMetrics) -> None:
        self.dsn = dsn
        self.metrics = metrics
        self._windows: dict[tuple[str, int], dict[str, Any]] = {}
        self._states: dict[str, TerminalState | Mapping[str, Any]] = {}
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def add_window(self, record: dict[str, Any]) -> None:
        key = (record["terminal_id"], record["window_start"])
        if self._windows.get(key, {}).get("final") and not record.get("final"):
            return  # never replace a final record with a provisional one
        self._windows[key] = record

    def add_state(self, state: TerminalState | Mapping[str, Any]) -> None:
        """Write this state at the next flush (as it is then: the last change wins)."""
        key = state.terminal_id if isinstance(state, TerminalState) else state["terminal_id"]
        self._states[key] = state

    def pending(self) -> int:
        return len(self._windows) + len(self._states)

    def take(self) -> Rows:
        """What is buffered, as rows (on the thread that changes the states)."""
        windows, self._windows = self._windows, {}
        states, self._states = self._states, {}
        return Rows(
            [_window_row(r) for r in windows.values()],
            [_state_row(s) for s in states.values()],
            [r["last_ts"] for r in windows.values() if r.get("last_ts")],
        )

    def flush(self) -> int:
        """Write what is buffered in one transaction (blocking)."""
        return self.write(self.take())

    def write(self, rows: Rows) -> int:
        """Write rows taken by :meth:`take` in one transaction (blocking: run it in a thread)."""
        if not rows:
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
            if rows.windows:
                self._write_windows(conn, rows.windows)
            if rows.states:
                self._write_states(conn, rows.states)
        committed = time.time()
        for last_ts in rows.last_ts:
            self.metrics.end_to_end.observe(max(0.0, committed - last_ts))
        self.metrics.sink_rows.labels("terminal_health").inc(len(rows.windows))
        self.metrics.sink_rows.labels("terminal_state").inc(len(rows.states))
        return len(rows)

    @staticmethod
    def _write_windows(
        conn: psycopg.Connection[tuple[Any, ...]], rows: list[tuple[Any, ...]]
    ) -> None:
        _copy_then_upsert(conn, _COPY_WINDOWS, rows, _UPSERT_WINDOWS)

    @staticmethod
    def _write_states(
        conn: psycopg.Connection[tuple[Any, ...]], rows: list[tuple[Any, ...]]
    ) -> None:
        _copy_then_upsert(conn, _COPY_STATES, rows, _UPSERT_STATES)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
