"""Health workers: events/s through one worker, and MQTT publish -> health row latency.

Runs against the local stack with its own topics, app id and database.

  throughput  N telemetry envelopes are loaded into Kafka first; one worker is
              started and timed from its first processed event to its N-th
              (read from its /metrics).
  latency     the real path: terminals publish over MQTT at --rate msgs/s for
              --seconds; one ingest bridge and one health worker run; the
              worker's histogram of "terminal timestamp -> health row committed"
              gives the percentiles (bucket resolution).

Usage:
  .venv/bin/python benchmarks/bench_streams.py --events 100000 --rate 5000 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import preload_telemetry  # noqa: E402 - after sys.path
from posflow.settings import KafkaSettings, Settings  # noqa: E402
from posflow.stack import ensure_topics  # noqa: E402
from posflow.storage.databases import create_database  # noqa: E402
from tests.unit import samples  # noqa: E402

TIME_LIMIT_S = 300


def _payload(merchant: str, terminal: str, seq: int, ts: float) -> dict[str, Any]:
    """A telemetry payload from the shared samples (what the contracts accept)."""
    return samples.telemetry(
        merchant_id=merchant,
        terminal_id=terminal,
        seq=seq,
        ts=datetime.fromtimestamp(ts, UTC).isoformat(),
    )


def _metric(port: int, name: str) -> dict[str, float]:
    """Samples of one metric family from a worker's /metrics (label text -> value)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _events(port: int) -> float:
    return sum(v for k, v in _metric(port, "posflow_streams_events_total").items())


def _worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "streams", "worker"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _percentile(buckets: dict[str, float], q: float) -> str:
    """The upper bound of the histogram bucket holding the q-quantile."""
    pairs = sorted(
        (float(k.split('le="')[1].split('"')[0]), v) for k, v in buckets.items() if 'le="' in k
    )
    total = pairs[-1][1] if pairs else 0
    for bound, count in pairs:
        if total and count >= q * total:
            return f"<= {bound * 1000:.0f} ms" if bound != float("inf") else "> 120 s"
    return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--terminals", type=int, default=2_000)
    parser.add_argument("--rate", type=int, default=5_000)
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()

    base = Settings()
    run = secrets.token_hex(3)
    db = f"bench_streams_{run}"
    with psycopg.connect(base.postgres.dsn(), autocommit=True) as admin:
        create_database(admin, db)
    print(
        f"# bench_streams {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, run {run}"
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # --- throughput -------------------------------------------------------------------
        prefix = f"bs{run}"
        settings = base.model_copy(
            update={"kafka": KafkaSettings(**{**base.kafka.model_dump(), "topic_prefix": prefix})}
        )
        asyncio.run(ensure_topics(settings))
        asyncio.run(
            preload_telemetry(
                settings.kafka.bootstrap, f"{prefix}.telemetry.v1", args.events, args.terminals
            )
        )
        # Baseline in the same run: a faust agent that only counts the same events.
        baseline = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "faust_baseline.py"),
             f"{prefix}.telemetry.v1", str(args.events), settings.kafka.bootstrap],
            cwd=ROOT, capture_output=True, text=True, timeout=TIME_LIMIT_S, check=False,
        )  # fmt: skip
        # faust sends what its agents print to its log (stderr).
        found = re.search(r"BASELINE (\d+)", baseline.stdout + baseline.stderr)
        ceiling = f"{int(found.group(1)):,}" if found else "n/a"
        print(f"baseline: a faust agent that only counts the same events: {ceiling} events/s")
        port = 19500
        env = {
            **os.environ, "POSFLOW_KAFKA__TOPIC_PREFIX": prefix,
            "POSFLOW_POSTGRES__DATABASE": db, "POSFLOW_STREAMS__APP_ID": f"bench-{run}",
            "POSFLOW_SERVICES__STREAMS": str(port),
        }  # fmt: skip
        procs.append(_worker(env))
        deadline = time.monotonic() + TIME_LIMIT_S
        first = None
        while time.monotonic() < deadline:
            seen = _events(port)
            if seen and first is None:
                first = (time.monotonic(), seen)
            if seen >= args.events:
                break
            time.sleep(0.1)
        done = time.monotonic()
        assert first is not None  # noqa: S101
        rate = (args.events - first[1]) / (done - first[0])
        print(
            f"throughput: {args.events} telemetry events, {args.terminals} terminals, one worker:"
            f" {rate:,.0f} events/s (first event to last, read from /metrics)"
        )
        procs.pop().terminate()

        # --- latency: MQTT -> bridge -> Kafka -> worker -> database --------------------------
        prefix2 = f"bl{run}"
        settings2 = base.model_copy(
            update={"kafka": KafkaSettings(**{**base.kafka.model_dump(), "topic_prefix": prefix2})}
        )
        asyncio.run(ensure_topics(settings2))
        port2, ingest_port = 19501, 19502
        merchant = f"M-lat-{run}"
        env2 = {
            **os.environ, "POSFLOW_KAFKA__TOPIC_PREFIX": prefix2,
            "POSFLOW_POSTGRES__DATABASE": db, "POSFLOW_STREAMS__APP_ID": f"benchlat-{run}",
            "POSFLOW_SERVICES__STREAMS": str(port2), "POSFLOW_SERVICES__INGEST": str(ingest_port),
            "POSFLOW_INGEST__CLIENT_ID": f"benchlat-{run}",
            "POSFLOW_INGEST__SHARE_GROUP": f"benchlat{run}",
            "POSFLOW_INGEST__TOPIC_FILTER": f"pos/v1/{merchant}/+/+",
        }  # fmt: skip
        procs.append(_worker(env2))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "cli", "ingest"], env=env2, cwd=ROOT,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        time.sleep(8)  # both connected and assigned
        m = base.mosquitto
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"benchpub-{run}")
        client.username_pw_set(m.service_user, m.service_password.get_secret_value())
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        client.connect(m.host, m.port)
        client.loop_start()
        total = args.rate * args.seconds
        started = time.monotonic()
        step = 50
        for first_i in range(0, total, step):
            for i in range(first_i, min(first_i + step, total)):
                terminal = f"T-{i % args.terminals:05d}"
                body = _payload(merchant, terminal, i, time.time())
                client.publish(f"pos/v1/{merchant}/{terminal}/telemetry", json.dumps(body), qos=1)
            ahead = started + (first_i + step) / args.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        sent_rate = total / (time.monotonic() - started)
        time.sleep(5)  # the last flushes
        client.loop_stop()
        client.disconnect()
        hist = _metric(port2, "posflow_streams_end_to_end_seconds_bucket")
        processed = _events(port2)
        print(
            f"latency: {total} MQTT messages at {sent_rate:,.0f} msgs/s for {args.seconds} s,"
            f" {args.terminals} terminals; worker processed {processed:.0f};"
            f" terminal timestamp -> health row committed: p50 {_percentile(hist, 0.5)},"
            f" p99 {_percentile(hist, 0.99)} (histogram bucket bounds)"
        )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        with psycopg.connect(base.postgres.dsn(), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
            )


if __name__ == "__main__":
    main()
