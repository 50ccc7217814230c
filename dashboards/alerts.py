"""Alerts: what is open, acknowledged, resolved; by rule; how fast people react."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import stat, table, timeseries
from grafana_foundation_sdk.models import common

from dashboards._panels import TAGS, fixed_colour, reduce_last
from dashboards._targets import PG, Sql

__all__ = ["UID", "build"]

UID = "posflow-alerts"

# Open and acknowledged: now; resolved: within the range.
BY_STATE = Sql(
    """
    SELECT count(*) FILTER (WHERE state IN ('pending', 'firing')) AS open,
           count(*) FILTER (WHERE state = 'acknowledged') AS acknowledged,
           count(*) FILTER (WHERE state = 'resolved' AND $__timeFilter(resolved_at))
               AS resolved
      FROM alerts
    """,
    open="number",
    acknowledged="number",
    resolved="number",
)

# Alerts whose life overlaps the range, per rule; reaction times in seconds, from when the
# alert fired (or started, for one that never fired).
BY_RULE = Sql(
    """
    SELECT rule,
           count(*) FILTER (WHERE state IN ('pending', 'firing')) AS open,
           count(*) FILTER (WHERE state = 'acknowledged') AS acknowledged,
           count(*) FILTER (WHERE state = 'resolved') AS resolved,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM
               acknowledged_at - coalesce(fired_at, started_at))) AS ack_p50_s,
           percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM
               acknowledged_at - coalesce(fired_at, started_at))) AS ack_p90_s,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM
               resolved_at - coalesce(fired_at, started_at))) AS resolve_p50_s,
           percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM
               resolved_at - coalesce(fired_at, started_at))) AS resolve_p90_s
      FROM alerts
     WHERE started_at <= $__timeTo() AND coalesce(resolved_at, 'infinity') >= $__timeFrom()
     GROUP BY rule
     ORDER BY 2 DESC, rule
    """,
    rule="string",
    open="number",
    acknowledged="number",
    resolved="number",
    ack_p50_s="number",
    ack_p90_s="number",
    resolve_p50_s="number",
    resolve_p90_s="number",
)

STARTED = Sql(
    """
    SELECT $__timeGroupAlias(started_at, $__interval), severity AS metric, count(*) AS alerts
      FROM alerts
     WHERE $__timeFilter(started_at)
     GROUP BY 1, 2
     ORDER BY 1
    """,
    fmt="time_series",
    time_="time",
    metric="string",
    alerts="number",
)

# Mean time to acknowledge / resolve of the alerts acknowledged / resolved per bucket (the
# macro cannot take an expression with parentheses: the subquery names it).
REACTION = Sql(
    """
    SELECT $__timeGroupAlias(done_at, $__interval),
           avg(extract(epoch FROM acknowledged_at - raised_at)) AS time_to_acknowledge_s,
           avg(extract(epoch FROM resolved_at - raised_at)) AS time_to_resolve_s
      FROM (SELECT coalesce(resolved_at, acknowledged_at) AS done_at, acknowledged_at,
                   resolved_at, coalesce(fired_at, started_at) AS raised_at
              FROM alerts
             WHERE acknowledged_at IS NOT NULL OR resolved_at IS NOT NULL) AS reacted
     WHERE $__timeFilter(done_at)
     GROUP BY 1
     ORDER BY 1
    """,
    fmt="time_series",
    time_="time",
    time_to_acknowledge_s="number",
    time_to_resolve_s="number",
)

OPEN_LIST = Sql(
    """
    SELECT started_at AS "time", severity, rule, subject_kind, subject_id, merchant_id,
           state, summary, acknowledged_by
      FROM alerts
     WHERE state <> 'resolved'
     ORDER BY CASE severity WHEN 'critical' THEN 0 WHEN 'warning' THEN 1 ELSE 2 END,
              started_at
    """,
    time_="time",
    severity="string",
    rule="string",
    subject_kind="string",
    subject_id="string",
    merchant_id="string",
    state="string",
    summary="string",
    acknowledged_by="string",
)


def build() -> db.Dashboard:
    return (
        db.Dashboard("posflow · Alerts")
        .uid(UID)
        .tags(TAGS)
        .description("Open, acknowledged and resolved alerts, by rule, and reaction times.")
        .time("now-7d", "now")
        .refresh("1m")
        .with_panel(
            stat.Panel()
            .title("Open · acknowledged · resolved in range")
            .datasource(PG)
            .with_target(BY_STATE)
            .reduce_options(reduce_last())
            .color_mode(common.BigValueColorMode.VALUE)
            .graph_mode(common.BigValueGraphMode.NONE)
            .override_by_name("open", fixed_colour("red"))
            .override_by_name("acknowledged", fixed_colour("orange"))
            .override_by_name("resolved", fixed_colour("green"))
            .height(5)
            .span(8)
        )
        .with_panel(
            timeseries.Panel()
            .title("Alerts started, by severity")
            .datasource(PG)
            .with_target(STARTED)
            .height(5)
            .span(16)
        )
        .with_panel(
            table.Panel()
            .title("By rule (reaction times in seconds)")
            .datasource(PG)
            .with_target(BY_RULE)
            .height(8)
            .span(24)
        )
        .with_panel(
            timeseries.Panel()
            .title("Time to acknowledge and to resolve")
            .datasource(PG)
            .with_target(REACTION)
            .unit("s")
            .height(8)
            .span(24)
        )
        .with_panel(
            table.Panel()
            .title("Open alerts")
            .datasource(PG)
            .with_target(OPEN_LIST)
            .height(10)
            .span(24)
        )
    )
