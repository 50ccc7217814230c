"""Merchant view: money in (gross, fees, net), balances, payouts, what the ledger did with
each payment (applied, no money, parked, flagged, quarantined), payment mix, its terminals."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import piechart, stat, table, timeseries
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import piechart as piechart_model

from dashboards._panels import (
    TAGS,
    health_thresholds,
    link,
    links_to,
    reduce_last,
    sql_variable,
    steps,
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
# across currencies. Only rows that moved money: a declined, parked or flagged row keeps
# the amounts it would have posted, and must not count.
MONEY = Sql(
    """
    SELECT $__timeGroupAlias(occurred_at, $__interval), currency::text AS metric,
           sum(gross_minor)::bigint AS gross_minor, sum(fee_minor)::bigint AS fee_minor,
           sum(net_minor)::bigint AS net_minor
      FROM ledger_entries
     WHERE merchant_id = '$merchant' AND $__timeFilter(occurred_at) AND effect = 'applied'
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

# What the ledger did with the merchant's transactions in the range (settlement effects).
LEDGER_EFFECTS = Sql(
    """
    SELECT effect, currency::text AS currency, count(*) AS entries,
           sum(net_minor)::bigint AS net_minor
      FROM ledger_entries
     WHERE merchant_id = '$merchant' AND $__timeFilter(occurred_at)
     GROUP BY 1, 2
     ORDER BY 1, 2
    """,
    effect="string",
    currency="string",
    entries="number",
    net_minor="number",
)

# Integrity findings recorded in the range: flagged rows (a rule broken, nothing applied)
# and quarantined copies (a known id with another body; the first body stays).
INTEGRITY_COUNTS = Sql(
    """
    SELECT (SELECT count(*) FROM ledger_entries
             WHERE merchant_id = '$merchant' AND effect = 'flagged'
               AND $__timeFilter(recorded_at)) AS flagged,
           (SELECT count(*) FROM ledger_quarantine
             WHERE merchant_id = '$merchant' AND $__timeFilter(recorded_at)) AS quarantined
    """,
    flagged="number",
    quarantined="number",
)

INTEGRITY_LIST = Sql(
    """
    SELECT recorded_at, 'flagged' AS finding, txn_id, txn_type, currency::text AS currency,
           gross_minor AS amount_minor, flag_reason AS reason
      FROM ledger_entries
     WHERE merchant_id = '$merchant' AND effect = 'flagged' AND $__timeFilter(recorded_at)
    UNION ALL
    SELECT recorded_at, 'quarantined', txn_id, body->>'type', body->>'currency',
           (body->>'amount_minor')::bigint, reason
      FROM ledger_quarantine
     WHERE merchant_id = '$merchant' AND $__timeFilter(recorded_at)
     ORDER BY 1 DESC, 3
     LIMIT 200
    """,
    recorded_at="time",
    finding="string",
    txn_id="string",
    txn_type="string",
    currency="string",
    amount_minor="number",
    reason="string",
)

# Payouts are the cash-flow events of kind 'payout' (available -> paid out).
PAYOUTS = Sql(
    """
    SELECT occurred_at, seq, currency::text AS currency, amount_minor AS payout_minor,
           available_minor AS available_after_minor, paid_out_minor AS paid_out_after_minor
      FROM cashflow_events
     WHERE merchant_id = '$merchant' AND kind = 'payout' AND $__timeFilter(occurred_at)
     ORDER BY occurred_at DESC, seq DESC
     LIMIT 200
    """,
    occurred_at="time",
    seq="number",
    currency="string",
    payout_minor="number",
    available_after_minor="number",
    paid_out_after_minor="number",
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
            "payouts, ledger effects, flagged and quarantined transactions, payment mix, its "
            "terminals and their health."
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
            table.Panel()
            .title("Payouts (minor units)")
            .datasource(PG)
            .with_target(PAYOUTS)
            .height(6)
            .span(12)
        )
        .with_panel(
            table.Panel()
            .title("Ledger effects (rows and net minor units)")
            .description(
                "applied: moved money; no_money: declined, preauth; parked: waiting for its "
                "original; flagged: a rule broken, recorded but not applied"
            )
            .datasource(PG)
            .with_target(LEDGER_EFFECTS)
            .height(6)
            .span(12)
        )
        .with_panel(
            stat.Panel()
            .title("Flagged · quarantined")
            .datasource(PG)
            .with_target(INTEGRITY_COUNTS)
            .reduce_options(reduce_last())
            .thresholds(steps([(None, "green"), (1, "red")]))
            .color_mode(common.BigValueColorMode.BACKGROUND)
            .graph_mode(common.BigValueGraphMode.NONE)
            .height(6)
            .span(12)
        )
        .with_panel(
            table.Panel()
            .title("Flagged and quarantined transactions")
            .datasource(PG)
            .with_target(INTEGRITY_LIST)
            .height(6)
            .span(24)
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
