"""The health worker's typed state: its changelog codec (old and new form), the deadline
timer and the provisional rows at the sink's cadence (pure; no services)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, cast

import orjson
from faust.serializers import codecs

from posflow.contracts import Accepted, validate_message
from posflow.settings import Settings, StreamsSettings
from streams.app import StateCodec, build
from streams.health import HealthApp
from streams.metrics import StreamMetrics
from streams.sink import HealthSink
from streams.state import OfflineBy, decode_state, encode_state
from streams.window import WindowConfig, close_due, heal, on_telemetry, on_txn
from tests.unit import samples

CFG = WindowConfig()
T0 = 1_795_000_000.0 - 1_795_000_000.0 % 60

# Written by the previous worker (main before issue 18: a dict of strings, windows keyed by
# str(start)): online status 100, telemetry 102-104 every 30 s, a declined payment (106),
# then health_score and status_changed_at as its sink set them.
PREVIOUS_WORKER = (
    b'{"terminal_id":"T-0001","merchant_id":"M-0001","windows":{"1794999960":{"samples":2,'
    b'"sig_sum":-190.0,"sig_n":2,"sig_min":-100,"sig_type":"lte","dropouts":0,"battery":79,'
    b'"battery_ts":1794999990.0,"charging":false,"temp_max":31.5,"printer":"ok","txn":0,'
    b'"approved":0,"declined":0,"failed":0,"latencies":[],"last_ts":1794999990.0},'
    b'"1795000020":{"samples":1,"sig_sum":-110.0,"sig_n":1,"sig_min":-110,"sig_type":"lte",'
    b'"dropouts":0,"battery":78,"battery_ts":1795000020.0,"charging":false,"temp_max":31.5,'
    b'"printer":"ok","txn":1,"approved":0,"declined":1,"failed":0,"latencies":[700],'
    b'"last_ts":1795000025.0}},"closed_upto":0.0,"watermark":1795000025.0,'
    b'"last_heard":1795000025.0,"online":true,"offline_reason":null,"heartbeat_s":30,'
    b'"late":0,"max_seq":106,"status_seq":100,"offline_by":null,"silent_seq":-1,'
    b'"seqs":[102,103,104],"txns":["tx-1"],"battery_hist":[[1794999960.0,80,false],'
    b'[1795000020.0,78,false]],"current":{"ts":1795000020.0,"seq":104,"signal_type":"lte",'
    b'"signal_dbm":-110,"carrier":"Telstra","battery":78,"charging":false,"printer":"ok",'
    b'"app_version":"3.4.1","firmware_version":"fw-2026.10","lat":-33.8688,'
    b'"lon":151.20929999999998},"health_score":83,"status_changed_at":1794999960.0}'
)


def tele(seq: int, **over: Any) -> dict[str, Any]:
    return samples.telemetry(seq=seq, **over)


def test_a_state_the_previous_worker_wrote_loads_and_carries_on_counting() -> None:
    state = decode_state(PREVIOUS_WORKER)
    assert sorted(state.windows) == [int(T0), int(T0) + 60]
    assert (state.windows[int(T0)].samples, state.windows[int(T0) + 60].latencies) == (2, [700])
    assert (state.max_seq, state.status_seq, state.health_score) == (106, 100, 83)
    assert (state.current.seq, state.current.carrier) == (104, "Telstra")
    # Redelivered after the restart: recognised, not counted again.
    assert on_telemetry(state, tele(104), T0 + 60, T0 + 90, CFG) == "replay"
    assert on_txn(state, samples.txn(txn_id="tx-1", seq=106), T0 + 65, T0 + 90, CFG) == "replay"
    assert on_telemetry(state, tele(107), T0 + 90, T0 + 90, CFG) == "ok"
    (record,) = close_due(state, T0 + 90, CFG)
    assert (record["window_start"], record["facts"]["samples"]) == (int(T0), 2)
    assert record["facts"]["signal_avg_dbm"] == -95.0
    assert state.windows[int(T0) + 60].samples == 2
    # Written back in the new form, it reads the same.
    assert decode_state(encode_state(state)) == state


def test_a_poisoned_state_of_the_previous_worker_is_healed_after_loading() -> None:
    old = orjson.loads(PREVIOUS_WORKER)
    year_9999 = 253_402_300_740
    old["windows"][str(year_9999)] = old["windows"]["1795000020"]
    old["watermark"] = float(year_9999)
    state = decode_state(orjson.dumps(old))
    assert heal(state, T0 + 100, CFG) == 1
    assert sorted(state.windows) == [int(T0), int(T0) + 60]
    assert state.watermark == T0 + 100 + CFG.max_ahead_s


def test_an_offline_state_of_an_older_worker_knows_why_it_is_offline() -> None:
    old = orjson.loads(PREVIOUS_WORKER)
    for key in ("max_seq", "status_seq", "offline_by", "silent_seq"):
        del old[key]
    old.update(online=False, offline_reason="silent for 95 s")
    state = decode_state(orjson.dumps(old))
    assert (state.offline_by, state.max_seq, state.silent_seq) == (OfflineBy.SILENCE, -1, -1)
    assert on_telemetry(state, tele(200), T0 + 120, T0 + 120, CFG) == "online"


def test_the_changelog_codec_of_the_table_reads_both_forms() -> None:
    health = build(Settings(streams=StreamsSettings(app_id="unit-health-codec")))
    codec = health.table.changelog_topic.value_serializer
    assert isinstance(codec, StateCodec)
    state = decode_state(PREVIOUS_WORKER)
    assert codecs.loads(codec, PREVIOUS_WORKER) == state
    encoded = codecs.dumps(codec, state)
    assert encoded.startswith(b"[2,")
    assert len(encoded) < 0.7 * len(PREVIOUS_WORKER)
    assert codecs.loads(codec, encoded) == state


# --- the timer looks at due terminals only -------------------------------------------------


class CountingTable(dict[bytes, Any]):
    """A table that counts the states read from it."""

    reads = 0

    def get(self, key: bytes, default: Any = None) -> Any:
        self.reads += 1
        return super().get(key, default)


def _health() -> HealthApp:
    metrics = StreamMetrics()
    return HealthApp(Settings(), cast(Any, None), metrics, HealthSink("", metrics), CFG)


def _record(terminal: str, seq: int, ts: float, **over: Any) -> bytes:
    result = validate_message(
        samples.topic("telemetry", terminal=terminal),
        samples.encode(tele(seq, terminal_id=terminal, ts=_iso(ts), **over)),
        received_at=datetime.now(UTC),
        mqtt_mid=1,
    )
    assert isinstance(result, Accepted)
    return result.envelope.to_json()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def test_an_idle_tick_reads_no_state_and_a_due_one_reads_only_the_due_terminals() -> None:
    health, table = _health(), CountingTable()
    now = time.time()
    batch = [_record(f"T-{i:04d}", 1, now - 5, heartbeat_interval_s=30) for i in range(500)]
    batch.append(_record("T-fast", 1, now - 5, heartbeat_interval_s=1))
    health.process(batch, table, now)
    health.flush_dirty(table)
    table.reads = 0
    health.tick(table, now + 1)  # nobody due: the table's keys are known, nothing read
    assert table.reads == 0
    health.tick(table, now + 4)  # T-fast: silent for more than 3 x 1 s
    assert table.reads == 1
    assert not table[b"T-fast"].online
    assert all(state.online for key, state in table.items() if key != b"T-fast")
    table.reads = 0
    health.tick(table, now + 5)
    assert table.reads == 0
    health.tick(table, now + 91)  # the others: 3 x 30 s
    assert not any(state.online for state in table.values())
    assert health.metrics.state_changes.labels("offline")._value.get() == 501


def test_a_restored_table_is_adopted_by_the_timer() -> None:
    health, table = _health(), CountingTable()
    state = decode_state(PREVIOUS_WORKER)  # as the changelog restores it
    table[b"T-0001"] = state
    health.tick(table, state.last_heard + 120)  # silent: offline, both windows closed
    assert (state.online, state.windows) == (False, {})
    assert [(r["window_start"], r["final"]) for r in health.sink._windows.values()] == [
        (int(T0), True),
        (int(T0) + 60, True),
    ]


def test_provisional_rows_score_only_the_window_that_changed() -> None:
    health, table = _health(), CountingTable()
    now = time.time()
    base = now - now % 60 - 60
    health.process([_record("T-0001", 1, base + 50), _record("T-0001", 2, base + 65)], table, now)
    health.write_provisional()
    assert sorted(r["window_start"] for r in health.sink._windows.values()) == [
        int(base),
        int(base) + 60,
    ]
    health.sink._windows.clear()
    health.process([_record("T-0001", 3, base + 66), _record("T-0001", 4, base + 67)], table, now)
    health.write_provisional()  # two messages, one window: scored once
    ((key, record),) = health.sink._windows.items()
    assert key == ("T-0001", int(base) + 60)
    assert (record["final"], record["facts"]["samples"]) == (False, 3)
    health.write_provisional()  # nothing changed since
    assert len(health.sink._windows) == 1
