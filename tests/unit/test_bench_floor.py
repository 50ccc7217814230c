"""The stream-floor benchmark's arithmetic: CPU from /proc, per event, and its report."""

from __future__ import annotations

import time

import pytest

from benchmarks._procstat import (
    Mark,
    Rate,
    between,
    cpu_seconds,
    floor_line,
    parse_floor_line,
    read_cpu,
)
from benchmarks.bench_stream_floor import CONTENDERS, Result, order, share_of, table

# /proc/<pid>/stat of a process whose name holds a space and a parenthesis; utime 1234 and
# stime 266 clock ticks (fields 14 and 15).
_STAT = (
    "4242 (faust (worker) x) S 1 4242 4242 0 -1 4194560 9000 0 0 0 1234 266 0 0 20 0 3 0 "
    "55 1000000 5000 18446744073709551615 1 1 0 0 0 0 0 16781312 16386 0 0 0 17 1 0 0 0 0 0"
)


def test_cpu_seconds_are_user_plus_system_ticks_counted_after_the_command_name() -> None:
    assert cpu_seconds(_STAT, ticks_per_s=100) == pytest.approx(15.0)
    assert cpu_seconds(_STAT, ticks_per_s=1000) == pytest.approx(1.5)


def test_this_process_cpu_grows_while_it_works() -> None:
    before = read_cpu()
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    assert read_cpu() - before >= 0.03  # 10 ms ticks


def test_rate_is_events_and_cpu_between_the_first_and_the_last_mark() -> None:
    rate = between(Mark(events=2000, wall_s=10.0, cpu_s=3.0), Mark(100_000, 20.0, 12.8))
    assert rate.events == 98_000
    assert rate.seconds == pytest.approx(10.0)
    assert rate.events_per_s == pytest.approx(9_800)
    assert rate.cpu_us_per_event == pytest.approx(100.0)


def test_marks_without_events_between_them_are_refused() -> None:
    with pytest.raises(ValueError, match="no events between the marks"):
        between(Mark(5, 1.0, 1.0), Mark(5, 2.0, 1.5))


def test_a_runner_line_reads_back_even_behind_a_log_prefix() -> None:
    rate = Rate(events=99_999, seconds=12.5, events_per_s=7999.92, cpu_us_per_event=110.5)
    output = f"starting\n[2026-12-03 15:20:00,000] [42] [WARNING] {floor_line(rate)}\nbye\n"
    assert parse_floor_line(output) == rate
    assert parse_floor_line("BASELINE 8000\n") is None


def test_every_other_round_runs_the_contenders_in_reverse() -> None:
    assert order(1) == list(CONTENDERS)
    assert order(2) == list(reversed(CONTENDERS))
    assert order(3, ["a", "b"]) == ["a", "b"]


def test_the_table_has_a_row_per_contender_and_says_why_one_has_no_figure() -> None:
    results = [
        Result(1, "faust no-op", Rate(99_000, 11.0, 9_000.4, 104.6)),
        Result(1, "health worker", Rate(99_000, 30.0, 3_300.0, 290.2)),
        Result(2, "faust no-op", Rate(99_000, 10.0, 9_900.0, 98.0)),
        Result(2, "health worker", None, "not done in 240 s"),
    ]
    assert table(results, ["faust no-op", "health worker"]).splitlines() == [
        "| contender | round 1 events/s | round 1 CPU µs/event |"
        " round 2 events/s | round 2 CPU µs/event |",
        "|---|---:|---:|---:|---:|",
        "| faust no-op | 9,000 | 105 | 9,900 | 98 |",
        "| health worker | 3,300 | 290 | n/a (not done in 240 s) | n/a |",
    ]
    assert share_of(results, "health worker", "faust no-op") == ["round 1: 37%"]
