"""Health score and tumbling-window logic (pure; no services)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from streams.score import WindowFacts, score
from streams.state import decode_state
from streams.window import (
    State,
    WindowConfig,
    check_offline,
    close_due,
    heal,
    new_state,
    on_status,
    on_telemetry,
    on_txn,
)
from tests.unit import samples

CFG = WindowConfig(window_s=60, grace_s=10, offline_factor=3, drain_span_s=1800)
T0 = 1_795_000_000.0 - 1_795_000_000.0 % 60  # a window boundary


def legacy_state(terminal_id: str, merchant_id: str) -> dict[str, Any]:
    """A new terminal's state as the previous worker wrote it to the changelog."""
    return {
        "terminal_id": terminal_id, "merchant_id": merchant_id, "windows": {},
        "closed_upto": 0.0, "watermark": 0.0, "last_heard": 0.0, "online": True,
        "offline_reason": None, "heartbeat_s": 30, "late": 0, "max_seq": -1,
        "status_seq": -1, "offline_by": None, "silent_seq": -1, "seqs": [], "txns": [],
        "battery_hist": [], "current": {},
    }  # fmt: skip


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
    assert (state.online, state.offline_reason) == (False, "silent for 31 s")
    assert on_telemetry(state, tele(1), T0 + 40, T0 + 40, CFG) == "online"
    assert on_status(state, status(2, "offline"), T0 + 41, T0 + 41) == "offline"
    assert state.offline_reason == "last will"
    assert on_status(state, status(3, "online"), T0 + 42, T0 + 42) == "online"


# --- online/offline ordering (docs/architecture.md, "online/offline ordering") ------------
#
# As the simulator (simulator/engine.py) and a real terminal do it: on connect it
# publishes "online" with seq S and registers its Last Will with seq S + 1, both with
# the connect time as ts; everything it sends on that connection has seq > S + 1 and a
# later ts. The broker publishes the will, unchanged, when the connection drops.


def status(seq: int, state: str, reason: str | None = None) -> dict[str, Any]:
    if state == "offline" and reason is None:
        reason = "last will"
    return samples.status(seq=seq, state=state, reason=reason)


def connected(seq: int, ts: float) -> State:
    """A terminal that connected at ``ts`` (online ``seq``, will ``seq + 1``)."""
    state = new_state("T-0001", "M-0001")
    assert on_status(state, status(seq, "online"), ts, ts) == "ok"
    return state


def test_telemetry_sent_before_the_will_but_processed_after_it_leaves_the_terminal_offline() -> (
    None
):
    state = connected(100, T0)  # its will: seq 101, ts T0
    assert on_telemetry(state, tele(102, **{"battery.level_pct": 50}), T0 + 5, T0 + 5, CFG) == "ok"
    # Sent at T0 + 35, just before the connection dropped, but its topic lags behind.
    late_reading = tele(103, **{"battery.level_pct": 48})
    assert on_status(state, status(101, "offline"), T0, T0 + 40) == "offline"
    assert on_telemetry(state, late_reading, T0 + 35, T0 + 41, CFG) == "ok"  # not "online"
    assert on_txn(state, {**txn("tx-1"), "seq": 104}, T0 + 36, T0 + 42, CFG) == "ok"
    assert (state.online, state.offline_reason) == (False, "last will")
    # Still valid data: it counts in its window and is the latest reading.
    assert state.windows[int(T0)].samples == 2
    assert state.windows[int(T0)].txn == 1
    assert state.current.battery == 48


def test_only_a_later_online_status_brings_it_back_then_its_telemetry_keeps_it_online() -> None:
    state = connected(100, T0)
    on_telemetry(state, tele(102), T0 + 5, T0 + 5, CFG)
    assert on_status(state, status(101, "offline"), T0, T0 + 40) == "offline"
    # Reconnected at T0 + 300: online 110 (will 111), then telemetry 112; the telemetry
    # topic is ahead, so 112 comes first. Newer than the will by seq and ts, yet from
    # the outside no different from telemetry sent before the drop: it stays offline.
    assert on_telemetry(state, tele(112), T0 + 305, T0 + 306, CFG) == "ok"
    assert not state.online
    assert on_status(state, status(110, "online"), T0 + 300, T0 + 307) == "online"
    assert (state.online, state.offline_reason) == (True, None)
    assert on_telemetry(state, tele(113), T0 + 335, T0 + 336, CFG) == "ok"
    assert state.online


def test_old_or_repeated_statuses_do_not_flip_the_state() -> None:
    state = connected(100, T0)
    assert on_status(state, status(100, "online"), T0, T0 + 1) == "stale"  # redelivered
    assert on_status(state, status(101, "offline"), T0, T0 + 40) == "offline"
    assert on_status(state, status(101, "offline"), T0, T0 + 41) == "stale"  # retained again
    assert on_status(state, status(100, "online"), T0, T0 + 42) == "stale"  # older online
    assert not state.online
    assert on_status(state, status(110, "online"), T0 + 300, T0 + 300) == "online"
    # The first connection's will, or a retained offline handed to a new subscription,
    # after the terminal reconnected: older than the online status, ignored.
    assert on_status(state, status(101, "offline"), T0, T0 + 301) == "stale"
    assert on_status(state, status(99, "offline", reason="shutdown"), T0, T0 + 302) == "stale"
    assert (state.online, state.status_seq) == (True, 110)


def test_a_retained_old_offline_after_newer_telemetry_leaves_the_terminal_online() -> None:
    state = connected(200, T0 + 600)  # second connection; the first one's will was 151
    on_telemetry(state, tele(202), T0 + 605, T0 + 605, CFG)
    on_txn(state, {**txn("tx-9"), "seq": 203}, T0 + 606, T0 + 606, CFG)
    assert on_status(state, status(151, "offline"), T0 + 100, T0 + 607) == "stale"
    assert (state.online, state.last_heard) == (True, T0 + 606)  # a replay is not life


def test_the_will_counts_although_its_connect_time_ts_is_older_than_what_was_heard() -> None:
    state = connected(100, T0)
    for i in range(20):  # ten minutes of telemetry on that connection
        on_telemetry(state, tele(102 + i), T0 + 30 * i, T0 + 30 * i, CFG)
    assert state.watermark == T0 + 570
    # The broker publishes the will registered at connect: ts T0, seq 101, both older
    # than everything heard since. It still takes the terminal offline.
    assert on_status(state, status(101, "offline"), T0, T0 + 600) == "offline"
    assert (state.online, state.offline_reason) == (False, "last will")
    assert state.watermark == T0 + 570  # the old ts moves no window


def test_skewed_terminal_clocks_do_not_decide_online_or_offline() -> None:
    # The clock runs 15 minutes ahead on the first connection: its last telemetry,
    # processed after the will, has a ts far beyond it. Still offline.
    state = connected(100, T0 + 900)
    assert on_status(state, status(101, "offline"), T0 + 900, T0 + 40) == "offline"
    assert on_telemetry(state, tele(102), T0 + 935, T0 + 41, CFG) == "ok"
    assert not state.online
    # Corrected (15 minutes back) before it reconnects: the new online status has a ts
    # older than the will's and the telemetry's, and the higher seq. Online.
    assert on_status(state, status(110, "online"), T0 + 300, T0 + 300) == "online"
    assert on_telemetry(state, tele(112), T0 + 305, T0 + 306, CFG) == "ok"
    assert state.online
    # The latest readings follow seq too, not the skewed ts.
    assert state.current.seq == 112
    # A delayed status of the skewed connection (higher ts, lower seq) is stale.
    assert on_status(state, status(101, "offline"), T0 + 900, T0 + 310) == "stale"
    assert state.online


def test_after_silence_only_newer_messages_bring_it_back() -> None:
    state = connected(100, T0)
    on_telemetry(state, tele(103, heartbeat_interval_s=10), T0, T0, CFG)
    assert check_offline(state, T0 + 31, CFG)
    # Delayed on its topic: older than what was heard before the silence. Not evidence.
    assert on_txn(state, {**txn("tx-1"), "seq": 102}, T0 - 1, T0 + 32, CFG) == "ok"
    assert not state.online
    assert on_telemetry(state, tele(104), T0 + 40, T0 + 41, CFG) == "online"
    assert (state.online, state.offline_reason) == (True, None)


def test_a_will_after_silence_holds_the_terminal_offline_with_its_reason() -> None:
    state = connected(100, T0)
    on_telemetry(state, tele(102, heartbeat_interval_s=10), T0, T0, CFG)
    assert check_offline(state, T0 + 31, CFG)
    assert on_status(state, status(101, "offline"), T0, T0 + 32) == "ok"  # already offline
    assert state.offline_reason == "last will"
    # Telemetry the dead connection sent before it dropped: newer than anything heard
    # at the silence, but the will says the connection is gone.
    assert on_telemetry(state, tele(103), T0 + 10, T0 + 33, CFG) == "ok"
    assert not state.online


def test_a_late_message_that_brings_a_silent_terminal_back_says_so() -> None:
    state = new_state("T-0001", "M-0001")
    on_telemetry(state, tele(0, heartbeat_interval_s=10), T0 + 5, T0 + 5, CFG)
    on_telemetry(state, tele(1, heartbeat_interval_s=10), T0 + 75, T0 + 75, CFG)
    close_due(state, T0 + 75, CFG)  # minute 0 closed
    assert check_offline(state, T0 + 106, CFG)
    # Newest by seq, though its (skewed) ts falls in the closed minute: late, and online.
    assert on_telemetry(state, tele(2), T0 + 30, T0 + 107, CFG) == "online"
    assert (state.online, state.late) == (True, 1)


def test_a_state_written_before_the_ordering_fields_keeps_working() -> None:
    old = legacy_state("T-0001", "M-0001")  # a dict, as the changelog holds it
    for key in ("max_seq", "status_seq", "offline_by", "silent_seq"):
        del old[key]
    old.update(online=False, offline_reason="last will")  # offline by an old will
    state = decode_state(orjson.dumps(old))
    assert on_telemetry(state, tele(5), T0, T0, CFG) == "ok"
    assert not state.online
    assert on_status(state, status(7, "online"), T0 + 1, T0 + 1) == "online"


# --- hostile input: a state poisoned by a far-future reading ------------------------------


def test_heal_drops_a_restored_far_future_window_so_closing_cannot_overflow() -> None:
    state = new_state("T-0001", "M-0001")
    on_telemetry(state, tele(0), T0 + 5, T0 + 5, CFG)
    year_9999 = 253_402_300_740.0  # 9999-12-31T23:59:00Z, as an old changelog may hold
    on_telemetry(state, tele(1), year_9999, T0 + 6, CFG)
    assert heal(state, T0 + 6, CFG) == 1
    assert list(state.windows) == [int(T0)]
    assert state.watermark == T0 + 6 + CFG.max_ahead_s
    assert heal(state, T0 + 6, CFG) == 0
    (record,) = close_due(state, T0 + 6 + CFG.max_ahead_s, CFG)
    assert record["window_start"] == int(T0)
