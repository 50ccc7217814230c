"""Terminal drill-down: one terminal's readings, payments, health, alerts and status."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import statetimeline, table, timeseries

from dashboards._panels import TAGS, health_thresholds, sql_variable, steps, value_colours
from dashboards._targets import PG, Sql

__all__ = ["UID", "build"]

UID = "posflow-terminal"

# Grafana shows __text and puts __value in $terminal.
TERMINALS = (
    "SELECT terminal_id AS __value, terminal_id || ' · ' || merchant_id AS __text"
    " FROM terminal_state ORDER BY terminal_id"
)

BATTERY = Sql(
    """
    SELECT $__timeGroupAlias(ts, $__interval), avg(battery_level_pct) AS battery_pct
      FROM telemetry
     WHERE terminal_id = '$terminal' AND $__timeFilter(ts)
     GROUP BY 1
     ORDER BY 1
    """,
    fmt="time_series",
    time_="time",
    battery_pct="number",
)

SIGNAL = Sql(
    """
    SELECT $__timeGroupAlias(ts, $__interval), avg(signal_dbm) AS signal_dbm,
           min(signal_dbm) AS signal_min_dbm
      FROM telemetry
     WHERE terminal_id = '$terminal' AND $__timeFilter(ts)
     GROUP BY 1
     ORDER BY 1
    """,
    fmt="time_series",
    time_="time",
    signal_dbm="number",
    signal_min_dbm="number",
)

# One series per outcome (approved, declined, error, timeout ...): the "metric" column.
PAYMENTS = Sql(
    """
    SELECT $__timeGroupAlias(ts, $__interval), status AS metric, count(*) AS payments
      FROM transactions
     WHERE terminal_id = '$terminal' AND $__timeFilter(ts)
     GROUP BY 1, 2
     ORDER BY 1
    """,
    fmt="time_series",
    time_="time",
    metric="string",
    payments="number",
)

HEALTH = Sql(
    """
    SELECT window_start AS "time", score, signal_score, battery_score, txn_score, printer_score
      FROM terminal_health
     WHERE terminal_id = '$terminal' AND $__timeFilter(window_start)
     ORDER BY 1
    """,
    fmt="time_series",
    time_="time",
    score="number",
    signal_score="number",
    battery_score="number",
    txn_score="number",
    printer_score="number",
)

# Status over time: each health window as a band (healthy / degraded / poor), and the
# terminal's offline spells from its terminal_offline alert (started when the terminal
# went offline or silent, resolved when it spoke again). Gaps are silence.
STATUS_HISTORY = Sql(
    """
    SELECT "time", status FROM (
        SELECT window_start AS "time",
               CASE WHEN score >= 80 THEN 'healthy' WHEN score >= 50 THEN 'degraded'
                    ELSE 'poor' END AS status
          FROM terminal_health
         WHERE terminal_id = '$terminal' AND $__timeFilter(window_start)
        UNION ALL
        SELECT started_at, 'offline'
          FROM alerts
         WHERE rule = 'terminal_offline' AND subject_id = '$terminal'
           AND $__timeFilter(started_at)
        UNION ALL
        SELECT resolved_at, 'back online'
          FROM alerts
         WHERE rule = 'terminal_offline' AND subject_id = '$terminal'
           AND resolved_at IS NOT NULL AND $__timeFilter(resolved_at)
    ) AS history
     ORDER BY 1
    """,
    fmt="time_series",
    time_="time",
    status="string",
)

CURRENT = Sql(
    """
    SELECT online, last_seen, status_changed_at, health_score, battery_level_pct, charging,
           signal_type, signal_dbm, carrier, printer_paper, app_version, firmware_version
      FROM terminal_state
     WHERE terminal_id = '$terminal'
    """,
    online="bool",
    last_seen="time",
    status_changed_at="time",
    health_score="number",
    battery_level_pct="number",
    charging="bool",
    signal_type="string",
    signal_dbm="number",
    carrier="string",
    printer_paper="string",
    app_version="string",
    firmware_version="string",
)

# Alerts whose life overlaps the range, newest first.
ALERTS = Sql(
    """
    SELECT started_at AS "time", rule, severity, state, summary, fired_at, acknowledged_at,
           acknowledged_by, resolved_at
      FROM alerts
     WHERE subject_kind = 'terminal' AND subject_id = '$terminal'
       AND started_at <= $__timeTo() AND coalesce(resolved_at, 'infinity') >= $__timeFrom()
     ORDER BY started_at DESC
    """,
    time_="time",
    rule="string",
    severity="string",
    state="string",
    summary="string",
    fired_at="time",
    acknowledged_at="time",
    acknowledged_by="string",
    resolved_at="time",
)


def build() -> db.Dashboard:
    return (
        db.Dashboard("posflow · Terminal")
        .uid(UID)
        .tags(TAGS)
        .description("One terminal: battery, signal, payments, health and alerts over time.")
        .time("now-6h", "now")
        .refresh("30s")
        .with_variable(sql_variable("terminal", "Terminal", TERMINALS))
        .with_panel(
            table.Panel().title("Now").datasource(PG).with_target(CURRENT).height(4).span(24)
        )
        .with_panel(
            timeseries.Panel()
            .title("Battery")
            .datasource(PG)
            .with_target(BATTERY)
            .unit("percent")
            .min(0)
            .max(100)
            .height(8)
            .span(12)
        )
        .with_panel(
            timeseries.Panel()
            .title("Signal")
            .datasource(PG)
            .with_target(SIGNAL)
            .unit("dBm")
            .height(8)
            .span(12)
        )
        .with_panel(
            timeseries.Panel()
            .title("Payments by outcome")
            .datasource(PG)
            .with_target(PAYMENTS)
            .height(8)
            .span(12)
        )
        .with_panel(
            timeseries.Panel()
            .title("Health score and components")
            .datasource(PG)
            .with_target(HEALTH)
            .min(0)
            .max(100)
            .thresholds(health_thresholds())
            .height(8)
            .span(12)
        )
        .with_panel(
            statetimeline.Panel()
            .title("Status history")
            .datasource(PG)
            .with_target(STATUS_HISTORY)
            .thresholds(steps([(None, "green")]))
            .override_by_name(
                "status",
                value_colours(
                    {
                        "healthy": "green",
                        "degraded": "orange",
                        "poor": "red",
                        "offline": "dark-red",
                        "back online": "blue",
                    }
                ),
            )
            .height(5)
            .span(24)
        )
        .with_panel(
            table.Panel().title("Alerts").datasource(PG).with_target(ALERTS).height(8).span(24)
        )
    )
