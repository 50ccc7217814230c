"""Settlement benchmark on the running stack (results: docs/benchmarks/settlement.md).

1. Throughput: N payments preloaded into a fresh topic; the settlement worker drains
   them into a fresh database. Baseline in the same run: a plain aiokafka consumer
   that only reads and parses the same records (no ledger).
2. Latency at a fixed rate: a separate producer process publishes payments at R/s,
   each envelope stamped ``received_at`` when sent; latency = the worker's database
   commit of the payment's cash-flow event minus ``received_at`` (what the
   ``posflow_settlement_end_to_end_seconds`` histogram measures).

    .venv/bin/python benchmarks/bench_settlement.py --count 20000 --rate 1000 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posflow.contracts import IngestEnvelope, Kind, Transaction  # noqa: E402
from posflow.settings import (  # noqa: E402
    KafkaSettings,
    PostgresSettings,
    ServicePorts,
    Settings,
    SettlementSettings,
)
from posflow.storage import migrate  # noqa: E402
from posflow.storage.databases import create_database  # noqa: E402
from posflow.storage.ledger import LedgerResult  # noqa: E402
from streams.settlement import SettlementWorker  # noqa: E402
from streams.settlement_metrics import SettlementMetrics  # noqa: E402

MERCHANTS = 500
PARTITIONS = 6
PLAN = '{"default": {"percent": "1.4", "fixed_minor": 10}, "rules": [{"scheme": "amex", "percent": "2.9"}]}'  # noqa: E501


def envelope(i: int, run: str, received_at: datetime) -> IngestEnvelope:
    merchant = f"M-{i % MERCHANTS:04d}"
    body = {
        "v": 1, "kind": "txn", "merchant_id": merchant, "terminal_id": f"T-{i % 5000:05d}",
        "ts": received_at.isoformat(), "seq": i, "txn_id": f"{run}-{i}", "type": "sale",
        "amount_minor": 500 + i % 9000, "tip_minor": 0, "currency": "EUR",
        "status": "approved", "auth_latency_ms": 300, "scheme": ["visa", "amex"][i % 2],
        "entry_mode": "contactless",
    }  # fmt: skip
    if i % 10 == 9:  # every tenth: a partial refund of the sale five payments earlier
        body |= {"type": "refund", "amount_minor": 100, "original_txn_id": f"{run}-{i - 5}"}
    payload = Transaction.model_validate_json(json.dumps(body))
    return IngestEnvelope(
        kind=Kind.TXN, merchant_id=merchant, terminal_id=payload.terminal_id,
        source_topic=f"pos/v1/{merchant}/{payload.terminal_id}/txn", received_at=received_at,
        mqtt_mid=1, payload=payload,
    )  # fmt: skip


async def produce(
    bootstrap: str, topic: str, run: str, *, start: int, count: int, rate: float
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    try:
        began = time.monotonic()
        for i in range(start, start + count):
            if rate > 0:  # paced: payment i leaves at its slot
                delay = began + (i - start) / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            env = envelope(i, run, datetime.now(UTC))
            await producer.send(topic, env.to_json(), key=env.merchant_id.encode())
        await producer.flush()
        print(f"produced {count} in {time.monotonic() - began:.1f}s", file=sys.stderr)
    finally:
        await producer.stop()


async def baseline_drain(bootstrap: str, topic: str, count: int) -> float:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, max_partition_fetch_bytes=4 << 20)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        began, seen = time.monotonic(), 0
        while seen < count and time.monotonic() - began < 300:
            batches = await consumer.getmany(timeout_ms=500, max_records=1000)
            for records in batches.values():
                for r in records:
                    IngestEnvelope.from_json(r.value or b"")
                    seen += 1
        return seen / (time.monotonic() - began)
    finally:
        await consumer.stop()


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] if len(values) > 1 else 0.0


async def bench(args: argparse.Namespace) -> None:
    base = Settings()
    run = secrets.token_hex(3)
    prefix, dbname = f"bench{run}", f"bench_settle_{run}"
    with psycopg.connect(base.postgres.dsn(), autocommit=True) as admin:
        create_database(admin, dbname)
    pg = PostgresSettings(**{**base.postgres.model_dump(), "database": dbname})
    settings = Settings(
        kafka=KafkaSettings(topic_prefix=prefix),
        postgres=pg,
        settlement=SettlementSettings(group=f"bench-{run}", max_records=args.max_records),
        services=ServicePorts(settlement=0),
    )
    topics = [f"{prefix}.{n}.v1" for n in ("txn", "cashflow", "integrity", "deadletter")]
    kafka = AIOKafkaAdminClient(bootstrap_servers=base.kafka.bootstrap)
    await kafka.start()
    await kafka.create_topics([NewTopic(t, PARTITIONS, 1) for t in topics])
    try:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            migrate(conn)
            for m in range(MERCHANTS):
                rule = '{"kind": "instant"}' if m % 2 else '{"kind": "daily", "cutoff": "18:00"}'
                conn.execute(
                    "INSERT INTO merchants (merchant_id, name, fee_plan, settlement_rule)"
                    " VALUES (%s, %s, %s::jsonb, %s::jsonb)",
                    [f"M-{m:04d}", f"M-{m:04d}", PLAN, rule],
                )
        await produce(base.kafka.bootstrap, topics[0], run, start=0, count=args.count, rate=0)
        baseline = await baseline_drain(base.kafka.bootstrap, topics[0], args.count)

        written: list[int] = [0]
        commits: list[float] = []
        latencies: list[float] = []
        measuring = [False]

        def on_committed(result: LedgerResult) -> None:
            now = datetime.now(UTC)
            written[0] += result.applied
            commits.append(time.monotonic())
            if measuring[0]:
                latencies.extend(
                    (now - e.received_at).total_seconds()
                    for e in result.events
                    if e.received_at and int((e.txn_id or "-0").rsplit("-", 1)[1]) >= args.count
                )

        worker = SettlementWorker(settings, SettlementMetrics(), on_committed=on_committed)
        stop = asyncio.Event()
        began = time.monotonic()
        task = asyncio.create_task(worker.run(stop))
        while written[0] < args.count and time.monotonic() - began < 600:
            await asyncio.sleep(0.05)
        drain = time.monotonic() - began
        steady = (commits[-1] - commits[0]) if len(commits) > 1 else drain
        batches = len(commits)

        # Latency at a fixed rate, from a separate producer process.
        total = int(args.rate * args.seconds)
        measuring[0] = True
        target = written[0] + total
        cmd = [sys.executable, __file__, "produce", "--topic", topics[0], "--run", run,
               "--start", str(args.count), "--n", str(total), "--rate", str(args.rate)]  # fmt: skip
        producer = subprocess.Popen(cmd, cwd=ROOT)  # noqa: ASYNC220 - returns at once
        deadline = time.monotonic() + args.seconds + 120
        while written[0] < target and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.to_thread(producer.wait, 60)
        stop.set()
        await task
        with psycopg.connect(pg.dsn()) as conn:
            rows = conn.execute("SELECT count(*) FROM ledger_entries").fetchone()
    finally:
        await kafka.delete_topics(topics)
        await kafka.close()
        with psycopg.connect(base.postgres.dsn(), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )
    print(f"ledger rows: {rows[0] if rows else 0} (expected {args.count + total})")
    print(f"baseline (aiokafka read + parse, no ledger): {baseline:,.0f} records/s")
    print(
        f"worker drain of {args.count} preloaded: {args.count / drain:,.0f} txn/s wall"
        f" (incl. group join), {args.count / steady:,.0f} txn/s first-to-last commit,"
        f" {batches} batches"
    )
    print(
        f"latency at {args.rate:.0f}/s for {args.seconds:.0f}s ({len(latencies)} events): "
        f"p50 {_pct(latencies, 0.5) * 1000:.0f} ms, p99 {_pct(latencies, 0.99) * 1000:.0f} ms,"
        f" max {max(latencies, default=0) * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "produce"])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-records", type=int, default=1000)
    parser.add_argument("--topic")
    parser.add_argument("--run")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--n", type=int, default=0)
    args = parser.parse_args()
    if args.mode == "produce":
        bootstrap = Settings().kafka.bootstrap
        asyncio.run(
            produce(bootstrap, args.topic, args.run, start=args.start, count=args.n, rate=args.rate)
        )
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
