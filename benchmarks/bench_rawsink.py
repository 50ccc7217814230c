"""Raw storage sink: rows/s draining a preloaded topic into the time-series tables.

Preloads fresh topics (own prefix) with validated telemetry (and optionally
transaction) envelopes, then runs the sink in this process (`streams.rawsink.RawSink`,
the same code `posflow streams sink` runs, without its HTTP endpoint) until every
record is committed: Kafka fetch, envelope parsing, card scan, both writers, WAL-flush
check and the Kafka offset commit. A fresh database is created and dropped. With
``--baseline`` the writer-only benchmark (bench_storage.py, same rows and batch) runs
first, in the same run. Bounded in rows and time.

``--marked`` preloads the records as the bridge writes them since issue 18: with the
record header ``posflow-record: bridge/1``, so the sink decodes them with the typed
decoder instead of the full check. ``--compare`` runs, in each of ``--rounds`` rounds,
the writer-only baseline and the sink on unmarked (full check) and on marked records,
alternating which goes first, each on its own topics and fresh database. Each sink run
reports rows/s and this process's CPU per record (utime + stime from /proc/self/stat
over the drain).

Usage:
  .venv/bin/python benchmarks/bench_rawsink.py --rows 200000 --txns 0 --batch 5000 --baseline
  .venv/bin/python benchmarks/bench_rawsink.py --rows 200000 --batch 5000 --compare --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import envelope
from posflow.contracts.internal import BRIDGE_HEADER
from posflow.settings import KafkaSettings, PostgresSettings, RawSinkSettings, Settings
from posflow.storage.databases import create_database, drop_database
from streams.rawsink import RawSink, RawSinkMetrics
from streams.rawsink.records import sort_records
from tests.unit import samples

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 300
_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s() -> float:
    """This process's CPU seconds (utime + stime, all threads) from /proc/self/stat."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _values(kind: str, count: int, terminals: int) -> list[tuple[bytes, bytes]]:
    now = datetime.now(UTC)
    out = []
    for i in range(count):
        terminal = f"T-{i % terminals:05d}"
        ts = (now - timedelta(seconds=(count - i) // terminals)).isoformat()
        if kind == "telemetry":
            body = samples.telemetry(merchant_id="M-0001", terminal_id=terminal, seq=i, ts=ts)
        else:
            body = samples.txn(
                merchant_id=f"M-{i % 200:04d}", terminal_id=terminal, seq=i, ts=ts,
                txn_id=f"{terminal}:{i:08d}", amount_minor=100 + i % 9000,
            )  # fmt: skip
        accepted = envelope(kind, body, received_at=now, mqtt_mid=i % 65535 + 1)
        out.append((accepted.kafka_key(), accepted.to_json()))
    return out


async def _preload(
    settings: Settings, partitions: int, rows: int, txns: int, terminals: int, *, marked: bool
) -> float:
    prefix = settings.kafka.topic_prefix
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(f"{prefix}.{n}.v1", num_partitions=partitions, replication_factor=1)
             for n in ("telemetry", "txn", "deadletter")]
        )  # fmt: skip
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap, acks="all", enable_idempotence=True,
        linger_ms=20, max_batch_size=512 * 1024,
    )  # fmt: skip
    await producer.start()
    started = time.monotonic()
    headers = [BRIDGE_HEADER] if marked else None
    try:
        for topic, kind, count in (("telemetry", "telemetry", rows), ("txn", "txn", txns)):
            pending = []
            for key, value in _values(kind, count, terminals):
                pending.append(
                    await producer.send(f"{prefix}.{topic}.v1", value, key=key, headers=headers)
                )
                if len(pending) >= 10_000:
                    await asyncio.gather(*pending)
                    pending = []
            await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.monotonic() - started


async def _drain(settings: Settings, expected: int) -> dict[str, float]:
    metrics = RawSinkMetrics()
    sink = RawSink(settings, metrics)
    stop = asyncio.Event()
    reg = metrics.registry

    def rows() -> float:
        return sum(
            (reg.get_sample_value("posflow_rawsink_rows_total", {"table": t}) or 0)
            + (reg.get_sample_value("posflow_rawsink_replayed_total", {"table": t}) or 0)
            for t in ("telemetry", "transactions")
        )

    async def watch() -> tuple[float, float, float, float]:
        while not sink.started:
            await asyncio.sleep(0.005)
        # The event loop's thread (fetch, decode) apart from the writer's (asyncio.to_thread).
        t0, cpu0, loop0 = time.monotonic(), _cpu_s(), time.thread_time()
        while rows() < expected and time.monotonic() - t0 < TIME_LIMIT_S:
            await asyncio.sleep(0.005)
        t1 = time.monotonic()
        stop.set()
        return t0, t1, _cpu_s() - cpu0, time.thread_time() - loop0

    watcher = asyncio.create_task(watch())
    await sink.run(stop)
    t0, t1, cpu, loop_cpu = await watcher
    count = reg.get_sample_value("posflow_rawsink_batch_write_seconds_count") or 0
    total = reg.get_sample_value("posflow_rawsink_batch_write_seconds_sum") or 0
    records = reg.get_sample_value("posflow_rawsink_batch_records_sum") or 0
    return {
        "seconds": t1 - t0,
        "cpu_s": cpu,
        "loop_cpu_s": loop_cpu,
        "rows": rows(),
        "inserted": sum(
            reg.get_sample_value("posflow_rawsink_rows_total", {"table": t}) or 0
            for t in ("telemetry", "transactions")
        ),
        "batches": count,
        "mean_batch": records / count if count else 0,
        "mean_batch_s": total / count if count else 0,
    }


def _parse_cost(*, marked: bool, count: int = 5000) -> float:
    """Microseconds per record of the sink's CPU work before the database: the share of
    the drain the writer-only baseline does not pay (it times already-built envelopes)."""
    topic = "b.telemetry.v1"
    headers = [BRIDGE_HEADER] if marked else []
    records = [
        ConsumerRecord(topic, 0, i, 0, 0, k, v, None, len(k), len(v), headers)
        for i, (k, v) in enumerate(_values("telemetry", count, 2000))
    ]
    sort_records(records[:100], telemetry_topic=topic, txn_topic="b.txn.v1")  # warm up
    started = time.perf_counter()
    sorted_ = sort_records(records, telemetry_topic=topic, txn_topic="b.txn.v1")
    assert len(sorted_.telemetry) == count  # noqa: S101 - every sample is valid
    return (time.perf_counter() - started) / count * 1e6


def _baseline(args: argparse.Namespace) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_storage.py"), "--rows",
         str(args.rows), "--batch", str(args.batch), "--ledger", "1000"],
        capture_output=True, text=True, check=True, timeout=TIME_LIMIT_S, cwd=ROOT,
    )  # fmt: skip
    line = next(x for x in out.stdout.splitlines() if x.startswith("telemetry:"))
    print(f"baseline (writer only, bench_storage.py) {line}", flush=True)


def _sink_run(args: argparse.Namespace, *, marked: bool) -> None:
    """One sink run on its own topics and fresh database: preload, drain, report, drop."""
    base = Settings()
    db = f"bench_{secrets.token_hex(4)}"
    admin_dsn = base.postgres.dsn()
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        create_database(admin, db)
    settings = Settings(
        kafka=KafkaSettings(topic_prefix=f"bench{secrets.token_hex(3)}"),
        postgres=PostgresSettings(**{**base.postgres.model_dump(), "database": db}),
        rawsink=RawSinkSettings(group=f"bench-{secrets.token_hex(3)}", max_records=args.batch),
    )
    what = "bridge-marked (typed decoder)" if marked else "unmarked (full check)"
    try:
        print(
            f"# bench_rawsink {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
            f"db={db}, prefix={settings.kafka.topic_prefix}, {args.partitions} partitions, "
            f"records {what}"
        )
        load_s = asyncio.run(
            _preload(settings, args.partitions, args.rows, args.txns, args.terminals, marked=marked)
        )
        expected = args.rows + args.txns
        print(f"preloaded {expected} records in {load_s:.1f} s")
        print(
            f"sort_records alone ({what}): {_parse_cost(marked=marked):.1f} us/record", flush=True
        )
        r = asyncio.run(_drain(settings, expected))
        print(
            f"rawsink [{what}]: {r['rows']:.0f} records ({args.rows} telemetry + {args.txns} "
            f"txn) in {r['seconds']:.2f} s = {r['rows'] / r['seconds']:,.0f} rows/s; "
            f"CPU {r['cpu_s'] / max(r['rows'], 1) * 1e6:.1f} us/record (this process; "
            f"event-loop thread {r['loop_cpu_s'] / max(r['rows'], 1) * 1e6:.1f}); "
            f"{r['inserted']:.0f} inserted; {r['batches']:.0f} batches of {r['mean_batch']:.0f} "
            f"records, {r['mean_batch_s'] * 1000:.0f} ms each to write + commit",
            flush=True,
        )
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            drop_database(admin, db)
        asyncio.run(_delete_topics(settings))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="telemetry records")
    parser.add_argument("--txns", type=int, default=0, help="transaction records")
    parser.add_argument("--batch", type=int, default=5_000, help="the sink's max_records")
    parser.add_argument("--terminals", type=int, default=2_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--baseline", action="store_true", help="run bench_storage first")
    parser.add_argument(
        "--marked", action="store_true", help="records with the bridge's header (bridge/1)"
    )
    parser.add_argument(
        "--compare", action="store_true",
        help="each round: writer-only baseline, unmarked and marked records (alternating)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="rounds of --compare")
    args = parser.parse_args()

    if not args.compare:
        if args.baseline:
            _baseline(args)
        _sink_run(args, marked=args.marked)
        return
    for n in range(args.rounds):
        print(f"\n## round {n + 1} of {args.rounds}")
        _baseline(args)
        for marked in (False, True) if n % 2 == 0 else (True, False):
            _sink_run(args, marked=marked)


async def _delete_topics(settings: Settings) -> None:
    prefix = settings.kafka.topic_prefix
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([f"{prefix}.{n}.v1" for n in ("telemetry", "txn", "deadletter")])
    finally:
        await admin.close()


if __name__ == "__main__":
    main()
