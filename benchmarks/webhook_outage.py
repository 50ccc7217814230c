"""A webhook receiver down for a full minute, with the DEFAULT retry schedule.

`posflow alerts run` as a subprocess on the real stack (own topic prefix, own
database, the shipped rules, POSFLOW_ALERTS__RETRY_SCHEDULE_S not set, so the
default 1, 2, 4, 8, 15, 30, 30, 30, 60, 60, 120, 300 s). --alerts integrity events
(one per merchant: rule ``ledger_integrity`` fires at once, one webhook notification
each) go to the integrity topic while nothing listens on the webhook port
(connection refused). The receiver starts --down seconds after the first
notification was written; the script then waits until every notification arrived,
waits --settle seconds more for duplicates, and prints per notification id how
often it arrived, plus the attempts and states from the outbox table.

Usage:
  .venv/bin/python benchmarks/webhook_outage.py --alerts 20 --down 60
Exit 0 only if every notification arrived exactly once and none is dead or pending.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web
from aiokafka import AIOKafkaProducer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import stop_processes  # noqa: E402
from posflow.settings import KafkaSettings, PostgresSettings, Settings  # noqa: E402
from posflow.stack import ensure_topics  # noqa: E402
from posflow.storage.databases import create_database, drop_database  # noqa: E402
from tests.conftest import free_port  # noqa: E402

TIME_LIMIT_S = 600
_OUTBOX_STATES = (
    "SELECT state, count(*), min(attempts), max(attempts) FROM alert_notifications"
    " WHERE channel = 'webhook' GROUP BY state"
)


class Receiver:
    def __init__(self, port: int) -> None:
        self.port = port
        self.got: list[tuple[str, float]] = []
        self.runner: web.AppRunner | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        await request.read()
        self.got.append((request.headers["X-Posflow-Notification-Id"], time.monotonic()))
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query.encode()).fetchall()


async def _wait(check: Any, seconds: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(step)
    return False


async def main(args: argparse.Namespace) -> int:
    base = Settings()
    tag = secrets.token_hex(4)
    prefix, database = f"wo{tag}", f"bench_webhook_outage_{tag}"
    pg = PostgresSettings(**{**base.postgres.model_dump(), "database": database})
    settings = base.model_copy(
        update={
            "kafka": KafkaSettings(**{**base.kafka.model_dump(), "topic_prefix": prefix}),
            "postgres": pg,
        }
    )
    with psycopg.connect(base.postgres.dsn(), autocommit=True) as admin:
        create_database(admin, database)
    await ensure_topics(settings)
    port, hook_port = free_port(), free_port()
    env = {
        **os.environ,
        "POSFLOW_KAFKA__TOPIC_PREFIX": prefix,
        "POSFLOW_POSTGRES__DATABASE": database,
        "POSFLOW_SERVICES__ALERTS": str(port),
        "POSFLOW_ALERTS__WEBHOOK_URL": f"http://127.0.0.1:{hook_port}/hook",
        "POSFLOW_ALERTS__LOG_NOTIFICATIONS": "false",
    }
    env.pop("POSFLOW_ALERTS__RETRY_SCHEDULE_S", None)  # the DEFAULT schedule is the point
    log = Path(tempfile.mkdtemp(prefix="webhook-outage-")) / "engine.log"
    with log.open("wb") as out:
        engine = subprocess.Popen(  # noqa: ASYNC220 - started once, before the loop matters
            [sys.executable, "-m", "cli", "alerts", "run"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=out,
        )
    receiver = Receiver(hook_port)
    dsn = pg.dsn()
    try:
        import httpx

        async with httpx.AsyncClient() as client:

            async def ready() -> bool:
                try:
                    r = await client.get(f"http://127.0.0.1:{port}/readyz")
                except httpx.HTTPError:
                    return False
                return r.status_code == 200

            deadline = time.monotonic() + 60
            while not await ready():
                if engine.poll() is not None or time.monotonic() > deadline:
                    print(log.read_text()[-2000:])
                    return 2
                await asyncio.sleep(0.3)
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
        await producer.start()
        try:
            for i in range(args.alerts):
                event = {"merchant_id": f"M-{tag}-{i}", "txn_id": f"tx-{i}",
                         "kind": "txn_id_reused"}  # fmt: skip
                await producer.send_and_wait(
                    f"{prefix}.integrity.v1", json.dumps(event).encode(), key=f"{i}".encode()
                )
        finally:
            await producer.stop()

        def written() -> bool:
            rows = _rows(dsn, "SELECT count(*) FROM alert_notifications WHERE channel='webhook'")
            return int(rows[0][0]) >= int(args.alerts)

        if not await _wait(written, 30):
            print("the engine never wrote the notifications\n" + log.read_text()[-2000:])
            return 2
        down_from = time.monotonic()
        await asyncio.sleep(args.down)
        before = _rows(dsn, _OUTBOX_STATES)
        await receiver.start()
        up_at = time.monotonic()
        ok = await _wait(lambda: len({i for i, _ in receiver.got}) >= args.alerts, 420, 0.1)
        all_at = time.monotonic()
        await asyncio.sleep(args.settle)
        after = _rows(dsn, _OUTBOX_STATES)
        expected = {f"{a}:firing" for (a,) in _rows(dsn, "SELECT alert_id FROM alerts")}
    finally:
        await receiver.stop()
        stop_processes([engine], timeout=20)
        with psycopg.connect(base.postgres.dsn(), autocommit=True) as admin:
            drop_database(admin, database)
    counts = Counter(i for i, _ in receiver.got)
    first: dict[str, float] = {}
    for nid, at in receiver.got:
        first.setdefault(nid, at)
    waits = sorted(first[n] - up_at for n in first)
    print(f"notifications written: {args.alerts} (webhook channel, default retry schedule)")
    print(f"receiver down (connection refused) for {up_at - down_from:.1f} s")
    print(f"outbox before the receiver came up: {before}")
    print(f"received: {len(receiver.got)} requests, {len(counts)} distinct ids")
    print(f"ids expected (alert id + ':firing'): {len(expected)}; all received: {ok}")
    print(f"ids received more than once: {sorted(n for n, c in counts.items() if c > 1)}")
    print(f"ids missing: {sorted(expected - set(counts))}")
    if waits:
        print(
            f"receiver up -> first arrival of each id: min {waits[0]:.1f} s,"
            f" max {waits[-1]:.1f} s; all arrived {all_at - up_at:.1f} s after it came up"
        )
    print(f"outbox after +{args.settle:.0f} s settle: {after}")
    exact = ok and set(counts) == expected and all(c == 1 for c in counts.values())
    done = [r for r in after if r[0] == "delivered"]
    exact = exact and len(after) == 1 and bool(done) and done[0][1] == args.alerts
    print("RESULT: every notification exactly once by id" if exact else "RESULT: FAILED")
    return 0 if exact else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=int, default=20)
    parser.add_argument("--down", type=float, default=60.0, help="seconds the receiver is down")
    parser.add_argument("--settle", type=float, default=10.0, help="wait for duplicates")
    cli = parser.parse_args()
    signal.alarm(TIME_LIMIT_S)  # bounded: never left running
    sys.exit(asyncio.run(main(cli)))
