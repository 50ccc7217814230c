"""Pipeline: the services' own Prometheus metrics, plus the dead letters stored in SQL.

Only metrics the services export today appear here (the test checks every name
against a real scrape). No service exports Kafka consumer lag yet, and the
settlement, alert and API services export none yet: their panels come with them.
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


def build() -> db.Dashboard:
    return (
        db.Dashboard("posflow · Pipeline")
        .uid(UID)
        .tags(TAGS)
        .description("Ingest, dead letters, stream processing and end-to-end latency.")
        .time("now-1h", "now")
        .refresh("10s")
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
