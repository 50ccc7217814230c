"""The raw storage sink as a process (`posflow streams sink`) on the real stack: envelopes
from Kafka become rows with exact values, duplicates and replays add nothing, bad records
go to the dead-letter topic, and a SIGKILL in the middle loses and repeats nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from posflow.contracts import (
    Accepted,
    DeadLetter,
    IngestEnvelope,
    Telemetry,
    Transaction,
    validate_message,
)
from posflow.contracts.internal import BRIDGE_HEADER, RECORD_HEADER
from posflow.settings import PostgresSettings, Settings
from posflow.storage import migrate
from tests.conftest import ROOT, free_port, unique
from tests.unit import samples

PARTITIONS = 3
CARD = "4111 1111 1111 1111"  # a Luhn-valid test card number: must never reach a dead letter


@dataclass
class Env:
    settings: Settings
    pg: PostgresSettings
    prefix: str
    group: str
    port: int

    def topic(self, name: str) -> str:
        return f"{self.prefix}.{name}.v1"

    def start(self, max_records: int = 100) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "POSFLOW_KAFKA__TOPIC_PREFIX": self.prefix,
            "POSFLOW_POSTGRES__DATABASE": self.pg.database,
            "POSFLOW_RAWSINK__GROUP": self.group,
            "POSFLOW_RAWSINK__MAX_RECORDS": str(max_records),
            "POSFLOW_RAWSINK__POLL_MS": "50",
            "POSFLOW_RAWSINK__MAINTAIN_INTERVAL_S": "1",
            "POSFLOW_SERVICES__RAWSINK": str(self.port),
        }
        cmd = [sys.executable, "-m", "cli", "streams", "sink"]
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)


@pytest.fixture
async def env(settings: Settings, pg: PostgresSettings) -> Env:
    e = Env(settings, pg, unique("rs").replace("-", ""), unique("rawsink"), free_port())
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(e.topic(n), num_partitions=PARTITIONS, replication_factor=1)
             for n in ("telemetry", "txn", "deadletter")]
        )  # fmt: skip
    finally:
        await admin.close()
    return e


def _envelope(kind: str, body: dict[str, Any], received_at: datetime) -> IngestEnvelope:
    topic = f"pos/v1/{body['merchant_id']}/{body['terminal_id']}/{kind}"
    result = validate_message(topic, json.dumps(body).encode(), received_at=received_at, mqtt_mid=1)
    assert isinstance(result, Accepted), result
    return result.envelope


def _telemetry(terminal: str, seq: int, ts: datetime, battery: int, rsrp: int) -> IngestEnvelope:
    body = samples.telemetry(
        merchant_id="M-1", terminal_id=terminal, seq=seq, ts=ts.isoformat(),
        **{"battery.level_pct": battery, "signal.rsrp_dbm": rsrp},
    )  # fmt: skip
    return _envelope("telemetry", body, ts + timedelta(milliseconds=250))


def _txn(terminal: str, n: int, ts: datetime, amount: int, tip: int = 0) -> IngestEnvelope:
    body = samples.txn(
        merchant_id="M-1", terminal_id=terminal, seq=n, txn_id=f"{terminal}:{n:06d}",
        ts=ts.isoformat(), amount_minor=amount, tip_minor=tip, currency="EUR",
    )  # fmt: skip
    return _envelope("txn", body, ts + timedelta(milliseconds=300))


async def _produce(
    env: Env,
    records: list[tuple[str, bytes, bytes]],
    headers: list[tuple[str, bytes]] | None = None,
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=env.settings.kafka.bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        for topic, key, value in records:
            await producer.send(env.topic(topic), value, key=key, headers=headers)
        await producer.flush()
    finally:
        await producer.stop()


def _records(envelopes: list[IngestEnvelope]) -> list[tuple[str, bytes, bytes]]:
    return [
        ("telemetry" if e.kind.value == "telemetry" else "txn", e.kafka_key(), e.to_json())
        for e in envelopes
    ]


async def _read_all(env: Env, name: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=env.settings.kafka.bootstrap)
    await consumer.start()
    try:
        parts = [TopicPartition(env.topic(name), p) for p in range(PARTITIONS)]
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


async def _committed_vs_end(env: Env) -> tuple[dict[str, int], dict[str, int]]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=env.settings.kafka.bootstrap, group_id=env.group,
        enable_auto_commit=False,
    )  # fmt: skip
    await consumer.start()
    try:
        parts = [
            TopicPartition(env.topic(n), p) for n in ("telemetry", "txn") for p in range(PARTITIONS)
        ]
        end = await consumer.end_offsets(parts)
        committed = {f"{tp.topic}/{tp.partition}": await consumer.committed(tp) or 0
                     for tp in parts}  # fmt: skip
        return committed, {f"{tp.topic}/{tp.partition}": end[tp] for tp in parts}
    finally:
        await consumer.stop()


def _query(pg: PostgresSettings, query: str, *args: Any) -> list[tuple[Any, ...]]:
    try:
        with psycopg.connect(pg.dsn()) as conn:
            return conn.execute(query, list(args)).fetchall()
    except psycopg.errors.UndefinedTable:
        return []  # the sink has not migrated the database yet


def _count(pg: PostgresSettings, table: str) -> int:
    rows = _query(pg, f"SELECT count(*) FROM {table}")  # noqa: S608 - fixed names
    return int(rows[0][0]) if rows else 0


async def _wait(predicate: Callable[[], bool], seconds: float, what: str) -> None:
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


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not exported")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


async def test_sink_writes_exact_rows_once_dead_letters_bad_records_and_keeps_going(
    env: Env,
) -> None:
    minute = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=2)
    tel = [_telemetry("T-1", i, minute + timedelta(seconds=5 * i), 90 - i, -90 - i)
           for i in range(6)]  # fmt: skip
    txns = [
        _txn("T-1", 1, minute + timedelta(seconds=3), 1250, 150),
        _txn("T-2", 2, minute + timedelta(seconds=7), 999_999_999_999),
    ]  # > 2**31: int8
    wrong_kind = ("telemetry", b"T-1", txns[0].to_json())  # a txn on the telemetry topic
    bad = [("telemetry", b"T-1", b'{"v": 1, "kind": "telemetry"'),
           ("txn", b"M-1", f'{{"pan": "{CARD}", "amount_minor": 5}}'.encode()),
           wrong_kind]  # fmt: skip
    later = [_telemetry("T-3", 1, minute + timedelta(seconds=40), 55, -101)]
    # Duplicates: the same envelopes again (a bridge retry), around the bad records.
    await _produce(env, _records([*tel, *txns, tel[2], txns[0]]) + bad + _records(later))
    await _produce(env, _records([tel[4], txns[1]]))

    proc = env.start()
    try:
        await _wait(lambda: _http(env.port, "/readyz")[0] == 200, 30, "/readyz 200")
        await _wait(lambda: _count(env.pg, "telemetry") == 7
                    and _count(env.pg, "transactions") == 2, 30, "7 + 2 rows")  # fmt: skip
        rows = _query(
            env.pg,
            "SELECT terminal_id, seq, ts, received_at, battery_level_pct, signal_dbm,"
            " rsrp_dbm, rssi_dbm, signal_type, carrier, printer_paper, lat, uptime_s"
            " FROM telemetry ORDER BY terminal_id, seq",
        )
        assert rows == [
            (e.terminal_id, e.payload.seq, e.payload.ts, e.received_at, 90 - i, -90 - i,
             -90 - i, -71, "lte", "Telstra", "ok", -33.8688, 86400)
            for i, e in enumerate(tel)
        ] + [("T-3", 1, later[0].payload.ts, later[0].received_at, 55, -101, -101, -71, "lte",
              "Telstra", "ok", -33.8688, 86400)]  # fmt: skip
        money = _query(
            env.pg,
            "SELECT txn_id, terminal_id, ts, amount_minor, tip_minor, currency, status,"
            " txn_type, card_last4, received_at FROM transactions ORDER BY txn_id",
        )
        assert money == [
            ("T-1:000001", "T-1", txns[0].payload.ts, 1250, 150, "EUR", "approved", "sale",
             "1111", txns[0].received_at),
            ("T-2:000002", "T-2", txns[1].payload.ts, 999_999_999_999, 0, "EUR", "approved", "sale",
             "1111", txns[1].received_at),
        ]  # fmt: skip
        assert all(isinstance(r[3], int) and isinstance(r[4], int) for r in money)

        # The 1-minute rollup of T-1's minute holds exactly the six samples, once each.
        rollup = _query(
            env.pg,
            "SELECT bucket, samples, battery_min, battery_max, battery_avg, signal_min_dbm,"
            " signal_max_dbm FROM telemetry_1m WHERE terminal_id = 'T-1'",
        )
        assert rollup == [(minute, 6, 85, 90, 87.5, -95, -90)]

        letters = [DeadLetter.from_json(v) for v in await _read_all(env, "deadletter")]
        by_reason = sorted((d.reason.value, d.field, d.original_topic.split("/")[0])
                           for d in letters)  # fmt: skip
        assert by_reason == [
            ("invalid_value", "kind", env.topic("telemetry")),
            ("malformed_json", None, env.topic("telemetry")),
            ("missing_field", "kind", env.topic("txn")),
        ]
        # The sink reads its own dead letters back and counts them, per minute and reason.
        await _wait(lambda: _query(env.pg, "SELECT coalesce(sum(count), 0)::int"
                                           " FROM deadletter_counts") == [(3,)],
                    30, "3 dead letters counted")  # fmt: skip
        counted = _query(env.pg, "SELECT reason, sum(count)::int FROM deadletter_counts"
                                 " GROUP BY 1 ORDER BY 1")  # fmt: skip
        assert counted == [("invalid_value", 1), ("malformed_json", 1), ("missing_field", 1)]
        buckets = {b for (b,) in _query(env.pg, "SELECT bucket FROM deadletter_counts")}
        assert all(b.second == 0 and b.microsecond == 0 for b in buckets)
        raw = b"".join(await _read_all(env, "deadletter"))
        assert CARD.encode() not in raw
        assert b"4111111111111111" not in raw
        assert b"[REDACTED" in raw
        assert all(d.payload_size > 0 for d in letters)

        status, metrics = _http(env.port, "/metrics")
        assert status == 200
        assert _http(env.port, "/healthz")[0] == 200
        assert _metric(metrics, 'posflow_rawsink_rows_total{table="telemetry"}') == 7
        assert _metric(metrics, 'posflow_rawsink_rows_total{table="transactions"}') == 2
        assert _metric(metrics, 'posflow_rawsink_replayed_total{table="telemetry"}') == 2
        assert _metric(metrics, 'posflow_rawsink_replayed_total{table="transactions"}') == 2
        assert (
            sum(
                _metric(metrics, f'posflow_rawsink_dead_letters_total{{reason="{r}"}}')
                for r in {d.reason.value for d in letters}
            )
            == 3
        )
        assert _metric(
            metrics,
            'posflow_rawsink_end_to_end_seconds_count{since="received",table="telemetry"}',
        ) == 9  # fmt: skip
        group = env.group
        assert (
            f'posflow_consumer_lag{{group="{group}",partition="0",topic="{env.topic("txn")}"}}'
            in metrics
        )
        # Periodic upkeep ran again after the one at start (period 1 s).
        await _wait(
            lambda: _metric(_http(env.port, "/metrics")[1],
                            'posflow_rawsink_maintenance_runs_total{outcome="ok"}') >= 2,
            10, "a periodic upkeep run",
        )  # fmt: skip
        if _query(env.pg, "SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'"):
            # TimescaleDB: the upkeep is its policy jobs, run by the sink, each one clean.
            text = _http(env.port, "/metrics")[1]
            for job in (
                "policy_refresh_continuous_aggregate telemetry_1m",
                "policy_compression telemetry",
                "policy_retention telemetry",
            ):
                assert (
                    _metric(
                        text, f'posflow_rawsink_storage_job_runs_total{{job="{job}",outcome="ok"}}'
                    )
                    >= 1
                ), job
                assert f'job_runs_total{{job="{job}",outcome="failed"}}' not in text, job

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        _kill(proc)
    committed, end = await _committed_vs_end(env)
    assert committed == end  # the drain committed everything it wrote


async def test_a_record_without_the_bridge_header_is_fully_validated_and_a_forged_one_refused(
    env: Env,
) -> None:
    ts = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)

    def edited(envelope: IngestEnvelope, old: bytes, new: bytes) -> tuple[str, bytes, bytes]:
        [(topic, key, value)] = _records([envelope])
        assert old in value
        return topic, key, value.replace(old, new)

    # A sale naming an original transaction breaks a rule only the full contract checks.
    relation = edited(_txn("T-1", 1, ts, 100), b'"original_txn_id":null', b'"original_txn_id":"x"')
    plain = [*_records([_telemetry("T-1", 1, ts, 50, -90)]), relation]
    # Records claiming to come from the bridge, with content its typed decoder refuses.
    forged = [
        *_records([_telemetry("T-2", 1, ts, 60, -91)]),
        edited(_telemetry("T-2", 2, ts, 61, -92), b'"level_pct":61', b'"level_pct":"61"'),
        edited(_telemetry("T-2", 3, ts, 62, -93), b'"Telstra"', f'"{CARD}"'.encode()),
    ]
    # A version of the mark this sink does not know: the full check, as if unmarked.
    unknown = [edited(_txn("T-3", 2, ts, 200), b'"original_txn_id":null', b'"original_txn_id":"y"')]
    await _produce(env, plain)
    await _produce(env, forged, headers=[BRIDGE_HEADER])
    await _produce(env, unknown, headers=[(RECORD_HEADER, b"bridge/99")])

    proc = env.start()
    try:
        await _wait(lambda: _count(env.pg, "telemetry") == 2, 30, "two telemetry rows")
        letters: list[DeadLetter] = []
        deadline = time.monotonic() + 20
        while len(letters) < 4 and time.monotonic() < deadline:
            letters = [DeadLetter.from_json(v) for v in await _read_all(env, "deadletter")]
        got = sorted((d.reason.value, d.field, d.original_topic.split("/")[0]) for d in letters)
        assert got == [
            ("card_data", None, env.topic("telemetry")),
            ("invalid_value", "payload.original_txn_id", env.topic("txn")),
            ("invalid_value", "payload.original_txn_id", env.topic("txn")),
            ("wrong_type", "payload.battery.level_pct", env.topic("telemetry")),
        ]
        # The typed decoder's refusals say so; the unmarked and unknown-version records
        # were refused in the pydantic contract's words (the full check ran).
        forged_letters = [d for d in letters if d.reason.value in ("card_data", "wrong_type")]
        assert all("bridge record" in d.message for d in forged_letters)
        full = [d for d in letters if d.field == "payload.original_txn_id"]
        assert all("bridge record" not in d.message for d in full)
        assert all("acts on no earlier transaction" in d.message for d in full)
        assert b"4111111111111111" not in b"".join(await _read_all(env, "deadletter"))
        assert CARD not in "".join(d.payload_redacted for d in letters)
        stored = _query(
            env.pg, "SELECT terminal_id, seq, battery_level_pct, carrier FROM telemetry"
        )
        assert sorted(stored) == [("T-1", 1, 50, "Telstra"), ("T-2", 1, 60, "Telstra")]
        assert _count(env.pg, "transactions") == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        _kill(proc)


async def test_sigkill_mid_stream_then_restart_stores_every_record_exactly_once(
    env: Env,
) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    telemetry = [
        _telemetry(f"T-{t:03d}", s, start + timedelta(seconds=s), 20 + (t + s) % 80, -80 - t % 40)
        for s in range(60) for t in range(100)
    ]  # fmt: skip
    txns = [_txn(f"T-{i % 100:03d}", i, start + timedelta(seconds=i % 300), 100 + i)
            for i in range(600)]  # fmt: skip
    await _produce(env, _records(telemetry + txns))

    first = env.start(max_records=200)
    try:
        await _wait(lambda: _count(env.pg, "telemetry") >= 1000, 60, "the first 1000 rows")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        _kill(first)
    written_before = _count(env.pg, "telemetry") + _count(env.pg, "transactions")
    assert 0 < written_before < len(telemetry) + len(txns), "the kill came mid-stream"

    second = env.start(max_records=500)
    try:
        await _wait(
            lambda: (
                _count(env.pg, "telemetry") == len(telemetry)
                and _count(env.pg, "transactions") == len(txns)
            ),
            90,
            "every record",
        )
        await asyncio.sleep(1)  # anything still arriving would be a duplicate key anyway
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0
    finally:
        _kill(second)

    tele = [e.payload for e in telemetry if isinstance(e.payload, Telemetry)]
    pays = [e.payload for e in txns if isinstance(e.payload, Transaction)]
    assert (len(tele), len(pays)) == (len(telemetry), len(txns))
    stored = _query(env.pg, "SELECT terminal_id, seq, battery_level_pct FROM telemetry")
    assert sorted(stored) == sorted((p.terminal_id, p.seq, p.battery.level_pct) for p in tele)
    amounts = _query(env.pg, "SELECT txn_id, amount_minor FROM transactions")
    assert sorted(amounts) == sorted((p.txn_id, p.amount_minor) for p in pays)
    # The rollups count each sample once although the killed batch was written again
    # (telemetry_1m: the plain path's view over its rollup table, or TimescaleDB's
    # continuous aggregate with real-time aggregation, so rows not yet materialised count).
    [(samples_total, battery_sum)] = _query(
        env.pg, "SELECT sum(samples), round(sum(battery_avg * samples)) FROM telemetry_1m"
    )
    assert samples_total == len(telemetry)
    assert battery_sum == sum(p.battery.level_pct for p in tele)
    committed, end = await _committed_vs_end(env)
    assert committed == end


async def test_a_row_the_database_refuses_is_dead_lettered_and_the_rest_of_its_batch_written(
    env: Env,
) -> None:
    # A rule only the database knows (the contract allows the amount): the sink must
    # isolate the refused row inside its batch, dead-letter it and write the others.
    with psycopg.connect(env.pg.dsn(), autocommit=True) as conn:
        migrate(conn)
        conn.execute("ALTER TABLE transactions ADD CONSTRAINT no_13 CHECK (amount_minor <> 1313)")
    ts = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    txns = [_txn("T-1", i, ts + timedelta(seconds=i), 1313 if i == 4 else 100 + i)
            for i in range(10)]  # fmt: skip
    await _produce(env, _records(txns))
    proc = env.start(max_records=100)
    try:
        await _wait(lambda: _count(env.pg, "transactions") == 9, 30, "nine rows")
        letters: list[DeadLetter] = []
        deadline = time.monotonic() + 10
        while not letters and time.monotonic() < deadline:
            letters = [DeadLetter.from_json(v) for v in await _read_all(env, "deadletter")]
        assert [(d.reason.value, d.original_topic.split("/")[0]) for d in letters] == [
            ("invalid_value", env.topic("txn"))
        ]
        assert "CheckViolation" in letters[0].message
        assert "no_13" in letters[0].message
        assert json.loads(letters[0].payload_redacted)["payload"]["amount_minor"] == 1313
        # Later batches still go in (the writers were replaced after the refusal).
        await _produce(env, _records([_txn("T-1", 99, ts, 777)]))
        await _wait(lambda: _count(env.pg, "transactions") == 10, 30, "the later row")
        rows = _query(env.pg, "SELECT amount_minor FROM transactions ORDER BY amount_minor")
        assert [r[0] for r in rows] == [100, 101, 102, 103, 105, 106, 107, 108, 109, 777]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        _kill(proc)


def test_dead_letters_are_counted_once_however_often_a_batch_is_read(
    pg: PostgresSettings,
) -> None:
    from aiokafka.structs import ConsumerRecord

    from posflow.contracts import DeadLetter, Reason
    from posflow.storage import migrate
    from posflow.storage.deadletters import count_dead_letters

    at = datetime(2026, 12, 2, 10, 15, 42, tzinfo=UTC)

    def record(offset: int, reason: Reason, seconds: int = 0) -> ConsumerRecord[bytes, bytes]:
        letter = DeadLetter(reason=reason, message="x", original_topic="pos/v1/M/T/telemetry",
                            received_at=at + timedelta(seconds=seconds), payload_redacted="{",
                            payload_size=1)  # fmt: skip
        return ConsumerRecord(
            topic="p.deadletter.v1", partition=offset % 2, offset=offset, timestamp=0,
            timestamp_type=0, key=None, value=letter.to_json(), checksum=None,
            serialized_key_size=0, serialized_value_size=0, headers=(),
        )  # fmt: skip

    first = [record(0, Reason.MALFORMED_JSON), record(1, Reason.CARD_DATA),
             record(2, Reason.MALFORMED_JSON, 30), record(3, Reason.CARD_DATA, 60)]  # fmt: skip
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
        assert count_dead_letters(conn, first) == 4
        assert count_dead_letters(conn, first) == 0  # re-read after a crash: nothing added
        # A rebalance re-reads part of it, with one new record per partition.
        more = [first[2], first[3], record(4, Reason.MALFORMED_JSON), record(5, Reason.CARD_DATA)]
        assert count_dead_letters(conn, more) == 2
        rows = conn.execute(
            "SELECT bucket, reason, count FROM deadletter_counts ORDER BY 1, 2"
        ).fetchall()
        not_a_letter = ConsumerRecord(
            topic="p.deadletter.v1", partition=0, offset=6, timestamp=1_796_220_000_000,
            timestamp_type=0, key=None, value=b"not json", checksum=None,
            serialized_key_size=0, serialized_value_size=0, headers=(),
        )  # fmt: skip
        assert count_dead_letters(conn, [not_a_letter]) == 1
        unreadable = conn.execute(
            "SELECT count FROM deadletter_counts WHERE reason = 'unreadable'"
        ).fetchall()
    minute = at.replace(second=0)
    nxt = minute + timedelta(minutes=1)
    assert rows == [  # 10:15:42 (+0 s) and 10:16:12 / 10:16:42 (+30 s, +60 s)
        (minute, "card_data", 2),  # offsets 1 and 5
        (minute, "malformed_json", 2),  # offsets 0 and 4
        (nxt, "card_data", 1),  # offset 3
        (nxt, "malformed_json", 1),  # offset 2
    ]
    assert unreadable == [(1,)]
