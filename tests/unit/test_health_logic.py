"""Health score and tumbling-window logic (pure; no services)."""

from __future__ import annotations

from typing import Any

import pytest

from streams.score import WindowFacts, score
from streams.window import (
    WindowConfig,
    check_offline,
    close_due,
    new_state,
    on_status,
    on_telemetry,
    on_txn,
)
from tests.unit import samples

CFG = WindowConfig(window_s=60, grace_s=10, offline_factor=3, drain_span_s=1800)
T0 = 1_795_000_000.0 - 1_795_000_000.0 % 60  # a window boundary


def tele(seq: int, **over: Any) -> dict[str, Any]:
    return samples.telemetry(seq=seq, **over)


def txn(txn_id: str, status: str = "approved", latency: int = 400) -> dict[str, Any]:
    return samples.txn(txn_id=txn_id, status=status, auth_latency_ms=latency)


# --- the score --------------------------------------------------------------------------


def test_a_healthy_terminal_scores_100_with_no_reasons() -> None:
    facts = WindowFacts(signal_type="lte", signal_avg_dbm=-85, battery_level_pct=80,
                        txn_total=20, printer_paper="ok")  # fmt: skip
    result = score(facts)
    assert (result.score, result.signal, result.battery, result.txn, result.printer) == (
        100, 100, 100, 100, 100,
    )  # fmt: skip
    assert result.reasons == []


@pytest.mark.parametrize(
    ("facts", "component", "value", "reason"),
    [
        (WindowFacts(signal_type="lte", signal_avg_dbm=-115), "signal", 17,
         "weak signal (lte, -115 dBm)"),
        (WindowFacts(signal_type="wifi", signal_avg_dbm=-70, dropouts=2), "signal", 10,
         "weak signal (wifi, -70 dBm, 2 dropouts)"),
        (WindowFacts(battery_level_pct=10), "battery", 20, "battery (10%)"),
        (WindowFacts(battery_level_pct=35, drain_pct_per_hour=30.0), "battery", 40,
         "battery (35%, draining 30%/h)"),
        (WindowFacts(battery_level_pct=90, battery_temp_c=58.0), "battery", 0,
         "battery (90%, 58 °C)"),
        (WindowFacts(txn_total=10, txn_failed=2), "txn", 40,
         "transactions failing (2 errors/timeouts, 0 declines of 10)"),
        (WindowFacts(txn_total=10, txn_declined=6), "txn", 55,
         "transactions failing (0 errors/timeouts, 6 declines of 10)"),
        (WindowFacts(printer_paper="out"), "printer", 0, "printer paper out"),
    ],
)  # fmt: skip
def test_each_component_falls_with_its_cause_and_says_why(
    facts: WindowFacts, component: str, value: int, reason: str
) -> None:
    result = score(facts)
    assert getattr(result, component) == value
    assert result.reasons == [reason]


def test_the_score_is_the_weighted_sum_and_offline_is_zero() -> None:
    facts = WindowFacts(signal_type="lte", signal_avg_dbm=-105, battery_level_pct=20,
                        printer_paper="low")  # fmt: skip
    result = score(facts)
    assert (result.signal, result.battery, result.txn, result.printer) == (50, 40, 100, 70)
    assert result.score == round(0.3 * 50 + 0.3 * 40 + 0.3 * 100 + 0.1 * 70)  # 64
    offline = score(WindowFacts(online=False))
    assert offline.score == 0
    assert offline.reasons == ["offline"]


# --- windows ------------------------------------------------------------------------------


def test_a_window_closes_once_event_time_passes_its_end_plus_grace() -> None:
    state = new_state("T-0001", "M-0001")
    for i, dbm in enumerate([-90, -100, -110]):
        t = tele(i, **{"signal.rsrp_dbm": dbm, "battery.level_pct": 80 - i})
        assert on_telemetry(state, t, T0 + 10 * i, T0 + 10 * i, CFG) == "ok"
    assert close_due(state, T0 + 60, CFG) == []  # next window not yet past the grace
    on_telemetry(state, tele(3), T0 + 70, T0 + 70, CFG)  # event time reaches end + grace
    (record,) = close_due(state, T0 + 70, CFG)
    assert (record["window_start"], record["window_end"]) == (int(T0), int(T0) + 60)
    facts = record["facts"]
    assert (facts["samples"], facts["signal_avg_dbm"], facts["signal_min_dbm"]) == (3, -100, -110)
    assert facts["battery_level_pct"] == 78
    assert record["components"]["signal"] == 67


def test_a_silent_terminals_window_closes_by_the_wall_clock() -> None:
    state = new_state("T-0001", "M-0001")
    on_telemetry(state, tele(0), T0 + 5, T0 + 5, CFG)
    assert close_due(state, T0 + 60, CFG) == []
    (record,) = close_due(state, T0 + 75, CFG)  # silent for window + grace, end + grace passed
    assert record["window_start"] == int(T0)


def test_late_messages_are_counted_not_applied_and_replays_are_ignored() -> None:
    state = new_state("T-0001", "M-0001")
    on_telemetry(state, tele(0), T0 + 5, T0 + 5, CFG)
    on_telemetry(state, tele(1), T0 + 75, T0 + 75, CFG)
    (first,) = close_due(state, T0 + 75, CFG)
    assert first["facts"]["samples"] == 1
    assert on_telemetry(state, tele(2), T0 + 30, T0 + 80, CFG) == "late"
    assert on_telemetry(state, tele(1), T0 + 75, T0 + 80, CFG) == "replay"
    assert on_txn(state, txn("tx-1"), T0 + 76, T0 + 80, CFG) == "ok"
    assert on_txn(state, txn("tx-1"), T0 + 76, T0 + 81, CFG) == "replay"
    on_telemetry(state, tele(3), T0 + 140, T0 + 140, CFG)
    (second,) = close_due(state, T0 + 140, CFG)
    assert second["facts"]["samples"] == 1  # seq 1 once; the replay and the late one not
    assert second["facts"]["txn"] == 1
    assert second["facts"]["late"] == 1


def test_out_of_order_within_grace_lands_in_its_own_window() -> None:
    state = new_state("T-0001", "M-0001")
    on_telemetry(state, tele(0), T0 + 5, T0 + 5, CFG)
    on_telemetry(state, tele(2), T0 + 65, T0 + 65, CFG)
    assert on_telemetry(state, tele(1), T0 + 55, T0 + 66, CFG) == "ok"  # before the grace ran out
    on_telemetry(state, tele(3), T0 + 130, T0 + 130, CFG)
    records = close_due(state, T0 + 130, CFG)
    assert [r["facts"]["samples"] for r in records] == [2, 1]


def test_transactions_give_rates_and_p95_latency() -> None:
    state = new_state("T-0001", "M-0001")
    statuses = ["approved"] * 6 + ["declined"] * 2 + ["error", "timeout"]
    for i, status in enumerate(statuses):
        on_txn(state, txn(f"tx-{i}", status, latency=100 * (i + 1)), T0 + i, T0 + i, CFG)
    on_telemetry(state, tele(0), T0 + 80, T0 + 80, CFG)
    (record,) = close_due(state, T0 + 80, CFG)
    facts = record["facts"]
    assert (facts["txn"], facts["approved"], facts["declined"], facts["failed"]) == (10, 6, 2, 2)
    assert (facts["decline_rate"], facts["error_rate"]) == (0.2, 0.2)
    assert facts["auth_p95_ms"] == 900  # index int(0.95 * 9) = 8 of 100..1000
    assert record["components"]["txn"] == 35  # 100 - 300*0.2 - 100*0.05


def test_battery_drain_rate_is_measured_over_the_discharging_run() -> None:
    state = new_state("T-0001", "M-0001")
    for i in range(11):  # 10 minutes, 1% a minute = 60 %/h
        t = tele(i, **{"battery.level_pct": 40 - i, "battery.charging": False})
        on_telemetry(state, t, T0 + 60 * i, T0 + 60 * i, CFG)
    records = close_due(state, T0 + 60 * 10 + 15, CFG)
    assert records[-1]["facts"]["drain_pct_per_hour"] == 60.0
    assert records[-1]["window_start"] == int(T0) + 480  # 8 minutes in; the 9th is still open
    assert records[-1]["reasons"] == ["battery (32%, draining 60%/h)"]


def test_offline_by_silence_or_last_will_and_back_online_when_heard() -> None:
    state = new_state("T-0001", "M-0001")
    on_telemetry(state, tele(0, heartbeat_interval_s=10), T0, T0, CFG)
    assert not check_offline(state, T0 + 30, CFG)  # 3 x 10 s not yet exceeded
    assert check_offline(state, T0 + 31, CFG)
    assert (state["online"], state["offline_reason"]) == (False, "silent for 31 s")
    assert on_telemetry(state, tele(1), T0 + 40, T0 + 40, CFG) == "online"
    assert on_status(state, {"state": "offline"}, T0 + 41, T0 + 41) == "offline"
    assert state["offline_reason"] == "last will"
    assert on_status(state, {"state": "online"}, T0 + 42, T0 + 42) == "online"
