"""The bridge's internal record: an envelope the bridge validated, marked by a Kafka header.

The ingest bridge is the one place that runs the full contract (pydantic models, the
card-data scan of the raw text, identity, duplicate keys, clock plausibility). What it
writes to Kafka carries the record header ``posflow-record: bridge/1``; a consumer
decodes such a record with :func:`decode_envelope`, a typed msgspec decoder, instead of
validating it again (a few µs instead of 20-90 µs a record).

What the fast path still checks, because it costs next to nothing: valid JSON; every
required field present, no unknown field; JSON types (an integer is not a string, a
bool is not an integer); enumerations (kinds, battery health, transaction types,
schemes ...); the contract's numeric ranges and string lengths (every value fits its
column); identifier patterns; timezone-aware timestamps; envelope and payload agreeing
on kind, merchant and terminal; a transaction's ISO 4217 currency and its
``original_txn_id`` rule; and card numbers and track data in every field that could
hold one (free text, and integers of 13 digits or more: the card guard's scan, when a
run of 12 digits or separators is there at all).

What it does not check again (the bridge did, before it wrote the record): duplicate
JSON keys (the bridge wrote the JSON itself), card-named JSON keys (``cvv``, ``pan``:
an unknown field is refused anyway), and the terminal clock against the time of
receipt.

A record without the header, or with a version this code does not know, gets the full
check (:meth:`IngestEnvelope.from_json` and the card scan), as every record did before.
The header is trusted only where Kafka lets the bridge alone write the raw topics
(docs/security.md, "Kafka: who may write the raw topics").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, ClassVar, Final, Literal, TypeAlias

import msgspec

from posflow.contracts._common import ID_PATTERN, ContractError, Kind, Reason
from posflow.contracts.cardguard import find_card_data, identifier_runs
from posflow.contracts.records import IngestEnvelope
from posflow.contracts.terminal import (
    ISO_4217_CODES,
    MAX_AMOUNT_MINOR,
    NEEDS_ORIGINAL,
    NO_ORIGINAL,
)

__all__ = [
    "BRIDGE_HEADER",
    "BRIDGE_V1",
    "RECORD_HEADER",
    "BridgeBattery",
    "BridgeEnvelope",
    "BridgeLocation",
    "BridgePrinter",
    "BridgeSignal",
    "BridgeStatus",
    "BridgeTelemetry",
    "BridgeTransaction",
    "DecodedEnvelope",
    "decode_envelope",
    "decode_trusted",
    "validate_untrusted",
]

RECORD_HEADER: Final = "posflow-record"
BRIDGE_V1: Final = b"bridge/1"
# What the bridge puts on every envelope it writes (one Kafka header: name, value).
BRIDGE_HEADER: Final[tuple[str, bytes]] = (RECORD_HEADER, BRIDGE_V1)

Headers: TypeAlias = Iterable[tuple[str, bytes | None]]

# --- the typed shape: the contract's fields, types, enumerations and ranges ---------------

# Python's "$" also matches before a final newline; "\\Z" only at the very end.
_Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN.removesuffix("$") + r"\Z")]
_Aware = Annotated[datetime, msgspec.Meta(tz=True)]
_Count = Annotated[int, msgspec.Meta(ge=0)]
_Money = Annotated[int, msgspec.Meta(ge=0, le=MAX_AMOUNT_MINOR)]
_Short = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_TxnId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+\Z")]


class _Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """Immutable, no unknown fields; not tracked by the garbage collector (the structs hold
    only scalars and other structs, never a cycle), so a batch of thousands of them adds
    no collector passes."""


class BridgeBattery(_Struct, frozen=True):
    level_pct: Annotated[int, msgspec.Meta(ge=0, le=100)]
    charging: bool
    temperature_c: Annotated[float, msgspec.Meta(ge=-40, le=100)]
    health: Literal["good", "fair", "poor", "unknown"]


class BridgeSignal(_Struct, frozen=True):
    type: Literal["lte", "5g", "3g", "2g", "wifi", "ethernet", "none"]
    rssi_dbm: Annotated[int, msgspec.Meta(ge=-150, le=0)] | None = None
    rsrp_dbm: Annotated[int, msgspec.Meta(ge=-156, le=-31)] | None = None
    sinr_db: Annotated[float, msgspec.Meta(ge=-20, le=40)] | None = None
    wifi_rssi_dbm: Annotated[int, msgspec.Meta(ge=-100, le=0)] | None = None
    carrier: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class BridgePrinter(_Struct, frozen=True):
    paper: Literal["ok", "low", "out", "jammed", "absent"]


class BridgeLocation(_Struct, frozen=True):
    lat: Annotated[float, msgspec.Meta(ge=-90, le=90)]
    lon: Annotated[float, msgspec.Meta(ge=-180, le=180)]
    accuracy_m: Annotated[float, msgspec.Meta(ge=0)]


class _Payload(_Struct, frozen=True, tag_field="kind"):
    kind: ClassVar[Kind]
    v: Literal[1]
    merchant_id: _Id
    terminal_id: _Id
    ts: _Aware
    seq: _Count


class BridgeTelemetry(_Payload, frozen=True, tag="telemetry"):
    """:class:`~posflow.contracts.Telemetry` as the bridge accepted it (same field names)."""

    kind: ClassVar[Kind] = Kind.TELEMETRY
    battery: BridgeBattery
    signal: BridgeSignal
    printer: BridgePrinter
    app_version: _Short
    firmware_version: _Short
    uptime_s: _Count
    tamper: bool
    location: BridgeLocation | None = None
    heartbeat_interval_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 30


class BridgeTransaction(_Payload, frozen=True, tag="txn"):
    """:class:`~posflow.contracts.Transaction` as the bridge accepted it (same field names)."""

    kind: ClassVar[Kind] = Kind.TXN
    txn_id: _TxnId
    type: Literal["sale", "refund", "void", "preauth", "capture", "reversal"]
    amount_minor: _Money
    currency: Annotated[str, msgspec.Meta(min_length=3, max_length=3)]
    status: Literal["approved", "declined", "error", "timeout"]
    auth_latency_ms: Annotated[int, msgspec.Meta(ge=0, le=600_000)]
    scheme: Literal["visa", "mastercard", "amex", "discover", "jcb", "unionpay", "maestro", "other"]
    entry_mode: Literal["chip", "contactless", "swipe", "manual", "wallet"]
    tip_minor: _Money = 0
    decline_code: Annotated[str, msgspec.Meta(max_length=8)] | None = None
    card_last4: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4}\Z")] | None = None
    card_token: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    original_txn_id: _TxnId | None = None


class BridgeStatus(_Payload, frozen=True, tag="status"):
    """:class:`~posflow.contracts.Status` as the bridge accepted it (same field names)."""

    kind: ClassVar[Kind] = Kind.STATUS
    state: Literal["online", "offline"]
    reason: Annotated[str, msgspec.Meta(max_length=128)] | None = None


class BridgeEnvelope(_Struct, frozen=True):
    """:class:`~posflow.contracts.IngestEnvelope` as the bridge wrote it (same field names)."""

    v: Literal[1]
    kind: Kind
    merchant_id: _Id
    terminal_id: _Id
    source_topic: str
    received_at: _Aware
    mqtt_mid: _Count
    payload: BridgeTelemetry | BridgeTransaction | BridgeStatus


DecodedEnvelope: TypeAlias = IngestEnvelope | BridgeEnvelope
"""An accepted envelope: fully validated (pydantic) or decoded from the bridge's record."""

_DECODER: Final = msgspec.json.Decoder(BridgeEnvelope)

# --- decoding --------------------------------------------------------------------------------


def decode_envelope(value: bytes | None, headers: Headers = ()) -> DecodedEnvelope:
    """The envelope of one Kafka record of the raw topics (telemetry, txn, status).

    A record the bridge marked ``bridge/1`` gets the typed decoder
    (:func:`decode_trusted`); any other record the full contract check
    (:func:`validate_untrusted`). Raises :class:`ContractError` (reason, message,
    field) for a record to dead-letter; nothing else for any bytes.
    """
    raw = value or b""
    for name, mark in headers:
        if name == RECORD_HEADER:
            if mark == BRIDGE_V1:
                return decode_trusted(raw)
            break  # an unknown version: this code cannot know what it promises
    return validate_untrusted(raw)


def validate_untrusted(raw: bytes) -> IngestEnvelope:
    """The full check: the envelope contract (pydantic) and the card scan of the raw text."""
    envelope = IngestEnvelope.from_json(raw)
    found = find_card_data(
        raw.decode("utf-8", "replace"),
        ignore=identifier_runs(envelope.merchant_id, envelope.terminal_id),
    )
    if found is not None:
        raise ContractError(Reason.CARD_DATA, f"the envelope contains {found}; it is not stored")
    return envelope


def decode_trusted(raw: bytes) -> BridgeEnvelope:
    """The typed decoder for a record the bridge wrote (see the module's docstring)."""
    try:
        envelope = _DECODER.decode(raw)
    except msgspec.ValidationError as exc:
        raise _invalid(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ContractError(
            Reason.MALFORMED_JSON, f"bridge record is not valid JSON: {exc}"
        ) from None
    payload = envelope.payload
    for name, outer, inner in (
        ("kind", envelope.kind, payload.kind),
        ("merchant_id", envelope.merchant_id, payload.merchant_id),
        ("terminal_id", envelope.terminal_id, payload.terminal_id),
    ):
        if outer != inner:
            raise ContractError(
                Reason.IDENTITY_MISMATCH,
                f"field payload.{name}: the envelope says {str(outer)!r}, its payload "
                f"{str(inner)!r} (bridge record)",
                f"payload.{name}",
            )
    if isinstance(payload, BridgeTransaction):
        _check_transaction(payload)
    text = _free_text(envelope)
    if _MAYBE_CARD.search(text) is not None:  # rare: a run of 12+ digits in free text
        found = find_card_data(
            text, ignore=identifier_runs(envelope.merchant_id, envelope.terminal_id)
        )
        if found is not None:
            raise ContractError(
                Reason.CARD_DATA,
                f"the envelope contains {found}; it is not stored (bridge record)",
            )
    return envelope


# Every card number and track holds 12 digits or separators in a row (the card guard's
# own pre-filter); text without such a run needs no scan.
_MAYBE_CARD = re.compile(r"[0-9 -]{12}")
_CARD_SIZED = 10**12  # the shortest card number has 13 digits


def _free_text(envelope: BridgeEnvelope) -> str:
    """Where card data could be in a decoded record, one field per line: its free-text
    strings, and numbers without a bound below 13 digits. Enumerations, patterned and
    bounded fields cannot hold a card number, nor can a fraction's digits. (The card
    guard's scan of the whole record costs 3-10 µs, and its byte pre-filter fires on most
    records: a longitude's fraction.) ``tests/unit/test_internal_records.py`` puts a card
    number in every field."""
    p = envelope.payload
    parts = [envelope.source_topic, envelope.merchant_id, envelope.terminal_id]
    numbers: list[float] = [envelope.mqtt_mid, p.seq]
    if isinstance(p, BridgeTelemetry):
        parts += (p.signal.carrier or "", p.app_version, p.firmware_version)
        numbers.append(p.uptime_s)
        if p.location is not None:
            numbers.append(p.location.accuracy_m)  # the one float without an upper bound
    elif isinstance(p, BridgeTransaction):
        parts += (p.txn_id, p.card_token or "", p.original_txn_id or "")
    else:
        parts.append(p.reason or "")
    parts += (f"{n:.0f}" for n in numbers if n >= _CARD_SIZED)
    return "\n".join(parts)


def _check_transaction(txn: BridgeTransaction) -> None:
    """The transaction rules a type cannot state: a known currency, the original's link."""
    if txn.currency not in ISO_4217_CODES:
        raise ContractError(
            Reason.UNKNOWN_CURRENCY,
            f"field payload.currency: unknown currency {txn.currency!r} (bridge record)",
            "payload.currency",
        )
    if txn.original_txn_id is None and txn.type in NEEDS_ORIGINAL:
        raise ContractError(
            Reason.MISSING_FIELD,
            f"field payload.original_txn_id: is required for a {txn.type} (bridge record)",
            "payload.original_txn_id",
        )
    if txn.original_txn_id is not None and txn.type in NO_ORIGINAL:
        raise ContractError(
            Reason.INVALID_VALUE,
            f"field payload.original_txn_id: must be null for a {txn.type} (bridge record)",
            "payload.original_txn_id",
        )


# --- msgspec's error -> reason and dotted field ---------------------------------------------

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_NAMED = re.compile(r"`(?P<name>[^`]+)`")
_REASONS: Final = (
    ("Object missing required field", Reason.MISSING_FIELD),
    ("Object contains unknown field", Reason.UNKNOWN_FIELD),
    ("Invalid enum value", Reason.INVALID_VALUE),
    ("Invalid value", Reason.INVALID_VALUE),
    ("Expected `datetime` with a timezone", Reason.NAIVE_TIMESTAMP),
    ("Invalid RFC3339", Reason.INVALID_VALUE),
    ("Expected `str` matching", Reason.INVALID_VALUE),
    ("Expected `str` of length", Reason.OUT_OF_RANGE),
)
_RANGE = re.compile(r"^Expected `(?:int|float)` [<>]=? ")


def _invalid(message: str) -> ContractError:
    """A ContractError from a msgspec ValidationError message: reason, field, the words."""
    at = _AT.search(message)
    problem = message[: at.start()] if at else message
    parts = [p for p in re.split(r"[.\[\]]", at.group("path")) if p] if at else []
    if problem.startswith(("Object missing required field", "Object contains unknown field")):
        named = _NAMED.search(problem)
        if named is not None:
            parts.append(named.group("name"))
    field = ".".join(parts) or None
    reason = next((r for prefix, r in _REASONS if problem.startswith(prefix)), None)
    if reason is None:
        reason = Reason.OUT_OF_RANGE if _RANGE.match(problem) else Reason.WRONG_TYPE
    if field in ("v", "payload.v") and reason is Reason.INVALID_VALUE:
        reason = Reason.UNSUPPORTED_VERSION
    where = f"field {field}: " if field else ""
    return ContractError(reason, f"{where}{problem} (bridge record)", field)
