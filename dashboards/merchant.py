"""Merchant view: money in (gross, fees, net), balances, payment mix, its terminals."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import piechart, table, timeseries
from grafana_foundation_sdk.models import piechart as piechart_model

from dashboards._panels import (
    TAGS,
    health_thresholds,
    link,
    links_to,
    reduce_last,
    sql_variable,
)
from dashboards._targets import PG, Sql

__all__ = ["UID", "build"]

UID = "posflow-merchant"

# Grafana shows __text and puts __value in $merchant.
MERCHANTS = (
    "SELECT merchant_id AS __value, name || ' (' || merchant_id || ')' AS __text"
    " FROM merchants ORDER BY merchant_id"
)

# Money stays in integer minor units per currency (the "metric" column): no float, no sum
# across currencies.
MONEY = Sql(
    """
    SELECT $__timeGroupAlias(occurred_at, $__interval), currency::text AS metric,
           sum(gross_minor)::bigint AS gross_minor, sum(fee_minor)::bigint AS fee_minor,
           sum(net_minor)::bigint AS net_minor
      FROM ledger_entries
     WHERE merchant_id = '$merchant' AND $__timeFilter(occurred_at)
     GROUP BY 1, 2
     ORDER BY 1
    """,
    fmt="time_series",
    time_="time",
    metric="string",
    gross_minor="number",
    fee_minor="number",
    net_minor="number",
)

# The balances after every ledger change, from the cash-flow events.
BALANCES = Sql(
    """
    SELECT occurred_at AS "time", currency::text AS metric, pending_minor, available_minor,
           paid_out_minor
      FROM cashflow_events
     WHERE merchant_id = '$merchant' AND $__timeFilter(occurred_at)
     ORDER BY occurred_at, seq
    """,
    fmt="time_series",
    time_="time",
    metric="string",
    pending_minor="number",
    available_minor="number",
    paid_out_minor="number",
)

BALANCES_NOW = Sql(
    """
    SELECT currency::text AS currency, pending_minor, available_minor, paid_out_minor,
           updated_at
      FROM merchant_balances
     WHERE merchant_id = '$merchant'
     ORDER BY currency
    """,
    currency="string",
    pending_minor="number",
    available_minor="number",
    paid_out_minor="number",
    updated_at="time",
)

PAYMENT_MIX = Sql(
    """
    SELECT scheme || ' · ' || entry_mode AS mix, count(*) AS payments
      FROM transactions
     WHERE merchant_id = '$merchant' AND $__timeFilter(ts) AND status = 'approved'
     GROUP BY 1
     ORDER BY 2 DESC, 1
    """,
    mix="string",
    payments="number",
)

TERMINALS = Sql(
    """
    SELECT t.terminal_id, t.model, s.online, s.health_score, s.battery_level_pct,
           s.signal_dbm, s.printer_paper, s.app_version, s.last_seen
      FROM terminals AS t
      LEFT JOIN terminal_state AS s USING (terminal_id)
     WHERE t.merchant_id = '$merchant'
     ORDER BY s.health_score NULLS FIRST, t.terminal_id
    """,
    terminal_id="string",
    model="string",
    online="bool",
    health_score="number",
    battery_level_pct="number",
    signal_dbm="number",
    printer_paper="string",
    app_version="string",
    last_seen="time",
)

TERMINAL_HEALTH = Sql(
    """
    SELECT $__timeGroupAlias(window_start, $__interval), terminal_id AS metric,
           avg(score) AS score
      FROM terminal_health
     WHERE merchant_id = '$merchant' AND $__timeFilter(window_start)
     GROUP BY 1, 2
     ORDER BY 1
    """,
    fmt="time_series",
    time_="time",
    metric="string",
    score="number",
)


def build() -> db.Dashboard:
    to_terminal = link("Terminal drill-down", "posflow-terminal", "var-terminal=${__value.raw}")
    return (
        db.Dashboard("posflow · Merchant")
        .uid(UID)
        .tags(TAGS)
        .description(
            "One merchant: gross, fees and net (integer minor units per currency), balances, "
            "payment mix, its terminals and their health."
        )
        .time("now-24h", "now")
        .refresh("1m")
        .with_variable(sql_variable("merchant", "Merchant", MERCHANTS))
        .with_panel(
            timeseries.Panel()
            .title("Gross, fees, net (minor units)")
            .datasource(PG)
            .with_target(MONEY)
            .decimals(0)
            .height(8)
            .span(12)
        )
        .with_panel(
            timeseries.Panel()
            .title("Balances (minor units)")
            .datasource(PG)
            .with_target(BALANCES)
            .decimals(0)
            .height(8)
            .span(12)
        )
        .with_panel(
            table.Panel()
            .title("Balances now (minor units)")
            .datasource(PG)
            .with_target(BALANCES_NOW)
            .height(6)
            .span(12)
        )
        .with_panel(
            piechart.Panel()
            .title("Payment mix (approved: scheme · entry mode)")
            .datasource(PG)
            .with_target(PAYMENT_MIX)
            .pie_type(piechart_model.PieChartType.PIE)
            .reduce_options(reduce_last(values=True))
            .height(6)
            .span(12)
        )
        .with_panel(
            table.Panel()
            .title("Terminals")
            .datasource(PG)
            .with_target(TERMINALS)
            .thresholds(health_thresholds())
            .override_by_name("terminal_id", links_to(to_terminal))
            .height(8)
            .span(12)
        )
        .with_panel(
            timeseries.Panel()
            .title("Health of its terminals")
            .datasource(PG)
            .with_target(TERMINAL_HEALTH)
            .min(0)
            .max(100)
            .thresholds(health_thresholds())
            .height(8)
            .span(12)
        )
    )
