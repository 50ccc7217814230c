"""The terminal health score: 0-100 with its components and the reasons behind them.

Components (each 0-100) and weights:

* **signal** (30%): the window's mean strength on a scale per network type —
  LTE/5G RSRP -120 dBm → 0 to -90 dBm → 100; 3G/2G RSSI -110 → 0 to -75 → 100;
  Wi-Fi RSSI -85 → 0 to -60 → 100; Ethernet 100; no network 0 — minus 25 per
  dropout (a sample with no network) in the window.
* **battery** (30%): charging 100; otherwise 100 at ≥ 50%, falling linearly to
  40 at 20%, and to 0 at 0%; minus 30 when draining faster than 20 %/hour;
  minus 40 above 45 °C; 0 above 55 °C (whatever else).
* **transactions** (30%): 100 without transactions (no evidence of trouble);
  else 100 - 300 x (error + timeout rate) - 100 x (decline rate above 15%),
  minus 20 when the p95 authorisation latency is over 3 s.
* **printer** (10%): ok 100, low 70, out or jammed 0, absent 100.

The score is the weighted sum, rounded; an offline terminal scores 0. Every
component below 70 adds a reason a person can act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["HealthScore", "WindowFacts", "score"]

WEIGHTS = {"signal": 0.3, "battery": 0.3, "txn": 0.3, "printer": 0.1}
_W_SIGNAL, _W_BATTERY, _W_TXN, _W_PRINTER = WEIGHTS.values()

_SIGNAL_SCALE = {
    "lte": (-120.0, -90.0),
    "5g": (-120.0, -90.0),
    "3g": (-110.0, -75.0),
    "2g": (-110.0, -75.0),
    "wifi": (-85.0, -60.0),
}
_PRINTER = {"ok": 100, "low": 70, "out": 0, "jammed": 0, "absent": 100}


class WindowFacts(NamedTuple):
    """What one window says about a terminal (inputs of the score).

    A named tuple, not a frozen dataclass: just as immutable, and built for every
    provisional record, where a frozen dataclass's field-by-field ``__init__`` cost
    more than the score itself.
    """

    signal_type: str | None = None
    signal_avg_dbm: float | None = None
    dropouts: int = 0
    battery_level_pct: int | None = None
    charging: bool = False
    battery_temp_c: float | None = None
    drain_pct_per_hour: float | None = None
    txn_total: int = 0
    txn_declined: int = 0
    txn_failed: int = 0  # error + timeout
    auth_p95_ms: int | None = None
    printer_paper: str | None = None
    online: bool = True


@dataclass(frozen=True)
class HealthScore:
    score: int
    signal: int
    battery: int
    txn: int
    printer: int
    reasons: list[str] = field(default_factory=list)


def _clamp(value: float) -> int:
    return round(max(0.0, min(100.0, value)))


def _linear(value: float, low: float, high: float) -> float:
    return 100.0 * (value - low) / (high - low)


def signal_score(f: WindowFacts) -> int:
    if f.signal_type in (None, "ethernet"):
        base = 100.0  # wired, or no sample in the window: no evidence of trouble
    elif f.signal_type == "none" or f.signal_avg_dbm is None:
        base = 0.0
    else:
        low, high = _SIGNAL_SCALE.get(f.signal_type, (-120.0, -90.0))
        base = _linear(f.signal_avg_dbm, low, high)
    return _clamp(base - 25 * f.dropouts)


def battery_score(f: WindowFacts) -> int:
    if f.battery_temp_c is not None and f.battery_temp_c > 55:
        return 0
    if f.charging or f.battery_level_pct is None or f.battery_level_pct >= 50:
        base = 100.0
    elif f.battery_level_pct >= 20:
        base = 40 + 60 * (f.battery_level_pct - 20) / 30
    else:
        base = 2.0 * f.battery_level_pct
    if not f.charging and f.drain_pct_per_hour is not None and f.drain_pct_per_hour > 20:
        base -= 30
    if f.battery_temp_c is not None and f.battery_temp_c > 45:
        base -= 40
    return _clamp(base)


def txn_score(f: WindowFacts) -> int:
    if f.txn_total == 0:
        return 100
    failed = f.txn_failed / f.txn_total
    declined = f.txn_declined / f.txn_total
    base = 100 - 300 * failed - 100 * max(0.0, declined - 0.15)
    if f.auth_p95_ms is not None and f.auth_p95_ms > 3000:
        base -= 20
    return _clamp(base)


def printer_score(f: WindowFacts) -> int:
    return _PRINTER.get(f.printer_paper or "ok", 100)


def score(f: WindowFacts) -> HealthScore:
    """The health score of one window, with components and reasons."""
    signal, battery, txn = signal_score(f), battery_score(f), txn_score(f)
    printer = printer_score(f)
    reasons = []
    if not f.online:
        reasons.append("offline")
    if signal < 70:
        reasons.append(
            f"weak signal ({f.signal_type or 'none'}"
            + (f", {f.signal_avg_dbm:.0f} dBm" if f.signal_avg_dbm is not None else "")
            + (f", {f.dropouts} dropouts" if f.dropouts else "")
            + ")"
        )
    if battery < 70:
        detail = [f"{f.battery_level_pct}%"] if f.battery_level_pct is not None else []
        if f.drain_pct_per_hour is not None and f.drain_pct_per_hour > 20:
            detail.append(f"draining {f.drain_pct_per_hour:.0f}%/h")
        if f.battery_temp_c is not None and f.battery_temp_c > 45:
            detail.append(f"{f.battery_temp_c:.0f} °C")
        reasons.append(f"battery ({', '.join(detail)})")
    if txn < 70:
        reasons.append(
            f"transactions failing ({f.txn_failed} errors/timeouts, {f.txn_declined} declines "
            f"of {f.txn_total})"
        )
    if printer < 70:
        reasons.append(f"printer paper {f.printer_paper}")
    # The weighted sum in WEIGHTS' order (the same float arithmetic as summing them).
    weighted = _W_SIGNAL * signal + _W_BATTERY * battery + _W_TXN * txn + _W_PRINTER * printer
    total = _clamp(weighted) if f.online else 0
    return HealthScore(total, signal, battery, txn, printer, reasons)
