"""Properties of the ingest edge: it never raises, and no card number ever leaves it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from posflow.contracts import (
    Accepted,
    DeadLetter,
    IngestEnvelope,
    Reason,
    Rejected,
    find_card_data,
    luhn_valid,
    redact,
    validate_message,
)
from tests.unit import samples
from tests.unit.samples import RECEIVED_AT

KINDS = ("telemetry", "txn", "status")
BUILDERS = {"telemetry": samples.telemetry, "txn": samples.txn, "status": samples.status}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(max_size=12), json_values, max_size=8)


def run(topic: str, payload: bytes, mqtt_mid: int | None = 1) -> Accepted | Rejected:
    result = validate_message(topic, payload, received_at=RECEIVED_AT, mqtt_mid=mqtt_mid)
    if isinstance(result, Rejected):
        dead = result.dead_letter
        assert isinstance(dead.reason, Reason)
        assert dead.message
        assert dead.payload_size == len(payload)
        assert DeadLetter.from_json(dead.to_json()) == dead
    else:
        assert IngestEnvelope.from_json(result.envelope.to_json()) == result.envelope
    return result


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    payload=st.binary(max_size=600),
    mqtt_mid=st.none() | st.integers(0, 65535),
)
def test_arbitrary_bytes_are_rejected_with_a_reason_and_never_raise(
    kind: str, payload: bytes, mqtt_mid: int | None
) -> None:
    assert isinstance(run(samples.topic(kind), payload, mqtt_mid), Rejected)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(KINDS), document=json_objects | json_values)
def test_arbitrary_json_is_rejected_with_a_reason_and_never_raises(
    kind: str, document: Any
) -> None:
    result = run(samples.topic(kind), json.dumps(document).encode())
    assert isinstance(result, Rejected)


@settings(max_examples=300, deadline=None)
@given(
    topic=st.text(max_size=80) | st.from_regex(r"\Apos/v[0-9]/[^/]{0,8}/[^/]{0,8}/[a-z]{0,10}\Z")
)
def test_arbitrary_topics_never_raise_and_only_the_right_one_accepts(topic: str) -> None:
    result = run(topic, samples.encode(samples.status()))
    if topic == samples.topic("status"):
        assert isinstance(result, Accepted)
    else:
        assert isinstance(result, Rejected)
        assert result.dead_letter.reason in {
            Reason.UNKNOWN_TOPIC,
            Reason.IDENTITY_MISMATCH,
            Reason.CARD_DATA,  # a topic id equal to a Luhn-valid number is possible, not likely
        }


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    data=st.data(),
    value=json_values,
)
def test_any_field_set_to_any_value_is_handled_and_reported_at_that_field(
    kind: str, data: st.DataObject, value: Any
) -> None:
    payload = BUILDERS[kind]()
    # Pick a field, possibly nested, and replace it.
    path = [data.draw(st.sampled_from(sorted(payload)))]
    node = payload[path[0]]
    while isinstance(node, dict) and node and data.draw(st.booleans()):
        path.append(data.draw(st.sampled_from(sorted(node))))
        node = node[path[-1]]
    result = run(samples.topic(kind), samples.encode(BUILDERS[kind](**{".".join(path): value})))
    if isinstance(result, Rejected) and (field := result.dead_letter.field) is not None:
        # The error is at the replaced field, inside it, or about a field it made necessary.
        assert field.startswith(path[0]) or field == "original_txn_id", result


@st.composite
def card_numbers(draw: st.DrawFn) -> str:
    """A Luhn-valid 13-19 digit card number (first digit 1-9, as ISO/IEC 7812 issues)."""
    length = draw(st.integers(13, 19))
    body = str(draw(st.integers(1, 9))) + "".join(
        str(d) for d in draw(st.lists(st.integers(0, 9), min_size=length - 2, max_size=length - 2))
    )
    number = next(body + str(check) for check in range(10) if luhn_valid(body + str(check)))
    assert luhn_valid(number)
    return number


@st.composite
def formatted(draw: st.DrawFn, number: str) -> str:
    """The number as written: plain, or in groups of 4 (or 4-6-5) split by a space or a dash."""
    style = draw(st.sampled_from(["plain", "4s", "4d", "465"]))
    if style == "plain":
        return number
    if style == "465" and len(number) == 15:
        return f"{number[:4]} {number[4:10]} {number[10:]}"
    sep = "-" if style == "4d" else " "
    return sep.join(number[i : i + 4] for i in range(0, len(number), 4))


# Surrounding text: anything without an ASCII digit, so the number is not part of a longer one.
no_digits = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="0123456789"),
    max_size=20,
)
around = st.tuples(no_digits, no_digits)


def assert_card_number_absent(result: Accepted | Rejected, number: str) -> None:
    assert isinstance(result, Rejected), result
    dead = result.dead_letter
    assert dead.reason is Reason.CARD_DATA, dead
    output = dead.to_json().decode()
    assert number not in output
    assert number not in output.replace(" ", "").replace("-", "")
    assert number not in json.loads(output)["payload_redacted"].replace(" ", "").replace("-", "")


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    number=card_numbers(),
    data=st.data(),
    around=around,
    where=st.sampled_from(["string", "number", "key", "nested", "list"]),
)
def test_card_number_anywhere_in_json_is_rejected_and_never_appears_in_the_dead_letter(
    kind: str, number: str, data: st.DataObject, around: tuple[str, str], where: str
) -> None:
    text = around[0] + data.draw(formatted(number)) + around[1]
    payload = BUILDERS[kind]()
    field = data.draw(st.sampled_from(sorted(payload)))
    if where == "string":
        payload[field] = text
    elif where == "number":
        payload[field] = int(number)
    elif where == "key":
        payload[text] = 1
    elif where == "nested":
        payload[field] = {"note": {"deeper": text}}
    else:
        payload[field] = [1, "two", text]
    ensure_ascii = data.draw(st.booleans())
    raw = json.dumps(payload, ensure_ascii=ensure_ascii).encode()
    assert_card_number_absent(run(samples.topic(kind), raw), number)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    number=card_numbers(),
    data=st.data(),
    prefix=no_digits,
    suffix=no_digits,
)
def test_card_number_in_text_that_is_not_json_is_rejected_and_redacted(
    kind: str, number: str, data: st.DataObject, prefix: str, suffix: str
) -> None:
    raw = (prefix + data.draw(formatted(number)) + suffix).encode()
    assert_card_number_absent(run(samples.topic(kind), raw), number)


@settings(max_examples=300, deadline=None)
@given(number=card_numbers(), prefix=no_digits, suffix=no_digits)
def test_card_number_with_invalid_utf8_is_redacted_from_the_hex_preview(
    number: str, prefix: str, suffix: str
) -> None:
    raw = prefix.encode() + b"\xff" + number.encode() + suffix.encode()
    result = run(samples.topic("txn"), raw)
    assert isinstance(result, Rejected)
    dead = result.dead_letter
    assert dead.reason is Reason.NOT_UTF8
    preview = bytes.fromhex(dead.payload_redacted.removeprefix("hex:").replace(":", ""))
    assert number.encode() not in preview
    assert number not in dead.to_json().decode()


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_redacted_text_never_holds_card_data(text: str) -> None:
    redacted = redact(text)
    assert find_card_data(redacted) is None
    assert redact(redacted) == redacted


@settings(max_examples=300, deadline=None)
@given(number=card_numbers(), data=st.data(), prefix=no_digits, suffix=no_digits)
def test_redact_removes_every_card_number(
    number: str, data: st.DataObject, prefix: str, suffix: str
) -> None:
    text = prefix + data.draw(formatted(number)) + suffix
    assert find_card_data(text) is not None
    assert number not in redact(text).replace(" ", "").replace("-", "")


# Valid payloads with random values: a real terminal's range of messages is all accepted.
# Bounded floats are finite.
# RFC 3339 offsets are whole minutes.
offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
telemetry_values = st.fixed_dictionaries(
    {
        "seq": st.integers(0, 10**12),
        "battery.level_pct": st.integers(0, 100),
        "battery.temperature_c": st.floats(-40, 100),
        "signal.rssi_dbm": st.none() | st.integers(-150, 0),
        "signal.sinr_db": st.none() | st.floats(-20, 40),
        "location.lat": st.floats(-90, 90),
        "location.lon": st.floats(-180, 180),
        "location.accuracy_m": st.floats(0, 1e6),
        "uptime_s": st.integers(0, 10**9),
        # Any clock within the allowance around the time of receipt (drift, store-and-forward);
        # hypothesis takes naive bounds and attaches the offsets itself, which move the
        # instant by up to 14 hours either way.
        "ts": st.datetimes(
            min_value=(RECEIVED_AT - timedelta(days=29)).replace(tzinfo=None),
            max_value=(RECEIVED_AT + timedelta(hours=9)).replace(tzinfo=None),
            timezones=offsets,
        ).map(datetime.isoformat),
    }
)
txn_values = st.fixed_dictionaries(
    {
        "seq": st.integers(0, 10**12),
        "amount_minor": st.integers(0, 10**12),
        "tip_minor": st.integers(0, 10**9),
        "currency": st.sampled_from(["EUR", "USD", "AUD", "JPY", "KWD", "XCG"]),
        "auth_latency_ms": st.integers(0, 600_000),
        "card_last4": st.none() | st.from_regex(r"\A[0-9]{4}\Z"),
    }
)


@settings(max_examples=300, deadline=None)
@given(values=telemetry_values)
def test_any_valid_telemetry_is_accepted(values: dict[str, Any]) -> None:
    result = run(samples.topic("telemetry"), samples.encode(samples.telemetry(**values)))
    assert isinstance(result, Accepted), result


@settings(max_examples=200, deadline=None)
@given(
    ts=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30))  # noqa: DTZ001
    .filter(
        lambda t: not -timedelta(days=31) < t - RECEIVED_AT.replace(tzinfo=None) < timedelta(days=2)
    )
    .map(lambda t: t.replace(tzinfo=UTC).isoformat())
)
def test_any_timestamp_far_from_the_time_of_receipt_is_refused(ts: str) -> None:
    result = run(samples.topic("telemetry"), samples.encode(samples.telemetry(ts=ts)))
    assert isinstance(result, Rejected), result
    assert (result.dead_letter.reason, result.dead_letter.field) == (
        Reason.IMPLAUSIBLE_TIMESTAMP,
        "ts",
    )


@settings(max_examples=300, deadline=None)
@given(values=txn_values)
def test_any_valid_transaction_is_accepted(values: dict[str, Any]) -> None:
    result = run(samples.topic("txn"), samples.encode(samples.txn(**values)))
    assert isinstance(result, Accepted), result
    assert result.envelope.payload.model_dump()["amount_minor"] == values["amount_minor"]
