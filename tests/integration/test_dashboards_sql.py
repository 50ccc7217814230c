"""Every SQL query of every dashboard, expanded like Grafana, runs on the real schema.

The database is a fresh one filled through the real writers (TelemetryWriter,
TransactionWriter, LedgerWriter, HealthSink) with a small deterministic fleet;
a flagged refund, a quarantined copy and a payout go through the settlement code
(``to_entry``, ``LedgerWriter``, ``payout``); alerts and dead-letter counts are
inserted as rows of their 0001 tables. Each query must return the columns
its panel reads, with the expected kinds, and at least one row; several panels'
values are checked against what was written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from dashboards import catalog
from dashboards.catalog import SqlTarget
from dashboards.macros import TimeRange, Variable, expand
from posflow.contracts import Accepted, IngestEnvelope, validate_message
from posflow.contracts.money import FeePlan
from posflow.settings import PostgresSettings
from posflow.storage import detect_path, migrate
from posflow.storage.databases import create_database
from posflow.storage.ledger import LedgerEntry, LedgerWriter
from posflow.storage.settlement import payout
from posflow.storage.writers import TelemetryWriter, TransactionWriter
from streams.metrics import StreamMetrics
from streams.settlement_entries import to_entry
from streams.sink import HealthSink
from tests.unit import samples

# The data's own times end a minute in the past; the range ends a quarter of an hour after
# that, so rows stamped at write time (recorded_at of flagged and quarantined rows, the
# payout's cash-flow event) are inside it too.
NOW = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=1)
START = NOW - timedelta(minutes=30)
RANGE = TimeRange(NOW - timedelta(hours=1), NOW + timedelta(minutes=15))

MERCHANTS = {"M-dash-a": (-33.87, 151.21), "M-dash-b": (-37.81, 144.96)}
# terminal -> merchant, battery start, rsrp, app version, online, health
TERMINALS: dict[str, tuple[str, int, int, str, bool, int]] = {
    "T-dash-1": ("M-dash-a", 90, -90, "3.4.1", True, 96),
    "T-dash-2": ("M-dash-a", 40, -118, "3.4.1", True, 31),  # weak signal, low battery
    "T-dash-3": ("M-dash-b", 75, -95, "3.3.0", False, 55),  # offline
    "T-dash-4": ("M-dash-b", 80, -92, "3.4.1", True, 88),
}
FEE_BPS = 150  # 1.5 %
PAYOUT_MINOR = 500


def _envelope(kind: str, payload: dict[str, Any]) -> IngestEnvelope:
    topic = samples.topic(kind, payload["merchant_id"], payload["terminal_id"])
    result = validate_message(
        topic, json.dumps(payload).encode(), received_at=datetime.now(UTC), mqtt_mid=1
    )
    assert isinstance(result, Accepted), result
    return result.envelope


def _fill(pg: PostgresSettings) -> dict[str, Any]:
    """Write the fleet; returns what the panels should show."""
    expected: dict[str, Any] = {"gross": {}, "fee": {}, "mix": {}}
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
        path = detect_path(conn)
        for merchant, (lat, lon) in MERCHANTS.items():
            conn.execute(
                "INSERT INTO merchants (merchant_id, name, lat, lon) VALUES (%s, %s, %s, %s)",
                [merchant, f"Shop {merchant}", lat, lon],
            )
        for terminal, (merchant, *_rest) in TERMINALS.items():
            lat, lon = MERCHANTS[merchant]
            conn.execute(
                "INSERT INTO terminals (terminal_id, merchant_id, model, lat, lon)"
                " VALUES (%s, %s, 'A920', %s, %s)",
                [terminal, merchant, lat, lon],
            )
        conn.autocommit = False
        telemetry, txns, ledger = [], [], []
        for terminal, (merchant, battery, rsrp, version, _online, _h) in TERMINALS.items():
            for i in range(30):
                ts = START + timedelta(minutes=i)
                telemetry.append(
                    _envelope(
                        "telemetry",
                        samples.telemetry(
                            merchant_id=merchant, terminal_id=terminal, seq=i,
                            ts=ts.isoformat(), app_version=version,
                            **{"battery.level_pct": battery - i // 3, "signal.rsrp_dbm": rsrp},
                        ),
                    )
                )  # fmt: skip
                if i % 5 == 0:
                    status = "declined" if i == 10 else "approved"
                    scheme = "visa" if i % 2 == 0 else "mastercard"
                    amount = 1000 + 10 * i
                    paid_at = (ts + timedelta(seconds=5)).isoformat()
                    body = samples.txn(
                        merchant_id=merchant, terminal_id=terminal, seq=1000 + i,
                        txn_id=f"{terminal}:{1000 + i:06d}", ts=paid_at,
                        status=status, amount_minor=amount, scheme=scheme,
                    )  # fmt: skip
                    txns.append(_envelope("txn", body))
                    if status == "approved":
                        fee = amount * FEE_BPS // 10_000
                        ledger.append(
                            LedgerEntry(
                                txn_id=body["txn_id"], merchant_id=merchant, terminal_id=terminal,
                                txn_type="sale", currency="AUD", gross_minor=amount,
                                fee_minor=fee, net_minor=amount - fee,
                                occurred_at=ts + timedelta(seconds=5), body=body,
                            )
                        )  # fmt: skip
                        expected["gross"][merchant] = expected["gross"].get(merchant, 0) + amount
                        expected["fee"][merchant] = expected["fee"].get(merchant, 0) + fee
                        key = (merchant, f"{scheme} · contactless")
                        expected["mix"][key] = expected["mix"].get(key, 0) + 1
        assert TelemetryWriter(conn, path).write(telemetry) == len(telemetry)
        assert TransactionWriter(conn, path).write(txns) == len(txns)
        writer = LedgerWriter(conn, "dashboards-test")
        assert writer.write(ledger, {}).applied == len(ledger)
        expected["integrity"] = _integrity(writer)
        conn.autocommit = True
        paid = payout(conn, "M-dash-a", "AUD", PAYOUT_MINOR, "dash-payout-1")
        expected["payout"] = (paid.seq, paid.available_minor, paid.paid_out_minor)
        _alerts(conn)

    sink = HealthSink(pg.dsn(), StreamMetrics())
    for terminal, (merchant, battery, rsrp, version, online, health) in TERMINALS.items():
        for minute in range(0, 30, 5):
            start = (START + timedelta(minutes=minute)).timestamp()
            reasons = ["signal weak", "battery low"] if health < 50 else []
            sink.add_window(
                {
                    "terminal_id": terminal, "merchant_id": merchant,
                    "window_start": start, "window_end": start + 60, "last_ts": start + 50,
                    "score": health,
                    "components": {"signal": health, "battery": health, "txn": 100,
                                   "printer": 100},
                    "final": True, "reasons": reasons, "facts": {"samples": 2},
                }
            )  # fmt: skip
        lat, lon = MERCHANTS[merchant]
        sink.add_state(
            {
                "terminal_id": terminal, "merchant_id": merchant, "online": online,
                "watermark": NOW.timestamp(), "last_heard": NOW.timestamp(),
                "status_changed_at": START.timestamp(), "health_score": health,
                "current": {"battery": battery - 9, "charging": False, "signal_type": "lte",
                            "signal_dbm": rsrp, "carrier": "Telstra", "printer": "ok",
                            "lat": lat, "lon": lon, "app_version": version,
                            "firmware_version": "fw-2026.10"},
            }
        )  # fmt: skip
    assert sink.flush() == 4 * 6 + 4
    sink.close()
    return expected


def _integrity(writer: LedgerWriter) -> dict[str, str]:
    """A refund above its sale (flagged) and a known id with another body (quarantined)."""
    sale = "T-dash-1:001000"  # 1000 minor units, approved
    refund = samples.txn(
        merchant_id="M-dash-a", terminal_id="T-dash-1", seq=2000, txn_id="T-dash-1:002000",
        ts=(START + timedelta(minutes=21)).isoformat(), type="refund", amount_minor=5000,
        original_txn_id=sale,
    )  # fmt: skip
    conflict = samples.txn(
        merchant_id="M-dash-a", terminal_id="T-dash-1", seq=1005, txn_id="T-dash-1:001005",
        ts=(START + timedelta(minutes=5, seconds=5)).isoformat(), amount_minor=7777,
    )  # fmt: skip
    entries = [to_entry(_envelope("txn", body), FeePlan()) for body in (refund, conflict)]
    result = writer.write(entries, {})
    assert (result.flagged, result.quarantined) == (["T-dash-1:002000"], ["T-dash-1:001005"])
    return {"flagged": "T-dash-1:002000", "quarantined": "T-dash-1:001005"}


def _alerts(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    t = START
    rows = [
        # id, rule, severity, subject, merchant, state, started, acked, resolved
        ("a1", "terminal_offline", "critical", "T-dash-3", "M-dash-b", "firing", t, None, None),
        ("a2", "battery_low", "warning", "T-dash-2", "M-dash-a", "acknowledged",
         t + timedelta(minutes=2), t + timedelta(minutes=4), None),
        ("a3", "weak_signal", "warning", "T-dash-2", "M-dash-a", "resolved",
         t + timedelta(minutes=1), t + timedelta(minutes=3), t + timedelta(minutes=11)),
        ("a4", "terminal_offline", "critical", "T-dash-1", "M-dash-a", "resolved",
         t + timedelta(minutes=5), None, t + timedelta(minutes=8)),
    ]  # fmt: skip
    for aid, rule, sev, subject, merchant, state, started, acked, resolved in rows:
        conn.execute(
            """
            INSERT INTO alerts (alert_id, rule, severity, subject_kind, subject_id, merchant_id,
                state, summary, started_at, fired_at, acknowledged_at, acknowledged_by,
                resolved_at)
            VALUES (%s, %s, %s, 'terminal', %s, %s, %s, %s, %s, %s, %s, %s, %s)
            """,
            [aid, rule, sev, subject, merchant, state, f"{rule} on {subject}", started,
             started, acked, "ops@example.com" if acked else None, resolved],
        )  # fmt: skip
    for minute, reason, count in ((3, "schema", 2), (3, "card_data", 1), (12, "schema", 4)):
        conn.execute(
            "INSERT INTO deadletter_counts (bucket, reason, count) VALUES (%s, %s, %s)",
            [START + timedelta(minutes=minute), reason, count],
        )


_KINDS = {
    "timestamptz": "time", "timestamp": "time",
    "int2": "number", "int4": "number", "int8": "number", "float4": "number",
    "float8": "number", "numeric": "number",
    "text": "string", "varchar": "string", "bpchar": "string", "name": "string",
    "bool": "bool",
}  # fmt: skip


@pytest.fixture(scope="module", params=["timescaledb", "plain"])
def filled(request: pytest.FixtureRequest) -> Iterator[tuple[PostgresSettings, dict[str, Any]]]:
    # The `pg` fixture is function-scoped; one database per storage path for the module.
    from tests.conftest import unique

    settings = request.getfixturevalue("settings")
    request.getfixturevalue("stack")
    name = unique("dash").replace("-", "_")
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
        got = create_database(admin, name, path=None if request.param == "timescaledb" else "plain")
    if request.param == "timescaledb" and settings.stack.require_timescaledb:
        assert got == "timescaledb"
    pg = PostgresSettings(**{**settings.postgres.model_dump(), "database": name})
    try:
        yield pg, _fill(pg)
    finally:
        with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


VARIABLES = {"terminal": Variable("T-dash-2"), "merchant": Variable("M-dash-a")}


def run(
    pg: PostgresSettings,
    target: SqlTarget,
    variables: dict[str, Variable] | None = None,
    time_range: TimeRange = RANGE,
) -> tuple[list[tuple[str, str]], list[Any]]:
    """(column name, kind) and rows of a target, expanded as Grafana would."""
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        timescale = detect_path(conn) == "timescaledb"
        sql = expand(target.sql, time_range, variables or VARIABLES, timescaledb=timescale)
        cur = conn.execute(sql.encode())
        assert cur.description is not None
        types = conn.adapters.types
        cols = []
        for col in cur.description:
            info = types.get(col.type_code)
            cols.append((col.name, _KINDS.get(info.name if info else "?", "?")))
        return cols, cur.fetchall()


TARGETS = catalog.sql_targets()


@pytest.mark.parametrize("target", TARGETS, ids=[f"{t.dashboard}:{t.where}" for t in TARGETS])
def test_every_sql_query_returns_the_columns_its_panel_reads_with_rows(
    filled: tuple[PostgresSettings, dict[str, Any]], target: SqlTarget
) -> None:
    pg, _ = filled
    cols, rows = run(pg, target)
    wanted = [(c.name, c.kind) for c in target.columns]
    # Grafana's SQL engine takes a numeric "time" column as epoch seconds.
    got = [(n, "time" if n == "time" and k == "number" else k) for n, k in cols]
    assert got == wanted
    assert rows, f"{target.dashboard} / {target.where}: no rows"
    if target.fmt == "time_series":
        times = [r[0] for r in rows]
        assert times == sorted(times), "a time series must come ordered by time"


def _target(dashboard: str, where: str) -> SqlTarget:
    return next(t for t in TARGETS if t.dashboard == dashboard and t.where == where)


def test_fleet_panels_show_what_the_writers_stored(
    filled: tuple[PostgresSettings, dict[str, Any]],
) -> None:
    pg, _ = filled
    assert run(pg, _target("fleet", "Terminals online / offline"))[1] == [(3, 1)]
    worst = run(pg, _target("fleet", "Worst terminals, and why"))[1]
    assert [(r[0], r[2], r[7]) for r in worst[:2]] == [
        ("T-dash-2", 31, "signal weak; battery low"),
        ("T-dash-3", 55, ""),
    ]
    # A range ending before now takes the other branch (every terminal probed): same rows.
    past = TimeRange(NOW - timedelta(hours=1), NOW - timedelta(minutes=2))
    assert run(pg, _target("fleet", "Worst terminals, and why"), time_range=past)[1] == worst
    assert run(pg, _target("fleet", "Open alerts by severity"))[1] == [
        ("critical", 1), ("warning", 1), ("info", 0)
    ]  # fmt: skip
    problems = run(pg, _target("fleet", "Terminals with problems (offline or health below 50)"))
    assert sorted((r[0], r[5]) for r in problems[1]) == [("T-dash-2", True), ("T-dash-3", False)]
    assert run(pg, _target("fleet", "App versions in the fleet"))[1] == [
        ("3.4.1", 3), ("3.3.0", 1)
    ]  # fmt: skip
    bands = dict(run(pg, _target("fleet", "Health score distribution (now)"))[1])
    assert (bands["30-39"], bands["50-59"], bands["80-89"], bands["90-100"]) == (1, 1, 1, 1)
    assert sum(bands.values()) == 4


def test_merchant_and_alert_panels_show_exact_money_and_reaction_times(
    filled: tuple[PostgresSettings, dict[str, Any]],
) -> None:
    pg, expected = filled
    money = run(pg, _target("merchant", "Gross, fees, net (minor units)"))[1]
    gross = sum(r[2] for r in money)
    fee = sum(r[3] for r in money)
    assert (gross, fee) == (expected["gross"]["M-dash-a"], expected["fee"]["M-dash-a"])
    assert all(isinstance(v, int) for r in money for v in r[2:])  # minor units, never floats
    assert {r[1] for r in money} == {"AUD"}
    balances = run(pg, _target("merchant", "Balances now (minor units)"))[1]
    # Pending or already available depends on the merchant's settlement rule; the total not.
    assert [(r[0], r[1] + r[2] + r[3]) for r in balances] == [("AUD", gross - fee)]
    payouts = run(pg, _target("merchant", "Payouts (minor units)"))[1]
    seq, available_after, paid_out_after = expected["payout"]
    assert [r[1:] for r in payouts] == [(seq, "AUD", PAYOUT_MINOR, available_after, paid_out_after)]
    assert paid_out_after == PAYOUT_MINOR
    effects = run(pg, _target("merchant", "Ledger effects (rows and net minor units)"))[1]
    # 10 approved sales applied; the refund above its sale recorded as flagged, not applied;
    # the conflicting copy is not a ledger row at all (quarantine).
    assert [(r[0], r[1], r[2]) for r in effects] == [("applied", "AUD", 10), ("flagged", "AUD", 1)]
    assert effects[0][3] == gross - fee
    assert run(pg, _target("merchant", "Flagged · quarantined"))[1] == [(1, 1)]
    findings = run(pg, _target("merchant", "Flagged and quarantined transactions"))[1]
    assert sorted((r[1], r[2], r[3], r[5]) for r in findings) == [
        ("flagged", expected["integrity"]["flagged"], "refund", -5000),
        ("quarantined", expected["integrity"]["quarantined"], "sale", 7777),
    ]
    assert all(r[6] for r in findings), "every finding says why"
    mix = dict(run(pg, _target("merchant", "Payment mix (approved: scheme · entry mode)"))[1])
    assert mix == {k[1]: v for k, v in expected["mix"].items() if k[0] == "M-dash-a"}

    by_rule = {
        r[0]: r for r in run(pg, _target("alerts", "By rule (reaction times in seconds)"))[1]
    }
    # weak_signal: acknowledged after 2 min, resolved after 10 min.
    assert by_rule["weak_signal"][1:4] == (0, 0, 1)
    assert by_rule["weak_signal"][4] == pytest.approx(120)
    assert by_rule["weak_signal"][6] == pytest.approx(600)
    assert by_rule["terminal_offline"][1:4] == (1, 0, 1)
    state = run(pg, _target("alerts", "Open · acknowledged · resolved in range"))[1]
    assert state == [(1, 1, 2)]


def test_terminal_variable_selects_that_terminal_only(
    filled: tuple[PostgresSettings, dict[str, Any]],
) -> None:
    pg, _ = filled
    battery = run(pg, _target("terminal", "Battery"))[1]
    # T-dash-2 starts at 40 % and loses one point every three minutes.
    assert Decimal(str(battery[0][1])) == 40
    assert min(r[1] for r in battery) == 31
    alerts = run(pg, _target("terminal", "Alerts"))[1]
    assert sorted(r[1] for r in alerts) == ["battery_low", "weak_signal"]
    status = run(pg, _target("terminal", "Status history"))[1]
    assert {r[1] for r in status} == {"poor"}  # T-dash-2 never went offline
    # T-dash-1 went offline at +5 min and spoke again at +8 min (its terminal_offline alert).
    other = {**VARIABLES, "terminal": Variable("T-dash-1")}
    history = run(pg, _target("terminal", "Status history"), other)[1]
    spells = [(r[0], r[1]) for r in history if r[1] in ("offline", "back online")]
    assert spells == [
        (START + timedelta(minutes=5), "offline"),
        (START + timedelta(minutes=8), "back online"),
    ]
    assert [r[0] for r in history] == sorted(r[0] for r in history)
    assert {r[1] for r in history} - {"offline", "back online"} <= {"healthy", "degraded", "poor"}
