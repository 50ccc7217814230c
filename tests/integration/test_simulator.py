"""A small simulated fleet with scheduled faults through the real pipeline.

Terminals publish over real MQTT connections (their own accounts and Last Wills;
some multiplexed over a gateway account) to Mosquitto; the real bridge
(`posflow ingest`) and health worker (`posflow streams worker`) run as
subprocesses on this test's own topics and database. Every faulty terminal must
show up in the health rows with its reason; the healthy ones must not.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer

from posflow.settings import KafkaSettings, PostgresSettings, Settings
from posflow.stack import Stack, ensure_topics
from simulator.accounting import Recorder, reconcile
from simulator.engine import Run
from simulator.fleet import build_fleet
from simulator.loadtest import read_back
from simulator.register import register_fleet
from simulator.runner import Pipeline, drive
from simulator.scenarios import load_scenario
from tests.conftest import unique

pytestmark = pytest.mark.slow

DURATION_S = 420  # seven simulated minutes...
SPEED = 30  # ...in 14 wall seconds
TERMINALS = 12
REAL = 8  # terminals 8-11 go over a multiplexed gateway connection

# What the "health" scenario does to each terminal, and what the health rows must say.
# The alert engine's check (when `posflow alerts` exists) maps the same terminals.
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
    assert done == {"merchants": len(fleet.merchants), "terminals": 12, "mqtt_accounts": 13}
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


# For the alerts check (alerts/rules/default.yaml names): which alert each faulty terminal
# should raise; HEALTHY terminals none.
EXPECTED_ALERTS = {
    0: {"battery_low", "battery_overheating", "terminal_offline"},
    1: {"carrier_area_signal_loss"},  # no signal at all: no dBm for weak_signal to average
    2: {"printer_out_of_paper"},
    3: {"decline_rate_spike"},
    4: {"terminal_offline"},
}


@pytest.mark.skip(
    reason="alert engine in progress (alerts/): its rules hold for 1-10 min of wall-clock "
    "time; to add: run `posflow alerts run` as a third subprocess in the test above "
    "(POSFLOW_ALERTS__GROUP unique), run the fleet at speed 1 for ~11 min or let the "
    "engine's `for` follow event time, then assert EXPECTED_ALERTS by terminal and none "
    "for HEALTHY from the alerts table"
)
def test_scheduled_faults_raise_the_expected_alerts_and_healthy_terminals_none() -> None:
    raise AssertionError("not written: see the skip reason")
