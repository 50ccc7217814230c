"""Settlement rules on the real PostgreSQL: caps, parking, cancels, release, payouts, notify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from posflow.contracts import IntegrityEvent
from posflow.contracts.money import FeePlan
from posflow.errors import PosflowError
from posflow.security.apikeys import issue_key
from posflow.security.roles import Role
from posflow.settings import PostgresSettings
from posflow.storage import migrate
from posflow.storage.ledger import LedgerResult, LedgerWriter
from posflow.storage.settlement import (
    mark_cashflow_published,
    payout,
    release_due,
    unpublished_cashflow,
    unpublished_integrity,
)
from streams.settlement_entries import to_entry
from tests.conftest import ROOT
from tests.integration._settlement_reference import envelope
from tests.unit import samples

Conn = psycopg.Connection[tuple[Any, ...]]
PLAN = FeePlan.from_json('{"default": {"percent": "2", "fixed_minor": 10}}')
M = "M-1"


@pytest.fixture
def db(pg: PostgresSettings) -> Iterator[Conn]:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
        conn.execute(
            "INSERT INTO merchants (merchant_id, name, timezone, fee_plan, settlement_rule)"
            " VALUES (%s, 'Cafe', 'Europe/Berlin', %s::jsonb,"
            ' \'{"kind": "daily", "cutoff": "18:00"}\'::jsonb)',
            [M, PLAN.model_dump_json()],
        )
    with psycopg.connect(pg.dsn()) as conn:
        yield conn


def _write(conn: Conn, *txns: dict[str, Any]) -> LedgerResult:
    entries = [to_entry(envelope(t), PLAN) for t in txns]
    return LedgerWriter(conn, "g").write(entries, offsets={})


def _txn(txn_id: str, kind: str = "sale", amount: int = 1000, **more: Any) -> dict[str, Any]:
    return samples.txn(
        merchant_id=M, terminal_id="T-1", txn_id=txn_id, type=kind, amount_minor=amount,
        currency="EUR", **more,
    )  # fmt: skip


def _balance(conn: Conn, currency: str = "EUR") -> tuple[int, int, int]:
    row = conn.execute(
        "SELECT pending_minor, available_minor, paid_out_minor FROM merchant_balances"
        " WHERE merchant_id = %s AND currency = %s",
        [M, currency],
    ).fetchone()
    conn.commit()
    return (0, 0, 0) if row is None else (int(row[0]), int(row[1]), int(row[2]))


def _effects(conn: Conn) -> dict[str, tuple[str, str | None, int]]:
    rows = conn.execute("SELECT txn_id, effect, flag_reason, net_minor FROM ledger_entries")
    return {r[0]: (r[1], r[2], r[3]) for r in rows.fetchall()}


def test_sale_fee_net_and_tip_count_in_gross(db: Conn) -> None:
    _write(db, _txn("s1", amount=1000, tip_minor=250))
    # gross 1250, fee 2 % = 25 + 10 = 35, net 1215, pending until the Berlin cut-off
    row = db.execute("SELECT gross_minor, fee_minor, net_minor FROM ledger_entries").fetchone()
    assert row == (1250, 35, 1215)
    assert _balance(db) == (1215, 0, 0)


def test_declined_error_timeout_are_recorded_without_touching_money(db: Conn) -> None:
    result = _write(
        db, _txn("d1", status="declined", decline_code="05"), _txn("e1", status="error"),
        _txn("t1", status="timeout"),
    )  # fmt: skip
    assert result.events == []
    assert {k: v[0] for k, v in _effects(db).items()} == dict.fromkeys(
        ("d1", "e1", "t1"), "no_money"
    )
    assert _balance(db) == (0, 0, 0)


def test_refund_beyond_captured_is_recorded_flagged_and_not_applied(db: Conn) -> None:
    _write(db, _txn("s1", amount=1000), _txn("r1", "refund", 600, original_txn_id="s1"))
    result = _write(db, _txn("r2", "refund", 500, original_txn_id="s1"))
    assert result.flagged == ["r2"]
    assert _effects(db)["r2"] == ("flagged", "refund_exceeds_captured", -500)
    assert _balance(db) == ((1000 - 30) - 600, 0, 0)  # r2 not applied
    (event,) = result.events
    assert (event.kind, event.txn_id, event.amount_minor) == ("flagged", "r2", 0)
    (integrity,) = unpublished_integrity(db)
    assert (integrity.kind, integrity.txn_id, integrity.original_txn_id) == (
        "refund_exceeds_captured", "r2", "s1",
    )  # fmt: skip
    assert integrity.amount_minor == 500


def test_a_refund_before_its_sale_waits_and_is_applied_when_the_sale_arrives(db: Conn) -> None:
    first = _write(db, _txn("r1", "refund", 300, original_txn_id="s1"))
    assert (first.parked, first.events) == (1, [])
    assert _effects(db)["r1"][0] == "parked"
    second = _write(db, _txn("s1", amount=1000))
    assert [(e.txn_id, e.amount_minor) for e in second.events] == [("s1", 970), ("r1", -300)]
    assert _balance(db) == (670, 0, 0)


def test_void_cancels_the_original_once_and_a_second_cancel_is_flagged(db: Conn) -> None:
    _write(db, _txn("s1", amount=1000))
    _write(db, _txn("v1", "void", 1000, original_txn_id="s1"))
    assert _balance(db) == (0, 0, 0)
    assert _effects(db)["v1"] == ("applied", None, -970)
    result = _write(db, _txn("x1", "reversal", 1000, original_txn_id="s1"))
    assert result.flagged == ["x1"]
    assert _balance(db) == (0, 0, 0)
    # nothing left to refund after a void
    assert _write(db, _txn("r1", "refund", 1, original_txn_id="s1")).flagged == ["r1"]


def test_preauth_moves_no_money_and_captures_stay_within_it(db: Conn) -> None:
    _write(db, _txn("p1", "preauth", 1000))
    assert _balance(db) == (0, 0, 0)
    _write(db, _txn("c1", "capture", 600, original_txn_id="p1"))
    result = _write(db, _txn("c2", "capture", 500, original_txn_id="p1"))
    assert result.flagged == ["c2"]
    assert _effects(db)["c2"][1] == "capture_exceeds_authorized"
    assert _balance(db) == (600 - 22, 0, 0)


def test_release_after_the_cutoff_then_payout_once_per_key(db: Conn) -> None:
    _write(db, _txn("s1", amount=1000))  # 16:06:50 UTC = 17:06 Berlin -> 18:00 Berlin
    assert release_due(db, datetime(2026, 11, 23, 16, 59, tzinfo=UTC)) == []
    (event,) = release_due(db, datetime(2026, 11, 23, 17, 0, tzinfo=UTC))
    assert (event.kind, event.amount_minor, event.pending_minor, event.available_minor) == (
        "release", 970, 0, 970,
    )  # fmt: skip
    assert release_due(db, datetime(2026, 11, 24, tzinfo=UTC)) == []  # released once

    with pytest.raises(PosflowError, match=r"refused: merchant M-1 has 970 EUR available"):
        payout(db, M, "EUR", 971, "k-1")
    done = payout(db, M, "EUR", 900, "k-1")
    again = payout(db, M, "EUR", 900, "k-1")
    assert (done.replayed, again.replayed, again.seq) == (False, True, done.seq)
    assert _balance(db) == (0, 70, 900)
    with pytest.raises(PosflowError, match="already used"):
        payout(db, M, "EUR", 50, "k-1")
    kinds = db.execute("SELECT seq, kind, amount_minor FROM cashflow_events ORDER BY seq")
    assert kinds.fetchall() == [(1, "sale", 970), (2, "release", 970), (3, "payout", 900)]


def test_multi_currency_merchant_keeps_one_balance_per_currency(db: Conn) -> None:
    usd = samples.txn(merchant_id=M, terminal_id="T-1", txn_id="u1", amount_minor=500,
                      currency="USD")  # fmt: skip
    _write(db, _txn("s1", amount=1000), usd)
    assert (_balance(db, "EUR"), _balance(db, "USD")) == ((970, 0, 0), (480, 0, 0))


def test_every_ledger_change_notifies_the_merchant_channel(db: Conn, pg: PostgresSettings) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as listener:
        listener.execute("LISTEN posflow_cashflow")
        _write(db, _txn("s1"), _txn("s2"))
        payout_conn = db
        release_due(payout_conn, datetime(2026, 11, 24, tzinfo=UTC))
        got = [n.payload for n in listener.notifies(timeout=2, stop_after=2)]
    assert got == [M, M]  # once per transaction that touched the merchant


def test_outbox_watermark_advances_only_over_contiguous_runs(db: Conn) -> None:
    result = _write(db, _txn("s1"), _txn("s2"), _txn("s3"))
    assert [e.seq for e in unpublished_cashflow(db)] == [1, 2, 3]
    mark_cashflow_published(db, result.events[1:])  # 2..3 without 1: watermark stays
    assert [e.seq for e in unpublished_cashflow(db)] == [1, 2, 3]
    mark_cashflow_published(db, result.events[:2])
    assert [e.seq for e in unpublished_cashflow(db)] == [3]


def test_a_reused_id_with_another_body_stores_one_integrity_event(db: Conn) -> None:
    _write(db, _txn("s1", amount=1000))
    for _ in range(2):  # the conflicting copy replayed: one finding
        _write(db, _txn("s1", amount=9999))
    (event,) = unpublished_integrity(db)
    assert isinstance(event, IntegrityEvent)
    assert (event.kind, event.severity, event.txn_id) == ("txn_id_conflict", "critical", "s1")
    stored = db.execute("SELECT payload FROM ledger_quarantine q, integrity_events i"
                        " WHERE q.txn_id = i.payload->>'txn_id'").fetchall()  # fmt: skip
    assert len(stored) == 1
    assert _balance(db) == (970, 0, 0)
    assert json.loads(event.to_json())["first_body_sha256"] != event.body_sha256


def _cli(pg: PostgresSettings, *args: str, staff_key: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POSFLOW_POSTGRES__DATABASE": pg.database, "POSFLOW_STAFF_KEY": staff_key}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_cli_set_plan_release_and_idempotent_payout(
    db: Conn, pg: PostgresSettings, tmp_path: Path
) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(
        '{"fee_plan": {"default": {"percent": "1", "fixed_minor": 0}},'
        ' "settlement_rule": {"kind": "daily", "cutoff": "20:00", "timezone": "UTC"}}'
    )
    finance = issue_key(db, None, role=Role.FINANCE).token
    db.commit()
    set_plan = ["settlement", "set-plan", "--merchant", "M-2", "--file", str(plan)]
    keyless = _cli(pg, *set_plan)
    assert keyless.returncode == 1
    assert "settlement.set_plan on merchant:M-2 refused: no staff API key given" in keyless.stderr
    done = _cli(pg, *set_plan, staff_key=finance)
    assert done.returncode == 0, done.stderr
    stored = db.execute(
        "SELECT fee_plan->'default'->>'percent', settlement_rule->>'cutoff' FROM merchants"
        " WHERE merchant_id = 'M-2'"
    ).fetchone()
    assert stored == ("1", "20:00")
    db.commit()
    sale = samples.txn(merchant_id="M-2", terminal_id="T-1", txn_id="c1", amount_minor=10_000,
                       currency="EUR")  # fmt: skip
    LedgerWriter(db, "g").write([to_entry(envelope(sale), FeePlan.from_json(
        '{"default": {"percent": "1"}}'))], offsets={})  # fmt: skip

    early = _cli(pg, "settlement", "release", "--now", "2026-11-23T19:59:00Z", staff_key=finance)
    assert "released for 0 merchant/currency pair(s)" in early.stdout
    late = _cli(pg, "settlement", "release", "--now", "2026-11-23T20:00:00Z", staff_key=finance)
    assert "M-2 EUR: released 9900" in late.stdout, late.stdout

    pay = ["payout", "--merchant", "M-2", "--currency", "EUR", "--idempotency-key", "p-1"]
    pay += ["--key", finance]
    too_much = _cli(pg, *pay, "--amount-minor", "9901")
    assert too_much.returncode == 1
    assert too_much.stderr.strip().splitlines() == [
        "posflow: error: payout of 9901 EUR refused: merchant M-2 has 9900 EUR available -- "
        "fix: pay out at most the available balance (`posflow settlement release` moves "
        "pending money whose cut-off passed)"
    ]
    first = _cli(pg, *pay, "--amount-minor", "9000")
    second = _cli(pg, *pay, "--amount-minor", "9000")
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "paid out 9000; available 900, paid out 9000" in first.stdout
    assert "already paid out (same key), nothing moved" in second.stdout
    db.commit()
    assert db.execute(
        "SELECT available_minor, paid_out_minor FROM merchant_balances WHERE merchant_id = 'M-2'"
    ).fetchone() == (900, 9000)

    bad = tmp_path / "bad.json"
    bad.write_text('{"fee_plan": {"default": {"percent": 1.5}}}')
    refused = _cli(pg, "settlement", "set-plan", "--merchant", "M-2", "--file", str(bad),
                   staff_key=finance)  # fmt: skip
    assert refused.returncode == 1
    assert "default.percent" in refused.stderr
