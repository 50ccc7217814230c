"""Pipeline: the services' own Prometheus metrics, plus the dead letters stored in SQL.

One row per service: ingest (9401), health streams (9402), settlement (9404), the
alert engine (9403), the merchant API (8400), then Kafka consumer lag
(``posflow_consumer_lag``, exported by every service that consumes with aiokafka).
Only metrics the services export appear here: the integration test starts each
service and checks every name against its real scrape.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import stat, timeseries
from grafana_foundation_sdk.models import common

from dashboards._panels import TAGS, steps
from dashboards._targets import PG, PROM, Sql, prom

__all__ = ["UID", "build"]

UID = "posflow-pipeline"

RATE = "$__rate_interval"


def _quantiles(histogram: str) -> list[object]:
    return [
        prom(
            f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket[{RATE}])))",
            f"p{round(q * 100)}",
            ref_id=ref,
        )
        for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
    ]


DEADLETTERS_STORED = Sql(
    """
    SELECT $__timeGroupAlias(bucket, $__interval), reason AS metric,
           sum(count)::bigint AS dead_letters
      FROM deadletter_counts
     WHERE $__timeFilter(bucket)
     GROUP BY 1, 2
     ORDER BY 1
    """,
    fmt="time_series",
    time_="time",
    metric="string",
    dead_letters="number",
)


def _series(title: str, *targets: object, unit: str = "", w: int = 12) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).datasource(PROM).height(8).span(w)
    for target in targets:
        panel = panel.with_target(target)  # type: ignore[arg-type]
    return panel.unit(unit) if unit else panel


def _rates(metric: str, by: str, legend: str, ref_id: str) -> object:
    grouping = f"sum by ({by})" if by else "sum"
    return prom(f"{grouping} (rate({metric}[{RATE}]))", legend, ref_id=ref_id)


def build() -> db.Dashboard:
    dash = (
        db.Dashboard("posflow · Pipeline")
        .uid(UID)
        .tags(TAGS)
        .description(
            "Ingest, dead letters, health streams, settlement, alert engine, merchant API, "
            "latencies and Kafka consumer lag."
        )
        .time("now-1h", "now")
        .refresh("10s")
        .with_row(db.Row("Services and ingest (posflow ingest)"))
        .with_panel(
            stat.Panel()
            .title("Services up")
            .datasource(PROM)
            .with_target(prom('up{job=~"posflow-.*"}', "{{job}}"))
            .color_mode(common.BigValueColorMode.BACKGROUND)
            .graph_mode(common.BigValueGraphMode.NONE)
            .thresholds(steps([(None, "red"), (1, "green")]))
            .height(4)
            .span(12)
        )
        .with_panel(
            stat.Panel()
            .title("Ingest ready · terminals in stream state")
            .datasource(PROM)
            .with_target(prom("min(posflow_ingest_ready)", "ingest ready", ref_id="A"))
            .with_target(prom("sum(posflow_streams_terminals)", "terminals", ref_id="B"))
            .graph_mode(common.BigValueGraphMode.AREA)
            .height(4)
            .span(12)
        )
        .with_panel(
            _series(
                "Ingest rate by kind",
                prom(f"sum by (kind) (rate(posflow_ingest_received_total[{RATE}]))", "{{kind}}"),
                unit="reqps",
            )
        )
        .with_panel(
            _series(
                "Records acknowledged by Kafka, by topic",
                prom(f"sum by (topic) (rate(posflow_ingest_produced_total[{RATE}]))", "{{topic}}"),
                unit="reqps",
            )
        )
        .with_panel(
            _series(
                "Dead letters by reason (ingest)",
                prom(
                    f"sum by (reason) (rate(posflow_ingest_dead_lettered_total[{RATE}]))",
                    "{{reason}}",
                ),
                unit="reqps",
            )
        )
        .with_panel(
            timeseries.Panel()
            .title("Dead letters by reason (stored counts)")
            .datasource(PG)
            .with_target(DEADLETTERS_STORED)
            .height(8)
            .span(12)
        )
        .with_panel(
            _series(
                "Kafka produce errors (retried) and messages in flight",
                prom(
                    f"sum by (error) (rate(posflow_ingest_kafka_errors_total[{RATE}]))",
                    "error {{error}}",
                    ref_id="A",
                ),
                prom("sum(posflow_ingest_inflight)", "in flight", ref_id="B"),
            )
        )
        .with_panel(
            _series(
                "MQTT to Kafka acknowledgement latency",
                *_quantiles("posflow_ingest_produce_latency_seconds"),
                unit="s",
            )
        )
        .with_row(db.Row("Health streams (posflow streams worker)"))
        .with_panel(
            _series(
                "Stream events by type, late and replayed",
                prom(
                    f"sum by (type) (rate(posflow_streams_events_total[{RATE}]))",
                    "{{type}}",
                    ref_id="A",
                ),
                prom(f"sum(rate(posflow_streams_late_total[{RATE}]))", "late", ref_id="B"),
                prom(f"sum(rate(posflow_streams_replays_total[{RATE}]))", "replayed", ref_id="C"),
                unit="reqps",
            )
        )
        .with_panel(
            _series(
                "Stream batch size (events per batch) and rows written",
                prom(
                    f"sum(rate(posflow_streams_events_total[{RATE}]))"
                    f" / sum(rate(posflow_streams_batch_seconds_count[{RATE}]))",
                    "events per batch",
                    ref_id="A",
                ),
                prom(
                    f"sum by (table) (rate(posflow_streams_sink_rows_total[{RATE}]))",
                    "rows/s {{table}}",
                    ref_id="B",
                ),
            )
        )
        .with_panel(
            _series(
                "Stream batch processing latency",
                *_quantiles("posflow_streams_batch_seconds"),
                unit="s",
            )
        )
        .with_panel(
            _series(
                "End-to-end latency: terminal timestamp to health row committed",
                *_quantiles("posflow_streams_end_to_end_seconds"),
                unit="s",
            )
        )
        .with_panel(
            _series(
                "Windows closed and online/offline changes",
                prom(
                    f"sum(rate(posflow_streams_windows_closed_total[{RATE}]))",
                    "windows closed",
                    ref_id="A",
                ),
                prom(
                    f"sum by (to) (rate(posflow_streams_state_changes_total[{RATE}]))",
                    "to {{to}}",
                    ref_id="B",
                ),
                w=24,
            )
        )
    )
    for section in (_rawsink, _settlement, _alerts, _api, _webhooks, _lag):
        dash = section(dash)
    return dash


def _rawsink(dash: db.Dashboard) -> db.Dashboard:
    m = "posflow_rawsink"
    return (
        dash.with_row(db.Row("Raw storage sink (posflow streams sink)"))
        .with_panel(
            _series(
                "Rows stored by table; replays; dead letters; failed batch writes",
                _rates(f"{m}_rows_total", "table", "stored {{table}}", "A"),
                _rates(f"{m}_replayed_total", "table", "replayed {{table}}", "B"),
                _rates(f"{m}_dead_letters_total", "reason", "dead letter {{reason}}", "C"),
                _rates(f"{m}_db_errors_total", "", "failed batch writes (retried)", "D"),
                unit="reqps",
            )
        )
        .with_panel(
            _series(
                "Writer batch size (Kafka records per batch)",
                *[
                    prom(
                        f"histogram_quantile({q}, sum by (le)"
                        f" (rate({m}_batch_records_bucket[{RATE}])))",
                        f"p{round(q * 100)}",
                        ref_id=ref,
                    )
                    for q, ref in ((0.5, "A"), (0.95, "B"))
                ],
                prom(
                    f"sum(rate({m}_batch_records_sum[{RATE}]))"
                    f" / sum(rate({m}_batch_records_count[{RATE}]))",
                    "mean",
                    ref_id="C",
                ),
            ).decimals(0)
        )
        .with_panel(
            _series(
                "Writer batch latency (both writers, to the database commit)",
                *_quantiles(f"{m}_batch_write_seconds"),
                unit="s",
            )
        )
        .with_panel(
            _series(
                "End-to-end: terminal timestamp to raw row committed (p99 by table)",
                prom(
                    "histogram_quantile(0.99, sum by (le, table)"
                    f' (rate({m}_end_to_end_seconds_bucket{{since="terminal"}}[{RATE}])))',
                    "p99 {{table}}",
                    ref_id="A",
                ),
                prom(
                    "histogram_quantile(0.5, sum by (le, table)"
                    f' (rate({m}_end_to_end_seconds_bucket{{since="terminal"}}[{RATE}])))',
                    "p50 {{table}}",
                    ref_id="B",
                ),
                unit="s",
            )
        )
        .with_panel(
            _series(
                "Batches awaiting the WAL flush (above a few: PostgreSQL is not flushing)",
                prom(f"sum({m}_batches_awaiting_flush)", "batches", ref_id="A"),
                prom(
                    f"time() - max({m}_last_batch_timestamp > 0)", "s since last batch", ref_id="B"
                ),
                w=24,
            )
        )
        .with_panel(
            _series(
                "TimescaleDB policy jobs run by the sink's upkeep, by outcome (failed: look)",
                prom(
                    f"sum by (job, outcome) (increase({m}_storage_job_runs_total[1h]))",
                    "{{job}} {{outcome}}",
                    ref_id="A",
                ),
            ).decimals(0)
        )
        .with_panel(
            _series(
                "TimescaleDB scheduler: failures it recorded per job (this PostgreSQL build"
                " records false failures; trust the sink's runs and the data)",
                prom(f"max by (job) ({m}_scheduler_job_failures)", "{{job}}", ref_id="A"),
            ).decimals(0)
        )
    )


def _webhooks(dash: db.Dashboard) -> db.Dashboard:
    m = "posflow_webhook"
    return (
        dash.with_row(db.Row("Merchant webhooks (posflow api webhooks deliver)"))
        .with_panel(
            _series(
                "Webhook attempts by outcome; endpoints parked (dead, revoked)",
                _rates(f"{m}_attempts_total", "outcome", "{{outcome}}", "A"),
                _rates(f"{m}_parked_total", "state", "parked {{state}}", "B"),
                unit="reqps",
            )
        )
        .with_panel(
            _series(
                "Webhook POST latency (sent to answered)",
                *_quantiles(f"{m}_attempt_seconds"),
                unit="s",
            )
        )
        .with_panel(
            _series(
                "Endpoints by state; LISTEN connection up",
                prom(f"sum by (state) ({m}_endpoints)", "{{state}}", ref_id="A"),
                prom(f"max({m}_listening)", "listening", ref_id="B"),
                w=24,
            ).decimals(0)
        )
    )


def _settlement(dash: db.Dashboard) -> db.Dashboard:
    m = "posflow_settlement"
    return (
        dash.with_row(db.Row("Settlement (posflow settlement worker)"))
        .with_panel(
            _series(
                "Ledger rows written, by effect",
                _rates(f"{m}_ledger_writes_total", "effect", "{{effect}}", "A"),
                unit="reqps",
            )
        )
        .with_panel(
            _series(
                "Duplicates refused, quarantined, flagged, invalid records",
                _rates(f"{m}_duplicates_refused_total", "", "duplicates refused", "A"),
                _rates(f"{m}_quarantined_total", "", "quarantined (same id, other body)", "B"),
                _rates(f"{m}_flagged_total", "", "flagged (recorded, not applied)", "C"),
                _rates(f"{m}_invalid_records_total", "reason", "invalid {{reason}}", "D"),
                unit="reqps",
            )
        )
        .with_panel(
            _series(
                "Cash-flow events by kind; published to Kafka; publish errors",
                _rates(f"{m}_cashflow_events_total", "kind", "event {{kind}}", "A"),
                _rates(f"{m}_published_total", "topic", "published {{topic}}", "B"),
                _rates(f"{m}_publish_errors_total", "", "publish errors (outbox retries)", "C"),
                unit="reqps",
            )
        )
        .with_panel(
            _series(
                "Settlement end-to-end: payment received / published to cash-flow event committed",
                *_quantiles(f"{m}_end_to_end_seconds"),
                prom(
                    "histogram_quantile(0.99, sum by (le)"
                    f" (rate({m}_publish_to_cashflow_seconds_bucket[{RATE}])))",
                    "p99 from the terminal's publish",
                    ref_id="D",
                ),
                unit="s",
            )
        )
        .with_panel(
            _series(
                "Settlement batch latency (decide and commit)",
                *_quantiles(f"{m}_batch_seconds"),
                unit="s",
            )
        )
        .with_panel(
            stat.Panel()
            .title("Seconds since the last settlement batch")
            .description(
                "Grows while no payments arrive; growing with consumer lag: stuck. "
                "No value before the worker's first batch."
            )
            .datasource(PROM)
            .with_target(prom(f"time() - max({m}_last_batch_timestamp > 0)", "seconds"))
            .unit("s")
            .graph_mode(common.BigValueGraphMode.NONE)
            .height(8)
            .span(12)
        )
    )


def _alerts(dash: db.Dashboard) -> db.Dashboard:
    m = "posflow_alerts"
    return (
        dash.with_row(db.Row("Alert engine (posflow alerts run)"))
        .with_panel(
            _series(
                "Rule evaluations and records consumed, by source",
                _rates(f"{m}_evaluations_total", "", "evaluations", "A"),
                _rates(f"{m}_records_total", "source", "records {{source}}", "B"),
                _rates(f"{m}_bad_records_total", "source", "unreadable {{source}}", "C"),
                unit="reqps",
            )
        )
        .with_panel(
            _series(
                "Open alerts by rule and state",
                prom(f"sum by (rule, state) ({m}_open)", "{{rule}} {{state}}"),
            ).decimals(0)
        )
        .with_panel(
            _series(
                "Notifications created; delivery failures and dead letters by channel",
                _rates(f"{m}_notifications_created_total", "event", "created {{event}}", "A"),
                _rates(f"{m}_notification_failures_total", "channel", "failed {{channel}}", "B"),
                _rates(f"{m}_notification_dead_letters_total", "channel", "dead {{channel}}", "C"),
                unit="reqps",
            )
        )
        .with_panel(
            _series(
                "Notification latency: transition to delivered (p95 by channel)",
                prom(
                    "histogram_quantile(0.95, sum by (le, channel)"
                    f" (rate({m}_notification_latency_seconds_bucket[{RATE}])))",
                    "p95 {{channel}}",
                ),
                unit="s",
            )
        )
        .with_panel(
            _series(
                "Alert batch latency (evaluate and store)",
                *_quantiles(f"{m}_batch_seconds"),
                unit="s",
            )
        )
        .with_panel(
            _series(
                "Rule reloads by result",
                prom(f"sum by (result) (increase({m}_rule_reloads_total[{RATE}]))", "{{result}}"),
            ).decimals(0)
        )
    )


def _api(dash: db.Dashboard) -> db.Dashboard:
    m = "posflow_api"
    return (
        dash.with_row(db.Row("Merchant API (posflow api)"))
        .with_panel(
            _series(
                "API requests by route and status",
                _rates(f"{m}_requests_total", "route, status", "{{status}} {{route}}", "A"),
                unit="reqps",
            )
        )
        .with_panel(
            _series(
                "API latency to first byte (p95 by route)",
                prom(
                    "histogram_quantile(0.95, sum by (le, route)"
                    f" (rate({m}_request_duration_seconds_bucket[{RATE}])))",
                    "p95 {{route}}",
                ),
                unit="s",
            )
        )
        .with_panel(
            _series(
                "Live streams: SSE clients, events delivered, catch-ups, rate limited",
                prom(f"sum({m}_sse_clients)", "SSE clients", ref_id="A"),
                _rates(f"{m}_events_delivered_total", "", "events delivered/s", "B"),
                _rates(f"{m}_sse_catchups_total", "reason", "catch-ups/s {{reason}}", "C"),
                _rates(f"{m}_rate_limited_total", "", "rate limited (429)/s", "D"),
            )
        )
        .with_panel(
            _series(
                "Cash-flow event delivery latency: recorded to handed to the client",
                *_quantiles(f"{m}_delivery_latency_seconds"),
                unit="s",
            )
        )
    )


def _lag(dash: db.Dashboard) -> db.Dashboard:
    return (
        dash.with_row(db.Row("Kafka consumer lag"))
        .with_panel(
            _series(
                "Consumer lag by group and topic (records not yet read)",
                prom("sum by (group, topic) (posflow_consumer_lag)", "{{group}} · {{topic}}"),
                w=16,
            ).decimals(0)
        )
        .with_panel(
            stat.Panel()
            .title("Largest partition lag now")
            .description("highwater - position of the worst assigned partition, per group")
            .datasource(PROM)
            .with_target(prom("max by (group) (posflow_consumer_lag)", "{{group}}"))
            .thresholds(steps([(None, "green"), (1000, "orange"), (10000, "red")]))
            .color_mode(common.BigValueColorMode.BACKGROUND)
            .graph_mode(common.BigValueGraphMode.AREA)
            .decimals(0)
            .height(8)
            .span(8)
        )
    )
