"""A small simulated fleet with scheduled faults through the real pipeline.

Terminals publish over real MQTT connections (their own accounts and Last Wills;
some multiplexed over a gateway account) to Mosquitto; the real bridge
(`posflow ingest`) and health worker (`posflow streams worker`) run as
subprocesses on this test's own topics and database. Every faulty terminal must
show up in the health rows with its reason, and raise exactly its alerts through
`posflow alerts run`; the healthy ones neither. `posflow simulate` itself runs as a
process: its /metrics, its summary line and a clean SIGTERM stop (no Last Wills).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
import yaml
from aiokafka import AIOKafkaConsumer
from paho.mqtt.enums import CallbackAPIVersion

from alerts.rules import default_rules_text, parse_duration
from cli.harness import Pipeline
from cli.loadtest import read_back
from posflow.settings import KafkaSettings, PostgresSettings, Settings
from posflow.stack import Stack, ensure_topics
from simulator.accounting import Recorder, reconcile
from simulator.engine import Run
from simulator.fleet import build_fleet
from simulator.register import register_fleet
from simulator.runner import drive
from simulator.scenarios import load_scenario
from tests.conftest import ROOT, free_port, unique

pytestmark = pytest.mark.slow

DURATION_S = 420  # seven simulated minutes...
SPEED = 30  # ...in 14 wall seconds
TERMINALS = 12
REAL = 8  # terminals 8-11 go over a multiplexed gateway connection

# What the "health" scenario does to each terminal, and what the health rows must say.
# EXPECTED_ALERTS (below) maps the same terminals to their alerts.
EXPECTED_REASON = {
    0: "battery (",  # failing battery: drains, overheats, dies (Last Will)
    1: "weak signal (none",  # signal loss
    2: "printer paper out",
    3: "transactions failing",  # every sale declined
}
OFFLINE = {0, 4}  # battery dead; switched off at 120 s: both by their Last Will
HEALTHY = range(6, TERMINALS)  # 5 sends broken messages only: dead letters, healthy windows


class Fixture:
    def __init__(self, settings: Settings, pg: PostgresSettings) -> None:
        self.run_id = unique("s").split("-")[1]
        self.prefix = f"sim{self.run_id}"
        self.settings = settings.model_copy(
            update={
                "kafka": KafkaSettings(
                    **{**settings.kafka.model_dump(), "topic_prefix": self.prefix}
                ),
                "postgres": pg,
            }
        )  # fmt: skip
        self.pipeline = Pipeline(settings, self.prefix, self.run_id, database=pg.database)

    def rows(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.settings.postgres.dsn()) as conn:
            return conn.execute(query.encode(), params).fetchall()


@pytest.fixture
async def sim(settings: Settings, pg: PostgresSettings, stack: Stack) -> Any:
    f = Fixture(settings, pg)
    await ensure_topics(f.settings)
    yield f
    f.pipeline.stop()


async def test_scheduled_faults_give_the_expected_health_rows_and_healthy_terminals_none(
    sim: Fixture,
) -> None:
    t0 = time.time() - DURATION_S  # event time catches up with the wall clock at the end
    fleet = build_fleet(TERMINALS, seed=sim.settings.simulator.seed, name="simit", at=t0)
    ids = [t.terminal_id for t in fleet.terminals]
    done = register_fleet(sim.settings, fleet)
    assert done == {
        "merchants": len(fleet.merchants),
        "terminals": 12,
        "mqtt_accounts": 13,
        "certificates": 0,
    }
    assert sim.rows("SELECT count(*) FROM terminals WHERE terminal_id = ANY(%s)", ids) == [(12,)]
    sim.pipeline.start()

    # Every shop open, and no failures but the scheduled ones: the clock cannot change the
    # outcome, and any health finding must come from a fault.
    run = Run(fleet, t0=t0, duration_s=DURATION_S, telemetry_s=30, txn_scale=4,
              scenario=load_scenario("health"), always_open=True,
              baseline_failures=False)  # fmt: skip
    rec = Recorder({t.index: t.terminal_id for t in fleet.terminals})
    result = await drive(sim.settings, fleet, run, on_sent=rec, max_real=REAL, gateways=1,
                         speed=SPEED, run_id=sim.run_id)  # fmt: skip
    assert result.stats.connect_failures == 0, result.stats.errors
    assert result.stats.wills == 2
    assert result.unacked == 0
    assert result.peak_connected == REAL + 1  # own connections + one gateway

    # Nothing lost: every message is in Kafka or an expected dead letter.
    seen = await read_back(sim.settings.kafka, set(ids), rec.total - rec.by_expect["dup"], 60)
    acc = reconcile(rec, seen)
    assert acc["lost"] == 0, acc["lost_examples"]
    assert acc["dead_letters_unexpected"] == 0
    assert acc["duplicates_unexpected"] == 0
    assert acc["wrong_verdict"] == 0
    assert (
        acc["dead_letters_expected"]
        == sum(v for k, v in rec.by_expect.items() if k.startswith("dl:"))
        > 0
    )
    assert {t for (t, _s) in seen.dead} == {ids[5]}  # only the broken app's terminal

    # Health rows: closed minutes of every terminal that was online for them.
    final = (
        "SELECT terminal_id, score, signal_score, battery_score, txn_score, printer_score,"
        " details FROM terminal_health WHERE (details->>'final')::boolean"
        " AND terminal_id = ANY(%s) ORDER BY terminal_id, window_start"
    )
    deadline = time.monotonic() + 60
    rows: list[tuple[Any, ...]] = []
    while time.monotonic() < deadline:
        rows = sim.rows(final, ids)
        have = {r[0] for r in rows}
        if len([r for r in rows if r[0] == ids[6]]) >= 5 and set(ids) - {ids[4]} <= have:
            break
        await asyncio.sleep(1)
    by_terminal: dict[str, list[tuple[Any, ...]]] = {}
    for r in rows:
        by_terminal.setdefault(r[0], []).append(r)
    reasons = {i: [set(r[6]["reasons"]) for r in by_terminal.get(ids[i], [])] for i in range(12)}

    for i, reason in EXPECTED_REASON.items():
        assert any(any(x.startswith(reason) for x in rs) for rs in reasons[i]), (i, reasons[i])
    # In every minute with telemetry: no signal at all, no paper at all.
    assert all(r[2] == 0 for r in by_terminal[ids[1]] if r[6]["samples"]), by_terminal[ids[1]]
    assert all(r[5] == 0 for r in by_terminal[ids[2]] if r[6]["samples"]), by_terminal[ids[2]]
    assert min(r[3] for r in by_terminal[ids[0]]) < 40  # the battery component collapsed
    for i in HEALTHY:
        assert len(by_terminal[ids[i]]) >= 5, i
        assert reasons[i], i
        assert all(rs == set() for rs in reasons[i]), (i, reasons[i])
        assert min(r[1] for r in by_terminal[ids[i]]) >= 80, i
    assert reasons[5]
    assert all(rs == set() for rs in reasons[5])

    # State changes on the health topic: the two Last Wills took theirs offline (the
    # broker published them when the connections dropped); nobody else went offline.
    changes = await _state_changes(sim.settings.kafka, set(ids), seconds=20)
    offline = {(t, reason) for t, online, reason in changes if not online}
    assert offline == {(ids[0], "last will"), (ids[4], "last will")}, changes
    # terminal_state shows the healthy terminals online (the two above may show online
    # again: the health worker reads status and telemetry from different topics, so a
    # telemetry record processed after the will brings its terminal back; reported).
    states = dict(
        sim.rows("SELECT terminal_id, online FROM terminal_state WHERE terminal_id = ANY(%s)", ids)
    )
    assert all(states[ids[i]] for i in HEALTHY), states


async def _state_changes(
    kafka: KafkaSettings, ours: set[str], seconds: float
) -> list[tuple[str, bool, str | None]]:
    """Online/offline changes the health worker published, from the start of its topic."""
    consumer = AIOKafkaConsumer(
        f"{kafka.topic_prefix}.health.v1",
        bootstrap_servers=kafka.bootstrap,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    out: list[tuple[str, bool, str | None]] = []
    try:
        deadline = time.monotonic() + seconds
        quiet = 0
        while time.monotonic() < deadline and quiet < 4:
            batches = await consumer.getmany(timeout_ms=500)
            quiet = 0 if batches else quiet + 1
            for records in batches.values():
                for r in records:
                    doc = json.loads(r.value or b"{}")
                    if doc.get("type") == "state" and doc.get("terminal_id") in ours:
                        out.append((doc["terminal_id"], doc["online"], doc.get("reason")))
    finally:
        await consumer.stop()
    return out


# --- `posflow simulate` as a process: metrics, summary, clean stop ---------------------------


def _get(port: int, path: str) -> tuple[int, bytes]:
    """(status, body); (0, b"") while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


async def _scrape(port: int) -> dict[str, float]:
    """``name{labels}`` -> value of every posflow_sim_* sample on /metrics."""
    status, body = await asyncio.to_thread(_get, port, "/metrics")
    assert status == 200, status
    text = body.decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("posflow_sim_"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


class _Listener:
    """The fleet's topics as the service account sees them (live messages only)."""

    def __init__(self, settings: Settings, merchants: set[str], fleet: str) -> None:
        m = settings.mosquitto
        self.fleet = fleet
        self.count = 0
        self.offline: list[str] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("simlisten"))
        self.client.username_pw_set(m.service_user, m.service_password.get_secret_value())
        self.client.on_message = self._message
        self.client.connect(m.host, m.port)
        for merchant in sorted(merchants):
            self.client.subscribe(f"pos/v1/{merchant}/+/+", qos=1)
        self.client.loop_start()

    def _message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:  # a retained status of an earlier run of this fleet
            return
        self.count += 1
        if msg.topic.endswith("/status") and json.loads(msg.payload)["state"] == "offline":
            self.offline.append(msg.topic.split("/")[3])

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


_SUMMARY = re.compile(
    r"published (?P<published>[\d,]+) \(telemetry (?P<telemetry>[\d,]+), txn (?P<txn>[\d,]+), "
    r"status (?P<status>[\d,]+)\), acknowledged (?P<acked>[\d,]+), expected dead letters "
    r"(?P<dead>[\d,]+), faults started (?P<faults>[\d,]+).*, wills (?P<wills>[\d,]+); "
    r"terminals (?P<terminals>[\d,]+),.* stopped by SIGTERM after"
)


async def test_simulate_serves_metrics_and_stops_cleanly_on_sigterm_without_wills(
    settings: Settings, pg: PostgresSettings, stack: Stack, tmp_path: Path
) -> None:
    name = "simcli"  # this test's own fleet (and MQTT accounts)
    fleet = build_fleet(TERMINALS, seed=settings.simulator.seed, name=name)
    ids = [t.terminal_id for t in fleet.terminals]
    port = free_port()
    listener = _Listener(settings, {m.merchant_id for m in fleet.merchants}, name)
    env = {
        **os.environ,
        "POSFLOW_SERVICES__SIMULATOR": str(port),
        "POSFLOW_POSTGRES__DATABASE": pg.database,
        "POSFLOW_STACK__DIR": str(settings.stack.dir),
    }
    argv = ["simulate", "-n", str(TERMINALS), "--fleet", name, "--forever", "--speed", "60",
            "--scenario", "health", "--max-real", str(REAL), "--gateways", "1"]  # fmt: skip
    with (tmp_path / "simulate.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *argv], env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=log,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60  # registration included (migrations, broker reload)
        ready = False
        while not ready and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "simulate.log").read_text()
            ready = (await asyncio.to_thread(_get, port, "/readyz"))[0] == 200
            await asyncio.sleep(0.2)
        assert ready, (tmp_path / "simulate.log").read_text()
        assert await asyncio.to_thread(_get, port, "/healthz") == (200, b'{"status": "ok"}')
        first = await _scrape(port)
        # Past every fault start (<= 120 s) and both Last Wills (battery dead by ~360 s).
        deadline = time.monotonic() + 30
        last = first
        while last["posflow_sim_simulated_seconds"] < 420 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            last = await _scrape(port)
        assert last["posflow_sim_simulated_seconds"] >= 420, last
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        out, _ = await asyncio.to_thread(proc.communicate, timeout=15)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (tmp_path / "simulate.log").read_text()
    assert took < 5, took
    await asyncio.sleep(2)  # anything the broker would still publish (a will) arrives
    listener.close()

    kinds = ("telemetry", "txn", "status")
    # The counters move while it runs (payments follow the shops' local hours: maybe none).
    key = 'posflow_sim_published_total{kind="telemetry"}'
    assert last[key] > first[key] > 0, (first, last)
    assert last["posflow_sim_acknowledged_total"] > first["posflow_sim_acknowledged_total"]
    assert last["posflow_sim_simulated_seconds"] > first["posflow_sim_simulated_seconds"]
    assert last["posflow_sim_terminals_total"] == TERMINALS
    assert last["posflow_sim_terminals_connected"] == TERMINALS - 2  # 0 and 4 went away
    assert last["posflow_sim_wills_total"] == 2
    assert last["posflow_sim_connect_failures_total"] == 0
    assert last["posflow_sim_expected_dead_letters_total"] > 0  # terminal 5's broken app
    # One per terminal hit: the "health" scenario's seven faults, one terminal each.
    assert {k: v for k, v in last.items() if k.startswith("posflow_sim_faults_started")} == {
        f'posflow_sim_faults_started_total{{kind="{kind}"}}': 1.0
        for kind in ("battery_failure", "signal_loss", "printer_out_of_paper", "decline_spike",
                     "terminal_offline", "malformed_messages", "card_number")
    }  # fmt: skip
    assert last["posflow_sim_acknowledged_total"] <= sum(
        last[f'posflow_sim_published_total{{kind="{k}"}}'] for k in kinds
    )

    # The summary: the final values of the same counters (a moment after the last scrape).
    line = out.decode().strip().splitlines()[-1]
    match = _SUMMARY.search(line)
    assert match, line
    got = {k: int(v.replace(",", "")) for k, v in match.groupdict().items()}
    for kind in kinds:
        assert got[kind] >= last[f'posflow_sim_published_total{{kind="{kind}"}}'], (kind, line)
    assert got["published"] == got["telemetry"] + got["txn"] + got["status"]
    assert (
        got["published"] - sum(last[f'posflow_sim_published_total{{kind="{k}"}}'] for k in kinds)
        < 200
    ), line  # 60 simulated s per wall s: a few hundred ms of traffic at most
    assert got["dead"] >= last["posflow_sim_expected_dead_letters_total"]
    assert (got["faults"], got["wills"], got["terminals"]) == (7, 2, TERMINALS)
    # Every message but the two wills (the broker publishes those) was acknowledged.
    assert got["acked"] == got["published"] - got["wills"], line
    # What the broker delivered is exactly what the summary says was published, and the
    # only offline statuses are the two wills of the faults: the stop triggered none.
    assert listener.count == got["published"], (listener.count, line)
    assert sorted(listener.offline) == [ids[0], ids[4]], listener.offline


# --- the alerts part of the scenario acceptance ------------------------------------------------

# What the "health" scenario must raise per terminal (alerts/rules/default.yaml names), in
# state firing or later; every other terminal nothing.
EXPECTED_ALERTS: dict[int, set[str]] = {
    0: {"battery_low", "battery_overheating", "terminal_offline"},  # drains, heats, dies
    # Total signal loss on one terminal raises no alert under the shipped rules: weak_signal
    # needs a dBm average (a reading of "none" has none) and carrier_area_signal_loss needs
    # 5 terminals of a carrier in one area. The engine does see it (signal_lost, below).
    1: set(),
    2: {"printer_out_of_paper"},
    3: {"decline_rate_spike"},
    4: {"terminal_offline"},  # switched off at 120 s: its Last Will
    5: set(),  # broken messages only: dead letters, no alert
}
ALERT_FOR = "2s"
# Slower than the health-rows test: the health worker (one faust process on a shared
# 2-core machine) falls behind on a payment-heavy fleet at 30x ("producer buffer full"),
# and its windows close without the payments still on their way.
ALERT_SPEED = 20  # 420 simulated s in 21 wall s
# Its condition depends on the merchant's real opening hours at the wall clock (minutes
# to close), so it keeps its shipped 5m and cannot fire within the test.
KEEP_FOR = {"battery_empty_before_close"}


def _test_rules(path: Path) -> set[str]:
    """The shipped rules with every `for` longer than ALERT_FOR cut to it (test only: the
    engine's `for` runs on the wall clock, and the fleet runs 20x faster than it)."""
    doc = yaml.safe_load(default_rules_text())
    cut = set()
    for rule in doc["rules"]:
        if rule["name"] in KEEP_FOR or "for" not in rule:
            continue
        if parse_duration(rule["for"]) > parse_duration(ALERT_FOR):
            rule["for"] = ALERT_FOR
            cut.add(rule["name"])
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return cut


async def test_scheduled_faults_raise_the_expected_alerts_and_healthy_terminals_none(
    sim: Fixture, tmp_path: Path
) -> None:
    """A 12-terminal fleet with the `health` scenario through the bridge, the health worker
    and `posflow alerts run` (own group, port, topics, database), with the shipped rules'
    `for` durations cut to 2 s in a user rules file (TEST ONLY: the engine's `for` is wall
    clock time and the fleet runs at 20x, so the shipped 1-10 min would need a 20-200 min
    run). Each faulty terminal has exactly its alerts; healthy terminals none."""
    rules = tmp_path / "rules.yaml"
    cut = _test_rules(rules)
    assert set().union(*EXPECTED_ALERTS.values()) <= cut
    t0 = time.time() - DURATION_S  # event time catches up with the wall clock at the end
    fleet = build_fleet(TERMINALS, seed=sim.settings.simulator.seed, name="simal", at=t0)
    ids = [t.terminal_id for t in fleet.terminals]
    merchants = [m.merchant_id for m in fleet.merchants]
    register_fleet(sim.settings, fleet)  # before the engine: it loads merchants at start
    sim.pipeline.start(alerts=True, env_extra={
        "POSFLOW_ALERTS__RULES_FILE": str(rules),
        "POSFLOW_ALERTS__TICK_S": "0.2",
        # The default 10 s of lateness is 0.5 wall s at 20x: payments (one more hop, the
        # re-keying router, seconds behind telemetry on a loaded machine) would land in
        # windows already closed and count as late. 150 s is 7.5 wall s here.
        "POSFLOW_STREAMS__GRACE_S": "150",
    })  # fmt: skip

    # Every shop open, no failures but the scheduled ones; payments at 30x the realistic
    # rate so terminal 3 has the 5 payments per window the decline rule asks for (~9).
    run = Run(fleet, t0=t0, duration_s=DURATION_S, telemetry_s=30, txn_scale=30,
              scenario=load_scenario("health"), always_open=True,
              baseline_failures=False)  # fmt: skip
    result = await drive(sim.settings, fleet, run, on_sent=lambda _m: None, max_real=REAL,
                         gateways=1, speed=ALERT_SPEED, run_id=sim.run_id)  # fmt: skip
    assert result.stats.wills == 2
    assert result.unacked == 0

    query = (
        "SELECT subject_kind, subject_id, rule, state, fired_at IS NOT NULL, summary"
        " FROM alerts WHERE subject_id = ANY(%s) OR merchant_id = ANY(%s)"
    )
    expected = {ids[i]: rules_ for i, rules_ in EXPECTED_ALERTS.items() if rules_}
    deadline = time.monotonic() + 40
    rows: list[tuple[Any, ...]] = []
    while time.monotonic() < deadline:
        rows = sim.rows(query, ids, merchants)
        fired: dict[str, set[str]] = {}
        for _kind, subject, rule, _state, was_fired, _summary in rows:
            if was_fired:
                fired.setdefault(subject, set()).add(rule)
        if all(expected[t] <= fired.get(t, set()) for t in expected):
            break
        await asyncio.sleep(1)
    # Another `for` past that, so an unexpected alert pending now would have fired too.
    await asyncio.sleep(parse_duration(ALERT_FOR) + 1)
    rows = sim.rows(query, ids, merchants)
    fired = {}
    for kind, subject, rule, state, was_fired, _summary in rows:
        assert kind == "terminal", rows  # no merchant / area / fleet alert for this fleet
        if was_fired:
            assert state in ("firing", "acknowledged", "resolved"), rows
            fired.setdefault(subject, set()).add(rule)
    facts = dict(sim.rows(
        "SELECT terminal_id, facts FROM alert_terminal_facts WHERE terminal_id = ANY(%s)", ids
    ))  # fmt: skip
    for i in range(TERMINALS):
        got = fired.get(ids[i], set())
        if got != EXPECTED_ALERTS.get(i, set()):
            windows = sim.rows(
                "SELECT window_start, details FROM terminal_health WHERE terminal_id = %s"
                " ORDER BY window_start",
                ids[i],
            )
            raise AssertionError(
                f"terminal {i}: fired {got}, expected {EXPECTED_ALERTS.get(i, set())}\n"
                f"engine facts: {json.dumps(facts.get(ids[i]))}\nalerts: {rows}\n"
                f"health windows: {windows}"
            )
    summaries = {(r[1], r[2]): r[5] for r in rows if r[4]}
    assert "last will" in summaries[(ids[4], "terminal_offline")]
    assert "printer out" in summaries[(ids[2], "printer_out_of_paper")]
    assert "100% of" in summaries[(ids[3], "decline_rate_spike")]
    # Terminal 1's loss reached the engine; no shipped rule alerts on one terminal's loss.
    assert facts[ids[1]]["signal_lost"] is True
    assert all(facts[ids[i]]["signal_lost"] is False for i in HEALTHY)
