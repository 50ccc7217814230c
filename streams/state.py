"""A terminal's state as the health worker keeps it: typed, slotted, and its changelog codec.

The worker holds one :class:`TerminalState` per terminal (in the faust table
``terminal-state``); :mod:`streams.window` changes it with pure functions.
:func:`encode_state` writes the compact changelog form (a JSON array headed by
its version); :func:`decode_state` reads it, and also the JSON object the
previous worker wrote (a dict of strings), so a worker restored from an older
changelog carries on where that one stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from operator import attrgetter
from typing import Any

import orjson

__all__ = [
    "FORMAT",
    "OfflineBy",
    "Outcome",
    "Readings",
    "TerminalState",
    "Window",
    "WindowConfig",
    "decode_state",
    "encode_state",
    "new_state",
]

# The changelog form's version (the first element of its array); the previous worker's
# form is a JSON object without one.
FORMAT = 2


class Outcome(StrEnum):
    """What one message did to a terminal's state."""

    OK = "ok"
    LATE = "late"  # for a window already closed: counted, not applied
    REPLAY = "replay"  # seen before (a redelivery), ignored
    ONLINE = "online"  # brought the terminal back online
    OFFLINE = "offline"  # took it offline
    STALE = "stale"  # a status not newer than the last one applied


class OfflineBy(StrEnum):
    STATUS = "status"  # only a later online status lifts it
    SILENCE = "silence"  # newer telemetry or a payment lifts it


@dataclass(slots=True)
class Window:
    """One tumbling window's aggregates (the facts its health record is scored from)."""

    samples: int = 0
    sig_sum: float = 0.0
    sig_n: int = 0
    sig_min: float | None = None
    sig_type: str | None = None
    dropouts: int = 0
    battery: int | None = None
    battery_ts: float = 0.0
    charging: bool = False
    temp_max: float | None = None
    printer: str | None = None
    txn: int = 0
    approved: int = 0
    declined: int = 0
    failed: int = 0
    latencies: list[int] = field(default_factory=list)
    last_ts: float = 0.0


@dataclass(slots=True)
class Readings:
    """The terminal's latest readings (its highest seq's telemetry)."""

    ts: float = 0.0
    seq: int | None = None
    signal_type: str | None = None
    signal_dbm: float | None = None
    carrier: str | None = None
    battery: int | None = None
    charging: bool | None = None
    printer: str | None = None
    app_version: str | None = None
    firmware_version: str | None = None
    lat: float | None = None
    lon: float | None = None


@dataclass(slots=True)
class TerminalState:
    terminal_id: str
    merchant_id: str
    windows: dict[int, Window] = field(default_factory=dict)  # window start (epoch s) ->
    closed_upto: float = 0.0  # every window ending at or before this is closed
    watermark: float = 0.0  # the newest event time seen
    last_heard: float = 0.0  # wall clock of the last message
    online: bool = True
    offline_reason: str | None = None
    heartbeat_s: float = 30
    late: int = 0
    max_seq: int = -1  # the greatest seq heard, any kind
    status_seq: int = -1  # the seq of the last status applied
    offline_by: OfflineBy | None = None
    silent_seq: int = -1  # max_seq when silence took it offline
    seqs: list[int] = field(default_factory=list)  # recent telemetry seqs (replays)
    txns: list[str] = field(default_factory=list)  # recent payment ids (replays)
    battery_hist: list[tuple[float, int, bool]] = field(default_factory=list)
    current: Readings = field(default_factory=Readings)
    status_changed_at: float | None = None
    health_score: int | None = None


@dataclass(frozen=True)
class WindowConfig:
    window_s: int = 60
    grace_s: int = 10
    offline_factor: float = 3.0
    drain_span_s: int = 1800
    # Event times further ahead of the worker's clock are refused (the bridge refuses them
    # first; this guards state against records that did not come through it).
    max_ahead_s: int = 24 * 3600


def new_state(terminal_id: str, merchant_id: str) -> TerminalState:
    return TerminalState(terminal_id, merchant_id)


# --- the changelog codec ------------------------------------------------------------------

_WINDOW_FIELDS = Window.__slots__
_READING_FIELDS = Readings.__slots__
_window_values = attrgetter(*_WINDOW_FIELDS)  # a tuple of the fields, in C
_reading_values = attrgetter(*_READING_FIELDS)


def encode_state(s: TerminalState) -> bytes:
    """The compact changelog form: a JSON array, fields in declaration order."""
    return orjson.dumps(
        [
            FORMAT, s.terminal_id, s.merchant_id, s.closed_upto, s.watermark, s.last_heard,
            s.online, s.offline_reason, s.heartbeat_s, s.late, s.max_seq, s.status_seq,
            s.offline_by, s.silent_seq, s.seqs, s.txns, s.battery_hist,
            _reading_values(s.current),
            [(start, _window_values(w)) for start, w in s.windows.items()],
            s.status_changed_at, s.health_score,
        ]
    )  # fmt: skip


def decode_state(data: bytes) -> TerminalState:
    """A state from its changelog record, in this worker's form or the previous one's."""
    value = orjson.loads(data)
    if isinstance(value, dict):
        return from_legacy(value)
    if not isinstance(value, list) or not value or value[0] != FORMAT:
        raise ValueError(f"terminal state of an unknown format: {str(value)[:80]!r}")
    (
        _, terminal_id, merchant_id, closed_upto, watermark, last_heard, online,
        offline_reason, heartbeat_s, late, max_seq, status_seq, offline_by, silent_seq,
        seqs, txns, hist, current, windows, status_changed_at, health_score,
    ) = value  # fmt: skip
    return TerminalState(
        terminal_id, merchant_id,
        windows={start: Window(*values) for start, values in windows},
        closed_upto=closed_upto, watermark=watermark, last_heard=last_heard, online=online,
        offline_reason=offline_reason, heartbeat_s=heartbeat_s, late=late, max_seq=max_seq,
        status_seq=status_seq, offline_by=OfflineBy(offline_by) if offline_by else None,
        silent_seq=silent_seq, seqs=seqs, txns=txns,
        battery_hist=[(h[0], h[1], h[2]) for h in hist],
        current=Readings(*current), status_changed_at=status_changed_at,
        health_score=health_score,
    )  # fmt: skip


def from_legacy(d: dict[str, Any]) -> TerminalState:
    """A state the previous worker wrote: a JSON object, windows keyed by str(start).

    States older still lack the ordering fields (``max_seq``, ``status_seq``,
    ``offline_by``, ``silent_seq``); they read as "nothing ordered yet", and an
    offline terminal's cause is told by its reason, as that worker did.
    """
    online = bool(d["online"])
    reason = d.get("offline_reason")
    by = d.get("offline_by")
    if not online and by is None:
        by = "silence" if str(reason).startswith("silent for") else "status"
    current = d.get("current") or {}
    return TerminalState(
        d["terminal_id"], d["merchant_id"],
        windows={
            int(start): Window(**{k: v for k, v in w.items() if k in _WINDOW_FIELDS})
            for start, w in (d.get("windows") or {}).items()
        },
        closed_upto=d.get("closed_upto", 0.0), watermark=d.get("watermark", 0.0),
        last_heard=d.get("last_heard", 0.0), online=online, offline_reason=reason,
        heartbeat_s=d.get("heartbeat_s", 30), late=d.get("late", 0),
        max_seq=d.get("max_seq", -1), status_seq=d.get("status_seq", -1),
        offline_by=OfflineBy(by) if by else None, silent_seq=d.get("silent_seq", -1),
        seqs=list(d.get("seqs") or []), txns=list(d.get("txns") or []),
        battery_hist=[(h[0], h[1], h[2]) for h in d.get("battery_hist") or []],
        current=Readings(**{k: v for k, v in current.items() if k in _READING_FIELDS}),
        status_changed_at=d.get("status_changed_at"), health_score=d.get("health_score"),
    )  # fmt: skip
