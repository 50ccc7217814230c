"""The simulator offline: fleets, behaviour, faults and determinism, checked message by message."""

from __future__ import annotations

import hashlib
import json
import math
import socket
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from cli.main import main as cli_main
from posflow.contracts import (
    Accepted,
    Rejected,
    Status,
    Telemetry,
    Transaction,
    validate_message,
)
from posflow.contracts.money import FeePlan, SettlementRule
from posflow.errors import PosflowError
from posflow.settings import ServicePorts, Settings
from simulator.accounting import (
    KafkaSeen,
    Recorder,
    expected_rows,
    parse_deadletter,
    reconcile,
)
from simulator.behaviour import DECLINE_CODES
from simulator.engine import Message, Run
from simulator.fleet import CATEGORIES, build_fleet
from simulator.metrics import SimMetrics
from simulator.scenarios import Fault, Scenario, Target, load_scenario
from simulator.service import serve_metrics
from simulator.transport import Fanout

T0 = 1_790_000_000.0  # 2026-09-21T13:33:20Z
RECEIVED = datetime(2026, 9, 21, 14, tzinfo=UTC)


def _messages(seed: int, *, terminals: int = 60, scenario: str | None = "mixed") -> list[Message]:
    fleet = build_fleet(terminals, seed=seed, name="u", at=T0)
    plan = load_scenario(scenario) if scenario else None
    return Run(fleet, t0=T0, duration_s=600, telemetry_s=10, scenario=plan).all()


def _digest(messages: list[Message]) -> str:
    h = hashlib.sha256()
    for m in messages:
        h.update(f"{m.at:.6f}|{m.topic}|{m.expect}|{m.retain}|".encode())
        h.update(m.payload)
        h.update(m.will or b"-")
    return h.hexdigest()


def _payload(m: Message) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(m.payload)
    return doc


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not() -> None:
    first, second = _messages(42), _messages(42)
    assert len(first) > 3000
    assert [m.payload for m in first] == [m.payload for m in second]
    assert _digest(first) == _digest(second)
    other = _messages(43)
    assert _digest(other) != _digest(first)
    # Not only timing: the content differs (ids are the same, the values are not).
    assert {m.payload for m in other}.isdisjoint({m.payload for m in first if m.kind == "txn"})


def test_every_message_gets_the_verdict_the_simulator_expects_from_the_bridge() -> None:
    plan = Scenario(
        name="all",
        faults=[
            Fault(kind=kind, at_s=0, target=Target(count=6))
            for kind in ("malformed_messages", "card_number", "duplicate_messages", "clock_skew")
        ],
    )
    fleet = build_fleet(40, seed=1, name="v", at=T0)
    messages = Run(fleet, t0=T0, duration_s=900, telemetry_s=10, txn_scale=5, scenario=plan,
                   always_open=True).all()  # fmt: skip
    verdicts: Counter[str] = Counter()
    first: dict[tuple[int, int], str] = {}
    for m in messages:
        result = validate_message(m.topic, m.payload, received_at=RECEIVED, mqtt_mid=1)
        if isinstance(result, Accepted):
            got = "ok"
        else:
            assert isinstance(result, Rejected)
            got = f"dl:{result.dead_letter.reason.value}"
        want = first.setdefault((m.terminal, m.seq), m.expect)  # a duplicate: as the first
        assert got == want, (m.expect, got, m.payload[:200])
        verdicts[m.expect] += 1
    for reason in ("card_data", "malformed_json", "unknown_field", "naive_timestamp"):
        assert verdicts[f"dl:{reason}"] > 0, reason
    assert verdicts["dup"] > 0
    assert verdicts["ok"] > 3 * sum(v for k, v in verdicts.items() if k != "ok")


def test_every_payload_is_byte_for_byte_what_its_contract_model_writes() -> None:
    """Telemetry and status are written without building the model (cheaper): each must
    still validate and serialise back to the very same bytes, in every fault's variant."""
    kinds = ("battery_failure", "signal_loss", "terminal_moved", "printer_out_of_paper",
             "tamper", "clock_skew", "terminal_offline")  # fmt: skip
    plan = Scenario(
        name="all", faults=[Fault(kind=k, at_s=60, target=Target(count=8)) for k in kinds]
    )
    fleet = build_fleet(60, seed=5, name="b", at=T0)
    messages = Run(fleet, t0=T0, duration_s=900, telemetry_s=10, scenario=plan).all()
    models: dict[str, type[Telemetry | Status | Transaction]] = {
        "telemetry": Telemetry, "status": Status, "txn": Transaction,
    }  # fmt: skip
    checked: Counter[str] = Counter()
    networks: set[str] = set()
    for m in messages:
        if m.expect != "ok" or not m.payload:
            continue
        model = models[m.kind].model_validate_json(m.payload)
        assert model.model_dump_json().encode() == m.payload, m.payload[:200]
        if isinstance(model, Telemetry):
            networks.add(model.signal.type)
        checked[m.kind] += 1
    assert checked["telemetry"] > 2000
    assert checked["status"] > 60
    assert networks >= {"lte", "wifi", "ethernet", "none"}, networks


def test_a_card_number_never_leaves_the_dead_letter_unredacted() -> None:
    plan = Scenario(
        name="pan", faults=[Fault(kind="card_number", at_s=0, target=Target(indexes=[0]))]
    )
    fleet = build_fleet(1, seed=3, name="p", at=T0)
    msgs = Run(fleet, t0=T0, duration_s=3600, txn_scale=5, scenario=plan, always_open=True).all()
    bad = [m for m in msgs if m.expect == "dl:card_data"]
    assert bad
    for m in bad:
        result = validate_message(m.topic, m.payload, received_at=RECEIVED, mqtt_mid=1)
        assert isinstance(result, Rejected)
        letter = result.dead_letter.to_json()
        for pan in (b"4111111111111111", b"5555555555554444", b"378282246310005"):
            assert pan not in letter
        # The accounting still finds which message it was.
        assert parse_deadletter(letter) == (fleet.terminals[0].terminal_id, m.seq, "card_data")


def test_seq_is_unique_per_terminal_and_increasing_from_the_runs_start() -> None:
    msgs = [m for m in _messages(5) if m.expect != "dup"]
    base = int(T0) * 10  # a later run's seqs are all higher
    by_terminal: dict[int, list[int]] = {}
    for m in msgs:
        by_terminal.setdefault(m.terminal, []).append(m.seq)
    for seqs in by_terminal.values():
        assert len(seqs) == len(set(seqs))
        assert seqs == sorted(seqs)
        online_and_will = 2  # the online status reserves the next seq for its Last Will
        assert seqs[0] == base
        assert seqs[1] == base + online_and_will


def test_the_fleet_has_places_hours_plans_and_unique_ids() -> None:
    fleet = build_fleet(500, seed=9, name="f", at=T0)
    assert len(fleet.terminals) == 500
    assert len({t.terminal_id for t in fleet.terminals}) == 500
    assert fleet.terminals[0].terminal_id == "T-f-000001"
    assert fleet.terminals[0].merchant.merchant_id == "M-f-00001"
    for m in fleet.merchants:
        assert m.category in CATEGORIES
        assert m.opening_hours.keys() == {"mon", "tue", "wed", "thu", "fri", "sat", "sun"}
        assert abs(m.lat - m.city.lat) < 0.1
        assert abs(m.lon - m.city.lon) < 0.11
        plan = FeePlan.model_validate(m.fee_plan)  # what the settlement worker reads
        assert plan.rule_for("visa", "chip").rate()[0] > 0
        assert plan.rule_for("amex", "chip").percent == "2.9"
        assert SettlementRule.model_validate(m.settlement_rule).kind in ("instant", "daily")
    sydney = [m for m in fleet.merchants if m.city.name == "Sydney"]
    assert sydney
    assert {m.utc_offset_s for m in sydney} == {10 * 3600}
    assert len({t.password for t in fleet.terminals}) == 500
    # Same seed, same fleet; another name, other ids and passwords.
    assert build_fleet(500, seed=9, name="f", at=T0) == fleet
    assert (
        build_fleet(5, seed=9, name="g", at=T0).terminals[0].password != fleet.terminals[0].password
    )


def test_payments_follow_the_merchants_local_hours() -> None:
    fleet = build_fleet(300, seed=11, name="h", at=T0)
    cafes = {t.index for t in fleet.terminals if t.merchant.category == "cafe"}
    run = Run(fleet, t0=T0, duration_s=24 * 3600, telemetry_s=3600)
    hours: Counter[int] = Counter()
    for m in run.all():
        if m.kind == "txn" and m.terminal in cafes:
            t = fleet.terminals[m.terminal]
            local = datetime.fromisoformat(_payload(m)["ts"]).timestamp() + t.merchant.utc_offset_s
            hours[int(local // 3600 % 24)] += 1
    assert hours
    assert set(hours) <= set(range(6, 16))
    assert hours[8] > hours[15]  # the morning peak


def test_payment_mix_is_realistic() -> None:
    fleet = build_fleet(200, seed=12, name="m", at=T0)
    txns = [_payload(m) for m in Run(fleet, t0=T0, duration_s=3600, telemetry_s=3600,
                                       always_open=True).all() if m.kind == "txn"]  # fmt: skip
    assert len(txns) > 3000
    status = Counter(t["status"] for t in txns)
    assert 0.90 < status["approved"] / len(txns) < 0.97
    assert 0.02 < status["declined"] / len(txns) < 0.07
    assert {t["decline_code"] for t in txns if t["status"] == "declined"} <= {
        c for c, _ in DECLINE_CODES
    }
    types = Counter(t["type"] for t in txns)
    assert types["refund"] > 0
    assert types["void"] > 0
    assert all(t["original_txn_id"] for t in txns if t["type"] in ("refund", "void"))
    assert any(t["tip_minor"] > 0 for t in txns)
    assert all(isinstance(t["amount_minor"], int) and t["amount_minor"] >= 100 for t in txns)
    assert Counter(t["entry_mode"] for t in txns).most_common(1)[0][0] == "contactless"
    assert all(t["card_token"].startswith("tok_") and not any(c.isdigit() for c in t["card_token"])
               for t in txns)  # fmt: skip


def test_faults_change_exactly_the_targeted_terminals() -> None:
    plan = load_scenario("health")
    fleet = build_fleet(12, seed=42, name="s", at=T0)
    msgs = Run(fleet, t0=T0, duration_s=600, telemetry_s=15, scenario=plan, always_open=True).all()
    tele: dict[int, list[dict[str, Any]]] = {}
    for m in msgs:
        if m.kind == "telemetry" and m.expect in ("ok", "dup"):
            tele.setdefault(m.terminal, []).append(_payload(m))
    wills = [m for m in msgs if m.is_will]
    # 0: the battery drains and dies; its Last Will goes out and then nothing more.
    levels = [t["battery"]["level_pct"] for t in tele[0]]
    assert levels[-1] < 20
    assert levels[0] > 40
    assert all(not t["battery"]["charging"] for t in tele[0][3:])
    assert max(t["battery"]["temperature_c"] for t in tele[0]) > 45
    assert [w.terminal for w in wills] == [4, 0] or sorted(w.terminal for w in wills) == [0, 4]
    will0 = next(w for w in wills if w.terminal == 0)
    assert all(m.at <= will0.at for m in msgs if m.terminal == 0)
    assert json.loads(will0.payload)["state"] == "offline"
    # 1: no signal at all; 2: out of paper; 4: silent after its will at 120 s.
    assert {t["signal"]["type"] for t in tele[1]} == {"none"}
    assert {t["printer"]["paper"] for t in tele[2]} == {"out"}
    will4 = next(w for w in wills if w.terminal == 4)
    assert will4.at == 120
    assert not [m for m in msgs if m.terminal == 4 and m.at > 120]
    # 3: every payment declined, with real response codes.
    declined = [_payload(m) for m in msgs if m.terminal == 3 and m.kind == "txn"]
    assert declined
    assert {d["status"] for d in declined if d["type"] == "sale"} == {"declined"}
    # 5: broken messages and card numbers; the rest of the fleet is clean.
    assert {m.expect for m in msgs if m.terminal == 5} > {"ok"}
    healthy = [m for m in msgs if m.terminal >= 6]
    assert {m.expect for m in healthy} == {"ok"}
    for i in range(6, 12):
        assert {t["printer"]["paper"] for t in tele[i]} == {"ok"}
        assert not any(t["tamper"] for t in tele[i])


def test_moved_tampered_and_skewed_terminals() -> None:
    plan = Scenario(name="x", faults=[
        Fault(kind="terminal_moved", at_s=60, target=Target(indexes=[0]),
              params={"distance_km": 40}),
        Fault(kind="tamper", at_s=60, target=Target(indexes=[1])),
        Fault(kind="clock_skew", at_s=0, target=Target(indexes=[2]), params={"skew_s": -3600}),
    ])  # fmt: skip
    fleet = build_fleet(3, seed=4, name="x", at=T0)
    msgs = [m for m in Run(fleet, t0=T0, duration_s=300, telemetry_s=10, scenario=plan).all()
            if m.kind == "telemetry"]  # fmt: skip
    t0 = [_payload(m) for m in msgs if m.terminal == 0]
    home = fleet.terminals[0]
    assert abs(t0[0]["location"]["lat"] - home.lat) < 0.001
    assert t0[-1]["location"]["lat"] - home.lat == pytest.approx(40 / 111, abs=0.001)
    assert [p["tamper"] for p in (_payload(m) for m in msgs if m.terminal == 1)][-1] is True
    skewed = next(m for m in msgs if m.terminal == 2)
    assert datetime.fromisoformat(_payload(skewed)["ts"]).timestamp() == pytest.approx(
        T0 + skewed.at - 3600, abs=0.01
    )


def test_a_shard_generates_the_same_messages_for_its_terminals() -> None:
    fleet = build_fleet(30, seed=8, name="sh", at=T0)
    plan = load_scenario("mixed")
    whole = Run(fleet, t0=T0, duration_s=300, scenario=plan).all()
    part = Run(fleet, t0=T0, duration_s=300, scenario=plan, only=range(10, 20)).all()
    assert [m.payload for m in whole if 10 <= m.terminal < 20] == [m.payload for m in part]


def test_scenarios_shipped_load_and_broken_ones_say_where(tmp_path: Path) -> None:
    assert {f.kind for f in load_scenario("mixed").faults} == {
        "battery_failure", "signal_loss", "terminal_offline", "printer_out_of_paper",
        "decline_spike", "terminal_moved", "tamper", "duplicate_messages",
        "malformed_messages", "clock_skew", "card_number",
    }  # fmt: skip
    with pytest.raises(PosflowError, match=r"no scenario named 'nope'.*mixed"):
        load_scenario("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\nfaults:\n  - kind: meteor\n    at_s: 1\n    target: {count: 1}\n")
    with pytest.raises(PosflowError, match=r"bad.yaml: faults.0.kind"):
        load_scenario(str(bad))
    bad.write_text("name: b\nfaults:\n  - kind: tamper\n    at_s: 1\n")
    with pytest.raises(PosflowError, match="target selects nothing"):
        load_scenario(str(bad))
    bad.write_text("name: [b\n")
    with pytest.raises(PosflowError, match="not valid YAML"):
        load_scenario(str(bad))


def test_reconcile_finds_lost_duplicated_and_dead_lettered_messages() -> None:
    fleet = build_fleet(1, seed=1, name="r", at=T0)
    tid = fleet.terminals[0].terminal_id
    topic = fleet.terminals[0].topic("telemetry")
    rec = Recorder({0: tid})
    for seq, expect in [
        (0, "ok"),
        (1, "ok"),
        (2, "ok"),
        (3, "dl:card_data"),
        (4, "ok"),
        (4, "dup"),
    ]:
        rec(Message(0.0, 0, "telemetry", seq, topic, b"{}", expect=expect))
    seen = KafkaSeen()
    ours = {tid}

    def env(seq: int) -> bytes:
        return json.dumps(
            {"terminal_id": tid, "payload": {"seq": seq}}, separators=(",", ":")
        ).encode()

    now_ms = int(rec.last_at * 1000) + 5
    for seq in (0, 1, 1, 4, 4):  # 2 lost, 1 delivered twice unasked, 4 twice as sent
        seen.add_valid("telemetry", env(seq), now_ms, ours)
    seen.add_dead(json.dumps({"original_topic": topic, "reason": "card_data",
                              "payload_redacted": '{"seq":3,"card_token":"****"}'}).encode(),
                  now_ms, ours)  # fmt: skip
    other = {"terminal_id": "T-other", "payload": {"seq": 1}}
    seen.add_valid("telemetry", json.dumps(other, separators=(",", ":")).encode(), now_ms, ours)
    out = reconcile(rec, seen)
    assert out["lost"] == 1
    assert out["lost_examples"] == [f"{tid}#2"]
    assert out["delivered"] == 3
    assert out["duplicates_expected"] == 1
    assert out["duplicates_unexpected"] == 1
    assert out["dead_letters_expected"] == 1
    assert out["dead_letters_unexpected"] == 0
    assert out["dead_letters_expected_by_reason"] == {"card_data": 1}
    assert seen.other_terminals == 1
    assert out["latency_publish_to_kafka_ms"]["n"] == 3


def test_the_acl_lets_a_gateway_publish_for_every_terminal_and_read_nothing() -> None:
    from posflow.stack.mosquitto import render_acl

    acl = render_acl("posflow-svc", ["posflow-gw-lt"])
    assert "user posflow-gw-lt\ntopic write pos/v1/+/+/+\n" in acl
    assert "pattern write pos/v1/+/%u/telemetry" in acl  # terminals still only their own
    assert render_acl("posflow-svc").count("user ") == 1  # no gateway: as before


def _samples(metrics: SimMetrics) -> dict[str, float]:
    out = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("posflow_sim_"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics_count_what_was_handed_to_mqtt_and_the_summary_says_the_same() -> None:
    plan = Scenario(name="m", faults=[
        Fault(kind="malformed_messages", at_s=0, target=Target(indexes=[1])),
        Fault(kind="card_number", at_s=0, target=Target(indexes=[2])),
        Fault(kind="terminal_offline", at_s=60, duration_s=120, target=Target(indexes=[3, 4])),
    ])  # fmt: skip
    fleet = build_fleet(10, seed=3, name="mx", at=T0)
    messages = Run(fleet, t0=T0, duration_s=600, telemetry_s=10, txn_scale=5, scenario=plan,
                   always_open=True).all()  # fmt: skip
    metrics = SimMetrics(terminals_total=10)
    for m in messages:
        metrics.on_sent(m)
    metrics.fault_started("terminal_offline", 2)
    kinds = Counter(m.kind for m in messages)
    dead = sum(1 for m in messages if m.expect.startswith("dl:"))
    wills = sum(1 for m in messages if m.is_will)
    assert dead > 0
    assert wills == 2  # 3 and 4 each drop once (and come back)
    got = _samples(metrics)
    for kind in ("telemetry", "txn", "status"):
        assert got[f'posflow_sim_published_total{{kind="{kind}"}}'] == kinds[kind] > 0
    assert got["posflow_sim_expected_dead_letters_total"] == dead
    assert got["posflow_sim_wills_total"] == wills
    assert got['posflow_sim_faults_started_total{kind="terminal_offline"}'] == 2
    assert got["posflow_sim_terminals_total"] == 10
    assert got["posflow_sim_terminals_connected"] == 0  # no transport bound
    line = metrics.summary()
    assert line.startswith(
        f"published {len(messages):,} (telemetry {kinds['telemetry']:,}, txn {kinds['txn']:,}, "
        f"status {kinds['status']:,}), acknowledged 0, expected dead letters {dead:,}, "
        f"faults started 2 (terminal_offline 2), wills {wills}; terminals 10,"
    ), line


def test_a_run_without_an_end_keeps_going_and_its_faults_never_stop() -> None:
    plan = Scenario(name="f", faults=[
        Fault(kind="printer_out_of_paper", at_s=5, target=Target(indexes=[0])),
    ])  # fmt: skip
    fleet = build_fleet(3, seed=1, name="inf", at=T0)
    run = Run(fleet, t0=T0, duration_s=math.inf, telemetry_s=30, scenario=plan)
    first = run.until(3600)
    later = run.until(7 * 86400)
    assert not run.done
    assert max(m.at for m in first) < 3600 <= min(m.at for m in later)
    assert max(m.at for m in later) > 7 * 86400 - 60
    papers = {_payload(m)["printer"]["paper"] for m in later if m.kind == "telemetry"
              and m.terminal == 0}  # fmt: skip
    assert papers == {"out"}


async def test_a_halted_fanout_hands_nothing_more_to_mqtt() -> None:
    fleet = build_fleet(3, seed=1, name="h", at=T0)
    fan = Fanout(
        terminals={t.index: (t.terminal_id, t.terminal_id, t.password) for t in fleet.terminals},
        host="127.0.0.1", port=1, max_real=3, gateways=0, gateway_user="gw",
        gateway_password="x", on_sent=lambda _m: None, seed=1, run_id="h",
    )  # fmt: skip
    telemetry = [m for m in Run(fleet, t0=T0, duration_s=300, telemetry_s=10).all()
                 if m.kind == "telemetry"]  # fmt: skip
    for m in telemetry[:5]:
        fan.send(m)  # no connection yet: the terminals' offline buffers
    assert fan.queued() == 5
    fan.halt()
    assert (fan.queued(), fan.unsent) == (0, 5)
    fan.send(telemetry[5])
    assert (fan.queued(), fan.unsent, fan.stats.published) == (0, 6, 0)
    assert fan.terminals_connected() == 0
    await fan.close()


@pytest.mark.parametrize("endless", [["--forever"], ["--duration", "0"]])
def test_offline_generation_of_an_endless_run_is_refused(
    endless: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.jsonl"
    assert cli_main(["simulate", "-n", "2", *endless, "--offline", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--offline writes a whole run: it needs a finite --duration" in err
    assert not out.exists()


async def test_a_busy_metrics_port_stops_simulate_but_not_the_load_test() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(services=ServicePorts(simulator=port))
        metrics = SimMetrics(terminals_total=1)
        assert await serve_metrics(settings, metrics, lambda: True, required=False) is None
        with pytest.raises(PosflowError, match=rf"simulator's metrics on 127\.0\.0\.1:{port}"):
            await serve_metrics(settings, metrics, lambda: True, required=True)


@pytest.mark.parametrize(("terminals", "merchants"), [(2000, 200), (40, 4), (7, 7), (5, 1)])
def test_a_fleet_with_a_merchant_count_has_exactly_that_many_each_with_a_terminal(
    terminals: int, merchants: int
) -> None:
    fleet = build_fleet(terminals, seed=42, name="mc", at=T0, merchants=merchants)
    per = Counter(t.merchant.merchant_id for t in fleet.terminals)
    assert len(fleet.terminals) == terminals
    assert len(fleet.merchants) == len(per) == merchants
    assert min(per.values()) >= 1
    again = build_fleet(terminals, seed=42, name="mc", at=T0, merchants=merchants)
    assert [t.terminal_id for t in again.terminals] == [t.terminal_id for t in fleet.terminals]
    assert [t.merchant.merchant_id for t in again.terminals] == [
        t.merchant.merchant_id for t in fleet.terminals
    ]
    if 1 < merchants < terminals:  # the realistic mix: some merchants bigger than others
        assert max(per.values()) > min(per.values())


def test_more_merchants_than_terminals_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli_main(["fleet", "register", "-n", "3", "--merchants", "4", "--no-mqtt"]) == 1
    err = capsys.readouterr().err
    assert "--merchants 4 is more than the 3 terminals" in err
    with pytest.raises(ValueError, match="merchants must be 1 to 3"):
        build_fleet(3, seed=1, merchants=4)


def test_the_counts_file_says_what_the_metrics_say() -> None:
    fleet = build_fleet(4, seed=2, name="cj", at=T0)
    plan = Scenario(name="d", faults=[
        Fault(kind="duplicate_messages", at_s=0, target=Target(indexes=[0]),
              params={"probability": 1.0}),
    ])  # fmt: skip
    messages = Run(fleet, t0=T0, duration_s=120, telemetry_s=10, scenario=plan).all()
    metrics = SimMetrics(terminals_total=4)
    for m in messages:
        metrics.on_sent(m)
    counts = json.loads(json.dumps(metrics.counts()))
    kinds = Counter(m.kind for m in messages)
    assert counts["published"] == {k: kinds[k] for k in ("telemetry", "txn", "status")}
    assert counts["duplicates"] == sum(1 for m in messages if m.expect == "dup") > 0
    assert counts["terminals"] == 4
    # What the database must hold: readings and payments, each duplicate once.
    dups = counts["duplicates"]
    assert expected_rows(counts) == kinds["telemetry"] + kinds["txn"] - dups
