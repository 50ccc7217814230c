"""Merchant feed latency: cash-flow row committed -> SSE event at the merchant's client.

Measures the API's part of the end-to-end path (issue 6): a writer commits
cash-flow events the way the settlement writer does (rows + pg_notify in one
transaction) at a fixed rate, spread over merchants; one SSE client per
merchant reads `posflow api` (a separate process, as deployed). Latency per
event = client receive time - the writer's time just before its COMMIT.

Baseline in the same run: a plain psycopg LISTEN connection timing the
NOTIFY of each transaction (commit -> notification at a client), the floor
under anything built on LISTEN/NOTIFY.

It does NOT include MQTT -> ingest -> Kafka -> settlement (see
docs/benchmarks/feed.md). Runs on the local stack's PostgreSQL in a fresh
database, dropped afterwards; bounded in time.

Usage:
  .venv/bin/python benchmarks/bench_feed.py --rate 1000 --seconds 20 --merchants 50
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import percentile_ms, read_sse_ids, stop_processes, wait_ready
from posflow.security.apikeys import issue_key
from posflow.security.keys import LocalMasterKey, issue_merchant_key
from posflow.security.roles import Principal, Role
from posflow.settings import Settings
from posflow.storage import migrate
from posflow.storage.databases import create_database, drop_database
from tests.conftest import free_port

POSFLOW = str(Path(sys.executable).with_name("posflow"))
TIME_LIMIT_S = 300


class Writer(threading.Thread):
    """Commits `batch`-event transactions so that `rate` events/s go out, round-robin."""

    def __init__(self, dsn: str, merchants: list[str], rate: int, seconds: float, batch: int):
        super().__init__(daemon=True)
        self.dsn, self.merchants, self.rate = dsn, merchants, rate
        self.seconds, self.batch = seconds, batch
        self.commit_at: dict[tuple[str, int], float] = {}
        self.tx_commit: list[float] = []
        self.tx_notifies: list[int] = []  # NOTIFYs per transaction (one per merchant in it)
        self.written = 0
        self.behind_s = 0.0

    def run(self) -> None:
        seq = dict.fromkeys(self.merchants, 0)
        turn = 0
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            started = time.monotonic()
            total = int(self.rate * self.seconds)
            while self.written < total:
                due = started + self.written / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    self.behind_s = max(self.behind_s, -delay)
                rows = []
                for _ in range(min(self.batch, total - self.written)):
                    m = self.merchants[turn % len(self.merchants)]
                    turn += 1
                    seq[m] += 1
                    rows.append((m, seq[m]))
                now = datetime.now(UTC)
                with conn.transaction():
                    with (
                        conn.cursor() as cur,
                        cur.copy(
                            "COPY cashflow_events (merchant_id, seq, txn_id, kind, currency,"
                            " amount_minor, pending_minor, available_minor, paid_out_minor,"
                            " occurred_at) FROM STDIN"
                        ) as copy,
                    ):
                        for m, s in rows:
                            copy.write_row((m, s, f"{m}-{s}", "sale", "EUR", 100, 100, 0, 0, now))
                    conn.execute(
                        "SELECT pg_notify('posflow_cashflow', m) FROM unnest(%s::text[]) AS m",
                        [sorted({m for m, _ in rows})],
                    )
                    at = time.time()  # just before COMMIT (the transaction block's exit)
                self.tx_commit.append(at)
                self.tx_notifies.append(len({m for m, _ in rows}))
                for key in rows:
                    self.commit_at[key] = at
                self.written += len(rows)


async def _listen_baseline(dsn: str, seen: list[float], stop: asyncio.Event) -> None:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    async with conn:
        await conn.execute("LISTEN posflow_cashflow")
        while not stop.is_set():
            async for _ in conn.notifies(timeout=0.5):
                seen.append(time.time())


async def _run(
    args: argparse.Namespace, dsn: str, base: str, keys: dict[str, str]
) -> dict[str, object]:
    merchants = sorted(keys)
    total = int(args.rate * args.seconds)
    per_merchant = dict.fromkeys(merchants, 0)
    for i in range(total):
        per_merchant[merchants[i % len(merchants)]] += 1
    got: dict[tuple[str, int], float] = {}
    notify_seen: list[float] = []
    stop = asyncio.Event()
    baseline = asyncio.create_task(_listen_baseline(dsn, notify_seen, stop))
    clients = [
        asyncio.create_task(read_sse_ids(base, m, keys[m], per_merchant[m], got, timeout_s=30))
        for m in merchants
    ]
    await asyncio.sleep(1.0)  # streams open and caught up (nothing to catch up yet)
    writer = Writer(dsn, merchants, args.rate, args.seconds, args.batch)
    writer.start()
    try:
        await asyncio.wait_for(asyncio.gather(*clients), args.seconds + 60)
    finally:
        stop.set()
        await baseline
    writer.join(timeout=10)
    warm = args.warmup * args.rate
    lat = [
        got[k] - writer.commit_at[k]
        for i, k in enumerate(sorted(writer.commit_at, key=writer.commit_at.__getitem__))
        if i >= warm and k in got
    ]
    # Notifications arrive in commit order: transaction i owns the next tx_notifies[i].
    base_lat, at = [], 0
    for commit, count in zip(writer.tx_commit, writer.tx_notifies, strict=True):
        if at + count > len(notify_seen):
            break
        if commit - writer.tx_commit[0] >= args.warmup:
            base_lat.append(notify_seen[at] - commit)
        at += count
    return {
        "events_written": writer.written,
        "events_received": len(got),
        "missing": writer.written - len(got),
        "writer_max_behind_s": round(writer.behind_s, 3),
        "api_p50_ms": round(percentile_ms(lat, 0.50), 1),
        "api_p99_ms": round(percentile_ms(lat, 0.99), 1),
        "api_max_ms": round(max(lat) * 1000, 1),
        "api_mean_ms": round(statistics.fmean(lat) * 1000, 1),
        "baseline_notify_p50_ms": round(percentile_ms(base_lat, 0.50), 1),
        "baseline_notify_p99_ms": round(percentile_ms(base_lat, 0.99), 1),
        "transactions": len(writer.tx_commit),
        "notifications_seen": len(notify_seen),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=1000, help="events per second")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--merchants", type=int, default=50)
    parser.add_argument("--batch", type=int, default=10, help="events per transaction")
    parser.add_argument("--warmup", type=int, default=2, help="seconds left out of the figures")
    args = parser.parse_args()
    assert args.seconds * args.rate <= TIME_LIMIT_S * 5000  # noqa: S101 - bounded run

    settings = Settings()
    db = f"bench_feed_{secrets.token_hex(4)}"
    admin_dsn = settings.postgres.dsn()
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        create_database(admin, db)
    dsn = settings.postgres.dsn(database=db)
    server: subprocess.Popen[bytes] | None = None
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
            # A merchant's API keys are accepted only while it has an active merchant key.
            provider = LocalMasterKey(secrets.token_bytes(32))
            admin_principal = Principal("bench", Role.SECURITY_ADMIN)
            for i in range(args.merchants):
                conn.execute(
                    "INSERT INTO merchants (merchant_id, name) VALUES (%s, 'bench')", [f"M-{i:04d}"]
                )
                issue_merchant_key(
                    conn, provider, f"M-{i:04d}", actor=admin_principal, source="bench"
                )
            keys = {
                f"M-{i:04d}": issue_key(conn, f"M-{i:04d}", "bench").token
                for i in range(args.merchants)
            }
        port = free_port()
        env = {
            **os.environ,
            "POSFLOW_POSTGRES__DATABASE": db,
            "POSFLOW_SERVICES__API": str(port),
            "POSFLOW_API__RATE_BURST": "100000",
        }
        server = subprocess.Popen([POSFLOW, "api"], env=env, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        wait_ready("posflow api", base + "/readyz", server, limit_s=30)
        result = asyncio.run(_run(args, dsn, base, keys))
        metrics = httpx.get(base + "/metrics").text
        delivered = [
            line for line in metrics.splitlines()
            if line.startswith("posflow_api_events_delivered_total")
        ]  # fmt: skip
        result["server_events_delivered"] = delivered[0].split()[-1] if delivered else "?"
        print(
            f"rate={args.rate}/s seconds={args.seconds} merchants={args.merchants}"
            f" batch={args.batch} warmup={args.warmup}s"
        )
        for name, value in result.items():
            print(f"  {name:<26} {value}")
        return 0 if result["missing"] == 0 else 1
    finally:
        if server is not None:
            stop_processes([server])
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            drop_database(admin, db)


if __name__ == "__main__":
    sys.exit(main())
