"""`posflow loadtest` itself, small, on the real stack: its report accounts for every message.

Thirty terminals for 20 s (own connections and a multiplexed gateway), with broken
messages and duplicates injected; the load test starts its own bridge, health worker,
settlement worker and raw sink, reads Kafka back and counts the database. The report
(JSON and Markdown) must say: nothing lost up to Kafka, nothing lost before the
database, the expected dead letters and duplicates recognised as such.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posflow.settings import Settings
from posflow.stack import Stack
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow

SCENARIO = """
name: lt-test
faults:
  - kind: malformed_messages
    at_s: 0
    target: {indexes: [1, 2]}
    params: {probability: 0.5}
  - kind: duplicate_messages
    at_s: 0
    target: {indexes: [3]}
    params: {probability: 0.5}
"""


def test_a_small_load_run_accounts_for_every_message_to_kafka_and_the_database(
    settings: Settings, stack: Stack, tmp_path: Path
) -> None:
    scenario = tmp_path / "lt.yaml"
    scenario.write_text(SCENARIO)
    argv = [
        sys.executable, "-m", "cli", "loadtest", "-n", "30", "-d", "20",
        "--ramp", "30", "--telemetry-s", "5", "--txn-scale", "20", "--max-real", "20",
        "--gateways", "1", "--scenario", str(scenario), "--out-dir", str(tmp_path),
        "--name", "small",
    ]  # fmt: skip
    env = {**os.environ, "POSFLOW_SERVICES__SIMULATOR": str(free_port()), "COLUMNS": "160"}
    done = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((tmp_path / "small.json").read_text())
    a, db = report["accounting"], report["database"]
    assert a["sent"] > 100
    assert a["lost"] == 0, a
    assert a["dead_letters_unexpected"] == 0, a
    assert a["dead_letters_expected"] > 0, a
    assert a["duplicates_expected"] > 0, a
    assert a["duplicates_unexpected"] == 0, a
    assert report["pipeline_exited_during_run"] == {}
    assert report["connections"] == {
        "real": 20, "multiplexed": 10, "gateways": 1, "peak_connected": 21,
    }  # fmt: skip
    # Every reading and payment is a row (the duplicates once), nothing else is missing.
    assert db["stored_rows"] == db["expected_rows"] > 0, db
    assert db["lost_before_database"] == 0
    assert db["telemetry_rows"] + db["transactions_rows"] == db["stored_rows"]
    latency = db["latency_publish_to_database_ms"]
    assert latency["n"] >= db["stored_rows"], latency  # each row observed (a replay again)
    assert latency["p99_le"] is not None, latency
    # The cost table: every posflow stage's CPU over the messages it handled, and the sum.
    cost = report["cost"]
    stages = {r["process"]: r for r in cost["stages"]}
    assert {"ingest", "health", "raw sink", "settlement", "alerts"} <= stages.keys(), stages
    assert {"kafka", "mosquitto", "postgres", "simulator"} <= stages.keys(), stages
    assert stages["ingest"]["messages_handled"] >= a["sent"] - a["duplicates_expected"], stages
    for stage in ("ingest", "health", "raw sink", "settlement", "alerts"):
        assert stages[stage]["messages_handled"] > 0, stages[stage]
        assert stages[stage]["cpu_us_per_message_handled"] > 0, stages[stage]
    assert cost["posflow_cpu_us_per_telemetry_message"] > 0, cost
    markdown = (tmp_path / "small.md").read_text()
    assert "## Cost per message" in markdown
    assert "| **lost** | **0** |" in markdown
    assert "| **lost before the database** | **0** |" in markdown
    assert "lost before the database [bold]" not in done.stdout  # rich rendered the markup
    assert "lost before the database 0" in done.stdout
