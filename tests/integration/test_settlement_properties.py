"""Property: whatever the delivery (duplicates, reorders, replays, conflicting copies,
any batch split), the real LedgerWriter on the real PostgreSQL ends with the balances,
effects and cash-flow numbering of a straightforward reference computation."""

from __future__ import annotations

import itertools
import json
import secrets
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posflow.contracts import Transaction
from posflow.contracts.money import FeePlan, SettlementRule
from posflow.settings import PostgresSettings
from posflow.storage import migrate
from posflow.storage.databases import create_database
from posflow.storage.ledger import LedgerWriter
from posflow.storage.settlement import release_due
from streams.settlement_entries import to_entry
from tests.integration._settlement_reference import Reference, envelope
from tests.unit import samples

Conn = psycopg.Connection[tuple[Any, ...]]

PLANS = {
    "A": FeePlan.model_validate_json(
        '{"default": {"percent": "1.4", "fixed_minor": 10},'
        ' "rules": [{"scheme": "amex", "percent": "2.95", "fixed_minor": 25}]}'
    ),
    "B": FeePlan.model_validate_json(
        '{"default": {"percent": "2.5", "fixed_by_currency": {"USD": 30}},'
        ' "rules": [{"entry_mode": "manual", "percent": "3.333333"}]}'
    ),
}
RULES = {
    "A": SettlementRule(kind="instant"),
    "B": SettlementRule(kind="daily", cutoff="18:00", timezone="Europe/Berlin"),
}
_examples = itertools.count()


@pytest.fixture(scope="module")
def ledger_db(settings: Any, stack: Any) -> Iterator[Conn]:
    from psycopg import sql

    name = f"t_settle_{secrets.token_hex(4)}"
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
        create_database(admin, name)
    pg = PostgresSettings(**{**settings.postgres.model_dump(), "database": name})
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
    with psycopg.connect(pg.dsn()) as conn:
        yield conn
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """(the distinct transactions, what Kafka delivers, batch sizes)."""
    run = f"x{next(_examples)}{secrets.token_hex(2)}"
    txns: list[dict[str, Any]] = []
    for i in range(draw(st.integers(1, 18))):
        kind = draw(st.sampled_from(["sale", "sale", "preauth", "capture", "refund", "refund",
                                     "void", "reversal"]))  # fmt: skip
        merchant = f"{draw(st.sampled_from(['A', 'B']))}-{run}"
        currency = draw(st.sampled_from(["EUR", "USD"]))
        original = None
        if kind in ("capture", "void", "reversal") or (kind == "refund" and draw(st.booleans())):
            if i == 0 or draw(st.integers(0, 9)) == 0:
                original = f"{run}-ghost"  # never arrives: its children stay parked
            else:
                parent = txns[draw(st.integers(0, i - 1))]
                original = parent["txn_id"]
                if draw(st.integers(0, 9)) > 0:  # mostly the same merchant and currency
                    merchant, currency = parent["merchant_id"], parent["currency"]
        amount = draw(st.integers(1, 5000))
        txns.append(
            samples.txn(
                merchant_id=merchant, terminal_id="T-1", txn_id=f"{run}-{i}", seq=i, type=kind,
                status=draw(st.sampled_from(["approved"] * 6 + ["declined", "error", "timeout"])),
                amount_minor=amount if kind != "capture" else draw(st.integers(1, 6000)),
                tip_minor=draw(st.sampled_from([0, 0, 0, 150])), currency=currency,
                scheme=draw(st.sampled_from(["visa", "amex", "mastercard"])),
                entry_mode=draw(st.sampled_from(["chip", "contactless", "manual"])),
                original_txn_id=original,
            )
        )  # fmt: skip
    delivered = [txns[k] for k in draw(st.permutations(range(len(txns))))]
    for _ in range(draw(st.integers(0, 6))):  # duplicates anywhere
        copy = txns[draw(st.integers(0, len(txns) - 1))]
        delivered.insert(draw(st.integers(0, len(delivered))), copy)
    for _ in range(draw(st.integers(0, 2))):  # the same id with another body
        k = draw(st.integers(0, len(txns) - 1))
        conflict = {**txns[k], "amount_minor": txns[k]["amount_minor"] + 1}
        delivered.insert(draw(st.integers(0, len(delivered))), conflict)
    if draw(st.booleans()):  # a crash: a suffix is delivered again
        delivered += delivered[draw(st.integers(0, len(delivered) - 1)) :]
    sizes = draw(st.lists(st.integers(1, 9), min_size=1, max_size=6))
    return txns, delivered, sizes


def _register(conn: Conn, merchants: set[str]) -> None:
    for merchant in sorted(merchants):
        letter = merchant.split("-")[0]
        conn.execute(
            "INSERT INTO merchants (merchant_id, name, timezone, fee_plan, settlement_rule)"
            " VALUES (%s, %s, 'UTC', %s::jsonb, %s::jsonb)",
            [merchant, merchant, PLANS[letter].model_dump_json(), RULES[letter].model_dump_json()],
        )
    conn.commit()


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=deliveries())
def test_any_delivery_gives_the_reference_balances(
    ledger_db: Conn,
    case: tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]],
) -> None:
    txns, delivered, sizes = case
    conn = ledger_db
    merchants = {t["merchant_id"] for t in txns}
    _register(conn, merchants)
    writer = LedgerWriter(conn, consumer_group="property")
    envelopes = [envelope(t) for t in delivered]
    entries = [to_entry(e, PLANS[e.merchant_id.split("-")[0]]) for e in envelopes]
    position, quarantined = 0, set()
    for size in itertools.cycle(sizes):
        if position >= len(entries):
            break
        result = writer.write(entries[position : position + size], offsets={})
        quarantined |= set(result.quarantined)
        position += size

    ref = Reference(plans={m: PLANS[m.split("-")[0]] for m in merchants})
    ref.feed([e.payload for e in envelopes if isinstance(e.payload, Transaction)])

    effects: dict[str, str] = dict(
        conn.execute(
            "SELECT txn_id, effect FROM ledger_entries WHERE merchant_id = ANY(%s)",
            [sorted(merchants)],
        ).fetchall()
    )
    assert effects == ref.effects()

    def balances() -> dict[tuple[str, str], tuple[int, int, int]]:
        rows = conn.execute(
            "SELECT merchant_id, currency, pending_minor, available_minor, paid_out_minor"
            " FROM merchant_balances WHERE merchant_id = ANY(%s)",
            [sorted(merchants)],
        ).fetchall()
        conn.commit()
        return {(m, c.strip()): (p, a, o) for m, c, p, a, o in rows if (p, a, o) != (0, 0, 0)}

    expected = {
        key: (0, money, 0) if key[0].startswith("A") else (money, 0, 0)
        for key, money in ref.money.items()
        if money != 0
    }
    assert balances() == expected
    # Every money change and every flag is one event, numbered 1..n per merchant.
    events = conn.execute(
        "SELECT merchant_id, array_agg(seq ORDER BY seq), count(*) FROM cashflow_events"
        " WHERE merchant_id = ANY(%s) GROUP BY 1",
        [sorted(merchants)],
    ).fetchall()
    per_merchant = Counter(
        s.txn.merchant_id for s in ref.state.values() if s.effect in ("applied", "flagged")
    )
    assert {m: list(seqs) for m, seqs, _ in events} == {
        m: list(range(1, n + 1)) for m, n in per_merchant.items()
    }
    # Ids delivered with two bodies are quarantined; the ledger kept the first one.
    bodies: dict[str, set[str]] = {}
    for t in delivered:
        bodies.setdefault(t["txn_id"], set()).add(json.dumps(t, sort_keys=True))
    assert quarantined == {k for k, v in bodies.items() if len(v) > 1}

    # The daily cut-off (18:00 Berlin) has passed long after: B's pending becomes available.
    release_due(conn, datetime(2026, 12, 1, tzinfo=UTC))
    released = {key: (0, money, 0) for key, money in ref.money.items() if money != 0}
    assert balances() == released
