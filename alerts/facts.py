"""What the engine knows about a terminal: facts folded from the streams, and derived ones.

Stored facts (JSON, persisted per terminal) come from four record kinds:

* health **window** records (pos.health.v1, ``type: window``, final windows of the
  health worker): sustained signal, decline / error rate, p95 authorisation
  latency, drain rate, transaction count;
* health **state** records (``type: state``) and **status** envelopes (pos.status.v1):
  online / offline;
* **telemetry** envelopes (pos.telemetry.v1): the instant readings a window does
  not carry: tamper flag, location, app version, carrier, battery, printer.

Derived facts are computed at evaluation time from the stored ones, the clock,
the merchant's reference data and the fleet (the current app version).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "EVENT_FIELDS",
    "FACTS",
    "GROUP_FACTS",
    "Fleet",
    "Merchant",
    "apply_record",
    "derive",
    "version_key",
]

FACTS = {
    # stored
    "online": "bool: online per the health worker / status (Last Will)",
    "offline_reason": "text",
    "last_seen": "epoch s of the newest record's event time",
    "battery_pct": "0-100",
    "charging": "bool",
    "battery_temp_c": "degrees C (window max, else latest reading)",
    "drain_pct_per_hour": "battery drain rate over the latest discharging run",
    "signal_type": "lte/5g/3g/2g/wifi/ethernet/none",
    "signal_dbm": "latest reading",
    "signal_avg_dbm": "mean over the last closed window",
    "signal_lost": "bool: the latest reading has no network",
    "dropouts": "samples without network in the last window",
    "printer_paper": "ok/low/out/jammed/absent",
    "tamper": "bool",
    "lat": "terminal location",
    "lon": "terminal location",
    "app_version": "text",
    "carrier": "text",
    "txn_count": "transactions in the last window",
    "decline_rate": "0-1 in the last window",
    "error_rate": "0-1 (error + timeout) in the last window",
    "auth_p95_ms": "p95 authorisation latency in the last window",
    "health_score": "0-100, the last window's score",
    # derived
    "terminal_id": "text",
    "merchant_id": "text",
    "merchant_name": "text",
    "silent_s": "seconds since last_seen (timer-evaluated)",
    "distance_m": "metres between the terminal and its merchant's location",
    "area": "grid cell of the terminal's (else merchant's) location",
    "fleet_app_version": "the fleet's current app version",
    "app_behind": "bool: app_version older than the fleet's current one",
    "minutes_to_empty": "battery_pct / drain rate (not charging)",
    "minutes_to_close": "until the merchant's current opening interval ends",
    "empty_before_close": "bool: minutes_to_empty < minutes_to_close",
}
GROUP_FACTS = {"count": "members matching", "total": "members", "fraction": "count / total"}
EVENT_FIELDS = {"txn_id", "kind", "reason", "count", "terminal_id"}

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class Merchant:
    merchant_id: str
    name: str = ""
    timezone: str = "UTC"
    opening_hours: dict[str, list[list[str]]] = field(default_factory=dict)
    lat: float | None = None
    lon: float | None = None

    def minutes_to_close(self, now: float) -> float | None:
        """Minutes until the opening interval containing ``now`` ends; None when closed."""
        try:
            tz = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            tz = ZoneInfo("UTC")
        local = datetime.fromtimestamp(now, tz)
        # Yesterday's interval may run past midnight (e.g. 18:00-02:00).
        for back in (0, 1):
            day = local - timedelta(days=back)
            for interval in self.opening_hours.get(_DAYS[day.weekday()], []):
                try:
                    open_h, open_m = (int(x) for x in interval[0].split(":"))
                    close_h, close_m = (int(x) for x in interval[1].split(":"))
                except (ValueError, IndexError):
                    continue
                start = day.replace(hour=open_h, minute=open_m, second=0, microsecond=0)
                end = day.replace(hour=close_h % 24, minute=close_m, second=0, microsecond=0)
                if end <= start:
                    end += timedelta(days=1)
                if start <= local < end:
                    return (end - local).total_seconds() / 60
        return None


def version_key(version: str) -> tuple[tuple[int, str], ...]:
    """'1.10.2' > '1.9.9'; non-numeric parts compare as text."""
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in version.split("."))


@dataclass
class Fleet:
    """Running count of app versions: the current one is the newest run by >= 10% of it."""

    versions: dict[str, int] = field(default_factory=dict)
    _current: str | None = None
    _dirty: bool = True

    def move(self, old: str | None, new: str | None) -> None:
        if old == new:
            return
        if old is not None:
            left = self.versions.get(old, 0) - 1
            if left > 0:
                self.versions[old] = left
            else:
                self.versions.pop(old, None)
        if new is not None:
            self.versions[new] = self.versions.get(new, 0) + 1
        self._dirty = True

    @property
    def current(self) -> str | None:
        if self._dirty:
            total = sum(self.versions.values())
            common = [v for v, n in self.versions.items() if n * 10 >= total]
            self._current = max(common, key=version_key) if common else None
            self._dirty = False
        return self._current


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def apply_record(facts: dict[str, Any], kind: str, record: dict[str, Any]) -> None:
    """Fold one record into a terminal's stored facts (in place)."""
    if kind == "window":
        f = record["facts"]
        ts = float(record["last_ts"])
        facts["health_score"] = record.get("score")
        facts["signal_avg_dbm"] = f.get("signal_avg_dbm")
        facts["dropouts"] = f.get("dropouts")
        facts["txn_count"] = f.get("txn")
        facts["decline_rate"] = f.get("decline_rate")
        facts["error_rate"] = f.get("error_rate")
        facts["auth_p95_ms"] = f.get("auth_p95_ms")
        facts["drain_pct_per_hour"] = f.get("drain_pct_per_hour")
        if f.get("battery_temp_c") is not None:
            facts["battery_temp_c"] = f["battery_temp_c"]
        if ts >= facts.get("tele_ts", 0.0) and f.get("battery_level_pct") is not None:
            # Health records alone (no telemetry consumed) still carry these readings.
            facts["battery_pct"] = f["battery_level_pct"]
            facts["charging"] = f.get("charging")
            facts["printer_paper"] = f.get("printer_paper")
            if f.get("signal_type") is not None:
                facts["signal_type"] = f["signal_type"]
        facts["last_seen"] = max(facts.get("last_seen", 0.0), ts)
    elif kind == "state":
        facts["online"] = bool(record["online"])
        facts["offline_reason"] = record.get("reason")
        if record["online"]:
            facts["last_seen"] = max(facts.get("last_seen", 0.0), float(record["at"]))
    elif kind == "status":
        p = record["payload"]
        facts["online"] = p["state"] == "online"
        facts["offline_reason"] = None if facts["online"] else (p.get("reason") or "last will")
        if facts["online"]:
            facts["last_seen"] = max(facts.get("last_seen", 0.0), _epoch(p["ts"]))
    elif kind == "telemetry":
        p = record["payload"]
        ts = _epoch(p["ts"])
        facts["last_seen"] = max(facts.get("last_seen", 0.0), ts)
        if ts < facts.get("tele_ts", 0.0):
            return  # an older reading arriving late never replaces a newer one
        facts["tele_ts"] = ts
        sig, bat = p["signal"], p["battery"]
        dbm = sig.get("rsrp_dbm")
        dbm = sig.get("rssi_dbm") if dbm is None else dbm
        dbm = sig.get("wifi_rssi_dbm") if dbm is None else dbm
        loc = p.get("location") or {}
        facts.update(
            online=True,
            offline_reason=None,
            battery_pct=bat["level_pct"],
            charging=bat["charging"],
            battery_temp_c=bat.get("temperature_c"),
            signal_type=sig["type"],
            signal_dbm=dbm,
            signal_lost=sig["type"] == "none",
            carrier=sig.get("carrier"),
            printer_paper=p["printer"]["paper"],
            tamper=bool(p["tamper"]),
            app_version=p["app_version"],
            lat=loc.get("lat", facts.get("lat")),
            lon=loc.get("lon", facts.get("lon")),
        )


def _haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6_371_000 * math.asin(math.sqrt(min(1.0, a)))


def area_of(lat: float | None, lon: float | None, deg: float) -> str | None:
    if lat is None or lon is None:
        return None
    return f"{math.floor(lat / deg) * deg:.2f},{math.floor(lon / deg) * deg:.2f}"


def derive(
    terminal_id: str,
    facts: dict[str, Any],
    now: float,
    *,
    merchant: Merchant | None,
    fleet: Fleet,
    area_deg: float,
) -> dict[str, Any]:
    """Stored facts plus the derived ones, for rule evaluation and templates."""
    out = dict(facts)
    out["terminal_id"] = terminal_id
    out["merchant_name"] = merchant.name if merchant and merchant.name else facts["merchant_id"]
    seen = facts.get("last_seen")
    out["silent_s"] = now - seen if seen else None
    lat, lon = facts.get("lat"), facts.get("lon")
    if merchant and merchant.lat is not None and merchant.lon is not None:
        if lat is not None and lon is not None:
            out["distance_m"] = round(_haversine_m(lat, lon, merchant.lat, merchant.lon))
        else:
            lat, lon = merchant.lat, merchant.lon
    out["area"] = area_of(lat, lon, area_deg)
    current = fleet.current
    out["fleet_app_version"] = current
    app = facts.get("app_version")
    if current is not None and app is not None:
        out["app_behind"] = version_key(app) < version_key(current)
    drain = facts.get("drain_pct_per_hour")
    battery = facts.get("battery_pct")
    if not facts.get("charging") and drain and drain > 0 and battery is not None:
        out["minutes_to_empty"] = round(battery / drain * 60, 1)
    if merchant is not None:
        to_close = merchant.minutes_to_close(now)
        out["minutes_to_close"] = None if to_close is None else round(to_close, 1)
        if to_close is not None and "minutes_to_empty" in out:
            out["empty_before_close"] = out["minutes_to_empty"] < to_close
    return out


def now_utc() -> datetime:
    return datetime.now(UTC)
