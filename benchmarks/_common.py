"""What several benchmarks do alike: percentiles, waiting for and stopping their services,
reading a merchant's event stream, sample bodies turned into the envelopes the bridge
writes, and a telemetry topic preloaded with them.

Imported as ``benchmarks._common`` once a benchmark has put the repository on ``sys.path``
(free ports come from ``tests.conftest.free_port``, the sample bodies from
``tests.unit.samples``).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer

from cli.harness import stop_processes
from posflow.contracts import Accepted, IngestEnvelope, validate_message
from tests.unit import samples

__all__ = [
    "envelope",
    "percentile_ms",
    "preload_telemetry",
    "read_sse_ids",
    "stop_processes",
    "wait_ready",
]


def percentile_ms(values: list[float], q: float) -> float:
    """The ``q`` quantile (lower rank) of ``values`` in seconds, as milliseconds."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def wait_ready(name: str, url: str, proc: subprocess.Popen[bytes], limit_s: float = 60) -> None:
    """Until ``url`` answers 200; exits the benchmark if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{name} not ready at {url} in {limit_s} s")


def envelope(
    kind: str, body: Mapping[str, Any], *, received_at: datetime, mqtt_mid: int
) -> IngestEnvelope:
    """A terminal's message body through the bridge's validation: the envelope it writes."""
    result = validate_message(
        f"pos/v1/{body['merchant_id']}/{body['terminal_id']}/{kind}",
        json.dumps(body).encode(),
        received_at=received_at,
        mqtt_mid=mqtt_mid,
    )
    assert isinstance(result, Accepted)  # noqa: S101 - the samples are valid
    return result.envelope


async def preload_telemetry(
    bootstrap: str, topic: str, count: int, terminals: int, merchant: str = "M-bench"
) -> None:
    """``count`` telemetry envelopes on ``topic``, keyed by terminal, round-robin over
    ``terminals``; every terminal reports every 5 s of event time, from an hour ago."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024
    )
    await producer.start()
    now = time.time()
    base = now - now % 60 - 3600
    try:
        for i in range(count):
            terminal = f"T-{i % terminals:05d}"
            body = samples.telemetry(
                merchant_id=merchant,
                terminal_id=terminal,
                seq=i,
                ts=datetime.fromtimestamp(base + (i // terminals) * 5.0, UTC).isoformat(),
            )
            record = envelope("telemetry", body, received_at=datetime.now(UTC), mqtt_mid=1)
            await producer.send(topic, record.to_json(), key=terminal.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def read_sse_ids(
    base: str,
    merchant: str,
    key: str,
    want: int,
    got: dict[tuple[str, int], float],
    *,
    timeout_s: float,
) -> None:
    """Read ``merchant``'s event stream until ``want`` events came; ``got`` maps each
    (merchant, seq) to the wall-clock time it arrived."""
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(timeout_s)) as client,
        client.stream("GET", f"{base}/v1/merchants/{merchant}/events/stream", headers=headers) as r,
    ):
        r.raise_for_status()
        count = 0
        async for line in r.aiter_lines():
            if line.startswith("id: "):
                got[(merchant, int(line[4:]))] = time.time()
                count += 1
                if count >= want:
                    return
