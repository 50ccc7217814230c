"""Health workers: events/s and CPU an event through one worker, idle cost, and latency.

Runs against the local stack with its own topics, app ids and database. Every phase
can measure a second checkout (``--before /path/to/checkout``, e.g. a git worktree of
main) on the same topic in the same run, alternating with this one.

  throughput  N telemetry envelopes are loaded into Kafka first; a faust agent that
              only counts them (faust_baseline.py), then each worker, is timed from
              its first processed event to its N-th (read from its /metrics); CPU is
              the process's utime + stime from /proc over the same span.
  paced       telemetry produced straight into Kafka at --paced-rate for
              --paced-seconds (--paced-terminals, event time = send time); the
              worker's CPU over the span, per event.
  idle        --idle-terminals terminals send one reading each; once the worker has
              them, its CPU over --idle-seconds while nobody talks: first while they
              are online with open windows, then after they went offline.
  latency     the real path: terminals publish over MQTT at --rate msgs/s for
              --seconds; one ingest bridge and one health worker run; the worker's
              histogram of "terminal timestamp -> health row committed" gives the
              percentiles (bucket resolution).

Usage:
  .venv/bin/python benchmarks/bench_streams.py --events 100000 --rate 2000 --seconds 20
  .venv/bin/python benchmarks/bench_streams.py --before /work/main --rounds 2 \\
      --paced-rate 3000 --idle-terminals 50000 --skip-latency
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
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from aiokafka import AIOKafkaProducer
from paho.mqtt.enums import CallbackAPIVersion
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posflow.contracts import Accepted, validate_message  # noqa: E402 - after sys.path
from posflow.settings import KafkaSettings, Settings  # noqa: E402
from posflow.stack import ensure_topics  # noqa: E402
from posflow.storage.databases import create_database  # noqa: E402
from tests.unit import samples  # noqa: E402

TIME_LIMIT_S = 300
_TICK = os.sysconf("SC_CLK_TCK")


def _payload(merchant: str, terminal: str, seq: int, ts: float) -> dict[str, Any]:
    """A telemetry payload from the shared samples (what the contracts accept)."""
    return samples.telemetry(
        merchant_id=merchant,
        terminal_id=terminal,
        seq=seq,
        ts=datetime.fromtimestamp(ts, UTC).isoformat(),
    )


def _envelope(merchant: str, terminal: str, seq: int, ts: float) -> bytes:
    """The Kafka record the bridge would write for that payload."""
    result = validate_message(
        f"pos/v1/{merchant}/{terminal}/telemetry",
        json.dumps(_payload(merchant, terminal, seq, ts)).encode(),
        received_at=datetime.now(UTC),
        mqtt_mid=1,
    )
    assert isinstance(result, Accepted)  # noqa: S101
    return result.envelope.to_json()


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


def _cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _worker(root: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`posflow streams worker` of the checkout at ``root``."""
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "streams", "worker"],
        env={**env, "PYTHONPATH": str(root)}, cwd=root,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _produce(settings: Settings, records: Iterator[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap, acks="all", linger_ms=20,
        max_batch_size=512 * 1024,
    )  # fmt: skip
    await producer.start()
    try:
        topic = f"{settings.kafka.topic_prefix}.telemetry.v1"
        for key, value in records:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


def _load(settings: Settings, count: int, terminals: int, spacing_s: float) -> None:
    """``count`` readings of ``terminals`` terminals, each every ``spacing_s`` of event time,
    ending about now."""
    now = time.time()
    base = now - count // terminals * spacing_s

    def records() -> Iterator[tuple[bytes, bytes]]:
        for i in range(count):
            terminal = f"T-{i % terminals:05d}"
            ts = base + (i // terminals) * spacing_s
            yield terminal.encode(), _envelope("M-bench", terminal, i, ts)

    asyncio.run(_produce(settings, records()))


def _settings(base: Settings, prefix: str) -> Settings:
    kafka = KafkaSettings(**{**base.kafka.model_dump(), "topic_prefix": prefix})
    settings = base.model_copy(update={"kafka": kafka})
    asyncio.run(ensure_topics(settings))
    return settings


def _env(prefix: str, db: str, app_id: str, port: int) -> dict[str, str]:
    return {
        **os.environ, "POSFLOW_KAFKA__TOPIC_PREFIX": prefix, "POSFLOW_POSTGRES__DATABASE": db,
        "POSFLOW_STREAMS__APP_ID": app_id, "POSFLOW_SERVICES__STREAMS": str(port),
    }  # fmt: skip


def _wait_events(port: int, proc: subprocess.Popen[bytes], want: float) -> None:
    deadline = time.monotonic() + TIME_LIMIT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if _events(port) >= want:
            return
        time.sleep(0.5)
    raise SystemExit(f"the worker processed {_events(port):.0f} of {want:.0f} events")


def _throughput(root: Path, env: dict[str, str], port: int, events: int) -> tuple[float, float]:
    """events/s and CPU µs an event of one worker draining the preloaded topic."""
    proc = _worker(root, env)
    try:
        deadline = time.monotonic() + TIME_LIMIT_S
        first: tuple[float, float, float] | None = None
        while time.monotonic() < deadline and proc.poll() is None:
            seen = _events(port)
            if seen and first is None:
                first = (time.monotonic(), _cpu_s(proc.pid), seen)
            if seen >= events:
                break
            # Every scrape of /metrics costs the worker CPU (counted against it): 0.5 s
            # keeps that under 1 % while the drain's timing error stays ~2 % of its run.
            time.sleep(0.5)
        done, cpu = time.monotonic(), _cpu_s(proc.pid)
        if first is None or _events(port) < events:
            raise SystemExit(f"worker of {root} did not process {events} events")
        counted = events - first[2]
        return counted / (done - first[0]), (cpu - first[1]) / counted * 1e6
    finally:
        _stop(proc)


def _baseline(settings: Settings, prefix: str, events: int) -> tuple[float, float]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "faust_baseline.py"),
         f"{prefix}.telemetry.v1", str(events), settings.kafka.bootstrap],
        cwd=ROOT, capture_output=True, text=True, timeout=TIME_LIMIT_S, check=False,
    )  # fmt: skip
    # faust sends what its agents print to its log (stderr).
    found = re.search(r"BASELINE (\d+) (\d+)", result.stdout + result.stderr)
    if not found:
        raise SystemExit(f"the faust baseline failed: {result.stderr[-2000:]}")
    return float(found.group(1)), float(found.group(2))


def _paced(
    root: Path, base: Settings, db: str, run: str, args: argparse.Namespace, *, tag: str
) -> float:
    """CPU µs an event of a worker fed at a steady rate (event time = send time)."""
    prefix = f"bp{run}{tag}"
    settings = _settings(base, prefix)
    port = 19503
    proc = _worker(root, _env(prefix, db, f"benchpaced-{run}-{tag}", port))
    try:
        rate, terminals = args.paced_rate, args.paced_terminals
        total = rate * args.paced_seconds
        start = time.time() + 20  # envelopes built first, the worker assigned meanwhile
        values = [
            (f"T-{i % terminals:05d}".encode(),
             _envelope("M-paced", f"T-{i % terminals:05d}", i, start + i / rate))
            for i in range(total)
        ]  # fmt: skip
        time.sleep(max(0.0, start - time.time()))

        async def paced() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, linger_ms=5)
            await producer.start()
            try:
                began = time.monotonic()
                for i, (key, value) in enumerate(values):
                    await producer.send(f"{prefix}.telemetry.v1", value, key=key)
                    if i % 50 == 0:
                        ahead = began + i / rate - time.monotonic()
                        if ahead > 0:
                            await asyncio.sleep(ahead)
                await producer.flush()
            finally:
                await producer.stop()

        cpu0 = _cpu_s(proc.pid)
        asyncio.run(paced())
        _wait_events(port, proc, total)
        time.sleep(0.5)  # its last flush
        return float((_cpu_s(proc.pid) - cpu0) / total * 1e6)
    finally:
        _stop(proc)


def _idle(
    root: Path, settings: Settings, db: str, run: str, args: argparse.Namespace, *, tag: str
) -> tuple[float, float]:
    """Share of a core over --idle-seconds with --idle-terminals known and silent: while
    online with open windows, then once all went offline."""
    port = 19504
    proc = _worker(root, _env(settings.kafka.topic_prefix, db, f"benchidle-{run}-{tag}", port))
    try:
        _wait_events(port, proc, args.idle_terminals)
        heard = time.monotonic()
        time.sleep(5)
        cpu0, t0 = _cpu_s(proc.pid), time.monotonic()
        time.sleep(args.idle_seconds)
        online = (_cpu_s(proc.pid) - cpu0) / (time.monotonic() - t0)
        # Offline after 3 x 30 s of silence, windows closed after 70 s: then idle again.
        time.sleep(max(0.0, heard + 100 - time.monotonic()))
        cpu0, t0 = _cpu_s(proc.pid), time.monotonic()
        time.sleep(args.idle_seconds)
        offline = (_cpu_s(proc.pid) - cpu0) / (time.monotonic() - t0)
        return online, offline
    finally:
        _stop(proc)


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


def _latency(base: Settings, db: str, run: str, args: argparse.Namespace) -> None:
    prefix2 = f"bl{run}"
    _settings(base, prefix2)
    port2, ingest_port = 19501, 19502
    merchant = f"M-lat-{run}"
    env2 = {
        **_env(prefix2, db, f"benchlat-{run}", port2),
        "POSFLOW_SERVICES__INGEST": str(ingest_port),
        "POSFLOW_INGEST__CLIENT_ID": f"benchlat-{run}",
        "POSFLOW_INGEST__SHARE_GROUP": f"benchlat{run}",
        "POSFLOW_INGEST__TOPIC_FILTER": f"pos/v1/{merchant}/+/+",
    }
    procs = [
        _worker(ROOT, env2),
        subprocess.Popen(
            [sys.executable, "-m", "cli", "ingest"], env=env2, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
    ]  # fmt: skip
    try:
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
            f" p99 {_percentile(hist, 0.99)} (histogram bucket bounds)",
            flush=True,
        )
    finally:
        for proc in procs:
            _stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--terminals", type=int, default=2_000)
    parser.add_argument("--rate", type=int, default=5_000)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=1, help="throughput rounds, paired")
    parser.add_argument(
        "--before", type=Path, action="append", default=[],
        help="another checkout, measured alongside (repeatable)",
    )  # fmt: skip
    parser.add_argument("--paced-rate", type=int, default=0, help="0: no paced phase")
    parser.add_argument("--paced-seconds", type=int, default=30)
    parser.add_argument("--paced-terminals", type=int, default=10_000)
    parser.add_argument("--idle-terminals", type=int, default=0, help="0: no idle phase")
    parser.add_argument("--idle-seconds", type=int, default=60)
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()

    base = Settings()
    run = secrets.token_hex(3)
    db = f"bench_streams_{run}"
    with psycopg.connect(base.postgres.dsn(), autocommit=True) as admin:
        create_database(admin, db)
    print(
        f"# bench_streams {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores,"
        f" run {run}",
        flush=True,
    )
    roots = {"this": ROOT} | {
        f"before {path.name}" if len(args.before) > 1 else "before": path.resolve()
        for path in args.before
    }
    try:
        # --- throughput, paired with faust's no-op agent --------------------------------
        prefix = f"bs{run}"
        settings = _settings(base, prefix)
        _load(settings, args.events, args.terminals, 5.0)  # every 5 s of event time
        for r in range(args.rounds):
            rate, cpu = _baseline(settings, prefix, args.events)
            print(f"round {r + 1}: faust no-op agent: {rate:,.0f} events/s, {cpu:.0f} µs CPU"
                  " an event", flush=True)  # fmt: skip
            order = list(roots.items()) if r % 2 == 0 else list(roots.items())[::-1]
            for name, root in order:
                env = _env(prefix, db, f"bench-{run}-{name.replace(' ', '-')}-{r}", 19500)
                wrate, wcpu = _throughput(root, env, 19500, args.events)
                print(
                    f"round {r + 1}: health worker ({name}: {root}): {wrate:,.0f} events/s"
                    f" ({wrate / rate:.0%} of the no-op agent), {wcpu:.0f} µs CPU an event;"
                    f" {args.events} events, {args.terminals} terminals",
                    flush=True,
                )
        # --- CPU an event at a steady rate ----------------------------------------------
        if args.paced_rate:
            for name, root in roots.items():
                cpu = _paced(root, base, db, run, args, tag=f"{len(name)}{name[-2:]}")
                print(
                    f"paced ({name}): {args.paced_rate} events/s for {args.paced_seconds} s,"
                    f" {args.paced_terminals} terminals: {cpu:.0f} µs CPU an event",
                    flush=True,
                )
        # --- idle with many terminals known -----------------------------------------------
        if args.idle_terminals:
            idle = _settings(base, f"bi{run}")
            _load(idle, args.idle_terminals, args.idle_terminals, 30.0)
            for name, root in roots.items():
                online, offline = _idle(root, idle, db, run, args, tag=f"{len(name)}{name[-2:]}")
                print(
                    f"idle ({name}): {args.idle_terminals} terminals known, none talking,"
                    f" {args.idle_seconds} s each: {online:.1%} of a core while online with"
                    f" open windows, {offline:.1%} once offline",
                    flush=True,
                )
        # --- latency: MQTT -> bridge -> Kafka -> worker -> database ------------------------
        if not args.skip_latency:
            _latency(base, db, run, args)
    finally:
        with psycopg.connect(base.postgres.dsn(), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
            )


if __name__ == "__main__":
    main()
