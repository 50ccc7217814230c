"""Alert engine: rule evaluations/s over 50,000 terminals, and publish -> webhook delay.

  engine   in-process: the shipped rules, 50,000 terminals of 10,000 merchants,
           --rounds telemetry records per terminal plus one health window each
           round (1% of terminals faulty). Baseline in the same run: folding the
           same records into facts without evaluating any rule.
  service  the real stack: --events telemetry envelopes preloaded into Kafka (own topic
           prefix), then `posflow alerts run` of this checkout and of each --before
           checkout drains them, one after the other (own database each, order
           alternating by round): records/s and CPU µs a record from /proc.
  e2e      the real stack: `posflow ingest` and `posflow alerts run` as
           subprocesses, a signed-webhook receiver on loopback; --faults
           terminals publish a tamper flag over MQTT (rule `for: 0s`), one every
           0.5 s; the delay is publish -> webhook request received.

Usage:
  .venv/bin/python benchmarks/bench_alerts.py engine --terminals 50000 --rounds 4
  .venv/bin/python benchmarks/bench_alerts.py service --events 60000 --before /tmp/base
  .venv/bin/python benchmarks/bench_alerts.py e2e --faults 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alerts.engine import Engine  # noqa: E402 - after sys.path
from alerts.facts import apply_record  # noqa: E402
from alerts.rules import load_rules  # noqa: E402
from posflow.storage.databases import create_database  # noqa: E402

TIME_LIMIT_S = 300


def _tele(i: int, t: float, faulty: bool) -> dict[str, Any]:
    return {
        "kind": "telemetry", "merchant_id": f"M-{i // 5}", "terminal_id": f"T-{i}",
        "payload": {
            "kind": "telemetry", "merchant_id": f"M-{i // 5}", "terminal_id": f"T-{i}",
            "ts": datetime.fromtimestamp(t, UTC).isoformat(),
            "battery": {"level_pct": 9 if faulty else 70, "charging": False,
                        "temperature_c": 31.0},
            "signal": {"type": "lte", "rsrp_dbm": -95, "carrier": f"C{i % 3}"},
            "printer": {"paper": "ok"}, "app_version": "3.4.1", "tamper": False,
            "location": {"lat": -33.8 + (i % 100) * 0.01, "lon": 151.2, "accuracy_m": 10.0},
        },
    }  # fmt: skip


def _window(i: int, t: float, faulty: bool) -> dict[str, Any]:
    return {
        "type": "window", "terminal_id": f"T-{i}", "merchant_id": f"M-{i // 5}",
        "last_ts": t, "score": 90, "final": True,
        "facts": {"signal_avg_dbm": -115.0 if faulty else -95.0, "dropouts": 0, "txn": 6,
                  "decline_rate": 0.1, "error_rate": 0.0, "auth_p95_ms": 400,
                  "drain_pct_per_hour": 4.0, "battery_level_pct": None,
                  "battery_temp_c": 31.0},
    }  # fmt: skip


def bench_engine(terminals: int, rounds: int) -> None:
    now = [time.time()]
    records: list[tuple[str, bytes]] = []
    for r in range(rounds):
        t = now[0] + 30 * r
        for i in range(terminals):
            faulty = i % 100 == 0
            records.append(("telemetry", json.dumps(_tele(i, t, faulty)).encode()))
            if r % 2 == 1:
                records.append(("window", json.dumps(_window(i, t, faulty)).encode()))
    print(f"{len(records):,} records for {terminals:,} terminals, {rounds} rounds")

    # Baseline: parse + fold into facts, no rules.
    facts: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for kind, raw in records:
        rec = json.loads(raw)
        f = facts.setdefault(rec["terminal_id"], {"merchant_id": rec["merchant_id"]})
        apply_record(f, kind, rec)
    base_s = time.perf_counter() - started
    print(f"baseline (parse + fold, no rules): {len(records) / base_s:,.0f} records/s")

    engine = Engine(load_rules(None), lambda: now[0])
    started = time.perf_counter()
    for n, (kind, raw) in enumerate(records):
        engine.on_record(kind, json.loads(raw))
        if n % 2000 == 0:
            now[0] += 1
            engine.tick()
            engine.drain()
    engine.tick()
    engine.drain()
    took = time.perf_counter() - started
    rules = len(engine.rules)
    print(
        f"engine: {len(records) / took:,.0f} records/s, {engine.evaluations / took:,.0f} "
        f"rule-set evaluations/s ({rules} rules each: {engine.evaluations * rules / took:,.0f} "
        f"rule evaluations/s), {len(engine.alerts)} open alerts"
    )


async def bench_e2e(faults: int) -> None:
    import hashlib
    import hmac

    import paho.mqtt.client as mqtt
    import psycopg
    from aiohttp import web
    from paho.mqtt.enums import CallbackAPIVersion
    from psycopg import sql

    from posflow.settings import KafkaSettings, Settings
    from posflow.stack import ensure_topics
    from tests.conftest import free_port
    from tests.unit import samples

    settings = Settings()
    tag = secrets.token_hex(4)
    prefix, merchant, db = f"ba{tag}", f"MB-{tag}", f"bench_alerts_{tag}"
    bench = settings.model_copy(
        update={"kafka": KafkaSettings(**{**settings.kafka.model_dump(), "topic_prefix": prefix})}
    )
    await ensure_topics(bench)
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
        create_database(admin, db)
    got: dict[str, float] = {}
    secret = "bench-secret"  # noqa: S105 - a throwaway key for this run

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        stamp = request.headers["X-Posflow-Timestamp"].encode()
        mac = hmac.new(secret.encode(), stamp + b"." + body, hashlib.sha256).hexdigest()
        if request.headers["X-Posflow-Signature"] != f"sha256={mac}":
            return web.json_response({"error": "bad signature"}, status=401)
        got[json.loads(body)["alert"]["subject_id"]] = time.time()
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port, alerts_port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    env = {
        **os.environ,
        "POSFLOW_KAFKA__TOPIC_PREFIX": prefix,
        "POSFLOW_POSTGRES__DATABASE": db,
        "POSFLOW_SERVICES__ALERTS": str(alerts_port),
        "POSFLOW_SERVICES__INGEST": str(free_port()),
        "POSFLOW_INGEST__CLIENT_ID": f"ingest-{tag}",
        "POSFLOW_INGEST__SHARE_GROUP": f"g{tag}",
        "POSFLOW_INGEST__TOPIC_FILTER": f"pos/v1/{merchant}/+/+",
        "POSFLOW_ALERTS__WEBHOOK_URL": f"http://127.0.0.1:{port}/hook",
        "POSFLOW_ALERTS__WEBHOOK_SECRET": secret,
        "POSFLOW_ALERTS__TICK_S": "0.1",
    }
    logs = Path(tempfile.mkdtemp(prefix="bench-alerts-"))
    procs = []
    for name, args in (("engine", ["alerts", "run"]), ("ingest", ["ingest"])):
        with (logs / f"{name}.log").open("ab") as log:
            procs.append(
                subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
                    [sys.executable, "-m", "cli", *args],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=log,
                )
            )
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{tag}")
    m = settings.mosquitto
    client.username_pw_set(m.service_user, m.service_password.get_secret_value())
    client.connect(m.host, m.port)
    client.loop_start()
    sent: dict[str, float] = {}
    try:
        await asyncio.sleep(8)  # both services up and subscribed
        for i in range(faults):
            terminal = f"T-{i}"
            body = samples.telemetry(merchant_id=merchant, terminal_id=terminal, seq=i,
                                     ts=datetime.now(UTC).isoformat(), tamper=True)  # fmt: skip
            sent[terminal] = time.time()
            client.publish(samples.topic("telemetry", merchant, terminal), json.dumps(body), qos=1)
            await asyncio.sleep(0.5)
        deadline = time.monotonic() + 30
        while len(got) < faults and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    finally:
        client.loop_stop()
        client.disconnect()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=20)
        await runner.cleanup()
        with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
            )
    delays = sorted((got[t] - sent[t]) * 1000 for t in sent if t in got)
    print(f"{len(got)} of {faults} faults reached the webhook (logs: {logs})")
    if delays:
        print(
            f"publish -> webhook ms: min {delays[0]:.0f}, p50 {statistics.median(delays):.0f}, "
            f"max {delays[-1]:.0f}"
        )


def bench_service(events: int, terminals: int, rounds: int, before: list[str]) -> None:
    """CPU per record of the whole alerts service (Kafka fetch, parse, rules, the batch's
    transaction), this checkout against others, on the same preloaded topic."""
    import psycopg

    from benchmarks._common import preload_telemetry
    from benchmarks._procstat import between, mark
    from cli.harness import stop_processes
    from posflow.settings import KafkaSettings, Settings
    from posflow.stack import ensure_topics
    from posflow.storage.databases import drop_database
    from tests.conftest import free_port

    settings = Settings()
    tag = secrets.token_hex(3)
    prefix = f"bs{tag}"
    bench = settings.model_copy(
        update={"kafka": KafkaSettings(**{**settings.kafka.model_dump(), "topic_prefix": prefix})}
    )
    asyncio.run(ensure_topics(bench))
    asyncio.run(
        preload_telemetry(
            settings.kafka.bootstrap, f"{prefix}.telemetry.v1", events, terminals, "M-balerts"
        )
    )
    print(f"# bench_alerts service {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, run {tag}: "
          f"{events} telemetry envelopes, {terminals} terminals")  # fmt: skip
    checkouts = [str(ROOT), *before]
    for round_no in range(1, rounds + 1):
        order = checkouts if round_no % 2 else checkouts[::-1]
        for root in order:
            db = f"bench_alerts_{tag}_{len(root)}_{round_no}_{checkouts.index(root)}"
            with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
                create_database(admin, db)
            port = free_port()
            env = {
                **os.environ, "PYTHONPATH": root, "POSFLOW_KAFKA__TOPIC_PREFIX": prefix,
                "POSFLOW_POSTGRES__DATABASE": db, "POSFLOW_SERVICES__ALERTS": str(port),
                "POSFLOW_ALERTS__GROUP": f"bench-{tag}-{round_no}-{checkouts.index(root)}",
            }  # fmt: skip
            proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "alerts", "run"], env=env, cwd=root,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                first = last = None
                deadline = time.monotonic() + TIME_LIMIT_S
                while time.monotonic() < deadline and proc.poll() is None:
                    seen = _records(port)
                    if seen and first is None:
                        first = mark(int(seen), proc.pid)
                    if seen >= events:
                        last = mark(int(seen), proc.pid)
                        break
                    time.sleep(0.5)
                if first is None or last is None:
                    print(f"round {round_no}: {root}: did not drain {events} records")
                    continue
                rate = between(first, last)
                name = "this" if root == str(ROOT) else f"before: {root}"
                print(f"round {round_no}: alerts service ({name}): "
                      f"{rate.events_per_s:,.0f} records/s, "
                      f"{rate.cpu_us_per_event:.0f} µs CPU a record")  # fmt: skip
            finally:
                stop_processes([proc], timeout=20)
                with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
                    drop_database(admin, db)


def _records(port: int) -> float:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("posflow_alerts_records_total{")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    e = sub.add_parser("engine")
    e.add_argument("--terminals", type=int, default=50_000)
    e.add_argument("--rounds", type=int, default=4)
    v = sub.add_parser("service")
    v.add_argument("--events", type=int, default=60_000)
    v.add_argument("--terminals", type=int, default=2_000)
    v.add_argument("--rounds", type=int, default=2)
    v.add_argument("--before", action="append", default=[], help="another checkout")
    x = sub.add_parser("e2e")
    x.add_argument("--faults", type=int, default=20)
    args = parser.parse_args()
    signal.alarm(TIME_LIMIT_S)
    if args.mode == "engine":
        bench_engine(args.terminals, args.rounds)
    elif args.mode == "service":
        signal.alarm(0)  # each checkout's drain is bounded by TIME_LIMIT_S instead
        bench_service(args.events, args.terminals, args.rounds, args.before)
    else:
        asyncio.run(bench_e2e(args.faults))


if __name__ == "__main__":
    main()
