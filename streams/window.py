"""Per-terminal state and tumbling windows, as pure functions over a JSON-able dict.

The faust agent keeps one such dict per terminal in a table (backed by its
changelog topic) and calls these functions; everything here is deterministic
and tested without Kafka.

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

States written before these fields existed lack them; the ``.get`` defaults
below read such a state as "nothing ordered yet".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streams.score import WindowFacts, score

__all__ = [
    "WindowConfig",
    "check_offline",
    "close_due",
    "heal",
    "new_state",
    "on_status",
    "on_telemetry",
    "on_txn",
    "open_records",
]

State = dict[str, Any]
# Seqs / txn ids remembered for replay detection: a restarted worker re-reads at
# most what arrived since the last offset commit (about a second), far fewer.
_RECENT = 64
_LATENCIES = 256  # per window, for the p95


@dataclass(frozen=True)
class WindowConfig:
    window_s: int = 60
    grace_s: int = 10
    offline_factor: float = 3.0
    drain_span_s: int = 1800
    # Event times further ahead of the worker's clock are refused (the bridge refuses them
    # first; this guards state against records that did not come through it).
    max_ahead_s: int = 24 * 3600


def new_state(terminal_id: str, merchant_id: str) -> State:
    return {
        "terminal_id": terminal_id,
        "merchant_id": merchant_id,
        "windows": {},  # str(window start, epoch s) -> aggregates
        "closed_upto": 0.0,  # every window ending at or before this is closed
        "watermark": 0.0,  # the newest event time seen
        "last_heard": 0.0,  # wall clock of the last message
        "online": True,
        "offline_reason": None,
        "heartbeat_s": 30,
        "late": 0,
        "max_seq": -1,  # the greatest seq heard, any kind
        "status_seq": -1,  # the seq of the last status applied
        "offline_by": None,  # "status" (only a later online status lifts) or "silence"
        "silent_seq": -1,  # max_seq when silence took it offline
        "seqs": [],
        "txns": [],
        "battery_hist": [],  # [ts, level, charging]
        "current": {},  # latest readings
    }


def _window(state: State, ts: float, cfg: WindowConfig) -> dict[str, Any] | None:
    start = int(ts // cfg.window_s * cfg.window_s)
    if start + cfg.window_s <= state["closed_upto"]:
        return None  # late
    key = str(start)
    if key not in state["windows"]:
        state["windows"][key] = {
            "samples": 0, "sig_sum": 0.0, "sig_n": 0, "sig_min": None, "sig_type": None,
            "dropouts": 0, "battery": None, "battery_ts": 0.0, "charging": False,
            "temp_max": None, "printer": None, "txn": 0, "approved": 0, "declined": 0,
            "failed": 0, "latencies": [], "last_ts": 0.0,
        }  # fmt: skip
    window: dict[str, Any] = state["windows"][key]
    window["last_ts"] = max(window["last_ts"], ts)
    return window


def _remember(items: list[Any], item: Any) -> bool:
    """Adds ``item``; False when it was already there (a replay)."""
    if item in items:
        return False
    items.append(item)
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
    state["last_heard"] = now
    state["watermark"] = max(state["watermark"], ts)
    if seq is not None:
        state["max_seq"] = max(state.get("max_seq", -1), seq)
    if state["online"] or _offline_by(state) == "status":
        return False
    if seq is not None and seq <= state.get("silent_seq", -1):
        return False  # sent before the newest message heard when it went silent
    state["online"], state["offline_reason"], state["offline_by"] = True, None, None
    return True


def _offline_by(state: State) -> str | None:
    if state["online"]:
        return None
    by: str | None = state.get("offline_by")
    if by is None:  # a state from before "offline_by" existed
        by = "silence" if str(state["offline_reason"]).startswith("silent for") else "status"
    return by


def on_telemetry(state: State, t: dict[str, Any], ts: float, now: float, cfg: WindowConfig) -> str:
    """Apply one telemetry payload; returns 'ok', 'late', 'replay' or 'online'."""
    if not _remember(state["seqs"], t["seq"]):
        return "replay"
    back = _heard(state, ts, now, _seq(t))
    state["heartbeat_s"] = t.get("heartbeat_interval_s", 30)
    signal, battery = t["signal"], t["battery"]
    dbm = signal.get("rsrp_dbm")
    dbm = signal.get("rssi_dbm") if dbm is None else dbm
    dbm = signal.get("wifi_rssi_dbm") if dbm is None else dbm
    current, seq = state["current"], _seq(t)
    # The latest readings are the highest seq's, not the latest ts: a skewed clock
    # (minutes behind after a reboot, say) must not freeze them.
    if (
        ts >= current.get("ts", 0.0)
        if seq is None or current.get("seq") is None
        else seq > current["seq"]
    ):
        loc = t.get("location") or {}
        state["current"] = {
            "ts": ts, "seq": seq, "signal_type": signal["type"], "signal_dbm": dbm,
            "carrier": signal.get("carrier"), "battery": battery["level_pct"],
            "charging": battery["charging"], "printer": t["printer"]["paper"],
            "app_version": t["app_version"], "firmware_version": t["firmware_version"],
            "lat": loc.get("lat"), "lon": loc.get("lon"),
        }  # fmt: skip
    hist = state["battery_hist"]
    # One reading a minute is plenty for a drain rate, and keeps the state small
    # (it is written to the changelog on every change).
    if not hist or ts - hist[-1][0] >= 60 or battery["charging"] != hist[-1][2]:
        hist.append([ts, battery["level_pct"], battery["charging"]])
        hist.sort(key=lambda h: h[0])
    while hist and hist[0][0] < state["watermark"] - cfg.drain_span_s:
        hist.pop(0)
    window = _window(state, ts, cfg)
    if window is None:
        state["late"] += 1
        return "online" if back else "late"  # the caller counts lateness by state["late"]
    window["samples"] += 1
    window["sig_type"] = signal["type"]
    if signal["type"] == "none" or dbm is None:
        if signal["type"] != "ethernet":
            window["dropouts"] += 1
    else:
        window["sig_sum"] += dbm
        window["sig_n"] += 1
        window["sig_min"] = dbm if window["sig_min"] is None else min(window["sig_min"], dbm)
    if ts >= window["battery_ts"]:
        window["battery"], window["battery_ts"] = battery["level_pct"], ts
        window["charging"] = battery["charging"]
        window["printer"] = t["printer"]["paper"]
    temp = battery.get("temperature_c")
    if temp is not None:
        window["temp_max"] = temp if window["temp_max"] is None else max(window["temp_max"], temp)
    return "online" if back else "ok"


def on_txn(state: State, t: dict[str, Any], ts: float, now: float, cfg: WindowConfig) -> str:
    """Apply one payment outcome; returns 'ok', 'late', 'replay' or 'online'."""
    if not _remember(state["txns"], t["txn_id"]):
        return "replay"
    back = _heard(state, ts, now, _seq(t))
    window = _window(state, ts, cfg)
    if window is None:
        state["late"] += 1
        return "online" if back else "late"
    window["txn"] += 1
    status = t["status"]
    if status == "approved":
        window["approved"] += 1
    elif status == "declined":
        window["declined"] += 1
    else:
        window["failed"] += 1
    window["latencies"].append(t["auth_latency_ms"])
    del window["latencies"][:-_LATENCIES]
    return "online" if back else "ok"


def on_status(state: State, s: dict[str, Any], ts: float, now: float) -> str:
    """Apply a status message; returns 'online', 'offline', 'ok' or 'stale'.

    'stale': a status not newer (by ``seq``) than the last one applied, ignored.
    An offline status (the Last Will) keeps the terminal offline until a later
    online status; see "Online/offline ordering" above.
    """
    seq = _seq(s)
    if seq is not None:
        if seq <= state.get("status_seq", -1):
            return "stale"
        state["status_seq"] = seq
        state["max_seq"] = max(state.get("max_seq", -1), seq)
    state["last_heard"] = now
    if s["state"] == "offline":
        was_online = state["online"]
        state["online"], state["offline_by"] = False, "status"
        state["offline_reason"] = s.get("reason") or "last will"
        return "offline" if was_online else "ok"
    state["watermark"] = max(state["watermark"], ts)
    if state["online"]:
        return "ok"
    state["online"], state["offline_reason"], state["offline_by"] = True, None, None
    return "online"


def check_offline(state: State, now: float, cfg: WindowConfig) -> bool:
    """Mark a silent terminal offline; True when that changed it."""
    silent = now - state["last_heard"]
    if (
        state["online"]
        and state["last_heard"]
        and silent > cfg.offline_factor * state["heartbeat_s"]
    ):
        state["online"], state["offline_by"] = False, "silence"
        state["offline_reason"] = f"silent for {silent:.0f} s"
        state["silent_seq"] = state.get("max_seq", -1)
        return True
    return False


def _drain(state: State, cfg: WindowConfig) -> float | None:
    """Battery drain in %/hour over the latest discharging run within the span."""
    run: list[list[Any]] = []
    for entry in state["battery_hist"]:
        run = [] if entry[2] else [*run, entry]
    if len(run) < 2 or run[-1][0] - run[0][0] < 300:
        return None
    hours = float(run[-1][0] - run[0][0]) / 3600
    return round(float(run[0][1] - run[-1][1]) / hours, 1)


def _record(
    state: State, start: int, w: dict[str, Any], cfg: WindowConfig, late: int
) -> dict[str, Any]:
    latencies = sorted(w["latencies"])
    facts = WindowFacts(
        signal_type=w["sig_type"],
        signal_avg_dbm=w["sig_sum"] / w["sig_n"] if w["sig_n"] else None,
        dropouts=w["dropouts"],
        battery_level_pct=w["battery"],
        charging=w["charging"],
        battery_temp_c=w["temp_max"],
        drain_pct_per_hour=_drain(state, cfg),
        txn_total=w["txn"],
        txn_declined=w["declined"],
        txn_failed=w["failed"],
        auth_p95_ms=latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
        printer_paper=w["printer"],
        online=True,
    )
    health = score(facts)
    return {
        "terminal_id": state["terminal_id"],
        "merchant_id": state["merchant_id"],
        "window_start": start,
        "window_end": start + cfg.window_s,
        "last_ts": w["last_ts"],
        "score": health.score,
        "components": {
            "signal": health.signal,
            "battery": health.battery,
            "txn": health.txn,
            "printer": health.printer,
        },
        "reasons": health.reasons,
        "facts": {
            "samples": w["samples"],
            "signal_avg_dbm": facts.signal_avg_dbm,
            "signal_min_dbm": w["sig_min"],
            "signal_type": w["sig_type"],
            "dropouts": w["dropouts"],
            "battery_level_pct": w["battery"],
            "charging": w["charging"],
            "battery_temp_c": w["temp_max"],
            "drain_pct_per_hour": facts.drain_pct_per_hour,
            "txn": w["txn"],
            "approved": w["approved"],
            "declined": w["declined"],
            "failed": w["failed"],
            "decline_rate": w["declined"] / w["txn"] if w["txn"] else None,
            "error_rate": w["failed"] / w["txn"] if w["txn"] else None,
            "auth_p95_ms": facts.auth_p95_ms,
            "printer_paper": w["printer"],
            "late": late,
        },
    }


def heal(state: State, now: float, cfg: WindowConfig) -> int:
    """Drop windows too far ahead of ``now`` from a state restored from the changelog.

    A state written before the edge refused far-future timestamps may hold a window in
    the year 9999, whose end is beyond what a datetime holds: closing it crashed the
    worker on every restart. Returns how many windows were dropped.
    """
    limit = now + cfg.max_ahead_s
    if state["watermark"] <= limit:
        return 0
    bad = [key for key in state["windows"] if int(key) > limit]
    for key in bad:
        del state["windows"][key]
    state["watermark"] = min(state["watermark"], limit)
    state["closed_upto"] = min(state["closed_upto"], limit)
    current = state["current"]
    if current.get("ts", 0.0) > limit:
        current["ts"] = limit
    return len(bad)


def open_records(state: State, cfg: WindowConfig) -> list[dict[str, Any]]:
    """Provisional health records of the windows still open (updated until they close)."""
    return [
        {**_record(state, int(key), w, cfg, state["late"]), "final": False}
        for key, w in sorted(state["windows"].items(), key=lambda kv: int(kv[0]))
    ]


def close_due(state: State, now: float, cfg: WindowConfig) -> list[dict[str, Any]]:
    """Close every window that is due; returns one final health record per closed window."""
    silent = now - state["last_heard"] >= cfg.grace_s + cfg.window_s
    records = []
    for key in sorted(state["windows"], key=int):
        start = int(key)
        end = start + cfg.window_s
        if state["watermark"] < end + cfg.grace_s and not (silent and now >= end + cfg.grace_s):
            break
        w = state["windows"].pop(key)
        state["closed_upto"] = max(state["closed_upto"], end)
        late, state["late"] = state["late"], 0
        records.append({**_record(state, start, w, cfg, late), "final": True})
    return records
