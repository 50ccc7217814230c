"""Valid terminal payloads for merchant M-0001 / terminal T-0001, built in one place.

Each builder returns a fresh dict; keyword overrides replace top-level fields, a
dotted key (``**{"battery.level_pct": 140}``) replaces a nested one, and the value
``REMOVE`` deletes the field.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any, Final

__all__ = [
    "MERCHANT",
    "RECEIVED_AT",
    "REMOVE",
    "TERMINAL",
    "apply",
    "encode",
    "status",
    "telemetry",
    "topic",
    "txn",
]

MERCHANT: Final = "M-0001"
TERMINAL: Final = "T-0001"
TS: Final = "2026-11-23T16:06:50.123Z"
RECEIVED_AT: Final = datetime(2026, 11, 23, 16, 6, 50, 456000, tzinfo=UTC)


class _Remove:
    def __repr__(self) -> str:
        return "REMOVE"


REMOVE: Final = _Remove()


def topic(kind: str, merchant: str = MERCHANT, terminal: str = TERMINAL) -> str:
    return f"pos/v1/{merchant}/{terminal}/{kind}"


def encode(payload: object) -> bytes:
    return json.dumps(payload).encode()


def apply(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with the overrides (dotted keys, ``REMOVE``) applied."""
    payload = copy.deepcopy(base)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = payload
        for parent in parents:
            node = node[parent]
        if value is REMOVE:
            del node[leaf]
        else:
            node[leaf] = value
    return payload


_COMMON: Final = {"v": 1, "merchant_id": MERCHANT, "terminal_id": TERMINAL, "ts": TS}

_TELEMETRY: Final = {
    **_COMMON,
    "kind": "telemetry",
    "seq": 41,
    "battery": {"level_pct": 87, "charging": False, "temperature_c": 31.5, "health": "good"},
    "signal": {
        "type": "lte",
        "rssi_dbm": -71,
        "rsrp_dbm": -95,
        "sinr_db": 12.5,
        "wifi_rssi_dbm": None,
        "carrier": "Telstra",
    },
    "printer": {"paper": "ok"},
    "location": {"lat": -33.8688, "lon": 151.20929999999998, "accuracy_m": 12.0},
    "app_version": "3.4.1",
    "firmware_version": "fw-2026.10",
    "uptime_s": 86400,
    "tamper": False,
    "heartbeat_interval_s": 30,
}

_TXN: Final = {
    **_COMMON,
    "kind": "txn",
    "seq": 42,
    "txn_id": "T-0001:000042",
    "type": "sale",
    "amount_minor": 1250,
    "tip_minor": 0,
    "currency": "AUD",
    "status": "approved",
    "decline_code": None,
    "auth_latency_ms": 420,
    "scheme": "visa",
    "entry_mode": "contactless",
    "card_last4": "1111",
    "card_token": "tok_9f8e7d6c5b4a",
    "original_txn_id": None,
}

_STATUS: Final = {**_COMMON, "kind": "status", "seq": 43, "state": "online", "reason": None}


def telemetry(**overrides: Any) -> dict[str, Any]:
    return apply(_TELEMETRY, overrides)


def txn(**overrides: Any) -> dict[str, Any]:
    return apply(_TXN, overrides)


def status(**overrides: Any) -> dict[str, Any]:
    return apply(_STATUS, overrides)
