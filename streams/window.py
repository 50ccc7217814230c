"""Per-terminal tumbling windows, as pure functions over the typed state of streams/state.py.

The faust agent keeps one :class:`~streams.state.TerminalState` per terminal in a
table (backed by its changelog topic) and calls these functions; everything here is
deterministic and tested without Kafka.

Time and lateness policy:

* Windows are **event time**: a message counts in the window of its ``ts``.
* A window closes when the terminal's own event time has moved ``grace``
  seconds past its end (so a terminal's clock skew does not matter), or, for
  a terminal gone silent, when the wall clock has (``close_due``).
* A message for a window that is already closed is **late**: it still
  updates the terminal's current state (last seen, and the latest readings
  if it is the newest), it is counted in the next health record's ``late``
  field and the ``late messages`` metric, and it never reopens a window.
* Replays (the same telemetry ``seq`` or transaction id again, after a
  worker restart) are recognised and ignored, so a window counts each message
  once even when Kafka delivers it twice.

Online/offline ordering (status, telemetry and payments come from different
topics, so their processing order is not their publish order):

* The order key is the terminal's ``seq`` (one increasing counter per
  terminal, shared by every kind), never ``ts``: the terminal clock may be
  skewed, and a Last Will's ``seq`` and ``ts`` are reserved when it is
  registered, at connect time, so they are old by the time it fires.
* A status applies only if its ``seq`` is greater than every status applied
  before (``status_seq``); an equal or older one (a retained status handed
  out again, a redelivery, the will of an earlier connection) is ``stale``
  and changes nothing.
* After an offline status only a later "online" status brings the terminal
  back: telemetry and payments with a greater ``seq`` may well have been
  published before the connection dropped (every message of the dead
  connection has a greater ``seq`` than its will), so they update the windows
  and current readings but not online/offline.
* After offline by silence (``check_offline``) a telemetry or payment newer
  than everything heard before (``seq`` > ``max_seq`` at that moment) brings
  it back; a delayed older one does not.

States written before these fields existed lack them; :func:`streams.state.decode_state`
reads such a state as "nothing ordered yet".
"""

from __future__ import annotations

from bisect import insort
from typing import Any

from streams.records import health_record, open_record, open_records
from streams.state import (
    OfflineBy,
    Outcome,
    Readings,
    TerminalState,
    Window,
    WindowConfig,
    new_state,
)

__all__ = [
    "State",
    "WindowConfig",
    "apply",
    "check_offline",
    "close_due",
    "heal",
    "new_state",
    "next_deadline",
    "on_status",
    "on_telemetry",
    "on_txn",
    "open_record",
    "open_records",
    "window_start",
]

State = TerminalState
# Seqs / txn ids remembered for replay detection: a restarted worker re-reads at
# most what arrived since the last offset commit (about a second), far fewer.
_RECENT = 64
_LATENCIES = 256  # per window, for the p95


def window_start(ts: float, cfg: WindowConfig) -> int:
    return int(ts // cfg.window_s * cfg.window_s)


def _window(state: State, ts: float, cfg: WindowConfig) -> Window | None:
    start = int(ts // cfg.window_s * cfg.window_s)
    if start + cfg.window_s <= state.closed_upto:
        return None  # late
    window = state.windows.get(start)
    if window is None:
        window = state.windows[start] = Window()
    window.last_ts = max(window.last_ts, ts)
    return window


def _remember(items: list[Any], item: Any) -> bool:
    """Adds ``item``; False when it was already there (a replay)."""
    if item in items:
        return False
    items.append(item)
    if len(items) > _RECENT:
        del items[:-_RECENT]
    return True


def _seq(message: dict[str, Any]) -> int | None:
    seq = message.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _heard(state: State, ts: float, now: float, seq: int | None) -> bool:
    """Marks the terminal heard (telemetry or payment); True if it came back online.

    See "Online/offline ordering" above: only newer evidence lifts an offline by
    silence, and nothing but a later online status lifts an offline status.
    """
    state.last_heard = now
    state.watermark = max(state.watermark, ts)
    if seq is not None and seq > state.max_seq:
        state.max_seq = seq
    if state.online or state.offline_by is OfflineBy.STATUS:
        return False
    if seq is not None and seq <= state.silent_seq:
        return False  # sent before the newest message heard when it went silent
    state.online, state.offline_reason, state.offline_by = True, None, None
    return True


def on_telemetry(
    state: State, t: dict[str, Any], ts: float, now: float, cfg: WindowConfig
) -> Outcome:
    """Apply one telemetry payload; returns ok, late, replay or online."""
    if not _remember(state.seqs, t["seq"]):
        return Outcome.REPLAY
    seq = _seq(t)
    back = _heard(state, ts, now, seq)
    state.heartbeat_s = t.get("heartbeat_interval_s", 30)
    signal, battery = t["signal"], t["battery"]
    dbm = signal.get("rsrp_dbm")
    dbm = signal.get("rssi_dbm") if dbm is None else dbm
    dbm = signal.get("wifi_rssi_dbm") if dbm is None else dbm
    level, charging, paper = battery["level_pct"], battery["charging"], t["printer"]["paper"]
    current = state.current
    # The latest readings are the highest seq's, not the latest ts: a skewed clock
    # (minutes behind after a reboot, say) must not freeze them.
    if ts >= current.ts if seq is None or current.seq is None else seq > current.seq:
        loc = t.get("location") or {}
        state.current = Readings(
            ts, seq, signal["type"], dbm, signal.get("carrier"), level, charging, paper,
            t["app_version"], t["firmware_version"], loc.get("lat"), loc.get("lon"),
        )  # fmt: skip
    hist = state.battery_hist
    # One reading a minute is plenty for a drain rate, and keeps the state small
    # (it is written to the changelog on every change).
    if not hist or ts - hist[-1][0] >= 60 or charging != hist[-1][2]:
        insort(hist, (ts, level, charging), key=lambda h: h[0])
    oldest = state.watermark - cfg.drain_span_s
    while hist and hist[0][0] < oldest:
        hist.pop(0)
    window = _window(state, ts, cfg)
    if window is None:
        state.late += 1
        return Outcome.ONLINE if back else Outcome.LATE  # lateness is counted by state.late
    window.samples += 1
    kind = window.sig_type = signal["type"]
    if kind == "none" or dbm is None:
        if kind != "ethernet":
            window.dropouts += 1
    else:
        window.sig_sum += dbm
        window.sig_n += 1
        if window.sig_min is None or dbm < window.sig_min:
            window.sig_min = dbm
    if ts >= window.battery_ts:
        window.battery, window.battery_ts, window.charging = level, ts, charging
        window.printer = paper
    temp = battery.get("temperature_c")
    if temp is not None and (window.temp_max is None or temp > window.temp_max):
        window.temp_max = temp
    return Outcome.ONLINE if back else Outcome.OK


def on_txn(state: State, t: dict[str, Any], ts: float, now: float, cfg: WindowConfig) -> Outcome:
    """Apply one payment outcome; returns ok, late, replay or online."""
    if not _remember(state.txns, t["txn_id"]):
        return Outcome.REPLAY
    back = _heard(state, ts, now, _seq(t))
    window = _window(state, ts, cfg)
    if window is None:
        state.late += 1
        return Outcome.ONLINE if back else Outcome.LATE
    window.txn += 1
    status = t["status"]
    if status == "approved":
        window.approved += 1
    elif status == "declined":
        window.declined += 1
    else:
        window.failed += 1
    latencies = window.latencies
    latencies.append(t["auth_latency_ms"])
    if len(latencies) > _LATENCIES:
        del latencies[:-_LATENCIES]
    return Outcome.ONLINE if back else Outcome.OK


def on_status(state: State, s: dict[str, Any], ts: float, now: float) -> Outcome:
    """Apply a status message; returns online, offline, ok or stale.

    stale: a status not newer (by ``seq``) than the last one applied, ignored.
    An offline status (the Last Will) keeps the terminal offline until a later
    online status; see "Online/offline ordering" above.
    """
    seq = _seq(s)
    if seq is not None:
        if seq <= state.status_seq:
            return Outcome.STALE
        state.status_seq = seq
        state.max_seq = max(state.max_seq, seq)
    state.last_heard = now
    if s["state"] == "offline":
        was_online = state.online
        state.online, state.offline_by = False, OfflineBy.STATUS
        state.offline_reason = s.get("reason") or "last will"
        return Outcome.OFFLINE if was_online else Outcome.OK
    state.watermark = max(state.watermark, ts)
    if state.online:
        return Outcome.OK
    state.online, state.offline_reason, state.offline_by = True, None, None
    return Outcome.ONLINE


def apply(state: State, event: dict[str, Any], ts: float, now: float, cfg: WindowConfig) -> Outcome:
    """Apply one event of any kind (a decoded record of the telemetry, status or re-keyed
    payment topic) at event time ``ts``."""
    kind = event["kind"]
    if kind == "telemetry":
        return on_telemetry(state, event["payload"], ts, now, cfg)
    if kind == "txn":
        return on_txn(state, event, ts, now, cfg)
    return on_status(state, event["payload"], ts, now)


def check_offline(state: State, now: float, cfg: WindowConfig) -> bool:
    """Mark a silent terminal offline; True when that changed it."""
    silent = now - state.last_heard
    if state.online and state.last_heard and silent > cfg.offline_factor * state.heartbeat_s:
        state.online, state.offline_by = False, OfflineBy.SILENCE
        state.offline_reason = f"silent for {silent:.0f} s"
        state.silent_seq = state.max_seq
        return True
    return False


def next_deadline(state: State, cfg: WindowConfig) -> float | None:
    """The wall-clock time the timer next has work for this terminal, if ever.

    Going offline by silence (``check_offline``) or closing its oldest window while it is
    silent (``close_due``); the timer wakes for it then, and not before.
    """
    due = None
    if state.online and state.last_heard:
        due = state.last_heard + cfg.offline_factor * state.heartbeat_s
    if state.windows:
        end = min(state.windows) + cfg.window_s + cfg.grace_s
        close = max(end, state.last_heard + cfg.grace_s + cfg.window_s)
        due = close if due is None else min(due, close)
    return due


def heal(state: State, now: float, cfg: WindowConfig) -> int:
    """Drop windows too far ahead of ``now`` from a state restored from the changelog.

    A state written before the edge refused far-future timestamps may hold a window in
    the year 9999, whose end is beyond what a datetime holds: closing it crashed the
    worker on every restart. Returns how many windows were dropped.
    """
    limit = now + cfg.max_ahead_s
    if state.watermark <= limit:
        return 0
    bad = [start for start in state.windows if start > limit]
    for start in bad:
        del state.windows[start]
    state.watermark = min(state.watermark, limit)
    state.closed_upto = min(state.closed_upto, limit)
    state.current.ts = min(state.current.ts, limit)
    return len(bad)


def close_due(state: State, now: float, cfg: WindowConfig) -> list[dict[str, Any]]:
    """Close every window that is due; returns one final health record per closed window."""
    if not state.windows:
        return []
    silent = now - state.last_heard >= cfg.grace_s + cfg.window_s
    records = []
    for start in sorted(state.windows):
        end = start + cfg.window_s
        if state.watermark < end + cfg.grace_s and not (silent and now >= end + cfg.grace_s):
            break
        w = state.windows.pop(start)
        state.closed_upto = max(state.closed_upto, end)
        late, state.late = state.late, 0
        records.append(health_record(state, start, w, cfg, late, final=True))
    return records
