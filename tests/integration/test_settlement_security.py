"""Money-moving commands need the finance role and are audited (real PostgreSQL, the CLI).

Every role against payout, set-plan, release and set-payout-account through
``cli.main.main``; refusals recorded (they commit on their own), changes recorded
in the same transaction as the money, and ``posflow audit verify`` intact afterwards.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cli.main import main
from posflow.contracts.money import FeePlan
from posflow.security.apikeys import issue_key, revoke_key
from posflow.security.audit import records, verify
from posflow.security.keys import LocalMasterKey, get_secret, issue_merchant_key
from posflow.security.roles import Principal, Role
from posflow.settings import PostgresSettings
from posflow.storage import migrate
from posflow.storage.ledger import LedgerWriter
from streams.settlement_entries import to_entry
from tests.conftest import unique
from tests.integration._settlement_reference import envelope
from tests.unit import samples

Conn = psycopg.Connection[tuple[Any, ...]]
PLAN = FeePlan.from_json('{"default": {"percent": "1", "fixed_minor": 0}}')
ADMIN = Principal("alice", Role.SECURITY_ADMIN)
ACCOUNT = "DE89 3704 0044 0532 0130 00 / COBADEFFXXX"


@dataclass
class Env:
    conn: Conn
    merchant: str
    other: str
    master: LocalMasterKey
    tmp: Path
    capsys: pytest.CaptureFixture[str]

    def run(self, *args: str, key: str | None = None) -> tuple[int, str, str]:
        """``posflow <args>`` in this process; the staff key as POSFLOW_STAFF_KEY."""
        self.capsys.readouterr()
        with pytest.MonkeyPatch.context() as mp:
            if key is None:
                mp.delenv("POSFLOW_STAFF_KEY", raising=False)
            else:
                mp.setenv("POSFLOW_STAFF_KEY", key)
            code = main(list(args))
        out = self.capsys.readouterr()
        return code, out.out, " ".join(out.err.split())

    def balance(self) -> tuple[int, int, int]:
        row = self.conn.execute(
            "SELECT pending_minor, available_minor, paid_out_minor FROM merchant_balances"
            " WHERE merchant_id = %s AND currency = 'EUR'",
            [self.merchant],
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    def key(self, role: Role) -> str:
        merchant = self.merchant if role is Role.MERCHANT else None
        return issue_key(self.conn, merchant, "ops", role=role).token


@pytest.fixture
def env(
    pg: PostgresSettings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Env]:
    raw = secrets.token_bytes(32)
    monkeypatch.setenv("POSFLOW_POSTGRES__DATABASE", pg.database)
    monkeypatch.setenv("POSFLOW_SECURITY__MASTER_KEY", base64.b64encode(raw).decode())
    merchant, other = unique("M"), unique("M")
    master = LocalMasterKey(raw)
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
        for m in (merchant, other):
            conn.execute(
                "INSERT INTO merchants (merchant_id, name, fee_plan, settlement_rule)"
                " VALUES (%s, 'Cafe', %s::jsonb, '{\"kind\": \"instant\"}'::jsonb)",
                [m, PLAN.model_dump_json()],
            )
            issue_merchant_key(conn, master, m, actor=ADMIN, source="test")
        sale = samples.txn(merchant_id=merchant, terminal_id="T-1", txn_id=unique("s"),
                           amount_minor=10_000, currency="EUR")  # fmt: skip
        conn.autocommit = False
        LedgerWriter(conn, "g").write([to_entry(envelope(sale), PLAN)], offsets={})
        conn.autocommit = True
        yield Env(conn, merchant, other, master, tmp_path, capsys)


def _commands(env: Env, n: int) -> dict[str, list[str]]:
    plan = env.tmp / "plan.json"
    plan.write_text('{"fee_plan": {"default": {"percent": "2.5", "fixed_minor": 5}}}')
    account = env.tmp / "account.txt"
    account.write_text(ACCOUNT)
    m = env.merchant
    return {
        "payout.create": ["payout", "--merchant", m, "--currency", "EUR",
                          "--amount-minor", "4000", "--idempotency-key", f"p-{n}"],
        "settlement.set_plan": ["settlement", "set-plan", "--merchant", m, "--file", str(plan)],
        "settlement.release": ["settlement", "release", "--now", "2030-01-01T00:00:00Z"],
        "settlement.set_payout_account": ["settlement", "set-payout-account", "--merchant", m,
                                          "--file", str(account)],
    }  # fmt: skip


@pytest.mark.parametrize("role", list(Role), ids=[r.value for r in Role])
def test_only_finance_moves_money_and_every_attempt_is_audited(env: Env, role: Role) -> None:
    key = env.key(role)
    key_id = key.split("_")[1]
    before = env.balance()
    assert before == (0, 9900, 0)
    results = {name: env.run(*args, key=key) for name, args in _commands(env, 1).items()}

    trail = [r for r in records(env.conn, limit=100) if r.actor == f"api-key:{key_id}"]
    got = [(r.action, r.target, r.role, r.outcome, r.source.startswith("cli:")) for r in trail]
    targets = {
        "payout.create": f"merchant:{env.merchant}",
        "settlement.set_plan": f"merchant:{env.merchant}",
        "settlement.release": "settlement:release",
        "settlement.set_payout_account": f"merchant:{env.merchant}",
    }
    if role is Role.FINANCE:
        assert {name: code for name, (code, _, _) in results.items()} == dict.fromkeys(
            targets, 0
        ), results
        assert env.balance() == (0, 5900, 4000)
        assert got == [(a, t, "finance", "ok", True) for a, t in targets.items()]
        payout, set_plan, release, account = (r.detail for r in trail)
        assert payout == {
            "currency": "EUR", "amount_minor": 4000, "idempotency_key": "p-1", "seq": 2,
            "replayed": False, "available_minor": 5900, "paid_out_minor": 4000,
            "key_label": "ops",
        }  # fmt: skip
        assert set_plan["fee_plan"] == {
            "v": 1, "rules": [], "default": {"scheme": None, "entry_mode": None,
            "percent": "2.5", "fixed_minor": 5, "fixed_by_currency": {}},
        }  # fmt: skip
        assert set_plan["previous_fee_plan"] == json.loads(PLAN.model_dump_json())
        assert set_plan["authorized_as"] == "payout.create"
        assert release["pairs"] == 0  # an instant merchant has nothing pending
        assert account == {
            "purpose": "payout_account", "key_version": 1, "key_label": "ops",
            "authorized_as": "payout.create",
        }  # fmt: skip
        stored = env.conn.execute(
            "SELECT fee_plan->'default'->>'percent' FROM merchants WHERE merchant_id = %s",
            [env.merchant],
        ).fetchone()
        assert stored == ("2.5",)
        assert get_secret(env.conn, env.master, env.merchant, "payout_account") == ACCOUNT.encode()
    else:
        assert {name: code for name, (code, _, _) in results.items()} == dict.fromkeys(targets, 1)
        for name, (_, out, err) in results.items():
            assert out == ""
            assert err.startswith(f"posflow: error: {name} on {targets[name]} refused: ")
            assert "may not payout.create" in err
            assert "posflow api keys issue --role finance" in err
        assert env.balance() == before
        assert got == [(a, t, role.value, "refused", True) for a, t in targets.items()]
        assert all("may not payout.create" in r.detail["reason"] for r in trail)
        assert env.conn.execute(
            "SELECT count(*) FROM merchant_secrets WHERE purpose = 'payout_account'"
        ).fetchone() == (0,)
        assert env.conn.execute(
            "SELECT fee_plan->'default'->>'percent' FROM merchants WHERE merchant_id = %s",
            [env.merchant],
        ).fetchone() == ("1",)
    assert verify(env.conn).ok
    code, out, _ = env.run("audit", "verify")
    assert code == 0
    assert f"audit trail intact: {len(records(env.conn, limit=1000))} records" in out


def test_missing_bad_and_revoked_keys_are_refused_and_recorded(env: Env) -> None:
    pay = _commands(env, 2)["payout.create"]
    finance = env.key(Role.FINANCE)
    key_id = finance.split("_")[1]
    wrong_secret = finance[:-4] + ("AAAA" if not finance.endswith("AAAA") else "BBBB")
    revoke_key(env.conn, key_id)
    cases = {
        None: ("anonymous", "no staff API key given"),
        "not-a-key": ("anonymous", "malformed API key"),
        wrong_secret: (f"api-key:{key_id}", "unknown API key"),
        finance: (f"api-key:{key_id}", f"API key {key_id} was revoked"),
    }
    for key, (actor, reason) in cases.items():
        code, out, err = env.run(*pay, key=key)
        assert (code, out) == (1, "")
        assert reason in err
        last = records(env.conn, limit=1)[0]
        assert (last.actor, last.role, last.action, last.outcome) == (
            actor, "none", "payout.create", "refused"
        )  # fmt: skip
        assert reason in last.detail["reason"]
    assert env.balance() == (0, 9900, 0)
    assert verify(env.conn).ok


def test_a_merchant_key_cannot_pay_itself_out(env: Env) -> None:
    merchant_key = env.key(Role.MERCHANT)
    code, _, err = env.run(*_commands(env, 3)["payout.create"], key=merchant_key)
    assert code == 1
    assert "merchant may: merchant.read, payout.read" in err
    assert env.balance() == (0, 9900, 0)


def test_payout_failures_are_recorded_and_the_payout_commits_only_with_its_record(
    env: Env,
) -> None:
    finance = env.key(Role.FINANCE)
    m = env.merchant
    pay = ["payout", "--merchant", m, "--currency", "EUR", "--idempotency-key", "k"]
    code, _, err = env.run(*pay, "--amount-minor", "9901", key=finance)
    assert code == 1
    assert "payout of 9901 EUR refused: merchant" in err
    failed = records(env.conn, limit=1)[0]
    assert (failed.action, failed.outcome) == ("payout.create", "failed")
    assert "9900 EUR available" in failed.detail["reason"]

    assert env.run(*pay, "--amount-minor", "9000", key=finance)[0] == 0
    code, out, _ = env.run(*pay, "--amount-minor", "9000", key=finance)
    assert code == 0
    assert "already paid out (same key), nothing moved" in out
    ok, replay = records(env.conn, limit=2)
    assert (ok.detail["replayed"], replay.detail["replayed"]) == (False, True)
    assert env.balance() == (0, 900, 9000)

    # The audit record is part of the payout's transaction: if it cannot be written,
    # no money moves (here the chain head row is gone, so record() fails).
    env.conn.execute("DELETE FROM audit_chain_head")
    code, _, err = env.run(*pay[:-1], "k2", "--amount-minor", "500", key=finance)
    assert code == 1
    assert "audit chain head row is missing" in err
    assert env.balance() == (0, 900, 9000)
    assert env.conn.execute(
        "SELECT count(*) FROM payouts WHERE merchant_id = %s", [m]
    ).fetchone() == (1,)


def test_payout_account_needs_an_active_merchant_key_and_is_never_recorded(env: Env) -> None:
    finance = env.key(Role.FINANCE)
    account = env.tmp / "a.txt"
    account.write_text(ACCOUNT)
    m = unique("M")  # no merchant key issued
    env.conn.execute("INSERT INTO merchants (merchant_id, name) VALUES (%s, 'x')", [m])
    code, _, _ = env.run(
        "settlement", "set-payout-account", "--merchant", m, "--file", str(account), key=finance
    )
    assert code == 1
    assert records(env.conn, limit=1)[0].outcome == "failed"
    code, _, _ = env.run(
        "settlement", "set-payout-account", "--merchant", env.other, "--file", str(account),
        key=finance,
    )  # fmt: skip
    assert code == 0
    sealed = env.conn.execute(
        "SELECT ciphertext FROM merchant_secrets WHERE merchant_id = %s", [env.other]
    ).fetchone()
    assert sealed is not None
    assert b"3704" not in bytes(sealed[0])
    assert get_secret(env.conn, env.master, env.other, "payout_account") == ACCOUNT.encode()
    dump = json.dumps([r.detail for r in records(env.conn, limit=100)])
    assert "3704" not in dump
    assert "DE89" not in dump
