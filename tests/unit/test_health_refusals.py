"""The health worker refuses records its state cannot hold, instead of crash-looping on them."""

from __future__ import annotations

import time
from typing import Any, cast

import orjson

from posflow.contracts import Accepted, DeadLetter, Reason, validate_message
from posflow.settings import Settings
from streams.health import HealthApp
from streams.metrics import StreamMetrics
from streams.sink import HealthSink
from streams.window import WindowConfig
from tests.unit import samples


def _health() -> HealthApp:
    metrics = StreamMetrics()
    return HealthApp(Settings(), cast(Any, None), metrics, HealthSink("", metrics), WindowConfig())


def _record(ts: str) -> bytes:
    result = validate_message(
        samples.topic("telemetry"),
        samples.encode(samples.telemetry(ts=samples.TS)),
        received_at=samples.RECEIVED_AT,
        mqtt_mid=1,
    )
    assert isinstance(result, Accepted)
    record = orjson.loads(result.envelope.to_json())
    record["payload"]["ts"] = ts  # as a record that did not come through the bridge may say
    return orjson.dumps(record)


def test_a_far_future_reading_goes_to_the_dead_letters_and_leaves_no_state() -> None:
    health, table = _health(), cast(dict[bytes, Any], {})
    now = time.time()
    health.process([_record("9999-12-31T23:59:59Z")], table, now)
    health.tick(table, now + 120)  # before the fix: ValueError year 10000 while closing
    assert table == {}
    assert health.dirty == {}
    ((key, value),) = health.refused
    letter = DeadLetter.from_json(value)
    assert key == b"T-0001"
    assert (letter.reason, letter.field) == (Reason.IMPLAUSIBLE_TIMESTAMP, "ts")
    assert letter.original_topic == "pos.telemetry.v1"
    assert "9999-12-31T23:59:59Z is more than 86400 s ahead" in letter.message
    assert health.metrics.refused.labels("implausible_timestamp")._value.get() == 1


def test_an_unparseable_timestamp_is_refused_and_the_batch_goes_on() -> None:
    health, table = _health(), cast(dict[bytes, Any], {})
    now = samples.RECEIVED_AT.timestamp()
    health.process([_record("yesterday"), _record(samples.TS)], table, now)
    assert [DeadLetter.from_json(v).field for _, v in health.refused] == ["ts"]
    assert list(health.dirty) == [b"T-0001"]
    assert health.dirty[b"T-0001"].current.seq == 41  # the good reading applied
