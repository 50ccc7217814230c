"""The bulk changelog's pure parts: the partition of a key, and the commit hook's order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from posflow.partitioning import KeyPartitioner
from streams.changelog import bulk_commit_consumer


def test_a_key_goes_to_the_partition_aiokafkas_default_partitioner_gives_it() -> None:
    """faust's ``use_partitioner`` table, the bridge and every other client use that
    partitioner; a changelog record in another partition would not be restored with its
    terminal, a bridge record in another would be processed by another worker."""
    partitioner, ours = DefaultPartitioner(), KeyPartitioner(max_keys=1000)
    for count in (1, 3, 6, 12):
        partitions = list(range(count))
        for _ in range(2):  # remembered hashes give the same answers
            for i in range(2000):  # more keys than it remembers: forgets, still right
                key = f"T-{i:06d}".encode()
                assert ours(key, partitions) == partitioner(key, partitions, partitions)
    assert ours(None, [0, 1, 2]) in (0, 1, 2)


def test_the_bulk_write_runs_before_faust_picks_the_offsets_to_commit() -> None:
    calls: list[str] = []

    class Consumer:
        async def force_commit(
            self, topics: Any = None, start_new_transaction: bool = True
        ) -> bool:
            calls.append(f"commit {topics} {start_new_transaction}")
            return True

    async def before() -> None:
        calls.append("bulk write")

    cls = bulk_commit_consumer(Consumer, before)
    assert issubclass(cls, Consumer)
    assert asyncio.run(cls().force_commit({"t"}, start_new_transaction=False)) is True
    assert calls == ["bulk write", "commit {'t'} False"]


def test_a_failed_bulk_write_fails_the_commit_it_came_before() -> None:
    """No offset is committed past a state that did not reach the changelog."""
    committed: list[bool] = []

    class Consumer:
        async def force_commit(
            self, topics: Any = None, start_new_transaction: bool = True
        ) -> bool:
            committed.append(True)
            return True

    async def before() -> None:
        raise RuntimeError("broker gone")

    cls = bulk_commit_consumer(Consumer, before)
    with pytest.raises(RuntimeError, match="broker gone"):
        asyncio.run(cls().force_commit())
    assert committed == []


def test_the_apps_monitor_keeps_what_fausts_stall_check_reads() -> None:
    """The worker's monitor drops faust's per-event bookkeeping but keeps the time each
    partition's stream last took an event: faust's consumer thread reads it to report
    stalled partitions, and without it logged every partition of a lagging worker as
    "Stream has not started processing" (seen in a 50,000-terminal load test)."""
    from faust.types import TP

    from posflow.settings import Settings
    from streams.app import HealthMonitor, build

    health = build(Settings())
    monitor = health.app.monitor
    assert isinstance(monitor, HealthMonitor)
    assert monitor.health is health
    tp = TP("pos.telemetry.v1", 3)
    monitor.on_stream_event_in(tp, 7, None, None)
    assert tp in monitor.stream_inbound_time
    monitor.on_message_in(tp, 7, None)  # the rest is not kept
    assert monitor.messages_received_total == 0
