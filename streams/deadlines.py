"""When the timer next has work for a terminal: a heap of deadlines, one live entry each.

The health timer used to walk every terminal every second; with 50,000 terminals
known and none talking that alone cost a sixth of a core. Now each terminal has at
most one live deadline (:func:`streams.window.next_deadline`), and a tick pops only
the due ones.

A terminal that keeps talking moves its deadline later all the time; rather than a
heap entry per message, its earlier entry stays and merely wakes the timer early
(the timer then finds nothing due, and schedules the real deadline). So the heap
holds about one entry per terminal, and an active one costs a pop and a push about
once per deadline period, not per message.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

__all__ = ["Deadlines"]


class Deadlines:
    def __init__(self) -> None:
        self._heap: list[tuple[float, bytes]] = []
        self._due: dict[bytes, float] = {}  # key -> the deadline of its live entry

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: bytes) -> bool:
        return key in self._due

    def schedule(self, key: bytes, due: float) -> None:
        """Wake for ``key`` at ``due`` at the latest (an earlier live entry stays)."""
        live = self._due.get(key)
        if live is not None and live <= due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, key))

    def pop_due(self, now: float) -> Iterator[bytes]:
        """The keys whose deadline is before ``now``, earliest first; each is unscheduled
        as it is handed out (schedule it again for its next deadline)."""
        heap, live = self._heap, self._due
        while heap and heap[0][0] < now:
            due, key = heapq.heappop(heap)
            if live.get(key) != due:
                continue  # superseded by an earlier entry, already handed out
            del live[key]
            yield key
