"""The bridge's internal record: a headered envelope decodes fast to the values the full
check gives; any other record gets the full check; a broken one is refused with a reason."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from posflow.contracts import Accepted, ContractError, IngestEnvelope, Reason, validate_message
from posflow.contracts.internal import (
    BRIDGE_HEADER,
    BRIDGE_V1,
    RECORD_HEADER,
    BridgeEnvelope,
    decode_envelope,
)
from posflow.storage.writers import telemetry_row, transaction_row
from streams.rawsink.records import dead_letter, sort_records
from tests.unit import samples

BRIDGE = [BRIDGE_HEADER]
TEL, TXN = "p.telemetry.v1", "p.txn.v1"
CARD = "4111 1111 1111 1111"
SAMPLES: dict[str, Callable[..., dict[str, Any]]] = {
    "telemetry": samples.telemetry,
    "txn": samples.txn,
    "status": samples.status,
}


def _bridge_value(kind: str, **overrides: Any) -> bytes:
    """What the bridge writes for the sample of ``kind``: the validated envelope's JSON."""
    body = SAMPLES[kind](**overrides)
    result = validate_message(
        samples.topic(kind), json.dumps(body).encode(), received_at=samples.RECEIVED_AT, mqtt_mid=7
    )
    assert isinstance(result, Accepted), result
    return result.envelope.to_json()


def _values(obj: object) -> object:
    """Field name -> value, recursively, for pydantic models and msgspec structs alike."""
    if isinstance(obj, BaseModel):
        return {name: _values(getattr(obj, name)) for name in type(obj).model_fields}
    if isinstance(obj, msgspec.Struct):
        fields = {name: _values(getattr(obj, name)) for name in obj.__struct_fields__}
        kind = getattr(type(obj), "kind", None)  # a payload's tag
        return fields if kind is None or "kind" in fields else {**fields, "kind": kind}
    return obj


def _refusal(
    value: bytes, headers: Sequence[tuple[str, bytes | None]]
) -> tuple[Reason, str | None]:
    with pytest.raises(ContractError) as caught:
        decode_envelope(value, headers)
    return caught.value.reason, caught.value.field


@pytest.mark.parametrize("kind", ["telemetry", "txn", "status"])
def test_a_headered_record_decodes_to_the_values_the_full_check_gives(kind: str) -> None:
    value = _bridge_value(kind)
    fast = decode_envelope(value, BRIDGE)
    full = decode_envelope(value, [])
    assert isinstance(fast, BridgeEnvelope)
    assert isinstance(full, IngestEnvelope)
    assert _values(fast) == _values(full)
    assert fast.payload.ts == full.payload.ts
    assert fast.received_at == full.received_at == samples.RECEIVED_AT


@pytest.mark.parametrize(("kind", "row"), [("telemetry", telemetry_row), ("txn", transaction_row)])
def test_the_raw_sink_stores_the_same_row_from_either_path(
    kind: str, row: Callable[[Any], tuple[object, ...]]
) -> None:
    # Optional fields left out and nulls too: the defaults must agree.
    overrides: dict[str, Any] = (
        {"location": samples.REMOVE, "heartbeat_interval_s": samples.REMOVE,
         "signal.carrier": None}
        if kind == "telemetry"
        else {"tip_minor": samples.REMOVE, "card_token": samples.REMOVE, "decline_code": "05",
              "status": "declined"}
    )  # fmt: skip
    for value in (_bridge_value(kind), _bridge_value(kind, **overrides)):
        assert row(decode_envelope(value, BRIDGE)) == row(decode_envelope(value, []))


def test_a_record_without_the_header_gets_the_full_check() -> None:
    good = _bridge_value("txn")
    void = _changed("txn", "payload.type", "void")  # a void must name the txn it acts on
    for headers in ([], [("other", BRIDGE_V1)]):
        assert isinstance(decode_envelope(good, headers), IngestEnvelope)
        with pytest.raises(ContractError) as caught:
            decode_envelope(void, headers)
        error = caught.value
        assert (error.reason, error.field) == (Reason.MISSING_FIELD, "payload.original_txn_id")
        assert "the txn_id it acts on" in error.message  # the pydantic contract's words
    with pytest.raises(ContractError) as caught:
        decode_envelope(void, BRIDGE)
    assert (caught.value.reason, caught.value.field) == (
        Reason.MISSING_FIELD,
        "payload.original_txn_id",
    )
    assert "(bridge record)" in caught.value.message


@pytest.mark.parametrize("mark", [b"bridge/2", b"bridge/0", b"bridge", b"", None])
def test_an_unknown_version_of_the_header_gets_the_full_check(mark: bytes | None) -> None:
    good = _bridge_value("telemetry")
    assert isinstance(decode_envelope(good, [(RECORD_HEADER, mark)]), IngestEnvelope)
    card = _bridge_value("txn").replace(b'"tok_9f8e7d6c5b4a"', f'"{CARD}"'.encode())
    assert _refusal(card, [(RECORD_HEADER, mark)]) == (Reason.CARD_DATA, "payload.card_token")


def test_the_first_record_header_decides_and_other_headers_are_ignored() -> None:
    value = _bridge_value("status")
    assert isinstance(decode_envelope(value, [("trace", b"x"), BRIDGE_HEADER]), BridgeEnvelope)
    # A second mark cannot upgrade a record whose first mark is unknown.
    mixed = [(RECORD_HEADER, b"bridge/9"), BRIDGE_HEADER]
    assert isinstance(decode_envelope(value, mixed), IngestEnvelope)


def _changed(kind: str, path: str, value: object = samples.REMOVE) -> bytes:
    """The bridge's record of the ``kind`` sample with one dotted field set (or removed)."""
    return json.dumps(samples.apply(json.loads(_bridge_value(kind)), {path: value})).encode()


@pytest.mark.parametrize(
    ("value", "reason", "field"),
    [
        (b'{"v": 1, "kind": "telem', Reason.MALFORMED_JSON, None),
        (b"\xff\xfe not even text", Reason.MALFORMED_JSON, None),
        (b"", Reason.MALFORMED_JSON, None),
        (b"[1, 2]", Reason.WRONG_TYPE, None),
        (_changed("telemetry", "payload.battery.charging"), Reason.MISSING_FIELD,
         "payload.battery.charging"),
        (_changed("telemetry", "received_at"), Reason.MISSING_FIELD, "received_at"),
        (_changed("telemetry", "payload.battery.level_pct", "87"), Reason.WRONG_TYPE,
         "payload.battery.level_pct"),
        (_changed("telemetry", "payload.battery.level_pct", 140), Reason.OUT_OF_RANGE,
         "payload.battery.level_pct"),
        (_changed("txn", "payload.amount_minor", 12.5), Reason.WRONG_TYPE, "payload.amount_minor"),
        (_changed("txn", "payload.currency", "ZZZ"), Reason.UNKNOWN_CURRENCY, "payload.currency"),
        (_changed("status", "payload.state", "asleep"), Reason.INVALID_VALUE, "payload.state"),
        (_changed("status", "extra", 1), Reason.UNKNOWN_FIELD, "extra"),
        (_changed("status", "v", 2), Reason.UNSUPPORTED_VERSION, "v"),
        (_changed("status", "payload.ts", "2026-11-23T16:06:50"), Reason.NAIVE_TIMESTAMP,
         "payload.ts"),
        (_changed("status", "payload.terminal_id", "T-0002"), Reason.IDENTITY_MISMATCH,
         "payload.terminal_id"),
        (_changed("status", "kind", "telemetry"), Reason.IDENTITY_MISMATCH, "payload.kind"),
        (_changed("telemetry", "payload.signal.carrier", CARD), Reason.CARD_DATA, None),
        (_changed("txn", "payload.txn_id", "4111111111111111"), Reason.CARD_DATA, None),
        (_changed("txn", "payload.card_token", CARD), Reason.CARD_DATA, None),
        (_changed("telemetry", "payload.uptime_s", 4111111111111111), Reason.CARD_DATA, None),
        (_changed("txn", "payload.original_txn_id", "T-0001:1"), Reason.INVALID_VALUE,
         "payload.original_txn_id"),
        (_changed("txn", "payload.type", "capture"), Reason.MISSING_FIELD,
         "payload.original_txn_id"),
    ],
)  # fmt: skip
def test_a_broken_headered_record_is_refused_with_its_reason_and_field(
    value: bytes, reason: Reason, field: str | None
) -> None:
    assert _refusal(value, BRIDGE) == (reason, field)
    with pytest.raises(ContractError, match=r"\(bridge record\)|not valid JSON"):
        decode_envelope(value, BRIDGE)


def _leaves(node: dict[str, Any], path: str = "") -> list[str]:
    """Every field's dotted path in a JSON document (objects only)."""
    out = []
    for key, value in node.items():
        here = f"{path}{key}"
        out += _leaves(value, f"{here}.") if isinstance(value, dict) else [here]
    return out


@pytest.mark.parametrize("kind", ["telemetry", "txn", "status"])
def test_a_card_number_in_any_field_of_a_headered_record_is_refused(kind: str) -> None:
    # Each field in turn holds a card number, as text and as an integer: the record must
    # be refused (card data, or a type/range/pattern/identity error), never accepted.
    doc = json.loads(_bridge_value(kind))
    accepted = []
    for path in _leaves(doc):
        for card in (CARD, CARD.replace(" ", ""), int(CARD.replace(" ", ""))):
            value = json.dumps(samples.apply(doc, {path: card})).encode()
            try:
                decode_envelope(value, BRIDGE)
            except ContractError:
                continue
            accepted.append((path, card))
    assert accepted == []


def test_a_numeric_terminal_id_is_not_card_data_in_a_headered_txn_id() -> None:
    terminal = "4111111111111111"  # a serial that happens to pass Luhn: an identifier
    body = samples.txn(terminal_id=terminal, txn_id=f"{terminal}:000042")
    result = validate_message(
        samples.topic("txn", terminal=terminal), json.dumps(body).encode(),
        received_at=samples.RECEIVED_AT, mqtt_mid=7,
    )  # fmt: skip
    assert isinstance(result, Accepted)
    decoded = decode_envelope(result.envelope.to_json(), BRIDGE)
    assert decoded.payload.terminal_id == terminal


def _outcome(value: bytes) -> BridgeEnvelope | IngestEnvelope | ContractError:
    try:
        return decode_envelope(value, BRIDGE)
    except ContractError as exc:
        return exc


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_with_the_header_are_refused_never_raised(value: bytes) -> None:
    outcome = _outcome(value)
    assert isinstance(outcome, ContractError)  # no bytes of <= 400 make a valid envelope
    assert outcome.reason in Reason
    assert outcome.message


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["telemetry", "txn", "status"]),
    st.data(),
)
def test_any_field_of_a_headered_record_set_to_any_json_value_is_decoded_or_refused(
    kind: str, data: st.DataObject
) -> None:
    doc = json.loads(_bridge_value(kind))
    node = data.draw(st.sampled_from([doc, doc["payload"]]))
    key = data.draw(st.sampled_from(sorted(node)))
    leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    node[key] = data.draw(leaf | st.lists(leaf, max_size=3) | st.dictionaries(st.text(), leaf))
    outcome = _outcome(json.dumps(doc).encode())
    assert isinstance(outcome, BridgeEnvelope | ContractError)
    if isinstance(outcome, ContractError):
        assert outcome.reason in Reason


def _record(topic: str, value: bytes, offset: int, headers: Any) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic, 0, offset, 0, 0, b"k", value, None, 1, len(value), headers)


def test_the_raw_sink_dead_letters_a_forged_record_and_keeps_the_good_ones() -> None:
    good = _bridge_value("telemetry")
    forged = _changed("telemetry", "payload.battery.level_pct", "full")
    out = sort_records(
        [
            _record(TEL, good, 1, BRIDGE),
            _record(TEL, forged, 2, BRIDGE),
            _record(TEL, _bridge_value("txn"), 3, BRIDGE),  # the wrong topic for its kind
            _record(TXN, _bridge_value("txn"), 4, BRIDGE),
        ],
        telemetry_topic=TEL,
        txn_topic=TXN,
    )
    assert [type(e) for e in out.telemetry + out.transactions] == [BridgeEnvelope] * 2
    got = [(r.record.offset, r.error.reason, r.error.field) for r in out.rejected]
    assert got == [
        (2, Reason.WRONG_TYPE, "payload.battery.level_pct"),
        (3, Reason.INVALID_VALUE, "kind"),
    ]
    letter = dead_letter(out.rejected[0])
    assert letter.original_topic == f"{TEL}/0/2"
    assert "bridge record" in letter.message


def test_the_bridge_mark_is_versioned() -> None:
    assert BRIDGE_HEADER == ("posflow-record", b"bridge/1")
    assert BRIDGE_V1 == b"bridge/1"
