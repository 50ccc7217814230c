"""The floor under the health worker: faust and Quix Streams on the same preloaded topic.

One telemetry topic is loaded once (--events envelopes, --terminals terminals, keyed by
terminal, --partitions partitions); then each contender reads all of it, as its own
process, one after the other, from the first offset:

  faust no-op       a faust agent that only counts (benchmarks/faust_baseline.py)
  faust window      faust's tumbling table: count / sum / min of the battery level per
                    terminal, 60 s event-time windows (faust_baseline.py --window)
  quix no-op        Quix Streams, a dataframe that only counts (benchmarks/quix_floor.py)
  quix window       Quix Streams, the same tumbling aggregation (quix_floor.py --window)
  health worker     `python -m cli streams worker`: whatever health worker is checked out,
                    with its database writes (a database of its own)

Each gives events/s and CPU µs an event (utime + stime of that process from /proc, from
its first event consumed to its last; a runner marks itself, the worker is sampled from
outside with its /metrics). --rounds rounds; every other round runs the contenders in the
reverse order, so a drift in the machine's load does not favour one. Quix Streams runs
from its own environment (`make bench-tools`, --quix-python); without it those rows are
skipped.

Usage (the stack up, `source /work/ci-env.sh` or equivalent settings):
  .venv/bin/python benchmarks/bench_stream_floor.py --events 100000 --terminals 2000 \\
      --partitions 6 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import preload_telemetry, stop_processes  # noqa: E402 - after sys.path
from benchmarks._procstat import Mark, Rate, between, mark, parse_floor_line  # noqa: E402
from posflow.settings import KafkaSettings, Settings  # noqa: E402
from posflow.stack import ensure_topics  # noqa: E402
from posflow.storage.databases import create_database, drop_database  # noqa: E402
from tests.conftest import free_port  # noqa: E402

TIME_LIMIT_S = 240  # one contender reading the topic, start-up included
WORKER_EVENTS = "posflow_streams_events_total"  # the health worker's events counter
POLL_S = 0.25  # how often the worker's /metrics and /proc are sampled

CONTENDERS = ("faust no-op", "faust window", "quix no-op", "quix window", "health worker")


@dataclass(frozen=True)
class Result:
    """One contender in one round: its rate, or why there is none."""

    round: int
    name: str
    rate: Rate | None
    note: str = ""


def order(round_no: int, names: Sequence[str] = CONTENDERS) -> list[str]:
    """The contenders of round ``round_no`` (from 1): as given, reversed every other round."""
    return list(names) if round_no % 2 else list(reversed(names))


def table(results: Sequence[Result], names: Sequence[str] = CONTENDERS) -> str:
    """A markdown table: one row a contender, events/s and CPU µs an event per round."""
    rounds = sorted({r.round for r in results})
    head = "| contender |" + "".join(
        f" round {n} events/s | round {n} CPU µs/event |" for n in rounds
    )
    lines = [head, "|---|" + "---:|---:|" * len(rounds)]
    by_key = {(r.name, r.round): r for r in results}
    for name in names:
        cells = []
        for n in rounds:
            got = by_key.get((name, n))
            if got is None or got.rate is None:
                cells += [f"n/a ({got.note})" if got and got.note else "n/a", "n/a"]
            else:
                cells += [f"{got.rate.events_per_s:,.0f}", f"{got.rate.cpu_us_per_event:,.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def share_of(results: Sequence[Result], name: str, of: str) -> list[str]:
    """Per round, ``name``'s events/s as a percentage of ``of``'s (where both ran)."""
    by_key = {(r.name, r.round): r.rate for r in results}
    out = []
    for n in sorted({r.round for r in results}):
        a, b = by_key.get((name, n)), by_key.get((of, n))
        if a and b:
            out.append(f"round {n}: {a.events_per_s / b.events_per_s:.0%}")
    return out


# ------------------------------------------------------------------------- the runners


def _runner(cmd: list[str], name: str, round_no: int) -> Result:
    """A runner that marks itself and prints a FLOOR line before it exits."""
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIME_LIMIT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return Result(round_no, name, None, f"not done in {TIME_LIMIT_S} s")
    rate = parse_floor_line(done.stdout + done.stderr)
    if rate is None:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        said = " / ".join(tail).replace("|", "/")
        return Result(round_no, name, None, f"exit {done.returncode}: {said}")
    return Result(round_no, name, rate)


def _worker_events(client: httpx.Client, port: int) -> int | None:
    try:
        text = client.get(f"http://127.0.0.1:{port}/metrics").text
    except httpx.TransportError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(WORKER_EVENTS):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _health_worker(base: Settings, prefix: str, events: int, round_no: int) -> Result:
    """`python -m cli streams worker` on the topic, sampled from outside."""
    name = "health worker"
    run = secrets.token_hex(3)
    db, port = f"bench_floor_{run}", free_port()
    with psycopg.connect(base.postgres.dsn(), autocommit=True) as admin:
        create_database(admin, db)
    env = {
        **os.environ, "POSFLOW_KAFKA__TOPIC_PREFIX": prefix, "POSFLOW_POSTGRES__DATABASE": db,
        "POSFLOW_STREAMS__APP_ID": f"floor-{run}", "POSFLOW_SERVICES__STREAMS": str(port),
    }  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "streams", "worker"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    first: Mark | None = None
    try:
        deadline = time.monotonic() + TIME_LIMIT_S
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline and proc.poll() is None:
                seen = _worker_events(client, port)
                if seen:
                    now = mark(seen, proc.pid)
                    if first is None:
                        first = now
                    elif seen >= events:
                        return Result(round_no, name, between(first, now))
                time.sleep(POLL_S)
        if proc.poll() is not None:
            return Result(round_no, name, None, f"exited with {proc.returncode}")
        return Result(round_no, name, None, f"not done in {TIME_LIMIT_S} s")
    finally:
        stop_processes([proc])
        with psycopg.connect(base.postgres.dsn(), autocommit=True) as admin:
            drop_database(admin, db)


def run_one(
    name: str, args: argparse.Namespace, base: Settings, prefix: str, round_no: int
) -> Result:
    """One contender reading the whole topic once."""
    topic, bootstrap = f"{prefix}.telemetry.v1", base.kafka.bootstrap
    common = [topic, str(args.events), bootstrap]
    if name.startswith("faust"):
        cmd = [sys.executable, str(ROOT / "benchmarks" / "faust_baseline.py"), *common]
        cmd += ["--partitions", str(args.partitions)]
        return _runner(cmd + (["--window"] if name == "faust window" else []), name, round_no)
    if name.startswith("quix"):
        if not Path(args.quix_python).exists():
            return Result(round_no, name, None, f"no {args.quix_python}: make bench-tools")
        cmd = [args.quix_python, str(ROOT / "benchmarks" / "quix_floor.py"), *common]
        cmd += ["--state-dir", tempfile.mkdtemp(prefix="quix-", dir=args.scratch)]
        return _runner(cmd + (["--window"] if name == "quix window" else []), name, round_no)
    return _health_worker(base, prefix, args.events, round_no)


def _load_average() -> str:
    """What else the machine runs: the contenders share its cores with it."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--terminals", type=int, default=2_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS), metavar="NAME",
        help=f"run only these contenders (of: {', '.join(CONTENDERS)})",
    )  # fmt: skip
    parser.add_argument(
        "--quix-python", default=str(ROOT / ".venv-bench" / "bin" / "python"),
        help="the Python of the environment `make bench-tools` made",
    )  # fmt: skip
    args = parser.parse_args()

    base = Settings()
    run = secrets.token_hex(3)
    prefix = f"fl{run}"
    base = base.model_copy(
        update={
            "kafka": KafkaSettings(
                **{
                    **base.kafka.model_dump(),
                    "topic_prefix": prefix,
                    "default_partitions": args.partitions,
                }
            )
        }
    )
    print(
        f"# bench_stream_floor {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores,"
        f" run {run}: {args.events:,} telemetry records, {args.terminals:,} terminals,"
        f" {args.partitions} partitions, topic {prefix}.telemetry.v1;"
        f" load average {_load_average()}",
        flush=True,
    )
    asyncio.run(ensure_topics(base))
    started = time.monotonic()
    asyncio.run(
        asyncio.wait_for(
            preload_telemetry(
                base.kafka.bootstrap, f"{prefix}.telemetry.v1", args.events, args.terminals
            ),
            timeout=TIME_LIMIT_S,
        )
    )
    print(f"preloaded in {time.monotonic() - started:.0f} s", flush=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="posflow-floor-") as scratch:
        args.scratch = scratch
        for round_no in range(1, args.rounds + 1):
            for name in order(round_no, [n for n in CONTENDERS if n in args.only]):
                result = run_one(name, args, base, prefix, round_no)
                results.append(result)
                shown = (
                    f"{result.rate.events_per_s:,.0f} events/s,"
                    f" {result.rate.cpu_us_per_event:,.0f} µs CPU/event"
                    f" ({result.rate.events:,} events in {result.rate.seconds:.1f} s)"
                    if result.rate
                    else f"n/a: {result.note}"
                )
                print(f"round {round_no} {name}: {shown}", flush=True)
    print(f"\nload average at the end {_load_average()}\n")
    print(table(results, [n for n in CONTENDERS if n in args.only]))
    shares = share_of(results, "health worker", "faust no-op")
    if shares:
        print(f"\nhealth worker events/s as a share of faust no-op: {', '.join(shares)}")


if __name__ == "__main__":
    main()
