"""Micro-benchmark of the wire contracts on the ingest hot path.

Run from the repository root:

    .venv/bin/python benchmarks/bench_contracts.py [--n 20000] [--rounds 5]

Each case runs ``rounds`` timed loops of ``n`` calls (time.perf_counter) and
reports the best round (least disturbed by other processes) and the median, as
microseconds per call and calls per second. Two baselines are measured in the
same run: ``json.loads`` of the telemetry payload, and pydantic's own
``Telemetry.model_validate_json``, the floor under validate_message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydantic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the sample payloads live with the tests, built in one place

from posflow.contracts import (  # noqa: E402
    Accepted,
    IngestEnvelope,
    Telemetry,
    redact,
    validate_message,
)
from tests.unit import samples  # noqa: E402

MAX_N = 1_000_000


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _time(call: Callable[[], object], n: int, rounds: int) -> tuple[float, float]:
    """(best, median) seconds per call over ``rounds`` loops of ``n`` calls."""
    for _ in range(min(n, 1000)):  # warm caches and the allocator
        call()
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            call()
        per_call.append((time.perf_counter() - start) / n)
    return min(per_call), statistics.median(per_call)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help=f"calls per round (<= {MAX_N})")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per case (<= 50)")
    args = parser.parse_args(argv)
    if not 1 <= args.n <= MAX_N or not 1 <= args.rounds <= 50:
        parser.error(f"--n must be 1..{MAX_N} and --rounds 1..50")

    received_at = samples.RECEIVED_AT
    telemetry = samples.encode(samples.telemetry())
    txn = samples.encode(samples.txn())
    telemetry_topic, txn_topic = samples.topic("telemetry"), samples.topic("txn")
    with_pan = samples.encode(samples.status(reason="card 4111 1111 1111 1111 declined"))

    first = validate_message(telemetry_topic, telemetry, received_at=received_at, mqtt_mid=1)
    if not isinstance(first, Accepted):
        raise SystemExit(f"sample telemetry was rejected: {first.dead_letter.message}")
    envelope = first.envelope
    envelope_json = envelope.to_json()
    clean_text, pan_text = telemetry.decode(), with_pan.decode()
    if redact(clean_text) != clean_text or "4111" in redact(pan_text):
        raise SystemExit("redact does not behave as the benchmark expects")

    def validate_telemetry() -> object:
        return validate_message(telemetry_topic, telemetry, received_at=received_at, mqtt_mid=1)

    def validate_txn() -> object:
        return validate_message(txn_topic, txn, received_at=received_at, mqtt_mid=1)

    def validate_and_serialise() -> object:
        result = validate_message(telemetry_topic, telemetry, received_at=received_at, mqtt_mid=1)
        return result.envelope.to_json() if isinstance(result, Accepted) else None

    cases: list[tuple[str, Callable[[], object]]] = [
        ("baseline: json.loads telemetry", lambda: json.loads(telemetry)),
        (
            "baseline: Telemetry.model_validate_json",
            lambda: Telemetry.model_validate_json(telemetry),
        ),
        ("validate_message telemetry", validate_telemetry),
        ("validate_message txn", validate_txn),
        ("envelope to_json (telemetry)", envelope.to_json),
        ("envelope from_json (telemetry)", lambda: IngestEnvelope.from_json(envelope_json)),
        ("validate_message + to_json telemetry", validate_and_serialise),
        ("redact clean telemetry payload", lambda: redact(clean_text)),
        ("redact payload with a PAN", lambda: redact(pan_text)),
    ]

    print(f"date     {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(
        f"machine  {_cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
    )
    print(f"python   {platform.python_version()}, pydantic {pydantic.VERSION}")
    print(
        f"payloads telemetry {len(telemetry)} B, txn {len(txn)} B, envelope {len(envelope_json)} B"
    )
    print(f"loops    {args.rounds} rounds x {args.n} calls per case; best round and median\n")
    print(f"{'case':42} {'best us':>9} {'median us':>10} {'best ops/s':>12}")
    for name, call in cases:
        best, median = _time(call, args.n, args.rounds)
        print(f"{name:42} {best * 1e6:9.2f} {median * 1e6:10.2f} {1 / best:12,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
