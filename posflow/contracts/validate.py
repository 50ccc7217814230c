"""The ingest edge: one MQTT message in, an envelope or a dead letter out.

``validate_message`` is pure and never raises for any topic or payload bytes.
Checks run cheapest and most fundamental first: size, encoding, topic, card
data (on the raw text, before JSON parsing, so even malformed JSON holding a
card number is redacted), JSON and the payload model, then identity.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime, timedelta
from typing import NamedTuple

from pydantic import ValidationError

from posflow.contracts._common import ContractError, Kind, Reason, TopicRef, parse_topic
from posflow.contracts._common import contract_error as _contract_error
from posflow.contracts.cardguard import find_card_data, identifier_runs, redact
from posflow.contracts.records import PAYLOAD_PREVIEW_CHARS, DeadLetter, IngestEnvelope
from posflow.contracts.terminal import Status, Telemetry, TerminalPayload, Transaction

__all__ = [
    "DEFAULT_CLOCK_AHEAD",
    "DEFAULT_CLOCK_BEHIND",
    "DEFAULT_MAX_BYTES",
    "Accepted",
    "Rejected",
    "validate_message",
]

DEFAULT_MAX_BYTES = 65536
# A terminal's clock may drift, and store-and-forward uploads payments hours or days late;
# a timestamp outside these bounds of the bridge's own clock is a broken clock or a forgery.
# Far-future times would poison every event-time window downstream (a year-9999 reading
# crashed the health worker), so they stop here.
DEFAULT_CLOCK_AHEAD = timedelta(hours=24)
DEFAULT_CLOCK_BEHIND = timedelta(days=30)
_HEX_PREVIEW_BYTES = 256
# A cut through a card number must not leave its first digits behind, escaped or not.
_TRAILING_DIGITS = re.compile(r"(?:[0-9 -]|\\u[0-9a-fA-F]{0,4}|\\)+\Z")
_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")

_KIND_VALUES = frozenset(k.value for k in Kind)
_MODELS: dict[Kind, type[Telemetry | Transaction | Status]] = {
    Kind.TELEMETRY: Telemetry,
    Kind.TXN: Transaction,
    Kind.STATUS: Status,
}


class Accepted(NamedTuple):
    envelope: IngestEnvelope


class Rejected(NamedTuple):
    dead_letter: DeadLetter


class _Problem(NamedTuple):
    reason: Reason
    message: str
    field: str | None
    preview: str
    shown_topic: str


def validate_message(
    topic: str,
    payload: bytes,
    *,
    received_at: datetime,
    mqtt_mid: int | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    clock_ahead: timedelta = DEFAULT_CLOCK_AHEAD,
    clock_behind: timedelta = DEFAULT_CLOCK_BEHIND,
) -> Accepted | Rejected:
    """Validate one MQTT message against contract v1.

    Returns Accepted with the Kafka envelope, or Rejected with a dead letter naming
    the reason, the field and a redacted preview. Raises only for a programming error
    in the arguments the bridge controls (a naive ``received_at``, a negative ``mqtt_mid``).
    """
    if received_at.utcoffset() is None:
        raise ValueError("received_at must be timezone-aware: pass datetime.now(UTC)")
    if mqtt_mid is not None and mqtt_mid < 0:
        raise ValueError(f"mqtt_mid must be >= 0 or None, got {mqtt_mid}")
    outcome = _check(topic, payload, max_bytes)
    if not isinstance(outcome, _Problem):
        outcome = _check_clock(
            outcome,
            topic,
            payload,
            received_at=received_at,
            ahead=clock_ahead,
            behind=clock_behind,
        )
    if isinstance(outcome, _Problem):
        return Rejected(
            DeadLetter(
                reason=outcome.reason,
                message=outcome.message,
                field=outcome.field,
                original_topic=outcome.shown_topic,
                received_at=received_at,
                mqtt_mid=mqtt_mid,
                payload_redacted=outcome.preview,
                payload_size=len(payload),
            )
        )
    ref, parsed = outcome
    return Accepted(
        IngestEnvelope(
            v=1,
            kind=ref.kind,
            merchant_id=ref.merchant_id,
            terminal_id=ref.terminal_id,
            source_topic=topic,
            received_at=received_at,
            mqtt_mid=0 if mqtt_mid is None else mqtt_mid,
            payload=parsed,
        )
    )


def _check(
    topic: str, payload: bytes, max_bytes: int
) -> tuple[TopicRef, TerminalPayload] | _Problem:
    if len(payload) > max_bytes:
        return _Problem(
            Reason.OVERSIZE,
            f"payload is {len(payload)} bytes, over the limit of {max_bytes} bytes",
            None,
            _cut_preview(payload),
            _safe_topic(topic),
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Problem(
            Reason.NOT_UTF8,
            f"payload is not UTF-8: {exc.reason} at byte {exc.start}",
            None,
            _hex_preview(payload),
            _safe_topic(topic),
        )
    try:
        ref = parse_topic(topic)
    except ContractError as exc:
        return _Problem(exc.reason, exc.message, None, _text_preview(text), _safe_topic(topic))

    return _check_payload(text, payload, ref, topic)


def _check_payload(
    text: str, payload: bytes, ref: TopicRef, topic: str
) -> tuple[TopicRef, TerminalPayload] | _Problem:
    # The topic is well formed: its digit runs are identities for the card-data check. A
    # rejected message's topic is shown redacted all the same, but for the terminal id (the
    # broker's authenticated username): the ACL lets a terminal publish under any merchant
    # segment, so a broken app can put a card number there.
    ignore = _identity_digits(ref.merchant_id, ref.terminal_id)
    topic = redact(topic, ignore=_identity_digits("", ref.terminal_id))
    found = find_card_data(text, ignore=ignore)
    if found is None and "\\u" in text:
        # JSON \u escapes can spell digits ("\u0034\u0031..."): scan what a parser sees too.
        found = find_card_data(_unescape(text), ignore=ignore)
    if found is not None:
        field = _locate_card_data(text, ignore)
        where = f" in field {field}" if field else ""
        return _Problem(
            Reason.CARD_DATA,
            f"payload contains {found}{where}: terminals must never send card data "
            "(send scheme, card_last4 and card_token instead); the payload is redacted here",
            field,
            _text_preview(text),
            topic,
        )
    try:
        parsed = _MODELS[ref.kind].model_validate_json(payload)
    except ValidationError as exc:
        error = _payload_error(exc, ref)
        return _Problem(error.reason, error.message, error.field, _text_preview(text), topic)
    duplicate = _duplicate_key(text)
    if duplicate is not None:
        # pydantic (like most parsers) keeps the last value; another reader may keep the
        # first. One object, two meanings: refuse it rather than pick one.
        return _Problem(
            Reason.DUPLICATE_KEY,
            f"field {duplicate}: the key appears more than once in one JSON object; "
            "send each field once",
            duplicate,
            _text_preview(text),
            topic,
        )
    mismatch = _identity_mismatch(parsed, ref)
    if mismatch is not None:
        return _Problem(
            mismatch.reason, mismatch.message, mismatch.field, _text_preview(text), topic
        )
    return ref, parsed


class _DuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return result


def _duplicate_key(text: str) -> str | None:
    """The first key repeated within one JSON object of ``text`` (already known to parse)."""
    try:
        json.loads(text, object_pairs_hook=_unique_pairs)
    except _DuplicateKeyError as exc:
        return _show_key(exc.key)
    except (ValueError, RecursionError):
        return None  # the model's parser accepted it; nothing more to say here
    return None


def _show_key(key: str) -> str:
    # Keys of an accepted payload are the contract's names, but a duplicate may be anything.
    return redact(key)[:64]


def _check_clock(
    outcome: tuple[TopicRef, TerminalPayload],
    topic: str,
    payload: bytes,
    *,
    received_at: datetime,
    ahead: timedelta,
    behind: timedelta,
) -> tuple[TopicRef, TerminalPayload] | _Problem:
    ref, parsed = outcome
    skew = parsed.ts - received_at
    if -behind <= skew <= ahead:
        return outcome
    if skew > ahead:
        where = f"{_span(skew)} ahead of"
        limit = f"at most {_span(ahead)} ahead"
    else:
        where = f"{_span(-skew)} behind"
        limit = f"at most {_span(behind)} behind"
    text = payload.decode("utf-8", "replace")
    return _Problem(
        Reason.IMPLAUSIBLE_TIMESTAMP,
        f"field ts: {parsed.ts.isoformat()} is {where} the time of receipt "
        f"({received_at.isoformat(timespec='seconds')}); a terminal clock may be {limit}: "
        "set the terminal's clock (NTP) and resend",
        "ts",
        _text_preview(text),
        redact(topic, ignore=_identity_digits("", ref.terminal_id)),
    )


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} days"
    if seconds >= 2 * 3600:
        return f"{seconds // 3600} hours"
    if seconds >= 120:
        return f"{seconds // 60} minutes"
    return f"{seconds} s"


def _unescape(text: str) -> str:
    # Surrogate halves become U+FFFD so the result always encodes.
    return _ESCAPE.sub(_unescape_one, text) if "\\u" in text else text


def _unescape_one(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return "\ufffd" if "\ud800" <= char <= "\udfff" else char


def _locate_card_data(text: str, ignore: frozenset[str]) -> str | None:
    """Dotted path of the first JSON key or value holding card data, if the text parses."""
    try:
        return _walk(json.loads(text), (), ignore)
    except (ValueError, RecursionError):
        return None


def _walk(node: object, path: tuple[str, ...], ignore: frozenset[str]) -> str | None:
    items: list[tuple[str, object]]
    if isinstance(node, dict):
        items = [(str(key), value) for key, value in node.items()]
    elif isinstance(node, list):
        items = [(str(index), value) for index, value in enumerate(node)]
    else:
        return None
    for key, value in items:
        here = (*path, key)
        if find_card_data(key, ignore=ignore) is not None:
            return ".".join(here)
        if isinstance(value, dict | list):
            found = _walk(value, here, ignore)
            if found is not None:
                return found
        elif find_card_data(json.dumps({key: value}), ignore=ignore) is not None:
            return ".".join(here)
    return None


def _payload_error(exc: ValidationError, ref: TopicRef) -> ContractError:
    error = _contract_error(exc, contract=f"{ref.kind} v1")
    first = exc.errors(include_url=False)[0]
    value = first.get("input")
    # A known kind on another kind's topic is a routing mistake, not a bad value.
    if (
        error.field == "kind"
        and first["type"] == "literal_error"
        and isinstance(value, str)
        and value in _KIND_VALUES
    ):
        return ContractError(
            Reason.IDENTITY_MISMATCH,
            f"field kind: payload is a {value!r} message but was published on a "
            f"{ref.kind.value!r} topic",
            "kind",
        )
    return error


def _identity_mismatch(parsed: TerminalPayload, ref: TopicRef) -> ContractError | None:
    for field, sent, expected in (
        ("merchant_id", parsed.merchant_id, ref.merchant_id),
        ("terminal_id", parsed.terminal_id, ref.terminal_id),
    ):
        if sent != expected:
            return ContractError(
                Reason.IDENTITY_MISMATCH,
                f"field {field}: payload says {sent!r} but the topic's {field} is {expected!r}",
                field,
            )
    return None


@functools.lru_cache(maxsize=1 << 16)
def _identity_digits(merchant_id: str, terminal_id: str) -> frozenset[str]:
    # Only the terminal id is the broker's authenticated identity (the ACL binds the login
    # to the topic's terminal segment): a numeric terminal serial that happens to pass Luhn
    # is an identifier. The merchant segment is whatever the publisher wrote, so a card
    # number there is card data like anywhere else.
    del merchant_id
    return identifier_runs(terminal_id)


def _safe_topic(topic: str) -> str:
    # Not a valid topic, so nothing vouches for its digits; lone surrogates cannot be encoded.
    return redact(topic.encode("utf-8", "replace").decode("utf-8"))


def _redact_all(text: str) -> str:
    # Card data as sent, then card data a JSON parser would see once \u escapes are decoded.
    return redact(_unescape(redact(text)))


def _text_preview(text: str) -> str:
    return _redact_all(text)[:PAYLOAD_PREVIEW_CHARS]


def _cut_preview(payload: bytes) -> str:
    head = payload[: PAYLOAD_PREVIEW_CHARS + 64].decode("utf-8", "replace")
    return _redact_all(_TRAILING_DIGITS.sub("", head))[:PAYLOAD_PREVIEW_CHARS]


def _hex_preview(payload: bytes) -> str:
    text = _redact_all(payload.decode("utf-8", "replace"))
    # Colon-separated, so no run of hex digits can look like a card number to the redactor.
    return "hex:" + text.encode("utf-8")[:_HEX_PREVIEW_BYTES].hex(":")
