"""The health agent itself, driven by faust's test context (no Kafka, no database)."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from datetime import UTC, datetime

from posflow.contracts import Accepted, validate_message
from posflow.settings import Settings, StreamsSettings
from streams.app import build
from streams.state import TerminalState
from tests.unit import samples


def _envelope(seq: int, ts: float, **over: object) -> bytes:
    return _validated("telemetry", seq, ts, over)


def _status(seq: int, ts: float, state: str, reason: str | None = None) -> bytes:
    return _validated("status", seq, ts, {"state": state, "reason": reason})


def _validated(kind: str, seq: int, ts: float, over: dict[str, object]) -> bytes:
    build = samples.status if kind == "status" else samples.telemetry
    body = build(seq=seq, ts=datetime.fromtimestamp(ts, UTC).isoformat(), **over)
    result = validate_message(
        f"pos/v1/M-0001/T-0001/{kind}",
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
    health.write_provisional()  # the sink's cadence (a timer, not run by test_context)
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


async def test_agent_keeps_a_terminal_offline_after_its_will_until_it_connects_again() -> None:
    health = build(Settings(streams=StreamsSettings(app_id="unit-health-will", grace_s=10)))
    _route, process = health.agents
    published: list[dict[str, object]] = []

    async def capture(_key: bytes, value: bytes) -> None:
        published.append(json.loads(value))

    health.publish_to = capture
    now = int(time.time())
    base = now - now % 60 - 600
    # The order the agent sees them in, not the order they were sent in: the will (seq
    # 101, connect-time ts) overtakes telemetry 103 sent just before the connection
    # dropped; a retained old online comes again; telemetry 112 of the next connection
    # overtakes its online status 110.
    sequence = [
        _status(100, base, "online"),
        _envelope(102, base + 5),
        _status(101, base, "offline", "last will"),
        _envelope(103, base + 35),
        _status(100, base, "online"),
        _envelope(112, base + 305),
        _status(110, base + 300, "online"),
    ]
    async with process.test_context() as agent:
        for value in sequence[:-1]:
            await agent.put(value, key=b"T-0001")
        await asyncio.sleep(0.2)  # one take() batch
        offline = copy.copy(health.sink._states["T-0001"])
        assert isinstance(offline, TerminalState)
        await agent.put(sequence[-1], key=b"T-0001")
        await asyncio.sleep(0.2)
    assert (offline.online, offline.offline_reason) == (False, "last will")
    assert offline.health_score == 0
    changes = [(r["online"], r["reason"]) for r in published if r["type"] == "state"]
    assert changes == [(False, "last will"), (True, None)]
    state = health.sink._states["T-0001"]
    assert isinstance(state, TerminalState)
    assert (state.online, state.status_seq, state.max_seq) == (True, 110, 112)
    assert health.metrics.events.labels("status")._value.get() == 4
