"""Card data detection and redaction on raw text."""

from __future__ import annotations

import pytest

from posflow.contracts import find_card_data, luhn_valid, redact
from posflow.contracts.cardguard import identifier_runs

VISA = "4111111111111111"
AMEX = "378282246310005"
VISA_13 = "4222222222222"
PAN_19 = "6212345678901234569"


@pytest.mark.parametrize("number", [VISA, AMEX, VISA_13, PAN_19, "5555555555554444"])
def test_luhn_accepts_valid_card_numbers(number: str) -> None:
    assert luhn_valid(number)


@pytest.mark.parametrize("number", ["4111111111111112", "378282246310006", "1234567890123"])
def test_luhn_rejects_a_wrong_check_digit(number: str) -> None:
    assert not luhn_valid(number)


@pytest.mark.parametrize(
    ("text", "description"),
    [
        (f"card {VISA} ok", "a 16-digit card number"),
        (f"amex {AMEX}", "a 15-digit card number"),
        (VISA_13, "a 13-digit card number"),
        (PAN_19, "a 19-digit card number"),
        ("4111-1111-1111-1111", "a 16-digit card number"),
        ("4111 1111 1111 1111", "a 16-digit card number"),
        ("3782 822463 10005", "a 15-digit card number"),
        (f'{{"n": {VISA}}}', "a 16-digit card number"),
        (f"no.{VISA}", "a 16-digit card number"),
        (f"tel 555 {VISA[:4]} {VISA[4:8]} {VISA[8:12]} {VISA[12:]}", "a 16-digit card number"),
        (f";{VISA}=25121010000000000000?", "track 2 data"),
        (f"{VISA}D25121010000000000000", "track 2 data"),
        (f"%B{VISA}^DOE/JANE^2512101000000000000?", "track 1 data"),
        ('{"cvv": "123"}', "a CVV field"),
        ('{"CVC2": 123}', "a CVV field"),
        ('{"cid":"1234"}', "a CVV field"),
        ('{"pan": "x"}', "a card number field"),
        ('{"cardNumber": "x"}', "a card number field"),
        ('{"card_number" : "1"}', "a card number field"),
        ('{"track2": "x"}', "a track data field"),
        ('{"track_data": "x"}', "a track data field"),
        (f"é {VISA}", "a 16-digit card number"),
    ],
)
def test_find_card_data_describes_what_it_found(text: str, description: str) -> None:
    assert find_card_data(text) == description


@pytest.mark.parametrize(
    "text",
    [
        "",
        "4111111111111112",  # fails Luhn
        "411111111111",  # 12 digits: too short
        "41111111111111111111",  # 20 digits: a longer number, not a card number
        f"1{VISA}",  # embedded in a longer run of digits
        f"0.{VISA}",  # a fraction's digits
        "-33.868819999999996",
        "0000000000000000",  # no card number starts with 0
        "4111  1111  1111  1111",  # double spaces do not group a card number
        "4111_1111_1111_1111",
        '{"cvv": ""}',
        '{"card_last4": "1111", "card_token": "tok_abc"}',
        '{"ts": "2026-11-23T16:06:50.123+00:00", "seq": 41, "uptime_s": 86400}',
        "cvv: 123",  # only JSON keys name a field
    ],
)
def test_find_card_data_ignores_what_is_not_card_data(text: str) -> None:
    assert find_card_data(text) is None


def test_find_card_data_never_returns_the_number() -> None:
    found = find_card_data(f"x {VISA}")
    assert found is not None
    assert VISA not in found
    assert "1111" not in found


def test_known_identifiers_are_not_card_numbers() -> None:
    ignore = identifier_runs("M-" + VISA, "T-0001")
    assert ignore == frozenset({VISA})
    assert find_card_data(f'{{"merchant_id": "M-{VISA}"}}', ignore=ignore) is None
    assert find_card_data(f'{{"merchant_id": "M-{AMEX}"}}', ignore=ignore) is not None


def test_redact_replaces_card_numbers_and_keeps_the_rest() -> None:
    text = f"paid with {VISA} and 4111-1111-1111-1111, ref 12345."
    assert redact(text) == "paid with [REDACTED-PAN] and [REDACTED-PAN], ref 12345."


def test_redact_keeps_the_digits_around_a_grouped_card_number() -> None:
    assert redact("tel 555 4111 1111 1111 1111 ok") == "tel 555 [REDACTED-PAN] ok"


def test_redact_replaces_whole_tracks() -> None:
    text = f'{{"t2": ";{VISA}=25121010000000000000?", "t1": "%B{VISA}^DOE/JANE^2512101?"}}'
    assert redact(text) == '{"t2": "[REDACTED-TRACK]", "t1": "[REDACTED-TRACK]"}'


def test_redact_replaces_values_of_card_keys_keeping_json_valid() -> None:
    text = '{"cvv": "123", "CVV2": 456, "card_number": "4111 1111", "track1": "B1^X^"}'
    assert redact(text) == (
        '{"cvv": "[REDACTED]", "CVV2": "[REDACTED]", "card_number": "[REDACTED]", '
        '"track1": "[REDACTED]"}'
    )


def test_redact_handles_escaped_quotes_in_a_card_field_value() -> None:
    assert redact(r'{"pan": "41\"11", "x": 1}') == '{"pan": "[REDACTED]", "x": 1}'


def test_redact_returns_clean_text_unchanged() -> None:
    text = '{"v": 1, "kind": "telemetry", "location": {"lat": -33.868819999999996}}'
    assert redact(text) is text


def test_redact_works_on_non_ascii_text() -> None:
    assert redact(f"Café — {VISA} — ünïcode") == "Café — [REDACTED-PAN] — ünïcode"
    assert redact(f"é ;{VISA}=2512? ü %B{VISA}^É^2512?") == "é [REDACTED-TRACK] ü [REDACTED-TRACK]"
    assert find_card_data('{"cvv": "1", "n": "é"}') == "a CVV field"


def test_redacted_text_has_no_card_data_left() -> None:
    text = f'{VISA} {{"cvv": "1"}} ;{VISA}=2512? %B{VISA}^A^2512? 4111-1111-1111-1111'
    redacted = redact(text)
    assert find_card_data(redacted) is None
    assert redact(redacted) == redacted
