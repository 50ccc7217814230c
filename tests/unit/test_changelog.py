"""The bulk changelog's pure parts: the partition of a key, and the commit hook's order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from streams.changelog import bulk_commit_consumer, partition_for


def test_a_key_goes_to_the_partition_aiokafkas_default_partitioner_gives_it() -> None:
    """faust's ``use_partitioner`` table and the bridge both use that partitioner; a
    changelog record in another partition would not be restored with its terminal."""
    partitioner = DefaultPartitioner()
    for count in (1, 3, 6, 12):
        partitions = list(range(count))
        for i in range(2000):
            key = f"T-{i:06d}".encode()
            assert partition_for(key, partitions) == partitioner(key, partitions, partitions)


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
