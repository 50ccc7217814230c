"""Dashboards as code: the committed JSON is what the Python generates; the macro
expansion matches Grafana's PostgreSQL datasource; PromQL names are found."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from typer.testing import CliRunner

from dashboards import catalog
from dashboards.cli import register
from dashboards.macros import (
    MacroError,
    TimeRange,
    Variable,
    expand,
    format_interval,
    interval_for,
)
from dashboards.promql import exposition_names, metric_names
from dashboards.publish import map_datasources

ROOT = Path(__file__).resolve().parents[2]
END = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SIX_HOURS = TimeRange(END - timedelta(hours=6), END)


def test_generating_reproduces_the_committed_json(tmp_path: Path) -> None:
    assert catalog.check() == []
    written = catalog.write(tmp_path)
    for path in written:
        assert path.read_bytes() == (catalog.JSON_DIR / path.name).read_bytes()
    assert sorted(p.name for p in catalog.JSON_DIR.glob("*.json")) == sorted(
        p.name for p in written
    )


def test_generate_check_command_fails_on_a_stale_file(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    runner = CliRunner()

    def run(*args: str) -> int:
        return runner.invoke(app, ["dashboards", *args, "--out", str(tmp_path)]).exit_code

    assert run("generate") == 0
    assert run("generate", "--check") == 0
    (tmp_path / "fleet.json").write_text("{}\n")
    assert run("generate", "--check") == 1
    assert run("generate") == 0
    assert catalog.check(tmp_path) == []


def test_dashboards_have_stable_uids_and_only_provisioned_datasources() -> None:
    uids = {}
    for path in sorted(catalog.JSON_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        uids[path.stem] = data["uid"]
        text = path.read_text()
        assert '"uid": "posflow-pg"' in text or '"uid": "posflow-prom"' in text
        ids = [p["id"] for p in data["panels"]]
        assert ids == list(range(1, len(ids) + 1))
    assert uids == {
        "alerts": "posflow-alerts", "fleet": "posflow-fleet", "merchant": "posflow-merchant",
        "pipeline": "posflow-pipeline", "terminal": "posflow-terminal",
    }  # fmt: skip
    provisioning = (ROOT / "deploy/grafana/provisioning/datasources/datasources.yml").read_text()
    assert "uid: posflow-pg" in provisioning
    assert "uid: posflow-prom" in provisioning


def test_panels_fit_the_24_column_grid_without_overlapping() -> None:
    for path in sorted(catalog.JSON_DIR.glob("*.json")):
        taken: set[tuple[int, int]] = set()
        for panel in json.loads(path.read_text())["panels"]:
            g = panel["gridPos"]
            assert g["x"] + g["w"] <= 24, (path.stem, panel["title"], g)
            cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                     for y in range(g["y"], g["y"] + g["h"])}  # fmt: skip
            assert not cells & taken, (path.stem, panel["title"], g)
            taken |= cells


def test_time_filter_and_bounds_are_rfc3339_utc() -> None:
    tr = TimeRange(
        datetime(2017, 7, 18, 11, 15, 52, tzinfo=UTC),
        datetime(2017, 7, 18, 13, 15, 52, 500000, tzinfo=UTC),
    )
    assert expand("WHERE $__timeFilter(ts)", tr) == (
        "WHERE ts BETWEEN '2017-07-18T11:15:52Z' AND '2017-07-18T13:15:52.5Z'"
    )
    assert expand("$__timeFrom() .. $__timeTo()", tr) == (
        "'2017-07-18T11:15:52Z' .. '2017-07-18T13:15:52.5Z'"
    )
    assert expand("$__unixEpochFilter(t)", tr) == "t >= 1500376552 AND t <= 1500383752"


def test_time_group_like_grafana_with_and_without_timescaledb() -> None:
    assert expand("$__timeGroupAlias(ts, '5m')", SIX_HOURS) == (
        'floor(extract(epoch from ts)/300)*300 AS "time"'
    )
    assert expand("$__timeGroup(ts, 1h)", SIX_HOURS, timescaledb=True) == (
        "time_bucket('3600s',ts)"
    )
    # Go prints a float64 of 30 days in exponent form.
    assert expand("$__timeGroup(ts, 30d)", SIX_HOURS) == (
        "floor(extract(epoch from ts)/2.592e+06)*2.592e+06"
    )
    assert expand("$__time(ts), $__timeEpoch(ts)", SIX_HOURS) == (
        'ts AS "time", extract(epoch from ts) as "time"'
    )


@pytest.mark.parametrize(
    ("span", "points", "want"),
    [
        (timedelta(hours=6), 1000, "20s"),  # 21.6 s rounds to 20 s
        (timedelta(hours=1), 1000, "5s"),  # 3.6 s rounds to 5 s
        (timedelta(minutes=5), 1000, "5s"),  # never below the datasource's minimum
        (timedelta(days=7), 1000, "10m"),  # 604.8 s rounds to 10 min
        (timedelta(days=30), 500, "1h"),
    ],
)
def test_interval_is_rounded_like_grafana(span: timedelta, points: int, want: str) -> None:
    tr = TimeRange(END - span, END, max_data_points=points, min_interval=timedelta(seconds=5))
    assert format_interval(interval_for(tr)) == want
    # With the provisioned minimum of one minute.
    default = format_interval(interval_for(TimeRange(END - span, END, max_data_points=points)))
    assert default == (want if want in ("10m", "1h") else "1m")
    assert expand("$__timeGroup(ts, $__interval)", tr).startswith("floor(extract(epoch from ts)/")


def test_variables_are_formatted_like_the_postgres_datasource() -> None:
    single = {"terminal": Variable("T-1'x")}
    assert expand("id = '$terminal' OR id = '${terminal}'", SIX_HOURS, single) == (
        "id = 'T-1''x' OR id = 'T-1''x'"
    )
    multi = {"t": Variable(["a", "b'c"], multi=True)}
    assert expand("id IN ($t)", SIX_HOURS, multi) == "id IN ('a','b''c')"
    assert expand("[[terminal]] $__interval_ms", SIX_HOURS, single) == "T-1''x 60000"


def test_unknown_macros_and_variables_are_refused() -> None:
    with pytest.raises(MacroError, match="unknown macro '__nope'"):
        expand("$__nope(ts)", SIX_HOURS)
    with pytest.raises(MacroError, match=r"\$merchant is neither"):
        expand("WHERE m = '$merchant'", SIX_HOURS)
    with pytest.raises(MacroError, match="error parsing interval"):
        expand("$__timeGroup(ts, often)", SIX_HOURS)


def test_every_dashboard_query_expands_with_its_variables() -> None:
    variables = {"terminal": Variable("T-1"), "merchant": Variable("M-1")}
    targets = catalog.sql_targets()
    assert len(targets) >= 25
    for target in targets:
        sql = expand(target.sql, SIX_HOURS, variables)
        assert "$" not in sql, (target.where, sql)


def test_metric_names_skip_functions_labels_and_grouping() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, kind) (rate(a_bucket{job="x", le!="+Inf"}'
        "[$__rate_interval]))) / on (job) group_left (kind) b_total offset 5m"
        " > bool 0 and up"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "up"}
    assert metric_names("sum(rate(posflow_ingest_received_total[1m]))") == {
        "posflow_ingest_received_total"
    }


def test_datasource_mapping_rewrites_only_our_references() -> None:
    body: dict[str, Any] = {
        "datasource": {"type": "grafana-postgresql-datasource", "uid": "posflow-pg"},
        "targets": [{"datasource": {"type": "prometheus", "uid": "posflow-prom"}, "expr": "up"}],
        "other": {"type": "loki", "uid": "keep"},
    }
    mapped = map_datasources(
        body,
        {
            "posflow-pg": {"type": "postgres", "uid": "PG1"},
            "posflow-prom": {"type": "prometheus", "uid": "PR1"},
        },
    )
    assert mapped == {
        "datasource": {"type": "postgres", "uid": "PG1"},
        "targets": [{"datasource": {"type": "prometheus", "uid": "PR1"}, "expr": "up"}],
        "other": {"type": "loki", "uid": "keep"},
    }
    assert body["datasource"]["uid"] == "posflow-pg"  # the input is not changed


def test_exposition_names_count_labelled_metrics_before_their_first_sample() -> None:
    registry = CollectorRegistry()
    requests = Counter("x_requests", "h", ["route"], registry=registry)
    Histogram("x_seconds", "h", ["channel"], registry=registry)
    Gauge("x_lag", "h", ["group", "topic", "partition"], registry=registry)
    Counter("x_plain", "h", registry=registry)
    text = generate_latest(registry).decode()
    assert "x_requests_total{" not in text  # no sample of a labelled metric yet
    assert "# HELP x_lag " in text  # ... but its family is declared
    names = exposition_names(text)
    assert names >= {
        "x_requests_total", "x_seconds_bucket", "x_seconds_count", "x_seconds_sum", "x_lag",
        "x_plain_total",
    }  # fmt: skip
    assert "x_requests" not in names  # a counter is read as x_total, never x
    assert "x_other_total" not in names
    requests.labels("/a").inc()
    assert "x_requests_total" in exposition_names(generate_latest(registry).decode())
