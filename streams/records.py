"""A window's health record: its facts, scored (streams/score.py), as the sink and the
health topic take it."""

from __future__ import annotations

from typing import Any

from streams.score import WindowFacts, score
from streams.state import TerminalState, Window, WindowConfig

__all__ = ["drain_rate", "health_record", "open_record", "open_records"]


def drain_rate(state: TerminalState) -> float | None:
    """Battery drain in %/hour over the latest discharging run within the span (one pass,
    no copies: the history is walked once, remembering where the run started)."""
    first = last = None
    for entry in state.battery_hist:
        if entry[2]:
            first = None
        else:
            if first is None:
                first = entry
            last = entry
    if first is None or last is None or first is last or last[0] - first[0] < 300:
        return None
    hours = float(last[0] - first[0]) / 3600
    return round(float(first[1] - last[1]) / hours, 1)


def health_record(
    state: TerminalState, start: int, w: Window, cfg: WindowConfig, late: int, *, final: bool
) -> dict[str, Any]:
    """The health record of window ``w`` (final once closed, else provisional)."""
    latencies = sorted(w.latencies)
    facts = WindowFacts(
        signal_type=w.sig_type,
        signal_avg_dbm=w.sig_sum / w.sig_n if w.sig_n else None,
        dropouts=w.dropouts,
        battery_level_pct=w.battery,
        charging=w.charging,
        battery_temp_c=w.temp_max,
        drain_pct_per_hour=drain_rate(state),
        txn_total=w.txn,
        txn_declined=w.declined,
        txn_failed=w.failed,
        auth_p95_ms=latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
        printer_paper=w.printer,
        online=True,
    )
    health = score(facts)
    return {
        "terminal_id": state.terminal_id,
        "merchant_id": state.merchant_id,
        "window_start": start,
        "window_end": start + cfg.window_s,
        "last_ts": w.last_ts,
        "score": health.score,
        "components": {
            "signal": health.signal,
            "battery": health.battery,
            "txn": health.txn,
            "printer": health.printer,
        },
        "reasons": health.reasons,
        "facts": {
            "samples": w.samples,
            "signal_avg_dbm": facts.signal_avg_dbm,
            "signal_min_dbm": w.sig_min,
            "signal_type": w.sig_type,
            "dropouts": w.dropouts,
            "battery_level_pct": w.battery,
            "charging": w.charging,
            "battery_temp_c": w.temp_max,
            "drain_pct_per_hour": facts.drain_pct_per_hour,
            "txn": w.txn,
            "approved": w.approved,
            "declined": w.declined,
            "failed": w.failed,
            "decline_rate": w.declined / w.txn if w.txn else None,
            "error_rate": w.failed / w.txn if w.txn else None,
            "auth_p95_ms": facts.auth_p95_ms,
            "printer_paper": w.printer,
            "late": late,
        },
        "final": final,
    }


def open_record(state: TerminalState, start: int, cfg: WindowConfig) -> dict[str, Any] | None:
    """The provisional health record of one open window (None once it has closed)."""
    w = state.windows.get(start)
    return None if w is None else health_record(state, start, w, cfg, state.late, final=False)


def open_records(state: TerminalState, cfg: WindowConfig) -> list[dict[str, Any]]:
    """Provisional health records of every window still open (updated until they close)."""
    return [
        health_record(state, start, state.windows[start], cfg, state.late, final=False)
        for start in sorted(state.windows)
    ]
