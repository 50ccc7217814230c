"""The settlement worker as a process (`posflow settlement worker`) on the real stack:
Kafka in and out, endpoints, integrity events, and a SIGKILL in the middle of the work."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from posflow.contracts import CashflowRecord, DeadLetter, IntegrityEvent, Transaction
from posflow.contracts.money import FeePlan
from posflow.settings import PostgresSettings, Settings
from posflow.storage import migrate
from tests.conftest import ROOT, free_port, unique
from tests.integration._settlement_reference import Reference, envelope
from tests.unit import samples

PLAN = FeePlan.from_json('{"default": {"percent": "1.5", "fixed_minor": 5}}')
RULE = '{"kind": "instant"}'


@dataclass
class Env:
    settings: Settings
    pg: PostgresSettings
    prefix: str
    group: str
    port: int

    def topic(self, name: str) -> str:
        return f"{self.prefix}.{name}.v1"

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "POSFLOW_KAFKA__TOPIC_PREFIX": self.prefix,
            "POSFLOW_POSTGRES__DATABASE": self.pg.database,
            "POSFLOW_SETTLEMENT__GROUP": self.group,
            "POSFLOW_SETTLEMENT__MAX_RECORDS": "50",
            "POSFLOW_SETTLEMENT__OUTBOX_INTERVAL_S": "0.2",
            "POSFLOW_SETTLEMENT__RELEASE_INTERVAL_S": "0.3",
            "POSFLOW_SERVICES__SETTLEMENT": str(self.port),
        }
        cmd = [sys.executable, "-m", "cli", "settlement", "worker", *extra]
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)


@pytest.fixture
async def env(settings: Settings, pg: PostgresSettings) -> Env:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
    e = Env(settings, pg, unique("ts").replace("-", ""), unique("settle"), free_port())
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(e.topic(n), num_partitions=3, replication_factor=1)
             for n in ("txn", "cashflow", "integrity", "deadletter")]
        )  # fmt: skip
    finally:
        await admin.close()
    return e


def _register(pg: PostgresSettings, merchants: list[str]) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        for m in merchants:
            conn.execute(
                "INSERT INTO merchants (merchant_id, name, fee_plan, settlement_rule)"
                " VALUES (%s, %s, %s::jsonb, %s::jsonb)",
                [m, m, PLAN.model_dump_json(), RULE],
            )


async def _produce(env: Env, values: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=env.settings.kafka.bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        for key, value in values:
            await producer.send(env.topic("txn"), value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def _read_all(env: Env, name: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=env.settings.kafka.bootstrap)
    await consumer.start()
    try:
        parts = [TopicPartition(env.topic(name), p) for p in range(3)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        out: list[bytes] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all([await consumer.position(tp) >= end[tp] for tp in parts]):
                break
            batches = await consumer.getmany(timeout_ms=500)
            out += [r.value for recs in batches.values() for r in recs if r.value is not None]
        return out
    finally:
        await consumer.stop()


def _count(pg: PostgresSettings, query: str) -> int:
    with psycopg.connect(pg.dsn()) as conn:
        row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


async def _wait(predicate: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def _cashflow_db(pg: PostgresSettings) -> dict[tuple[str, int], tuple[str, int]]:
    with psycopg.connect(pg.dsn()) as conn:
        rows = conn.execute("SELECT merchant_id, seq, kind, amount_minor FROM cashflow_events")
        return {(m, s): (k, a) for m, s, k, a in rows.fetchall()}


async def test_worker_settles_publishes_and_reports_integrity(env: Env) -> None:
    _register(env.pg, ["M-a"])
    txns = [samples.txn(merchant_id="M-a", terminal_id="T-1", txn_id=f"s{i}", amount_minor=1000)
            for i in range(20)]  # fmt: skip
    conflict = {**txns[3], "amount_minor": 99_999}
    too_much = samples.txn(merchant_id="M-a", terminal_id="T-1", txn_id="r1", type="refund",
                           amount_minor=1001, original_txn_id="s0")  # fmt: skip
    values = [(b"M-a", envelope(t).to_json()) for t in [*txns, txns[5], conflict, too_much]]
    # A daily-cut-off merchant whose payment is from yesterday: the worker's timer releases it.
    with psycopg.connect(env.pg.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO merchants (merchant_id, name, settlement_rule) VALUES ('M-d', 'D',"
            ' \'{"kind": "daily", "cutoff": "00:00", "timezone": "UTC"}\'::jsonb)'
        )
    yesterday = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    old = samples.txn(merchant_id="M-d", terminal_id="T-9", txn_id="d1", amount_minor=700,
                      ts=yesterday)  # fmt: skip
    values.append((b"M-d", envelope(old).to_json()))
    await _produce(env, [*values, (b"M-a", b'{"not": "an envelope"')])
    proc = env.start()
    try:
        await _wait(lambda: _http(env.port, "/readyz")[0] == 200, 30, "/readyz 200")
        await _wait(
            lambda: _count(env.pg, "SELECT count(*) FROM ledger_entries") == 22, 30, "22 rows"
        )
        await _wait(
            lambda: _count(env.pg, "SELECT count(*) FROM cashflow_events WHERE kind = 'release'")
            == 1, 10, "the release timer",
        )  # fmt: skip
        await _wait(
            lambda: _count(env.pg, "SELECT count(*) FROM integrity_events"
                           " WHERE published_at IS NULL") == 0, 10, "integrity published",
        )  # fmt: skip
        assert _http(env.port, "/healthz")[0] == 200
        _, metrics = _http(env.port, "/metrics")
        with psycopg.connect(env.pg.dsn()) as conn:
            balance = conn.execute(
                "SELECT available_minor FROM merchant_balances WHERE merchant_id = 'M-a'"
            ).fetchone()
            daily = conn.execute(
                "SELECT pending_minor, available_minor FROM merchant_balances"
                " WHERE merchant_id = 'M-d'"
            ).fetchone()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0  # clean shutdown
    finally:
        _stop(proc)
    fee = 15 + 5  # 1.5 % of 1000 + 5
    assert balance == (20 * (1000 - fee),)  # the conflict and the excess refund not applied
    assert "posflow_settlement_quarantined_total 1.0" in metrics
    assert "posflow_settlement_duplicates_refused_total 1.0" in metrics
    assert "posflow_settlement_flagged_total 1.0" in metrics
    assert 'posflow_settlement_ledger_writes_total{effect="applied"} 21.0' in metrics
    assert "posflow_settlement_end_to_end_seconds_count 22.0" in metrics  # + the flag
    assert "posflow_settlement_publish_to_cashflow_seconds_count 22.0" in metrics
    # The topic is at least once (the outbox sweeper may resend a batch still in flight);
    # consumers dedupe integrity events by event_id (docs/architecture.md).
    unique_events = {
        e.event_id: e for e in map(IntegrityEvent.from_json, await _read_all(env, "integrity"))
    }
    found = sorted((e.kind, e.txn_id) for e in unique_events.values())
    assert found == [("refund_exceeds_captured", "r1"), ("txn_id_conflict", "s3")]
    (letter,) = [DeadLetter.from_json(v) for v in await _read_all(env, "deadletter")]
    assert letter.reason == "malformed_json"
    assert letter.original_topic.startswith(env.topic("txn"))
    records = [CashflowRecord.from_json(v) for v in await _read_all(env, "cashflow")]
    published = {(r.merchant_id, r.seq): (r.kind, r.amount_minor) for r in records}
    assert published == _cashflow_db(env.pg)
    assert len(published) == 23  # 20 sales + the flagged refund, M-d's sale and its release
    assert published[("M-d", 2)] == ("release", 700)
    assert daily == (0, 700)  # no fee plan: no fee


@pytest.mark.slow
async def test_worker_killed_mid_batch_resumes_to_the_reference_and_every_event_once(
    env: Env,
) -> None:
    merchants = [f"M-{k}" for k in range(6)]
    _register(env.pg, merchants)
    txns: list[dict[str, Any]] = []
    for i in range(900):
        m = merchants[i % 6]
        base = {"merchant_id": m, "terminal_id": "T-1", "txn_id": f"k{i}", "seq": i}
        if i % 10 == 7:  # refund of the sale 6 transactions earlier (same merchant)
            txns.append(samples.txn(**base, type="refund", amount_minor=400,
                                    original_txn_id=f"k{i - 6}"))  # fmt: skip
        elif i % 10 == 9:  # void of a sale of this merchant
            txns.append(samples.txn(**base, type="void", amount_minor=1,
                                    original_txn_id=f"k{i - 6}"))  # fmt: skip
        else:
            txns.append(samples.txn(**base, amount_minor=100 + i, tip_minor=i % 3 * 50))
    delivered = [*txns, *txns[100:160]]  # a producer retry re-sent some
    await _produce(env, [(t["merchant_id"].encode(), envelope(t).to_json()) for t in delivered])

    first = env.start()
    try:
        await _wait(
            lambda: _count(env.pg, "SELECT count(*) FROM ledger_entries") > 0, 30, "a first batch"
        )
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        _stop(first)
    before = _count(env.pg, "SELECT count(*) FROM ledger_entries")
    assert 0 < before < 900, before

    second = env.start()
    try:
        await _wait(
            lambda: _count(env.pg, "SELECT count(*) FROM ledger_entries") == 900, 60, "900 rows"
        )
        await _wait(
            lambda: _count(env.pg, "SELECT count(*) FROM merchant_cashflow_seq s LEFT JOIN"
                           " cashflow_published p USING (merchant_id)"
                           " WHERE s.last_seq > coalesce(p.published_seq, 0)") == 0,
            30, "the outbox drained",
        )  # fmt: skip
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=20)
        _stop(second)

    ref = Reference(plans=dict.fromkeys(merchants, PLAN))
    ref.feed([p for p in (envelope(t).payload for t in delivered) if isinstance(p, Transaction)])
    with psycopg.connect(env.pg.dsn()) as conn:
        balances = {
            (m, c.strip()): (p, a)
            for m, c, p, a in conn.execute(
                "SELECT merchant_id, currency, pending_minor, available_minor"
                " FROM merchant_balances"
            ).fetchall()
        }
        effects: dict[str, str] = dict(
            conn.execute("SELECT txn_id, effect FROM ledger_entries").fetchall()
        )
    assert effects == ref.effects()
    assert balances == {key: (0, money) for key, money in ref.money.items()}
    db_events = _cashflow_db(env.pg)
    for m in merchants:  # every event once, numbered without a gap
        seqs = sorted(s for mm, s in db_events if mm == m)
        assert seqs == list(range(1, len(seqs) + 1))
    changes = [s for s in ref.state.values() if s.effect in ("applied", "flagged")]
    assert len(db_events) == len(changes)
    # Kafka holds each DB event at least once (repeats after the kill are allowed):
    # the set of (merchant, seq) and their contents equal the database's.
    records = [CashflowRecord.from_json(v) for v in await _read_all(env, "cashflow")]
    published = {(r.merchant_id, r.seq): (r.kind, r.amount_minor) for r in records}
    assert published == db_events
