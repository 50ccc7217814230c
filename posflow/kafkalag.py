"""Kafka consumer lag as a Prometheus gauge, the same for every aiokafka consumer.

``posflow_consumer_lag{group, topic, partition}`` = the partition's highwater (offset
of the next record produced) minus the consumer's position (offset of the next record
it will fetch), for the partitions assigned to it now. Both come from the consumer
itself (``highwater`` arrives with every fetch response), so no admin request is
made and a consumer that stores its offsets outside Kafka (settlement, alerts) is
measured by what it actually read. The settlement worker, the alert engine and the
raw-storage sink each own one :class:`ConsumerLag` on their registry.

A partition whose highwater is not known yet (nothing fetched since assignment) or
whose position is being reset is left out of that update rather than reported as 0;
a partition no longer assigned loses its series, so a rebalance leaves no stale lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError
from prometheus_client import CollectorRegistry, Gauge

__all__ = ["LAG_METRIC", "ConsumerLag", "LagSource"]

log = logging.getLogger("posflow.kafkalag")

LAG_METRIC = "posflow_consumer_lag"


class LagSource(Protocol):
    """What lag needs of a consumer: ``aiokafka.AIOKafkaConsumer`` has it, and so has
    faust's ``app.consumer`` (its position is the fetcher's, ahead of what faust's
    agents have processed)."""

    def assignment(self) -> set[TopicPartition]: ...

    def highwater(self, partition: TopicPartition) -> int | None: ...

    async def position(self, partition: TopicPartition) -> int | None: ...


class ConsumerLag:
    """The lag gauge of one consumer group on one registry."""

    def __init__(
        self, registry: CollectorRegistry, group: str, *, position_timeout_s: float = 1.0
    ) -> None:
        self.group = group
        self.position_timeout_s = position_timeout_s
        self.gauge = Gauge(
            LAG_METRIC,
            "records in the partition not yet read by the consumer (highwater - position)",
            ["group", "topic", "partition"],
            registry=registry,
        )
        self._shown: set[tuple[str, int]] = set()

    async def update(self, consumer: LagSource) -> dict[tuple[str, int], int]:
        """Measure every assigned partition once; returns (topic, partition) -> lag."""
        assigned = consumer.assignment()
        lags: dict[tuple[str, int], int] = {}
        for tp in sorted(assigned):
            try:
                high = consumer.highwater(tp)
                if high is None:
                    continue
                # position() waits while an offset reset is under way: don't hang on it.
                position = await asyncio.wait_for(consumer.position(tp), self.position_timeout_s)
            except (AssertionError, IllegalStateError, TimeoutError):
                continue  # revoked meanwhile, or no position yet: measured next time
            if position is None:
                continue
            lags[(tp.topic, tp.partition)] = max(high - position, 0)
        # An assigned partition not measured this time keeps its last value.
        for topic, partition in self._shown - {(t.topic, t.partition) for t in assigned}:
            with contextlib.suppress(KeyError):
                self.gauge.remove(self.group, topic, str(partition))
            self._shown.discard((topic, partition))
        for (topic, partition), lag in lags.items():
            self.gauge.labels(self.group, topic, str(partition)).set(lag)
            self._shown.add((topic, partition))
        return lags

    async def run(self, consumer: LagSource, stop: asyncio.Event, interval_s: float = 5.0) -> None:
        """Update every ``interval_s`` until ``stop`` is set (or the task is cancelled)."""
        while not stop.is_set():
            try:
                await self.update(consumer)
            except KafkaError as exc:
                log.warning("consumer lag of group %s not measured: %s", self.group, exc)
            except Exception:  # a metric never takes the service down
                log.exception("consumer lag of group %s not measured", self.group)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
