"""A terminal's health over its events: the health workers' processing, in plain Python.

The faust agents (:mod:`streams.app`) hand each batch to :meth:`HealthApp.process` and
call :meth:`HealthApp.tick` on a timer; both work over the terminal-state table and
the pure window logic of :mod:`streams.window`. What they produce waits in the app:
final windows and state changes for the health topic, refused records for the
dead-letter topic (both sent by :meth:`HealthApp.publish`), rows for the database
sink, and the states changed since the last offset commit (``dirty``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import faust
import orjson

from posflow.contracts import DeadLetter, Reason
from posflow.settings import Settings
from posflow.topics import topic_names
from streams.metrics import StreamMetrics
from streams.sink import HealthSink
from streams.window import (
    State,
    WindowConfig,
    check_offline,
    close_due,
    heal,
    new_state,
    on_status,
    on_telemetry,
    on_txn,
    open_records,
)

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
    """The faust app and what its agents share; :func:`streams.app.build` wires it whole."""

    settings: Settings
    app: faust.App
    metrics: StreamMetrics
    sink: HealthSink
    cfg: WindowConfig
    outbox: list[tuple[bytes, bytes]] = field(default_factory=list)
    # Records refused with their reason, for the dead-letter topic (key, dead letter).
    refused: list[tuple[bytes, bytes]] = field(default_factory=list)
    # States changed since the last offset commit: written to the table (and so to its
    # changelog) once per commit, not once per batch; see FlushBeforeCommit.
    dirty: dict[bytes, State] = field(default_factory=dict)
    # Where final windows and state changes go (the health topic; a test may capture them).
    publish_to: Send | None = None
    # Where refused records go (the dead-letter topic).
    dead_letters_to: Send | None = None
    table: Any = None  # the faust table "terminal-state"

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
        dirty, self.dirty = self.dirty, {}
        for key, state in dirty.items():
            table[key] = state

    # --- processing (pure Python over the table; called from the agents) -------------

    def process(self, batch: list[bytes], table: Any, now: float) -> None:
        touched: dict[str, State] = {}
        for value in batch:
            event = orjson.loads(value)
            kind, terminal = event["kind"], event["terminal_id"]
            ts = _event_time(event, now, self.cfg)
            if isinstance(ts, str):
                self._refuse(terminal, kind, value, ts)
                continue
            state = touched.get(terminal)
            if state is None:
                state = self.state_of(table, terminal.encode()) or new_state(
                    terminal, event["merchant_id"]
                )
                self._heal(state, now)
                touched[terminal] = state
            late = state["late"]
            if kind == "telemetry":
                outcome = on_telemetry(state, event["payload"], ts, now, self.cfg)
            elif kind == "txn":
                outcome = on_txn(state, event, ts, now, self.cfg)
            else:
                outcome = on_status(state, event["payload"], ts, now)
            self.metrics.events.labels(kind).inc()
            if state["late"] > late:  # also when a late message brought it back online
                self.metrics.late.inc()
            if outcome == "replay":
                self.metrics.replays.inc()
            elif outcome in ("online", "offline"):
                self._state_change(state, outcome, now)
        for terminal, state in touched.items():
            self._record_windows_and_state(state, now)
            self.dirty[terminal.encode()] = state

    def tick(self, table: Any, now: float) -> None:
        """Close windows of silent terminals; mark terminals silent too long offline."""
        count = 0
        keys = set(table.keys()) | set(self.dirty)
        for key in keys:
            state = self.state_of(table, key)
            if state is None:
                continue
            count += 1
            self._heal(state, now)
            changed = check_offline(state, now, self.cfg)
            if changed:
                self._state_change(state, "offline", now)
            closed = close_due(state, now, self.cfg) if state["windows"] else []
            if closed:
                self._publish_closed(state, closed)
            if changed or closed:
                self.sink.add_state(state)
                self.dirty[key] = state
        self.metrics.terminals.set(count)

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
                state["terminal_id"],
                dropped,
                self.cfg.max_ahead_s,
            )

    def _publish_closed(self, state: State, closed: list[dict[str, Any]]) -> None:
        for record in closed:
            self.metrics.windows_closed.inc()
            self.sink.add_window(record)
            state["health_score"] = record["score"]
            self.outbox.append(
                (state["terminal_id"].encode(), orjson.dumps({"type": "window", **record}))
            )

    def _record_windows_and_state(self, state: State, now: float) -> None:
        """Publish the windows that closed, keep the open ones provisional in the sink."""
        self._publish_closed(state, close_due(state, now, self.cfg))
        for record in open_records(state, self.cfg):
            self.sink.add_window(record)
            state["health_score"] = record["score"]
        if not state["online"]:
            state["health_score"] = 0
        self.sink.add_state(state)

    def _state_change(self, state: State, to: str, now: float) -> None:
        state["status_changed_at"] = now
        self.metrics.state_changes.labels(to).inc()
        self.sink.add_state(state)
        self.outbox.append(
            (
                state["terminal_id"].encode(),
                orjson.dumps(
                    {
                        "type": "state",
                        "terminal_id": state["terminal_id"],
                        "merchant_id": state["merchant_id"],
                        "online": state["online"],
                        "reason": state["offline_reason"],
                        "at": now,
                    }
                ),
            )
        )
