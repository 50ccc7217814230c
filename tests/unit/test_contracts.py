"""The wire contracts: what the bridge accepts, and the reason and field of what it rejects."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from posflow.contracts import (
    CONTRACT_VERSION,
    Accepted,
    ContractError,
    DeadLetter,
    IngestEnvelope,
    Kind,
    Reason,
    Rejected,
    Telemetry,
    TopicRef,
    Transaction,
    parse_topic,
    validate_message,
)
from tests.unit import samples
from tests.unit.samples import MERCHANT, RECEIVED_AT, REMOVE, TERMINAL


def check(
    kind: str, payload: dict[str, Any] | bytes, *, topic: str | None = None
) -> Accepted | Rejected:
    raw = payload if isinstance(payload, bytes) else samples.encode(payload)
    return validate_message(topic or samples.topic(kind), raw, received_at=RECEIVED_AT, mqtt_mid=7)


def accepted(kind: str, payload: dict[str, Any]) -> IngestEnvelope:
    result = check(kind, payload)
    assert isinstance(result, Accepted), result
    return result.envelope


def rejected(kind: str, payload: dict[str, Any] | bytes, *, topic: str | None = None) -> DeadLetter:
    result = check(kind, payload, topic=topic)
    assert isinstance(result, Rejected), result
    return result.dead_letter


# --- accepted messages -------------------------------------------------------------------


def test_valid_telemetry_becomes_an_envelope_keyed_by_terminal() -> None:
    envelope = accepted("telemetry", samples.telemetry())
    assert envelope.v == CONTRACT_VERSION == 1
    assert envelope.kind is Kind.TELEMETRY
    assert (envelope.merchant_id, envelope.terminal_id) == (MERCHANT, TERMINAL)
    assert envelope.source_topic == "pos/v1/M-0001/T-0001/telemetry"
    assert envelope.received_at == RECEIVED_AT
    assert envelope.mqtt_mid == 7
    assert envelope.kafka_key() == b"T-0001"
    assert isinstance(envelope.payload, Telemetry)
    assert envelope.payload.battery.level_pct == 87
    assert envelope.payload.heartbeat_interval_s == 30
    assert envelope.payload.ts == datetime(2026, 11, 23, 16, 6, 50, 123000, tzinfo=UTC)


def test_transaction_envelope_is_keyed_by_merchant_for_per_merchant_order() -> None:
    envelope = accepted("txn", samples.txn())
    assert envelope.kafka_key() == b"M-0001"
    assert isinstance(envelope.payload, Transaction)
    assert envelope.payload.amount_minor == 1250
    assert envelope.payload.currency == "AUD"


def test_status_envelope_is_keyed_by_terminal() -> None:
    envelope = accepted("status", samples.status(state="offline", reason="last will"))
    assert envelope.kafka_key() == b"T-0001"
    assert envelope.payload.kind == "status"


def test_optional_fields_take_their_defaults_when_left_out() -> None:
    payload = samples.telemetry(location=REMOVE, heartbeat_interval_s=REMOVE)
    payload["signal"] = {"type": "wifi"}
    envelope = accepted("telemetry", payload)
    assert isinstance(envelope.payload, Telemetry)
    assert envelope.payload.location is None
    assert envelope.payload.heartbeat_interval_s == 30
    assert envelope.payload.signal.rssi_dbm is None


def test_envelope_json_is_compact_and_round_trips() -> None:
    envelope = accepted("txn", samples.txn())
    data = envelope.to_json()
    assert isinstance(data, bytes)
    assert b" " not in data
    decoded = json.loads(data)
    assert decoded["payload"]["amount_minor"] == 1250
    assert decoded["received_at"] == "2026-11-23T16:06:50.456000Z"
    assert IngestEnvelope.from_json(data) == envelope


def test_received_at_is_stored_in_utc_whatever_offset_the_bridge_passes() -> None:
    plus_two = RECEIVED_AT.astimezone(timezone(timedelta(hours=2)))
    result = validate_message(
        samples.topic("status"),
        samples.encode(samples.status()),
        received_at=plus_two,
        mqtt_mid=None,
    )
    assert isinstance(result, Accepted)
    assert result.envelope.received_at.utcoffset() == timedelta(0)
    assert result.envelope.received_at == RECEIVED_AT
    # QoS 0 messages carry no packet id.
    assert result.envelope.mqtt_mid == 0


def test_refund_without_original_and_void_with_original_are_accepted() -> None:
    accepted("txn", samples.txn(type="refund"))
    accepted("txn", samples.txn(type="void", original_txn_id="T-0001:000041"))


def test_a_card_number_as_merchant_id_is_card_data_the_merchant_segment_is_not_authenticated() -> (
    None
):
    # The broker binds a login to the topic's terminal segment only: a terminal can write
    # anything in the merchant segment, so a card number there must not become a Kafka key.
    merchant = "4111111111111111"
    payload = samples.txn(merchant_id=merchant)
    result = check("txn", payload, topic=samples.topic("txn", merchant=merchant))
    assert isinstance(result, Rejected), result
    assert result.dead_letter.reason == Reason.CARD_DATA
    assert merchant not in result.dead_letter.model_dump_json()


def test_numeric_terminal_serial_that_passes_luhn_is_an_identifier_not_a_card_number() -> None:
    terminal = "4111111111111111"  # the broker authenticated this login
    payload = samples.txn(terminal_id=terminal)
    result = check("txn", payload, topic=samples.topic("txn", terminal=terminal))
    assert isinstance(result, Accepted), result


def test_long_float_fraction_is_not_mistaken_for_a_card_number() -> None:
    # 0.4111111111111111: the digits after a decimal point are a fraction, not a PAN.
    accepted("telemetry", samples.telemetry(**{"location.lat": 0.4111111111111111}))


def test_naive_received_at_is_a_programming_error_in_the_bridge() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        validate_message(
            samples.topic("txn"),
            samples.encode(samples.txn()),
            received_at=datetime(2026, 11, 23),  # noqa: DTZ001 -- the point of the test
            mqtt_mid=1,
        )


# --- topics --------------------------------------------------------------------------------


def test_parse_topic_returns_merchant_terminal_and_kind() -> None:
    assert parse_topic("pos/v1/M-0001/T.7_x/txn") == TopicRef("M-0001", "T.7_x", Kind.TXN)


@pytest.mark.parametrize(
    ("topic", "says"),
    [
        ("pos/v1/M-0001/T-0001", "is not of the form"),
        ("pos/v1/M-0001/T-0001/txn/extra", "is not of the form"),
        ("pay/v1/M-0001/T-0001/txn", "is not of the form"),
        ("pos/v2/M-0001/T-0001/txn", "has version 'v2'"),
        ("pos/v1/M 1/T-0001/txn", "invalid merchant_id 'M 1'"),
        ("pos/v1/M-0001/-T/txn", "invalid terminal_id '-T'"),
        ("pos/v1/M-0001/+/txn", "invalid terminal_id '+'"),
        ("pos/v1/M-0001/T-0001/payments", "ends in 'payments'"),
        ("", "is not of the form"),
    ],
)
def test_unknown_topics_are_rejected_saying_what_is_wrong(topic: str, says: str) -> None:
    with pytest.raises(ContractError) as caught:
        parse_topic(topic)
    assert caught.value.reason is Reason.UNKNOWN_TOPIC
    assert says in caught.value.message
    assert caught.value.field is None


def test_message_on_unknown_topic_goes_to_dead_letter() -> None:
    dead = rejected("txn", samples.txn(), topic="pos/v1/M-0001/T-0001/payments")
    assert dead.reason is Reason.UNKNOWN_TOPIC
    assert dead.original_topic == "pos/v1/M-0001/T-0001/payments"
    assert '"amount_minor": 1250' in dead.payload_redacted


# --- rejected messages: one test per kind of bad input -----------------------------------------


def test_malformed_json_is_rejected_with_its_position() -> None:
    dead = rejected("telemetry", b'{"v": 1, "kind": "telemetry",')
    assert dead.reason is Reason.MALFORMED_JSON
    assert dead.field is None
    assert dead.message.startswith("payload is not valid JSON: ")
    assert "line 1 column" in dead.message
    assert dead.payload_redacted == '{"v": 1, "kind": "telemetry",'


def test_json_that_is_not_an_object_is_a_wrong_type() -> None:
    dead = rejected("status", b"[1, 2, 3]")
    assert dead.reason is Reason.WRONG_TYPE
    assert dead.field is None
    assert dead.message == "payload must be a JSON object, got an array"


def test_string_for_an_integer_is_a_wrong_type_naming_the_nested_field() -> None:
    dead = rejected("telemetry", samples.telemetry(**{"battery.level_pct": "87"}))
    assert dead.reason is Reason.WRONG_TYPE
    assert dead.field == "battery.level_pct"
    assert dead.message == "field battery.level_pct: must be an integer, got a string '87'"


def test_boolean_amount_is_a_wrong_type_not_money() -> None:
    dead = rejected("txn", samples.txn(amount_minor=True))
    assert dead.reason is Reason.WRONG_TYPE
    assert dead.field == "amount_minor"


def test_object_where_a_block_is_expected_must_be_an_object() -> None:
    dead = rejected("telemetry", samples.telemetry(printer="ok"))
    assert dead.reason is Reason.WRONG_TYPE
    assert dead.field == "printer"
    assert dead.message == "field printer: must be an object, got a string 'ok'"


def test_missing_top_level_field_is_named() -> None:
    dead = rejected("txn", samples.txn(txn_id=REMOVE))
    assert dead.reason is Reason.MISSING_FIELD
    assert dead.field == "txn_id"
    assert dead.message == "field txn_id: is required but missing"


def test_missing_nested_field_is_named_by_its_dotted_path() -> None:
    dead = rejected("telemetry", samples.telemetry(**{"battery.charging": REMOVE}))
    assert dead.reason is Reason.MISSING_FIELD
    assert dead.field == "battery.charging"


def test_void_without_the_original_transaction_is_missing_a_field() -> None:
    dead = rejected("txn", samples.txn(type="void"))
    assert dead.reason is Reason.MISSING_FIELD
    assert dead.field == "original_txn_id"
    assert "required for a void" in dead.message


def test_sale_naming_an_original_transaction_is_invalid() -> None:
    dead = rejected("txn", samples.txn(original_txn_id="T-0001:000001"))
    assert dead.reason is Reason.INVALID_VALUE
    assert dead.field == "original_txn_id"


def test_unknown_field_is_rejected_top_level_and_nested() -> None:
    top = rejected("status", samples.status(colour="green"))
    assert (top.reason, top.field) == (Reason.UNKNOWN_FIELD, "colour")
    assert top.message == "field colour: is not a field of the status v1 contract"
    nested = rejected("telemetry", samples.telemetry(**{"battery.voltage_mv": 3700}))
    assert (nested.reason, nested.field) == (Reason.UNKNOWN_FIELD, "battery.voltage_mv")


@pytest.mark.parametrize("amount", [12.5, 12.0, 1e3])
def test_float_amount_is_float_money(amount: float) -> None:
    dead = rejected("txn", samples.txn(amount_minor=amount))
    assert dead.reason is Reason.FLOAT_MONEY
    assert dead.field == "amount_minor"
    assert dead.message == (
        "field amount_minor: money must be an integer number of minor units (e.g. cents), "
        f"got {amount!r}"
    )


def test_float_tip_is_float_money() -> None:
    dead = rejected("txn", samples.txn(tip_minor=0.5))
    assert (dead.reason, dead.field) == (Reason.FLOAT_MONEY, "tip_minor")


def test_float_for_a_non_money_integer_is_just_a_wrong_type() -> None:
    dead = rejected("telemetry", samples.telemetry(uptime_s=1.5))
    assert (dead.reason, dead.field) == (Reason.WRONG_TYPE, "uptime_s")


@pytest.mark.parametrize("currency", ["XYZ", "eur", "EURO", ""])
def test_unknown_currency_is_rejected(currency: str) -> None:
    dead = rejected("txn", samples.txn(currency=currency))
    assert dead.reason is Reason.UNKNOWN_CURRENCY
    assert dead.field == "currency"
    assert "ISO 4217" in dead.message


def test_out_of_range_value_says_the_bound_and_the_value() -> None:
    dead = rejected("telemetry", samples.telemetry(**{"battery.level_pct": 140}))
    assert dead.reason is Reason.OUT_OF_RANGE
    assert dead.field == "battery.level_pct"
    assert dead.message == "field battery.level_pct: must be at most 100, got 140"


def test_amount_above_the_cap_is_out_of_range() -> None:
    dead = rejected("txn", samples.txn(amount_minor=10**12 + 1))
    assert (dead.reason, dead.field) == (Reason.OUT_OF_RANGE, "amount_minor")
    assert dead.message == "field amount_minor: must be at most 1000000000000, got 1000000000001"


def test_negative_sequence_number_is_out_of_range() -> None:
    dead = rejected("status", samples.status(seq=-1))
    assert (dead.reason, dead.field) == (Reason.OUT_OF_RANGE, "seq")
    assert dead.message == "field seq: must be at least 0, got -1"


def test_too_long_text_is_out_of_range() -> None:
    dead = rejected("txn", samples.txn(decline_code="TOO-LONG-CODE"))
    assert (dead.reason, dead.field) == (Reason.OUT_OF_RANGE, "decline_code")
    assert dead.message == "field decline_code: must be at most 8 characters, got 13"


def test_timestamp_without_offset_is_naive() -> None:
    dead = rejected("telemetry", samples.telemetry(ts="2026-11-23T16:06:50"))
    assert dead.reason is Reason.NAIVE_TIMESTAMP
    assert dead.field == "ts"
    assert "UTC offset" in dead.message


def test_unparseable_timestamp_is_an_invalid_value() -> None:
    dead = rejected("status", samples.status(ts="yesterday"))
    assert (dead.reason, dead.field) == (Reason.INVALID_VALUE, "ts")
    assert "RFC 3339" in dead.message


def test_value_outside_a_fixed_set_is_invalid() -> None:
    dead = rejected("telemetry", samples.telemetry(**{"battery.health": "excellent"}))
    assert dead.reason is Reason.INVALID_VALUE
    assert dead.field == "battery.health"
    assert dead.message == (
        "field battery.health: must be 'good', 'fair', 'poor' or 'unknown', got 'excellent'"
    )


def test_id_not_matching_the_pattern_is_invalid() -> None:
    dead = rejected("txn", samples.txn(card_last4="11a1"))
    assert (dead.reason, dead.field) == (Reason.INVALID_VALUE, "card_last4")


def test_infinite_float_is_invalid() -> None:
    dead = rejected("telemetry", samples.telemetry(**{"location.accuracy_m": float("inf")}))
    assert (dead.reason, dead.field) == (Reason.INVALID_VALUE, "location.accuracy_m")


@pytest.mark.parametrize("version", [2, 0, "1", True, 1.0])
def test_other_contract_versions_are_unsupported(version: object) -> None:
    dead = rejected("status", samples.status(v=version))
    assert dead.reason is Reason.UNSUPPORTED_VERSION
    assert dead.field == "v"
    assert "this bridge accepts v=1" in dead.message


def test_missing_version_is_a_missing_field() -> None:
    dead = rejected("status", samples.status(v=REMOVE))
    assert (dead.reason, dead.field) == (Reason.MISSING_FIELD, "v")


def test_payload_for_another_merchant_is_an_identity_mismatch() -> None:
    dead = rejected("txn", samples.txn(merchant_id="M-0002"))
    assert dead.reason is Reason.IDENTITY_MISMATCH
    assert dead.field == "merchant_id"
    assert dead.message == (
        "field merchant_id: payload says 'M-0002' but the topic's merchant_id is 'M-0001'"
    )


def test_payload_for_another_terminal_is_an_identity_mismatch() -> None:
    dead = rejected("telemetry", samples.telemetry(terminal_id="T-9999"))
    assert (dead.reason, dead.field) == (Reason.IDENTITY_MISMATCH, "terminal_id")


def test_payload_kind_differing_from_the_topic_kind_is_an_identity_mismatch() -> None:
    dead = rejected("telemetry", samples.txn(), topic=samples.topic("telemetry"))
    assert (dead.reason, dead.field) == (Reason.IDENTITY_MISMATCH, "kind")
    assert "'txn' message but was published on a 'telemetry' topic" in dead.message


def test_unknown_kind_in_payload_is_an_invalid_value() -> None:
    dead = rejected("status", samples.status(kind="heartbeat"))
    assert (dead.reason, dead.field) == (Reason.INVALID_VALUE, "kind")


def test_oversize_payload_is_rejected_before_anything_else() -> None:
    payload = b"\xff" + b"x" * 70_000
    dead = rejected("txn", payload)
    assert dead.reason is Reason.OVERSIZE
    assert dead.payload_size == 70_001
    assert dead.message == "payload is 70001 bytes, over the limit of 65536 bytes"
    assert len(dead.payload_redacted) == 4096


def test_max_bytes_is_configurable() -> None:
    raw = samples.encode(samples.status())
    result = validate_message(
        samples.topic("status"), raw, received_at=RECEIVED_AT, mqtt_mid=1, max_bytes=len(raw) - 1
    )
    assert isinstance(result, Rejected)
    assert result.dead_letter.reason is Reason.OVERSIZE


def test_oversize_preview_cut_through_a_card_number_leaves_none_of_its_digits() -> None:
    # The 4096 + 64 byte preview window ends in the middle of the card number.
    payload = b'{"note": "' + b"x" * 4140 + b'4111111111111111"}' + b" " * 70_000
    dead = rejected("txn", payload)
    assert dead.reason is Reason.OVERSIZE
    assert "41111" not in dead.to_json().decode()


def test_non_utf8_payload_is_rejected_with_a_hex_preview() -> None:
    dead = rejected("telemetry", b'{"v": 1, "x": "\xff\xfe"}')
    assert dead.reason is Reason.NOT_UTF8
    assert dead.field is None
    assert dead.message == "payload is not UTF-8: invalid start byte at byte 15"
    assert dead.payload_redacted.startswith("hex:")
    preview = from_hex_preview(dead.payload_redacted)
    assert preview == '{"v": 1, "x": "\ufffd\ufffd"}'


def test_non_utf8_payload_with_a_card_number_has_it_redacted_in_the_hex_preview() -> None:
    dead = rejected("txn", b"\xff pan 4111 1111 1111 1111")
    assert dead.reason is Reason.NOT_UTF8
    preview = from_hex_preview(dead.payload_redacted)
    assert preview == "\ufffd pan [REDACTED-PAN]"
    assert b"4111111111111111".hex(":") not in dead.payload_redacted


def from_hex_preview(preview: str) -> str:
    assert preview.startswith("hex:")
    return bytes.fromhex(preview.removeprefix("hex:").replace(":", "")).decode()


# --- card data ---------------------------------------------------------------------------------

PAN = "4111111111111111"


def assert_no_pan(dead: DeadLetter, pan: str = PAN) -> None:
    text = dead.to_json().decode()
    assert pan not in text
    assert pan[:8] not in text.replace("-", "").replace(" ", "")


def test_card_number_in_a_top_level_field_is_card_data_naming_the_field() -> None:
    dead = rejected("txn", samples.txn(card_token=PAN))
    assert dead.reason is Reason.CARD_DATA
    assert dead.field == "card_token"
    assert dead.message.startswith("payload contains a 16-digit card number in field card_token")
    assert '"card_token": "[REDACTED-PAN]"' in dead.payload_redacted
    assert_no_pan(dead)


def test_card_number_in_a_nested_field_is_card_data_naming_the_path() -> None:
    dead = rejected("telemetry", samples.telemetry(**{"signal.carrier": f"card {PAN}"}))
    assert (dead.reason, dead.field) == (Reason.CARD_DATA, "signal.carrier")
    assert_no_pan(dead)


@pytest.mark.parametrize("pan", ["4111-1111-1111-1111", "4111 1111 1111 1111", "3782 822463 10005"])
def test_dashed_or_spaced_card_number_is_card_data(pan: str) -> None:
    dead = rejected("status", samples.status(reason=f"customer card {pan}"))
    assert (dead.reason, dead.field) == (Reason.CARD_DATA, "reason")
    assert pan not in dead.to_json().decode()
    assert "[REDACTED-PAN]" in dead.payload_redacted


def test_card_number_as_a_bare_json_number_is_card_data() -> None:
    dead = rejected("txn", samples.txn(amount_minor=int(PAN)))
    assert (dead.reason, dead.field) == (Reason.CARD_DATA, "amount_minor")
    assert_no_pan(dead)


def test_card_number_in_a_list_names_the_index() -> None:
    dead = rejected("status", samples.status(extra=["ok", {"n": PAN}]))
    assert (dead.reason, dead.field) == (Reason.CARD_DATA, "extra.1.n")


def test_card_number_spelled_with_json_escapes_is_still_card_data() -> None:
    escaped = "".join(f"\\u{ord(c):04x}" for c in PAN)
    raw = samples.encode(samples.status(reason="PLACEHOLDER")).replace(
        b"PLACEHOLDER", escaped.encode()
    )
    dead = rejected("status", raw)
    assert (dead.reason, dead.field) == (Reason.CARD_DATA, "reason")
    assert "[REDACTED-PAN]" in dead.payload_redacted
    assert escaped not in dead.to_json().decode()


def test_card_number_in_malformed_json_is_card_data_and_redacted() -> None:
    dead = rejected("txn", f'{{"pan": {PAN}, "oops'.encode())
    assert dead.reason is Reason.CARD_DATA
    assert dead.field is None
    assert dead.payload_redacted == '{"pan": "[REDACTED]", "oops'
    assert_no_pan(dead)


def test_track_2_data_is_card_data() -> None:
    dead = rejected("txn", samples.txn(decline_code=f";{PAN}=25121010000000000000?"))
    assert dead.reason is Reason.CARD_DATA
    assert dead.field == "decline_code"
    assert "track 2 data" in dead.message
    assert "[REDACTED-TRACK]" in dead.payload_redacted
    assert_no_pan(dead)


def test_track_1_data_is_card_data() -> None:
    dead = rejected("status", samples.status(reason=f"%B{PAN}^DOE/JANE^2512101000000000000?"))
    assert (dead.reason, dead.field) == (Reason.CARD_DATA, "reason")
    assert "track 1 data" in dead.message
    assert "DOE/JANE" not in dead.to_json().decode()
    assert_no_pan(dead)


@pytest.mark.parametrize("key", ["cvv", "CVV2", "cvc", "cid"])
def test_cvv_key_is_card_data_and_its_value_redacted(key: str) -> None:
    dead = rejected("txn", samples.txn(**{key: "123"}))
    assert dead.reason is Reason.CARD_DATA
    assert dead.field == key
    assert "a CVV field" in dead.message
    assert f'"{key}": "[REDACTED]"' in dead.payload_redacted
    assert '"123"' not in dead.payload_redacted


def test_card_number_key_is_card_data_even_with_a_short_value() -> None:
    dead = rejected("txn", samples.txn(card_number="1111"))
    assert (dead.reason, dead.field) == (Reason.CARD_DATA, "card_number")
    assert "a card number field" in dead.message


def test_card_number_in_the_topic_is_redacted_from_the_dead_letter() -> None:
    dead = rejected("txn", samples.txn(), topic=f"pos/v1/M-0001/T-0001/txn/{PAN}")
    assert dead.reason is Reason.UNKNOWN_TOPIC
    assert dead.original_topic == "pos/v1/M-0001/T-0001/txn/[REDACTED-PAN]"
    assert_no_pan(dead)


def test_card_token_that_is_a_card_number_is_refused_by_the_model_too() -> None:
    with pytest.raises(ValueError, match="card_token"):
        Transaction.model_validate({**samples.txn(card_token=PAN), "ts": RECEIVED_AT})


# --- records -----------------------------------------------------------------------------------


def test_dead_letter_round_trips_through_json() -> None:
    dead = rejected("telemetry", samples.telemetry(**{"battery.level_pct": 140}))
    data = dead.to_json()
    assert json.loads(data)["reason"] == "out_of_range"
    assert DeadLetter.from_json(data) == dead


def test_dead_letter_redacts_card_data_whoever_builds_it() -> None:
    dead = DeadLetter(
        reason=Reason.CARD_DATA,
        message=f"saw {PAN}",
        field=None,
        original_topic="pos/v1/M/T/txn",
        received_at=RECEIVED_AT,
        mqtt_mid=None,
        payload_redacted=f'{{"cvv": "123", "n": "{PAN}"}}',
        payload_size=10,
    )
    assert dead.message == "saw [REDACTED-PAN]"
    assert dead.payload_redacted == '{"cvv": "[REDACTED]", "n": "[REDACTED-PAN]"}'


def test_envelope_from_bad_json_raises_contract_error_with_field() -> None:
    data = json.loads(accepted("txn", samples.txn()).to_json())
    data["payload"]["amount_minor"] = 1.5
    with pytest.raises(ContractError) as caught:
        IngestEnvelope.from_json(json.dumps(data).encode())
    assert caught.value.reason is Reason.FLOAT_MONEY
    assert caught.value.field == "payload.amount_minor"


def test_envelope_from_non_json_raises_malformed_json() -> None:
    with pytest.raises(ContractError) as caught:
        IngestEnvelope.from_json(b"not json")
    assert caught.value.reason is Reason.MALFORMED_JSON


def test_envelope_must_agree_with_its_payload() -> None:
    envelope = accepted("txn", samples.txn())
    with pytest.raises(ValueError, match="must equal the payload's"):
        IngestEnvelope(
            v=1,
            kind=Kind.TXN,
            merchant_id="M-0002",
            terminal_id=TERMINAL,
            source_topic=envelope.source_topic,
            received_at=RECEIVED_AT,
            mqtt_mid=1,
            payload=envelope.payload,
        )


def test_models_are_frozen() -> None:
    envelope = accepted("status", samples.status())
    with pytest.raises(ValueError, match="frozen"):
        envelope.mqtt_mid = 9  # type: ignore[misc]


# --- hostile input: parser differentials and impossible clocks ----------------------------


def test_a_key_given_twice_in_one_object_is_refused_not_last_one_wins() -> None:
    raw = samples.encode(samples.txn()).replace(
        b'"amount_minor": 1250', b'"amount_minor": 1250, "amount_minor": 125000'
    )
    assert raw.count(b'"amount_minor"') == 2
    dead = rejected("txn", raw)
    assert (dead.reason, dead.field) == (Reason.DUPLICATE_KEY, "amount_minor")
    assert dead.message == (
        "field amount_minor: the key appears more than once in one JSON object; "
        "send each field once"
    )
    assert "125000" in dead.payload_redacted  # the evidence is kept for the vendor


def test_a_duplicate_key_in_a_nested_object_is_refused_too() -> None:
    raw = samples.encode(samples.telemetry()).replace(
        b'"level_pct": 87', b'"level_pct": 87, "level_pct": 3'
    )
    dead = rejected("telemetry", raw)
    assert (dead.reason, dead.field) == (Reason.DUPLICATE_KEY, "level_pct")


def test_the_same_key_in_sibling_objects_is_not_a_duplicate() -> None:
    # No contract payload repeats a field name across objects, so the check itself is
    # asked: a key is a duplicate only within one object.
    from posflow.contracts.validate import _duplicate_key

    assert _duplicate_key('{"a": {"x": 1}, "b": {"x": 2}, "x": 3}') is None
    assert _duplicate_key('{"a": {"x": 1}, "b": {"y": 2, "y": 3}}') == "y"


def test_a_timestamp_in_the_year_9999_is_refused_at_the_edge() -> None:
    dead = rejected("telemetry", samples.telemetry(ts="9999-12-31T23:59:59Z"))
    assert (dead.reason, dead.field) == (Reason.IMPLAUSIBLE_TIMESTAMP, "ts")
    assert dead.message.startswith("field ts: 9999-12-31T23:59:59+00:00 is ")
    assert "days ahead of the time of receipt (2026-11-23T16:06:50+00:00)" in dead.message
    assert "at most 24 hours ahead" in dead.message


def test_a_timestamp_years_behind_receipt_is_refused() -> None:
    dead = rejected("txn", samples.txn(ts="0001-01-01T00:00:00+14:00"))
    assert (dead.reason, dead.field) == (Reason.IMPLAUSIBLE_TIMESTAMP, "ts")
    assert "behind the time of receipt" in dead.message
    assert "at most 30 days behind" in dead.message


@pytest.mark.parametrize(
    "skew", [timedelta(hours=23, minutes=59), -timedelta(days=29, hours=23), timedelta(0)]
)
def test_clock_drift_and_store_and_forward_within_the_allowance_are_accepted(
    skew: timedelta,
) -> None:
    ts = (RECEIVED_AT + skew).isoformat()
    assert accepted("txn", samples.txn(ts=ts)).payload.ts == RECEIVED_AT + skew


def test_the_clock_allowance_is_configurable() -> None:
    raw = samples.encode(samples.status(ts=(RECEIVED_AT + timedelta(minutes=10)).isoformat()))
    result = validate_message(
        samples.topic("status"),
        raw,
        received_at=RECEIVED_AT,
        mqtt_mid=1,
        clock_ahead=timedelta(minutes=5),
    )
    assert isinstance(result, Rejected)
    assert result.dead_letter.reason is Reason.IMPLAUSIBLE_TIMESTAMP
    assert "10 minutes ahead" in result.dead_letter.message
