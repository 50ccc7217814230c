"""Which partition a keyed record goes to: the one aiokafka's default partitioner gives it.

That partitioner (murmur2 of the key, as Kafka's Java client) is pure Python in
aiokafka and costs 5-13 µs a call on this project's machines: more than the rest of
what the bridge does to route a record. Record keys here are terminal ids, a bounded
set that repeats, so :class:`KeyPartitioner` remembers each key's hash. Every writer
that picks partitions itself (the bridge's batches, the health worker's bulk
changelog) uses it, so a terminal's records land where every other client puts them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from aiokafka.partitioner import murmur2

__all__ = ["KeyPartitioner"]


class KeyPartitioner:
    """``partitioner(key, partitions)`` → the partition for ``key`` (``partitions`` sorted,
    as aiokafka passes them); a record without a key goes to a random one, as aiokafka's."""

    def __init__(self, max_keys: int = 1_000_000) -> None:
        self._hashes: dict[bytes, int] = {}
        self._max_keys = max_keys  # a bound on memory for keys that never repeat

    def __call__(self, key: bytes | None, partitions: Sequence[int]) -> int:
        if key is None:
            return random.choice(partitions)  # noqa: S311 - spreading, not security
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= self._max_keys:
                self._hashes.clear()
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return partitions[hashed % len(partitions)]
