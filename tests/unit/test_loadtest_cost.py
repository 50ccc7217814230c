"""The load test's cost table: CPU per message per stage from two /proc samples."""

from __future__ import annotations

import pytest

from cli.costtable import cost_markdown, cost_table
from simulator.procstat import ProcSample, works_for


def _at(at: float, cpu_s: float) -> ProcSample:
    return ProcSample(at=at, cpu_s=cpu_s, rss_mb=100.0)


def test_cpu_over_messages_per_stage_and_the_posflow_sum_per_published_and_telemetry() -> None:
    before = {
        "ingest": _at(0, 10.0), "streams": _at(0, 5.0), "sink": _at(0, 1.0),
        "settlement": _at(0, 2.0), "alerts": _at(0, 0.5), "kafka": _at(0, 100.0),
        "simulator": _at(0, 3.0),
    }  # fmt: skip
    after = {
        "ingest": _at(60, 10.6), "streams": _at(60, 5.9), "sink": _at(60, 1.3),
        "settlement": _at(60, 2.05), "alerts": _at(60, 0.65), "kafka": _at(60, 100.5),
        "simulator": _at(30, 4.2),  # its own window: the run only
    }  # fmt: skip
    handled = {"ingest": 10_000, "streams": 9_500, "sink": 10_000, "settlement": 250,
               "alerts": 9_750}  # fmt: skip
    cost = cost_table(before, after, handled, published=10_000, telemetry=9_500)
    rows = {r["process"]: r for r in cost["stages"]}

    assert [r["process"] for r in cost["stages"]] == [
        "ingest", "health", "raw sink", "settlement", "alerts", "kafka", "simulator",
    ]  # fmt: skip
    assert rows["ingest"] == {
        "process": "ingest", "role": "posflow", "cpu_s": 0.6, "cpu_pct_of_one_core": 1.0,
        "messages_handled": 10_000, "cpu_us_per_message_handled": 60.0,
        "cpu_us_per_message_published": 60.0,
    }  # fmt: skip
    assert rows["health"]["cpu_us_per_message_handled"] == pytest.approx(94.7)
    assert rows["settlement"]["cpu_us_per_message_handled"] == 200.0  # payments only
    assert rows["settlement"]["cpu_us_per_message_published"] == 5.0
    assert rows["kafka"]["role"] == "broker"
    assert rows["kafka"]["messages_handled"] is None
    assert rows["kafka"]["cpu_us_per_message_published"] == 50.0
    assert rows["simulator"]["cpu_pct_of_one_core"] == 4.0  # 1.2 s over its 30 s
    assert rows["simulator"]["cpu_us_per_message_published"] == 120.0
    # posflow: 0.6 + 0.9 + 0.3 + 0.05 + 0.15 = 2.0 s; brokers and simulator apart.
    assert cost["posflow_cpu_s"] == 2.0
    assert cost["posflow_cpu_us_per_message_published"] == 200.0
    assert cost["posflow_cpu_us_per_telemetry_message"] == pytest.approx(210.5)


def test_a_process_missing_from_either_sample_is_left_out_and_zero_counts_give_none() -> None:
    before = {"ingest": _at(0, 1.0), "streams": None, "postgres": _at(0, 1.0)}
    after = {"ingest": _at(10, 1.1), "streams": _at(10, 2.0)}  # postgres: not sampled again
    cost = cost_table(before, after, {"ingest": 0}, published=0, telemetry=0)

    assert [r["process"] for r in cost["stages"]] == ["ingest"]
    assert cost["stages"][0]["cpu_us_per_message_handled"] is None
    assert cost["posflow_cpu_us_per_message_published"] is None


def test_the_markdown_table_shows_every_stage_and_the_telemetry_target() -> None:
    cost = cost_table(
        {"ingest": _at(0, 0.0), "mosquitto": _at(0, 0.0)},
        {"ingest": _at(10, 0.25), "mosquitto": _at(10, 0.1)},
        {"ingest": 2_000},
        published=2_000,
        telemetry=1_900,
    )
    text = "\n".join(cost_markdown(cost))
    assert "| ingest | posflow | 0.25 | 2.5 | 2,000 | 125.0 | 125.0 |" in text
    assert "| mosquitto | broker | 0.1 | 1.0 | - | - | 50.0 |" in text
    assert "**131.6 µs** (target <= 200 µs)" in text


def test_postgres_processes_count_for_the_runs_database_and_the_servers_own_work() -> None:
    run = "posflow_lt_ab12cd"
    assert works_for(b"postgres: checkpointer \0\0", run)
    assert works_for(b"postgres: TimescaleDB Background Worker Scheduler for database 1", run)
    assert works_for(b"postgres: posflow posflow_lt_ab12cd 127.0.0.1(54502) idle\0", run)
    assert works_for(b"postgres: posflow posflow_lt_ab12cd [local] COPY", run)
    assert not works_for(b"postgres: posflow t_2af2bb29 127.0.0.1(54503) idle", run)
    assert not works_for(b"postgres: posflow posflow [local] idle", run)
