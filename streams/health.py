"""A terminal's health over its events: the health workers' processing, in plain Python.

The faust agents (:mod:`streams.app`) hand each batch to :meth:`HealthApp.process`,
call :meth:`HealthApp.tick` on a timer (only terminals whose deadline passed) and
:meth:`HealthApp.write_provisional` at the sink's cadence; all work over the
terminal-state table and the pure window logic of :mod:`streams.window`. What they
produce waits in the app: final windows and state changes for the health topic,
refused records for the dead-letter topic (both sent by :meth:`HealthApp.publish`),
rows for the database sink, and the states changed since the last offset commit
(``dirty``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from posflow.contracts import DeadLetter, Reason
from posflow.settings import Settings
from posflow.topics import topic_names
from streams.changelog import BulkChangelog
from streams.deadlines import Deadlines
from streams.metrics import StreamMetrics
from streams.sink import HealthSink
from streams.state import Outcome
from streams.window import (
    State,
    WindowConfig,
    apply,
    check_offline,
    close_due,
    heal,
    new_state,
    next_deadline,
    open_record,
    window_start,
)

if TYPE_CHECKING:
    import faust

__all__ = ["HealthApp", "Send"]

log = logging.getLogger("posflow.streams")

# Sends one record (key, value) to a topic.
Send = Callable[[bytes, bytes], Awaitable[None]]


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _event_time(event: dict[str, Any], now: float, cfg: WindowConfig) -> float | str:
    """The event's time in epoch seconds, or why it can't be used."""
    body = event if event["kind"] == "txn" else event["payload"]
    try:
        ts = _epoch(body["ts"])
    except (KeyError, TypeError, ValueError, OverflowError):
        return f"field ts: {str(body.get('ts'))[:40]!r} is not an RFC 3339 timestamp"
    if ts > now + cfg.max_ahead_s:
        return (
            f"field ts: {body['ts']} is more than {cfg.max_ahead_s} s ahead of the worker's "
            "clock; refused so it cannot hold the terminal's windows open"
        )
    return ts


@dataclass
class HealthApp:
    """The faust app and what its agents share; :func:`streams.app.build` wires it whole.

    The processing (:meth:`process`, :meth:`tick`, :meth:`write_provisional`) works over
    typed state and a dict-like table only: no faust in it, so what faust costs and what
    posflow's own logic costs are measured apart (benchmarks/bench_streams.py).
    """

    settings: Settings
    app: faust.App
    metrics: StreamMetrics
    sink: HealthSink
    cfg: WindowConfig
    outbox: list[tuple[bytes, bytes]] = field(default_factory=list)
    # Records refused with their reason, for the dead-letter topic (key, dead letter).
    refused: list[tuple[bytes, bytes]] = field(default_factory=list)
    # States changed since the last offset commit: written to the table (and so to its
    # changelog) once per commit, not once per batch; see streams.app.HealthMonitor.
    dirty: dict[bytes, State] = field(default_factory=dict)
    # Where final windows and state changes go (the health topic; a test may capture them).
    publish_to: Send | None = None
    # Where refused records go (the dead-letter topic).
    dead_letters_to: Send | None = None
    table: Any = None  # the faust table "terminal-state"
    # Writes dirty states to the table's changelog in bulk before each commit (None: only
    # faust's per-key path, as in the unit tests).
    changelog: BulkChangelog | None = None
    # Open windows changed since the provisional rows were last written: (terminal, start).
    changed: dict[tuple[bytes, int], State] = field(default_factory=dict)
    deadlines: Deadlines = field(default_factory=Deadlines)
    _table_size: int = -1  # the table's size when the timer last adopted its keys

    @property
    def agents(self) -> tuple[Any, ...]:
        """The app's agents in the order they were defined: (txn router, health agent)."""
        return tuple(self.app.agents.values())

    async def publish(self) -> None:
        """Send what processing produced: windows and state changes, then refusals."""
        outbox, self.outbox = self.outbox, []
        if self.publish_to is not None:
            for key, value in outbox:
                await self.publish_to(key, value)
        refused, self.refused = self.refused, []
        if self.dead_letters_to is not None:
            for key, value in refused:
                await self.dead_letters_to(key, value)

    def state_of(self, table: Any, key: bytes) -> State | None:
        state: State | None = self.dirty.get(key)
        return state if state is not None else table.get(key)

    def flush_dirty(self, table: Any) -> None:
        """faust's own per-key path (``table[key] = state``, a changelog record each): for
        the states still dirty when faust picks the offsets to commit."""
        dirty, self.dirty = self.dirty, {}
        for key, state in dirty.items():
            table[key] = state
        if dirty:
            self.metrics.changelog_records.labels("faust").inc(len(dirty))

    async def write_changelog(self) -> None:
        """The bulk path (:mod:`streams.changelog`), awaited at the start of each commit.

        If it fails, its states are dirty again and go through :meth:`flush_dirty`."""
        if self.changelog is None or self.table is None or not self.dirty:
            return
        dirty, self.dirty = self.dirty, {}
        try:
            written = await self.changelog.write(self.table, dirty)
        except Exception as exc:  # any Kafka error: faust's own path takes them
            log.warning(
                "bulk changelog write of %d terminal states failed (%s: %s); "
                "faust's own changelog path writes them before this commit",
                len(dirty),
                type(exc).__name__,
                exc,
            )
            for key, state in dirty.items():
                self.dirty.setdefault(key, state)
            return
        self.metrics.changelog_records.labels("bulk").inc(written)

    # --- processing (pure Python over the table; called from the agents) -------------

    def process(self, batch: list[bytes], table: Any, now: float) -> None:
        cfg, changed = self.cfg, self.changed
        touched: dict[bytes, State] = {}
        counts = dict.fromkeys(("telemetry", "txn", "status"), 0)
        late = replays = 0
        for value in batch:
            event = orjson.loads(value)
            kind, terminal = event["kind"], event["terminal_id"]
            ts = _event_time(event, now, cfg)
            if isinstance(ts, str):
                self._refuse(terminal, kind, value, ts)
                continue
            key = terminal.encode()
            state = touched.get(key)
            if state is None:
                state = self.state_of(table, key) or new_state(terminal, event["merchant_id"])
                self._heal(state, now)
                touched[key] = state
            was_late = state.late
            outcome = apply(state, event, ts, now, cfg)
            counts[kind] = counts.get(kind, 0) + 1
            if state.late > was_late:  # also when a late message brought it back online
                late += 1
            if outcome is Outcome.REPLAY:
                replays += 1
            elif outcome is Outcome.ONLINE or outcome is Outcome.OFFLINE:
                self._state_change(state, outcome, now)
                if outcome is Outcome.ONLINE and state.windows:  # its score is back
                    changed[key, max(state.windows)] = state
            if kind != "status" and outcome is not Outcome.REPLAY:
                changed[key, window_start(ts, cfg)] = state
        for key, state in touched.items():
            self._publish_closed(state, close_due(state, now, cfg))
            if not state.online:
                state.health_score = 0
            self.sink.add_state(state)
            self.dirty[key] = state
            self._schedule(key, state, now)
        self._count(counts, late, replays)

    def write_provisional(self) -> None:
        """Provisional rows of the open windows changed since the last call, scored now.

        Called at the sink's cadence, not per batch: a window that took ten messages
        since is scored once; windows of the terminal that did not change are not.
        """
        changed, self.changed = self.changed, {}
        for (_key, start), state in changed.items():
            record = open_record(state, start, self.cfg)
            if record is None:
                continue  # closed since: its final record is in the sink already
            self.sink.add_window(record)
            if state.online and start == max(state.windows):
                state.health_score = record["score"]

    def tick(self, table: Any, now: float) -> None:
        """Close windows of silent terminals; mark terminals silent too long offline.

        Only the terminals whose deadline passed are looked at (:mod:`streams.deadlines`);
        terminals restored from the changelog are adopted when the table's size changes.
        """
        size = len(table)
        if size != self._table_size:
            self._table_size = size
            for key in list(table.keys()):
                if key not in self.deadlines:
                    self.deadlines.schedule(key, now - 1)
        for key in self.deadlines.pop_due(now):
            state = self.state_of(table, key)
            if state is None:
                continue  # its partition went to another worker
            self._heal(state, now)
            went_offline = check_offline(state, now, self.cfg)
            if went_offline:
                self._state_change(state, Outcome.OFFLINE, now)
            closed = close_due(state, now, self.cfg)
            if closed:
                self._publish_closed(state, closed)
            if went_offline or closed:
                self.sink.add_state(state)
                self.dirty[key] = state
            self._schedule(key, state, now)
        self.metrics.terminals.set(size + sum(1 for key in self.dirty if key not in table))

    def _schedule(self, key: bytes, state: State, now: float) -> None:
        due = next_deadline(state, self.cfg)
        if due is not None:
            self.deadlines.schedule(key, max(due, now))

    def _count(self, counts: dict[str, int], late: int, replays: int) -> None:
        m = self.metrics
        for kind, n in counts.items():
            if n:
                m.events.labels(kind).inc(n)
        if late:
            m.late.inc(late)
        if replays:
            m.replays.inc(replays)

    def _refuse(self, terminal: str, kind: str, value: bytes, why: str) -> None:
        self.metrics.refused.labels(Reason.IMPLAUSIBLE_TIMESTAMP.value).inc()
        log.warning("%s record of terminal %s refused: %s", kind, terminal, why)
        letter = DeadLetter(
            reason=Reason.IMPLAUSIBLE_TIMESTAMP,
            message=why,
            field="ts",
            original_topic=topic_names(self.settings.kafka).of_kind(kind),
            received_at=datetime.now(UTC),
            payload_redacted=value[:4096].decode("utf-8", "replace"),
            payload_size=len(value),
        )
        self.refused.append((terminal.encode(), letter.to_json()))

    def _heal(self, state: State, now: float) -> None:
        dropped = heal(state, now, self.cfg)
        if dropped:
            log.warning(
                "terminal %s: dropped %d window(s) more than %d s in the future from its "
                "restored state",
                state.terminal_id,
                dropped,
                self.cfg.max_ahead_s,
            )

    def _publish_closed(self, state: State, closed: list[dict[str, Any]]) -> None:
        if not closed:
            return
        self.metrics.windows_closed.inc(len(closed))
        key = state.terminal_id.encode()
        for record in closed:
            self.sink.add_window(record)
            state.health_score = record["score"]
            self.outbox.append((key, orjson.dumps({"type": "window", **record})))

    def _state_change(self, state: State, to: str, now: float) -> None:
        state.status_changed_at = now
        self.metrics.state_changes.labels(to).inc()
        self.sink.add_state(state)
        self.outbox.append(
            (
                state.terminal_id.encode(),
                orjson.dumps(
                    {
                        "type": "state",
                        "terminal_id": state.terminal_id,
                        "merchant_id": state.merchant_id,
                        "online": state.online,
                        "reason": state.offline_reason,
                        "at": now,
                    }
                ),
            )
        )
