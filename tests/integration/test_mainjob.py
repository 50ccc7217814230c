"""The main job (`posflow demo --duration`): every service supervised, a fleet, a summary.

The run gets its own topic prefix, database, consumer groups, ports and fleet, so it
never sees another test's data; otherwise it is exactly what the README's first
command runs. During the run the test kills one service with SIGKILL: the supervisor
must restart it and say so, and the money must still add up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from posflow.settings import PostgresSettings, Settings
from posflow.stack import Stack
from tests.conftest import ROOT, free_port, unique

pytestmark = pytest.mark.slow

DURATION_S = 120  # the printer's 1 min `for` fires within it
TERMINALS = 40


def _env(settings: Settings, run: str, db: str) -> dict[str, str]:
    ports = {name: str(free_port()) for name in ("ingest", "streams", "rawsink", "settlement")}
    ports |= {name: str(free_port()) for name in ("alerts", "api", "simulator")}
    return {
        **os.environ,
        "COLUMNS": "160",
        "POSFLOW_KAFKA__TOPIC_PREFIX": run,
        "POSFLOW_POSTGRES__DATABASE": db,
        "POSFLOW_STREAMS__APP_ID": f"{run}-health",
        "POSFLOW_STREAMS__DATA_DIR": f"/tmp/{run}-faust",
        "POSFLOW_SETTLEMENT__GROUP": f"{run}-settlement",
        "POSFLOW_ALERTS__GROUP": f"{run}-alerts",
        "POSFLOW_RAWSINK__GROUP": f"{run}-sink",
        "POSFLOW_INGEST__CLIENT_ID": f"{run}-ingest",
        "POSFLOW_INGEST__SHARE_GROUP": run.replace("-", ""),
        "POSFLOW_API__WEBHOOK_PORT": str(free_port()),
        **{f"POSFLOW_SERVICES__{name.upper()}": port for name, port in ports.items()},
    }


def test_the_main_job_runs_every_stage_restarts_a_killed_service_and_loses_nothing(
    settings: Settings, stack: Stack, tmp_path: Path
) -> None:
    run = unique("mj").lower()
    db = run.replace("-", "_")
    env = _env(settings, run, db)
    log_dir = tmp_path / "logs"
    summary_file = tmp_path / "summary.json"
    started = datetime.now(UTC)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "cli", "demo", "--duration", str(DURATION_S),
            "--terminals", str(TERMINALS), "--fleet", run, "--log-dir", str(log_dir),
            "--summary-json", str(summary_file),
            # Payments whatever the hour of the run (the featured merchant must get some).
            "--txn-scale", "10", "--always-open",
        ],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        # Once the settlement worker has written its first ledger rows, kill it.
        killed = _kill_when_money_flows(db, settings, log_dir / "settlement.pid", proc)
        out, _ = proc.communicate(timeout=DURATION_S + 240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    summary = json.loads(summary_file.read_text())

    stages = summary["stages"]
    feed_lines = [line for line in text.splitlines() if "live feed" in line][-3:]
    for stage in (
        "published (MQTT)", "received from MQTT", "records to Kafka", "payments to Kafka",
        "dead-lettered", "health events", "health rows written", "raw rows stored",
        "ledger entries", "cash-flow events", "alert evaluations", "cash-flow events to clients",
    ):  # fmt: skip
        assert stages.get(stage, 0) > 0, (stage, stages, feed_lines)
    # Nothing lost end to end: every reading and payment the terminals published is a row
    # in the database, except the broken app's messages, which are dead letters.
    assert summary["expected_dead_letters"] >= 1, summary
    assert summary["stored_rows"] == summary["expected_rows"] > 0, summary
    assert summary["lost"] == 0, summary
    assert summary["lost_before_kafka"] == 0, summary
    # The featured merchant's live feed (SSE through the merchant API) saw its payments.
    assert summary["feed_events"] > 0, summary
    assert "live feed (SSE):" in text
    # The demo scenario's tampered terminal and its broken app (malformed + card number).
    # The demo scenario's faults whose `for` fits in the run have fired: the tampered
    # terminal (0 s) and the printer out of paper (1 min); the others are at least pending
    # or fired (terminals offline: 2 min, failing battery: overheating 1 min).
    fired, pending = summary["alerts_by_rule"], summary["alerts_pending"]
    assert fired.get("tamper_detected") == 1, (fired, pending)
    assert fired.get("printer_out_of_paper") == 1, (fired, pending)
    assert fired.get("terminal_offline", 0) + pending.get("terminal_offline", 0) == 2, (
        fired,
        pending,
    )
    assert stages["dead-lettered"] >= summary["expected_dead_letters"]

    # The supervisor restarted the killed worker and said so.
    assert killed is not None
    assert summary["restarts"]["settlement"] >= 1
    assert any("settlement exited with code -9" in e for e in summary["events"]), summary
    assert any("settlement restarted" in e for e in summary["events"]), summary
    assert "posflow summary" in text
    assert "lost 0" in text

    # Nothing counted twice: every cash-flow event once, numbered 1..n per merchant,
    # and the balances are the sum of the ledger's effects.
    with psycopg.connect(settings.postgres.dsn(database=db)) as conn:
        # 40 terminals across 4 merchants (one per ten terminals, as 2,000 across 200).
        [(merchants,)] = conn.execute(
            "SELECT count(DISTINCT merchant_id) FROM terminals WHERE terminal_id LIKE %s",
            [f"T-{run}-%"],
        ).fetchall()
        assert merchants == TERMINALS // 10
        gaps = conn.execute(
            "SELECT merchant_id, count(*), max(seq) FROM cashflow_events GROUP BY 1"
            " HAVING count(*) <> max(seq)"
        ).fetchall()
        assert gaps == []
        dup = conn.execute(
            "SELECT txn_id FROM ledger_entries GROUP BY txn_id HAVING count(*) > 1"
        ).fetchall()
        assert dup == []
        # The live feed delivered each of the featured merchant's events once, none missing.
        [(events,)] = conn.execute(
            "SELECT count(*) FROM cashflow_events WHERE merchant_id = %s",
            [summary["feed_merchant"]],
        ).fetchall()
        assert summary["feed_events"] == events, (summary["feed_merchant"], events)
        no_grafana = stack.grafana.unavailable()
        if no_grafana is None:
            _dashboards_over_the_run(settings, conn, run, summary["feed_merchant"], started)
    _drop(settings, db)
    if no_grafana is not None:
        pytest.skip(f"the run passed; its dashboards need Grafana, which is missing: {no_grafana}")


# Panels whose data a two-minute demo run does not make: no payout was requested, no
# refund exceeded its sale and no id was reused, no alert was acknowledged or resolved.
# The dashboards' own tests (test_dashboards_sql.py, test_dashboards_grafana.py) fill
# and check those. PromQL panels are checked for errors only: the run's services
# listen on free ports, which the stack's Prometheus does not scrape
# (test_dashboards_metrics.py checks every metric they name is exported).
_NOT_IN_A_SHORT_RUN = {
    ("merchant", "Payouts (minor units)"),
    ("merchant", "Flagged and quarantined transactions"),
    ("alerts", "Time to acknowledge and to resolve"),
}


def _dashboards_over_the_run(
    settings: Settings,
    conn: psycopg.Connection[tuple[object, ...]],
    run: str,
    merchant: str,
    started: datetime,
) -> None:
    """Every target of every dashboard, run through the stack's Grafana (/api/ds/query)
    over the run's time range on the database the simulated run filled, the variables
    set to one of its terminals and its featured merchant: no errors, the columns each
    table panel reads, and rows in every SQL panel but the named few."""
    from dashboards import catalog
    from dashboards.query import grafana_client, postgres_datasource, query_dashboards

    # The tampered terminal: it has readings, payments, health rows and an alert.
    [(terminal,)] = conn.execute(
        "SELECT subject_id FROM alerts WHERE rule = 'tamper_detected' AND subject_id LIKE %s",
        [f"T-{run}-%"],
    ).fetchall()
    db = conn.info.dbname
    pg = PostgresSettings(**{**settings.postgres.model_dump(), "database": db})
    with grafana_client(settings.grafana) as client, postgres_datasource(client, pg) as uid:
        results = query_dashboards(
            settings.grafana,
            [f"posflow-{name}" for name in catalog.BUILDERS],
            started - timedelta(minutes=5),
            datetime.now(UTC) + timedelta(minutes=5),
            variables={"terminal": str(terminal), "merchant": merchant},
            datasources={"posflow-pg": uid},
            client=client,
        )
    errors = [(r.dashboard, r.panel, r.error) for r in results if r.error]
    assert errors == []
    columns = {(t.dashboard, t.where): [c.name for c in t.columns] for t in catalog.sql_targets()}
    tables = {(t.dashboard, t.where) for t in catalog.sql_targets() if t.fmt == "table"}
    sql = [r for r in results if r.language == "sql"]
    assert {(r.dashboard.removeprefix("posflow-"), r.panel) for r in sql} == set(columns)
    assert len(results) - len(sql) == len(catalog.prom_targets())
    wrong = [
        (key, r.fields)
        for r in sql
        if (key := (r.dashboard.removeprefix("posflow-"), r.panel)) in tables
        and list(r.fields) != columns[key]
    ]
    assert wrong == []
    empty = [
        key
        for r in sql
        if r.rows == 0
        and (key := (r.dashboard.removeprefix("posflow-"), r.panel)) not in _NOT_IN_A_SHORT_RUN
    ]
    assert empty == [], f"panels with no rows after a simulated run (fleet {run}): {empty}"


def _kill_when_money_flows(
    db: str, settings: Settings, pidfile: Path, proc: subprocess.Popen[bytes]
) -> int | None:
    deadline = time.monotonic() + DURATION_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with psycopg.connect(settings.postgres.dsn(database=db), connect_timeout=3) as conn:
                row = conn.execute("SELECT count(*) FROM ledger_entries").fetchone()
        except psycopg.Error:
            row = None
        if row and row[0] > 0 and pidfile.exists():
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(1.0)
    return None


def _drop(settings: Settings, db: str) -> None:
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
