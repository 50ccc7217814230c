"""The engine in memory and its copy in PostgreSQL: one lock, one way to commit.

Whatever changes the engine (a batch of records, an acknowledgement, a silence, a
rule reload) happens under :attr:`LiveEngine.lock` and ends in :meth:`LiveEngine.commit`,
which stores the engine's changes in one transaction with the offsets and audit
records that caused them, then wakes the outbox.

One process runs the engine: :meth:`LiveEngine.take_lock` holds a PostgreSQL advisory
lock (a second instance waits on it as a hot standby) before :meth:`LiveEngine.restore`
loads the stored state.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import psycopg

from alerts.engine import Engine
from alerts.metrics import AlertMetrics
from alerts.notify import Outbox
from alerts.store import AlertStore, AuditEntry
from posflow.runtime import Backoff

__all__ = ["LiveEngine"]

log = logging.getLogger("posflow.alerts")
_LOCK = 0x706F73616C657274  # "posalert"


@dataclass
class LiveEngine:
    engine: Engine
    store: AlertStore
    outbox: Outbox
    metrics: AlertMetrics
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def commit(
        self, offsets: dict[tuple[str, int], int], audit: list[AuditEntry] | None = None
    ) -> None:
        """Store what the engine changed, with ``offsets`` and ``audit``, in one transaction
        (the caller holds :attr:`lock`)."""
        changes = self.engine.drain()
        if not changes and not offsets and not audit:
            return
        await asyncio.to_thread(self.store.write, changes, offsets, audit)
        for n in changes.notifications:
            rule = n.payload["alert"]["rule"]
            self.metrics.transitions.labels(rule, n.event).inc()
        if changes.notifications:
            self.outbox.wake.set()
        if changes.alerts or changes.dropped:
            self.metrics.alerts.clear()
            counts: dict[tuple[str, str], int] = {}
            for a in self.engine.alerts.values():
                counts[(a.rule, a.state)] = counts.get((a.rule, a.state), 0) + 1
            for (rule, state), count in counts.items():
                self.metrics.alerts.labels(rule, state).set(count)

    async def take_lock(self, stop: asyncio.Event) -> bool:
        """Hold the single-instance lock (standing by while another engine holds it);
        False if ``stop`` came first."""
        standby = Backoff(first=2.0, cap=2.0)
        while not await asyncio.to_thread(self._try_lock):
            if stop.is_set():
                return False
            log.warning("another alert engine holds the lock; standing by")
            await standby.sleep(stop)
        return True

    def _try_lock(self) -> bool:
        got = self.store.conn.execute("SELECT pg_try_advisory_lock(%s)", [_LOCK]).fetchone()
        self.store.conn.commit()
        return bool(got and got[0])

    async def restore(self) -> None:
        """Load the stored state and the reference data (nothing is notified again)."""
        terminals, alerts, silences = await asyncio.to_thread(self.store.load_state)
        merchants, registered = await asyncio.to_thread(self.store.load_reference)
        self.engine.set_reference(merchants, registered)
        self.engine.restore(terminals, alerts, silences)

    async def refresh_reference(self, every_s: float, stop: asyncio.Event) -> None:
        """Reload merchants and registered terminals every ``every_s`` until ``stop``."""
        while not stop.is_set():
            await asyncio.sleep(every_s)
            # Under the lock: the store's one connection is not used by two threads at
            # once (a read between a batch's statements would leave its transaction open
            # and turn every later batch into a savepoint of it).
            async with self.lock:
                try:
                    merchants, terminals = await asyncio.to_thread(self.store.load_reference)
                except psycopg.Error as exc:
                    log.error("reference data refresh failed: %s", exc)  # noqa: TRY400
                    continue
                self.engine.set_reference(merchants, terminals)
