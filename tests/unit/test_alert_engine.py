"""The alert engine's logic, per rule, with an injected clock (no services)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from alerts.engine import Engine
from alerts.facts import Merchant
from alerts.rules import RuleSet, load_rules

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC).timestamp()  # a Monday, 12:00 UTC


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


def tele(terminal: str, t: float, merchant: str = "M-1", **over: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "kind": "telemetry", "merchant_id": merchant, "terminal_id": terminal, "ts": iso(t),
        "battery": {"level_pct": 80, "charging": False, "temperature_c": 30.0},
        "signal": {"type": "lte", "rsrp_dbm": -85, "carrier": "Telco"},
        "printer": {"paper": "ok"}, "app_version": "2.4.0", "tamper": False,
        "location": {"lat": 48.8566, "lon": 2.3522, "accuracy_m": 10},
    }  # fmt: skip
    for key, value in over.items():
        target = payload
        *path, last = key.split("__")
        for p in path:
            target = target[p]
        target[last] = value
    return {"kind": "telemetry", "merchant_id": merchant, "terminal_id": terminal,
            "payload": payload}  # fmt: skip


def window(terminal: str, t: float, merchant: str = "M-1", **facts: Any) -> dict[str, Any]:
    base = {"signal_avg_dbm": -85.0, "dropouts": 0, "txn": 0, "decline_rate": None,
            "error_rate": None, "auth_p95_ms": None, "drain_pct_per_hour": None,
            "battery_level_pct": None, "battery_temp_c": None}  # fmt: skip
    return {"type": "window", "terminal_id": terminal, "merchant_id": merchant,
            "last_ts": t, "score": 90, "final": True, "facts": {**base, **facts}}  # fmt: skip


def state(terminal: str, online: bool, t: float, merchant: str = "M-1") -> dict[str, Any]:
    return {"type": "state", "terminal_id": terminal, "merchant_id": merchant,
            "online": online, "reason": None if online else "last will", "at": t}  # fmt: skip


MERCHANTS = {
    "M-1": Merchant(
        "M-1", "Cafe Luna", "Europe/Paris", {"mon": [["08:00", "18:00"]]}, 48.8566, 2.3522
    )
}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(clock: Clock) -> Engine:
    return Engine(load_rules(None), clock, merchants=MERCHANTS)


def firing(engine: Engine) -> dict[tuple[str, str], str]:
    return {(a.rule, a.subject_id): a.state for a in engine.alerts.values()}


def events(engine: Engine) -> list[tuple[str, str, str]]:
    return [
        (n.event, n.payload["alert"]["rule"], n.payload["alert"]["subject_id"])
        for n in engine.drain().notifications
    ]


def test_battery_low_boundary_for_duration_and_hysteresis(engine: Engine, clock: Clock) -> None:
    engine.on_record("telemetry", tele("T1", clock.t, battery__level_pct=15))
    assert firing(engine) == {}  # 15 is not below 15
    engine.on_record("telemetry", tele("T1", clock.t, battery__level_pct=14))
    assert firing(engine) == {("battery_low", "T1"): "pending"}
    clock.advance(119)
    engine.tick()
    assert firing(engine)[("battery_low", "T1")] == "pending"
    clock.advance(1)
    engine.tick()  # the for-timer fires without a new record
    assert firing(engine)[("battery_low", "T1")] == "firing"
    assert events(engine) == [("firing", "battery_low", "T1")]
    # Hysteresis: 17% is above the firing threshold but below the clear one: still firing.
    engine.on_record("telemetry", tele("T1", clock.t + 1, battery__level_pct=17))
    assert firing(engine)[("battery_low", "T1")] == "firing"
    engine.on_record("telemetry", tele("T1", clock.t + 2, battery__level_pct=14))
    engine.on_record("telemetry", tele("T1", clock.t + 3, battery__level_pct=20))
    assert firing(engine) == {}
    assert events(engine) == [("resolved", "battery_low", "T1")]


def test_pending_that_clears_before_for_is_dropped_silently(engine: Engine, clock: Clock) -> None:
    engine.on_record("telemetry", tele("T1", clock.t, battery__level_pct=10))
    clock.advance(60)
    engine.on_record(
        "telemetry", tele("T1", clock.t, battery__level_pct=10, battery__charging=True)
    )
    changes = engine.drain()
    assert firing(engine) == {}
    assert changes.notifications == []
    assert len(changes.dropped) == 1


def test_battery_empty_before_closing_uses_drain_rate_and_opening_hours(
    engine: Engine, clock: Clock
) -> None:
    # 13:00 in Paris, closes 18:00 (300 min). 30% at 12 %/h lasts 150 min: empty first.
    engine.on_record("telemetry", tele("T1", clock.t, battery__level_pct=30))
    engine.on_record("window", window("T1", clock.t, drain_pct_per_hour=12.0))
    clock.advance(300)
    engine.tick()
    alert = engine.alerts[("battery_empty_before_close", "terminal", "T1")]
    assert alert.state == "firing"
    assert alert.summary == (
        "Terminal T1 at Cafe Luna will run out of battery in ~150 min, 295 min before closing"
    )
    # At 5 %/h it lasts 360 min, past closing: clears.
    engine.on_record("window", window("T1", clock.t + 1, drain_pct_per_hour=5.0))
    assert ("battery_empty_before_close", "terminal", "T1") not in engine.alerts


def test_battery_empty_rule_is_quiet_while_the_merchant_is_closed(clock: Clock) -> None:
    clock.t = datetime(2026, 11, 23, 20, 0, tzinfo=UTC).timestamp()  # 21:00 in Paris
    engine = Engine(load_rules(None), clock, merchants=MERCHANTS)
    engine.on_record("telemetry", tele("T1", clock.t, battery__level_pct=30))
    engine.on_record("window", window("T1", clock.t, drain_pct_per_hour=50.0))
    assert ("battery_empty_before_close", "terminal", "T1") not in engine.alerts


def test_weak_signal_needs_ten_sustained_minutes(engine: Engine, clock: Clock) -> None:
    for minute in range(10):
        engine.on_record("window", window("T1", clock.t, signal_avg_dbm=-111.0))
        clock.advance(60)
        engine.tick()
        assert firing(engine)[("weak_signal", "T1")] == ("pending" if minute < 9 else "firing")
    engine.on_record("window", window("T1", clock.t, signal_avg_dbm=-107.0))
    assert firing(engine)[("weak_signal", "T1")] == "firing"  # hysteresis band
    engine.on_record("window", window("T1", clock.t, signal_avg_dbm=-105.0))
    assert firing(engine) == {}


@pytest.mark.parametrize(
    ("rule", "record", "fixed"),
    [
        ("printer_out_of_paper", {"printer__paper": "out"}, {"printer__paper": "ok"}),
        ("battery_overheating", {"battery__temperature_c": 55.5}, {"battery__temperature_c": 49.0}),
        ("tamper_detected", {"tamper": True}, None),
        (
            "terminal_far_from_merchant",
            {"location__lat": 48.8566 + 0.02},  # ~2.2 km north
            {"location__lat": 48.8566 + 0.005},  # ~560 m
        ),
    ],
)
def test_telemetry_rules_fire_after_for_and_resolve(
    engine: Engine, clock: Clock, rule: str, record: dict[str, Any], fixed: dict[str, Any] | None
) -> None:
    engine.on_record("telemetry", tele("T1", clock.t, **record))
    clock.advance(engine.rules[rule].for_s)
    engine.tick()
    assert firing(engine) == {(rule, "T1"): "firing"}
    assert events(engine) == [("firing", rule, "T1")]
    if fixed is not None:
        engine.on_record("telemetry", tele("T1", clock.t, **fixed))
        assert firing(engine) == {}
        assert events(engine) == [("resolved", rule, "T1")]


def test_overheating_boundary_55_is_not_above(engine: Engine, clock: Clock) -> None:
    engine.on_record("telemetry", tele("T1", clock.t, battery__temperature_c=55.0))
    assert firing(engine) == {}


def test_decline_spike_needs_enough_payments(engine: Engine, clock: Clock) -> None:
    engine.on_record("window", window("T1", clock.t, txn=4, decline_rate=1.0))
    assert firing(engine) == {}
    engine.on_record("window", window("T1", clock.t, txn=5, decline_rate=0.6))
    clock.advance(180)
    engine.tick()
    assert firing(engine) == {("decline_rate_spike", "T1"): "firing"}
    engine.on_record("window", window("T1", clock.t, txn=10, decline_rate=0.3))
    assert firing(engine) == {("decline_rate_spike", "T1"): "firing"}
    engine.on_record("window", window("T1", clock.t, txn=10, decline_rate=0.2))
    assert firing(engine) == {}


def test_slow_authorizations(engine: Engine, clock: Clock) -> None:
    engine.on_record("window", window("T1", clock.t, auth_p95_ms=3001))
    clock.advance(300)
    engine.tick()
    assert firing(engine) == {("slow_authorizations", "T1"): "firing"}


def test_app_version_behind_the_fleet(engine: Engine, clock: Clock) -> None:
    for i in range(9):
        engine.on_record("telemetry", tele(f"T{i}", clock.t, app_version="2.10.0"))
    engine.on_record("telemetry", tele("T-old", clock.t, app_version="2.9.3"))
    clock.advance(3600)
    engine.on_record("telemetry", tele("T-old", clock.t, app_version="2.9.3"))
    assert firing(engine) == {("app_version_behind", "T-old"): "firing"}
    alert = engine.alerts[("app_version_behind", "terminal", "T-old")]
    assert alert.summary == "Terminal T-old runs app 2.9.3, the fleet runs 2.10.0"


def test_dormant_terminal_fires_from_a_timer_after_offline_was_announced(
    engine: Engine, clock: Clock
) -> None:
    engine.on_record("telemetry", tele("T1", clock.t))
    engine.on_record("state", state("T1", False, clock.t + 90))
    clock.advance(3 * 86400)
    engine.tick()
    assert ("terminal_dormant", "T1") not in firing(engine)  # exactly 3 days: not more
    clock.advance(1)
    engine.tick()
    assert firing(engine)[("terminal_dormant", "T1")] == "firing"
    offline = engine.alerts[("terminal_offline", "terminal", "T1")]
    assert offline.state == "firing"
    assert events(engine) == [
        ("firing", "terminal_offline", "T1"),
        ("firing", "terminal_dormant", "T1"),
    ]


def _offline_fleet(engine: Engine, clock: Clock, n_off: int, total: int = 4) -> None:
    for i in range(total):
        engine.on_record("telemetry", tele(f"T{i}", clock.t))
    for i in range(n_off):
        engine.on_record("state", state(f"T{i}", False, clock.t))


def test_merchant_group_alert_inhibits_the_individual_offline_alerts(
    engine: Engine, clock: Clock
) -> None:
    _offline_fleet(engine, clock, n_off=3)
    assert firing(engine)[("merchant_terminals_offline", "M-1")] == "pending"
    clock.advance(120)
    engine.tick()
    states = firing(engine)
    assert states[("merchant_terminals_offline", "M-1")] == "firing"
    assert {states[("terminal_offline", f"T{i}")] for i in range(3)} == {"firing"}
    assert events(engine) == [("firing", "merchant_terminals_offline", "M-1")]
    t0 = engine.alerts[("terminal_offline", "terminal", "T0")]
    assert str(t0.suppressed_by).startswith("inhibited by merchant_terminals_offline")
    # Two come back: the group clears; the one still offline is announced now.
    for i in (1, 2):
        engine.on_record("telemetry", tele(f"T{i}", clock.t))
    engine.tick()
    assert events(engine) == [
        ("resolved", "merchant_terminals_offline", "M-1"),
        ("firing", "terminal_offline", "T0"),
    ]


def test_two_of_four_offline_is_no_merchant_alert(engine: Engine, clock: Clock) -> None:
    _offline_fleet(engine, clock, n_off=2)
    clock.advance(120)
    engine.tick()
    assert set(firing(engine)) == {("terminal_offline", "T0"), ("terminal_offline", "T1")}


def test_carrier_area_signal_loss_groups_by_carrier_and_cell(engine: Engine, clock: Clock) -> None:
    for i in range(6):
        engine.on_record("telemetry", tele(f"A{i}", clock.t, signal__type="none",
                                           signal__rsrp_dbm=None))  # fmt: skip
    for i in range(6):  # another carrier in the same cell: unaffected
        engine.on_record("telemetry", tele(f"B{i}", clock.t, signal__carrier="Other"))
    clock.advance(120)
    engine.tick()
    group = [a for a in engine.alerts.values() if a.rule == "carrier_area_signal_loss"]
    assert [(a.subject_id, a.state) for a in group] == [("Telco/48.80,2.30", "firing")]
    assert group[0].summary.startswith("6 of 6 terminals on carrier/area Telco/48.80,2.30")


def test_silence_suppresses_then_expires_and_announces(engine: Engine, clock: Clock) -> None:
    engine.add_silence({"terminal_id": "T1"}, 600, by="ops", comment="maintenance")
    engine.on_record("telemetry", tele("T1", clock.t, tamper=True))
    assert firing(engine) == {("tamper_detected", "T1"): "firing"}
    assert events(engine) == []
    clock.advance(600)
    engine.tick()
    assert events(engine) == [("firing", "tamper_detected", "T1")]


def test_silence_on_a_resolved_alert_sends_no_resolve_notice(engine: Engine, clock: Clock) -> None:
    engine.add_silence({"alertname": "printer_out_of_paper"}, 3600)
    engine.on_record("telemetry", tele("T1", clock.t, printer__paper="jammed"))
    clock.advance(60)
    engine.tick()
    engine.on_record("telemetry", tele("T1", clock.t, printer__paper="ok"))
    assert events(engine) == []


def test_ack_then_resolve(engine: Engine, clock: Clock) -> None:
    engine.on_record("telemetry", tele("T1", clock.t, tamper=True))
    alert_id = engine.alerts[("tamper_detected", "terminal", "T1")].alert_id
    engine.ack(alert_id, "alice")
    assert firing(engine) == {("tamper_detected", "T1"): "acknowledged"}
    with pytest.raises(KeyError):
        engine.ack("nope", "alice")
    engine.on_record("telemetry", tele("T1", clock.t + 1, tamper=False))
    assert events(engine) == [
        ("firing", "tamper_detected", "T1"),
        ("acknowledged", "tamper_detected", "T1"),
        ("resolved", "tamper_detected", "T1"),
    ]


def test_one_open_alert_per_rule_and_subject(engine: Engine, clock: Clock) -> None:
    for i in range(5):
        engine.on_record("telemetry", tele("T1", clock.t + i, tamper=True))
    assert len([a for a in engine.alerts.values() if a.rule == "tamper_detected"]) == 1
    assert len(events(engine)) == 1


def test_integrity_event_fires_per_merchant_and_resolves_after_quiet(
    engine: Engine, clock: Clock
) -> None:
    record = {"merchant_id": "M-1", "txn_id": "tx-9", "kind": "txn_id_reused", "extra": [1]}
    engine.on_record("integrity", record)
    engine.on_record("integrity", {**record, "txn_id": "tx-10"})
    alert = engine.alerts[("ledger_integrity", "merchant", "M-1")]
    assert alert.summary == "Integrity: transaction tx-10 at Cafe Luna (txn_id_reused); 2 event(s)"
    clock.advance(86400)
    engine.tick()
    assert firing(engine) == {}
    assert events(engine) == [
        ("firing", "ledger_integrity", "M-1"),
        ("resolved", "ledger_integrity", "M-1"),
    ]


def test_restore_resumes_timers_without_renotifying(engine: Engine, clock: Clock) -> None:
    engine.on_record("telemetry", tele("T1", clock.t, battery__level_pct=5))
    engine.on_record("telemetry", tele("T2", clock.t, tamper=True))
    engine.drain()
    restored = Engine(load_rules(None), clock, merchants=MERCHANTS)
    restored.restore(
        {t: dict(f) for t, f in engine.terminals.items()}, list(engine.alerts.values()), []
    )
    clock.advance(120)
    restored.tick()
    assert firing(restored) == {
        ("battery_low", "T1"): "firing",
        ("tamper_detected", "T2"): "firing",
    }
    assert events(restored) == [("firing", "battery_low", "T1")]


def test_removing_a_rule_by_reload_resolves_its_alerts(engine: Engine, clock: Clock) -> None:
    engine.on_record("telemetry", tele("T1", clock.t, tamper=True))
    engine.drain()
    rules = [r for r in load_rules(None).rules if r.name != "tamper_detected"]
    engine.set_rules(RuleSet(rules=rules))
    assert firing(engine) == {}
    assert events(engine) == [("resolved", "tamper_detected", "T1")]


def test_slow_authorizations_boundary_for_and_hysteresis(engine: Engine, clock: Clock) -> None:
    engine.on_record("window", window("T1", clock.t, auth_p95_ms=3000))
    assert firing(engine) == {}  # 3000 ms is not above the limit
    engine.on_record("window", window("T1", clock.t, auth_p95_ms=3001))
    clock.advance(299)
    engine.tick()
    assert firing(engine) == {("slow_authorizations", "T1"): "pending"}
    clock.advance(1)
    engine.tick()
    assert firing(engine) == {("slow_authorizations", "T1"): "firing"}
    assert events(engine) == [("firing", "slow_authorizations", "T1")]
    engine.on_record("window", window("T1", clock.t, auth_p95_ms=2000))
    assert firing(engine) == {("slow_authorizations", "T1"): "firing"}  # band: 2000-3000
    engine.on_record("window", window("T1", clock.t, auth_p95_ms=1999))
    assert firing(engine) == {}
    assert events(engine) == [("resolved", "slow_authorizations", "T1")]


def test_app_version_behind_resolves_once_the_terminal_updates(
    engine: Engine, clock: Clock
) -> None:
    for i in range(9):
        engine.on_record("telemetry", tele(f"T{i}", clock.t, app_version="2.10.0"))
    engine.on_record("telemetry", tele("T-old", clock.t, app_version="2.9.3"))
    clock.advance(3599)
    engine.tick()
    assert firing(engine) == {("app_version_behind", "T-old"): "pending"}
    clock.advance(1)
    engine.tick()
    assert firing(engine) == {("app_version_behind", "T-old"): "firing"}
    engine.on_record("telemetry", tele("T-old", clock.t, app_version="2.10.0"))
    assert firing(engine) == {}
    assert events(engine) == [
        ("firing", "app_version_behind", "T-old"),
        ("resolved", "app_version_behind", "T-old"),
    ]


def test_a_terminal_first_seen_dormant_gets_one_alert_not_two(engine: Engine, clock: Clock) -> None:
    # The engine learns of a terminal silent for four days (a restore, a backlog): dormant
    # fires at once, and the offline alert that follows 2 min later is inhibited by it.
    # (Inhibition holds back a firing notice; an offline alert announced days before the
    # terminal turned dormant stays announced, as the test above shows.)
    then = clock.t - 4 * 86400
    engine.on_record("telemetry", tele("T1", then))
    engine.on_record("state", state("T1", False, then + 90))
    engine.tick()
    assert firing(engine)[("terminal_dormant", "T1")] == "firing"
    clock.advance(120)
    engine.tick()
    offline = engine.alerts[("terminal_offline", "terminal", "T1")]
    assert offline.state == "firing"
    assert str(offline.suppressed_by).startswith("inhibited by terminal_dormant"), offline
    assert events(engine) == [("firing", "terminal_dormant", "T1")]
    # It checks in: both close; the inhibited offline alert sends no resolve notice.
    engine.on_record("telemetry", tele("T1", clock.t))
    engine.tick()
    assert firing(engine) == {}
    assert events(engine) == [("resolved", "terminal_dormant", "T1")]


def test_carrier_area_signal_loss_needs_five_terminals_and_inhibits_weak_signal(
    engine: Engine, clock: Clock
) -> None:
    for i in range(6):
        engine.on_record("telemetry", tele(f"A{i}", clock.t))
    for i in range(4):  # 4 of 6: below min_count 5
        engine.on_record("telemetry", tele(f"A{i}", clock.t, signal__type="none",
                                           signal__rsrp_dbm=None))  # fmt: skip
    clock.advance(120)
    engine.tick()
    assert not [a for a in engine.alerts.values() if a.rule == "carrier_area_signal_loss"]
    engine.on_record("telemetry", tele("A4", clock.t, signal__type="none",
                                       signal__rsrp_dbm=None))  # fmt: skip
    # A5 still has a weak signal for ten minutes: inhibited by the area's loss.
    for _ in range(10):
        engine.on_record("window", window("A5", clock.t, signal_avg_dbm=-111.0))
        clock.advance(60)
        engine.tick()
    states = firing(engine)
    assert states[("carrier_area_signal_loss", "Telco/48.80,2.30")] == "firing"
    assert states[("weak_signal", "A5")] == "firing"
    weak = engine.alerts[("weak_signal", "terminal", "A5")]
    assert str(weak.suppressed_by).startswith("inhibited by carrier_area_signal_loss"), weak
    assert ("firing", "weak_signal", "A5") not in events(engine)
    for i in range(5):  # signal back
        engine.on_record("telemetry", tele(f"A{i}", clock.t))
    engine.tick()
    assert ("carrier_area_signal_loss", "Telco/48.80,2.30") not in firing(engine)
