"""Named read queries: what dashboards and the merchant API ask of the database.

Kept next to the schema so a schema change and the reads it breaks are in
one review, and tested against the real database (tests/integration). They
read the rollup views (``telemetry_1m``/``telemetry_1h``), which have the same
columns on TimescaleDB and on plain PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, LiteralString

import psycopg
from psycopg.rows import dict_row

__all__ = ["QUERIES", "NamedQuery", "run"]


@dataclass(frozen=True)
class NamedQuery:
    name: str
    sql: LiteralString
    description: str


# The minute and the hour rollup views have the same columns: one query, two views.
_TERMINAL_TELEMETRY: LiteralString = """
            SELECT bucket, samples, battery_avg, battery_min, signal_avg_dbm, signal_min_dbm,
                   charging_samples
              FROM {view}
             WHERE terminal_id = %(terminal_id)s AND bucket >= %(start)s AND bucket < %(end)s
             ORDER BY bucket
            """

QUERIES: dict[str, NamedQuery] = {
    q.name: q
    for q in [
        NamedQuery(
            "fleet_online",
            """
            SELECT count(*) FILTER (WHERE online) AS online,
                   count(*) FILTER (WHERE NOT online) AS offline
              FROM terminal_state
            """,
            "terminals online and offline now",
        ),
        NamedQuery(
            "worst_terminals",
            """
            SELECT terminal_id, merchant_id, health_score, battery_level_pct, signal_dbm,
                   printer_paper, online, last_seen
              FROM terminal_state
             WHERE health_score IS NOT NULL
             ORDER BY health_score ASC, terminal_id
             LIMIT %(limit)s
            """,
            "the least healthy terminals, worst first",
        ),
        NamedQuery(
            "terminal_telemetry_1m",
            _TERMINAL_TELEMETRY.format(view="telemetry_1m"),
            "one terminal's battery and signal per minute",
        ),
        NamedQuery(
            "terminal_telemetry_1h",
            _TERMINAL_TELEMETRY.format(view="telemetry_1h"),
            "one terminal's battery and signal per hour",
        ),
        NamedQuery(
            "merchant_balances",
            """
            SELECT currency, pending_minor, available_minor, paid_out_minor, updated_at
              FROM merchant_balances
             WHERE merchant_id = %(merchant_id)s
             ORDER BY currency
            """,
            "a merchant's balances, one row per currency",
        ),
        NamedQuery(
            "merchant_cashflow_page",
            """
            SELECT seq, txn_id, kind, currency, amount_minor, pending_minor, available_minor,
                   paid_out_minor, occurred_at
              FROM cashflow_events
             WHERE merchant_id = %(merchant_id)s AND seq > %(after_seq)s
               AND occurred_at >= %(start)s AND occurred_at < %(end)s
             ORDER BY seq
             LIMIT %(limit)s
            """,
            "a page of a merchant's cash-flow events after a cursor (the last seq seen)",
        ),
        NamedQuery(
            "open_alerts_by_severity",
            """
            SELECT severity, count(*) AS open
              FROM alerts
             WHERE state <> 'resolved'
             GROUP BY severity
             ORDER BY severity
            """,
            "open alerts by severity",
        ),
        NamedQuery(
            "deadletters_by_reason",
            """
            SELECT reason, sum(count)::bigint AS count
              FROM deadletter_counts
             WHERE bucket >= %(start)s AND bucket < %(end)s
             GROUP BY reason
             ORDER BY count DESC, reason
            """,
            "dead letters by reason over a time range",
        ),
    ]
}


def run(conn: psycopg.Connection[Any], name: str, **params: Any) -> list[dict[str, Any]]:
    """Run a named query; rows as dicts."""
    query = QUERIES[name]
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query.sql, params)
        return cur.fetchall()
