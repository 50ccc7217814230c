"""The health agent itself, driven by faust's test context (no Kafka, no database)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime

from posflow.contracts import Accepted, validate_message
from posflow.settings import Settings, StreamsSettings
from streams.app import build
from tests.unit import samples


def _envelope(seq: int, ts: float, **over: object) -> bytes:
    body = samples.telemetry(seq=seq, ts=datetime.fromtimestamp(ts, UTC).isoformat(), **over)
    result = validate_message(
        "pos/v1/M-0001/T-0001/telemetry",
        json.dumps(body).encode(),
        received_at=datetime.now(UTC),
        mqtt_mid=1,
    )
    assert isinstance(result, Accepted)
    return result.envelope.to_json()


async def test_agent_closes_a_window_and_keeps_the_open_one_provisional() -> None:
    health = build(Settings(streams=StreamsSettings(app_id="unit-health", grace_s=10)))
    _route, process = health.agents
    published: list[dict[str, object]] = []

    async def capture(_key: bytes, value: bytes) -> None:
        published.append(json.loads(value))

    health.publish_to = capture  # the health topic is covered by the integration tests
    now = int(time.time())
    base = now - now % 60 - 600
    async with process.test_context() as agent:
        for i, dbm in enumerate([-95, -105, -100, -110]):  # 0, 30, 60, 90 s
            await agent.put(_envelope(i, base + 30 * i, **{"signal.rsrp_dbm": dbm}), key=b"T-0001")
        await asyncio.sleep(0.2)  # one take() batch
    records = sorted(health.sink._windows.values(), key=lambda r: r["window_start"])
    assert [(r["window_start"] - int(base), r["final"]) for r in records] == [
        (0, True),
        (60, False),
    ]
    closed, open_ = records
    assert (closed["facts"]["samples"], closed["facts"]["signal_avg_dbm"]) == (2, -100.0)
    assert closed["components"]["signal"] == 67
    assert (open_["facts"]["samples"], open_["facts"]["signal_avg_dbm"]) == (2, -105.0)
    # The final window went to the health topic, for the alert engine.
    assert [(r["type"], r["window_start"]) for r in published] == [("window", base)]
    assert health.metrics.events.labels("telemetry")._value.get() == 4
