"""What every contract shares: the version, topic grammar, reason codes and the error type.

Also the translation of a pydantic ``ValidationError`` into a reason code, a dotted
field path and a sentence a terminal vendor can act on.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Self

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import ErrorDetails, PydanticCustomError, ValidationError

from posflow.contracts.cardguard import redact

__all__ = [
    "CONTRACT_VERSION",
    "ID_PATTERN",
    "TOPIC_PREFIX",
    "ContractError",
    "Id",
    "JsonContract",
    "JsonRecord",
    "Kind",
    "Reason",
    "TopicRef",
    "UtcDatetime",
    "Version",
    "contract_error",
    "parse_topic",
]

CONTRACT_VERSION = 1
TOPIC_PREFIX = f"pos/v{CONTRACT_VERSION}"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Kind(StrEnum):
    """The three message kinds a terminal publishes: the last segment of its topic."""

    TELEMETRY = "telemetry"
    TXN = "txn"
    STATUS = "status"


class Reason(StrEnum):
    """Machine-readable dead-letter reason codes."""

    NOT_UTF8 = "not_utf8"
    MALFORMED_JSON = "malformed_json"
    DUPLICATE_KEY = "duplicate_key"
    OVERSIZE = "oversize"
    UNKNOWN_TOPIC = "unknown_topic"
    UNSUPPORTED_VERSION = "unsupported_version"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    WRONG_TYPE = "wrong_type"
    FLOAT_MONEY = "float_money"
    UNKNOWN_CURRENCY = "unknown_currency"
    OUT_OF_RANGE = "out_of_range"
    NAIVE_TIMESTAMP = "naive_timestamp"
    IMPLAUSIBLE_TIMESTAMP = "implausible_timestamp"
    INVALID_VALUE = "invalid_value"
    IDENTITY_MISMATCH = "identity_mismatch"
    CARD_DATA = "card_data"


class ContractError(Exception):
    """Input that breaks a contract: a reason code, a human message and the field's dotted path."""

    def __init__(self, reason: Reason, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field

    def __repr__(self) -> str:
        return f"ContractError({self.reason.value!r}, {self.message!r}, field={self.field!r})"


class TopicRef(NamedTuple):
    merchant_id: str
    terminal_id: str
    kind: Kind


_KINDS = {k.value: k for k in Kind}
_TOPIC_SHAPE = f"{TOPIC_PREFIX}/{{merchant_id}}/{{terminal_id}}/{{{'|'.join(_KINDS)}}}"


def parse_topic(topic: str) -> TopicRef:
    """Merchant, terminal and kind of a ``pos/v1/{merchant_id}/{terminal_id}/{kind}`` topic.

    Raises ContractError (reason ``unknown_topic``) for anything else.
    """
    return _parse_topic(topic)


# Topics repeat for every message of a terminal; a bounded cache makes the common case a lookup.
@functools.lru_cache(maxsize=1 << 16)
def _parse_topic(topic: str) -> TopicRef:
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != "pos":
        raise ContractError(
            Reason.UNKNOWN_TOPIC, f"topic {_show(topic)} is not of the form {_TOPIC_SHAPE}"
        )
    _, version, merchant_id, terminal_id, kind = parts
    if version != f"v{CONTRACT_VERSION}":
        raise ContractError(
            Reason.UNKNOWN_TOPIC,
            f"topic {_show(topic)} has version {_show(version)}; "
            f"this contract is v{CONTRACT_VERSION} ({_TOPIC_SHAPE})",
        )
    for name, value in (("merchant_id", merchant_id), ("terminal_id", terminal_id)):
        if _ID.fullmatch(value) is None:
            raise ContractError(
                Reason.UNKNOWN_TOPIC,
                f"topic {_show(topic)} has an invalid {name} {_show(value)}: "
                "use 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit",
            )
    known = _KINDS.get(kind)
    if known is None:
        raise ContractError(
            Reason.UNKNOWN_TOPIC,
            f"topic {_show(topic)} ends in {_show(kind)}; expected one of {', '.join(_KINDS)}",
        )
    return TopicRef(merchant_id, terminal_id, known)


class Model(BaseModel):
    """Base of every contract model: immutable, no unknown fields, no type coercion."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class JsonContract(Model):
    """A contract read from JSON; ``contract_name`` is what its errors call it."""

    contract_name: ClassVar[str]

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Parse JSON; raises ContractError saying what is wrong and where."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise contract_error(exc, contract=cls.contract_name) from None


class JsonRecord(JsonContract):
    """A contract that is also written as JSON: a Kafka record value."""

    def to_json(self) -> bytes:
        """Compact JSON, the record value."""
        return self.__pydantic_serializer__.to_json(self)


def _exactly_version(value: object) -> object:
    # Strict Literal[1] still accepts true and 1.0; a version is exactly the integer.
    if type(value) is not int or value != CONTRACT_VERSION:
        raise PydanticCustomError(
            "unsupported_version",
            "unsupported contract version {version}: this bridge accepts v={supported}",
            {"version": _show(value), "supported": CONTRACT_VERSION},
        )
    return value


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


Version = Annotated[Literal[1], BeforeValidator(_exactly_version)]
Id = Annotated[str, Field(pattern=ID_PATTERN)]
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]

# ---------------------------------------------------------------------------------------------
# ValidationError -> reason, field, message

MONEY_FIELDS = frozenset({"amount_minor", "tip_minor"})

_R = Reason
# pydantic error type -> reason and message; {value}, {type}, {got} (type and value),
# {length}, {contract} and the
# error's context ({le}, {expected}, {pattern}, ...) are filled in.
_MESSAGES: dict[str, tuple[Reason, str]] = {
    "json_invalid": (_R.MALFORMED_JSON, "payload is not valid JSON: {error}"),
    "missing": (_R.MISSING_FIELD, "is required but missing"),
    "extra_forbidden": (_R.UNKNOWN_FIELD, "is not a field of the {contract} contract"),
    "int_type": (_R.WRONG_TYPE, "must be an integer, got {got}"),
    "string_type": (_R.WRONG_TYPE, "must be a string, got {got}"),
    "bool_type": (_R.WRONG_TYPE, "must be true or false, got {got}"),
    "float_type": (_R.WRONG_TYPE, "must be a number, got {got}"),
    "model_type": (_R.WRONG_TYPE, "must be an object, got {got}"),
    "model_attributes_type": (_R.WRONG_TYPE, "must be an object, got {got}"),
    "dict_type": (_R.WRONG_TYPE, "must be an object, got {got}"),
    "list_type": (_R.WRONG_TYPE, "must be an array, got {got}"),
    "datetime_type": (_R.WRONG_TYPE, "must be an RFC 3339 timestamp string, got {got}"),
    "greater_than": (_R.OUT_OF_RANGE, "must be greater than {gt}, got {value}"),
    "greater_than_equal": (_R.OUT_OF_RANGE, "must be at least {ge}, got {value}"),
    "less_than": (_R.OUT_OF_RANGE, "must be less than {lt}, got {value}"),
    "less_than_equal": (_R.OUT_OF_RANGE, "must be at most {le}, got {value}"),
    "string_too_long": (_R.OUT_OF_RANGE, "must be at most {max_length} characters, got {length}"),
    "string_too_short": (_R.OUT_OF_RANGE, "must be at least {min_length} characters, got {length}"),
    "timezone_aware": (
        _R.NAIVE_TIMESTAMP,
        "timestamp must carry a UTC offset ('Z' or '+02:00'), got {value}",
    ),
    "literal_error": (_R.INVALID_VALUE, "must be {expected}, got {value}"),
    "enum": (_R.INVALID_VALUE, "must be {expected}, got {value}"),
    "string_pattern_mismatch": (_R.INVALID_VALUE, "must match {pattern}, got {value}"),
    "finite_number": (_R.INVALID_VALUE, "must be a finite number, got {value}"),
    "union_tag_not_found": (_R.MISSING_FIELD, "is missing its discriminator {discriminator}"),
    "union_tag_invalid": (_R.INVALID_VALUE, "must be one of {expected_tags}, got {tag}"),
}
_TIMESTAMP = (
    _R.INVALID_VALUE,
    "must be an RFC 3339 timestamp like '2026-11-23T16:06:50Z', got {value}",
)
_FLOAT_MONEY = (
    _R.FLOAT_MONEY,
    "money must be an integer number of minor units (e.g. cents), got {value}",
)
# Custom errors raised by the contract models' own validators; their message is final.
_CUSTOM = {
    "unsupported_version": _R.UNSUPPORTED_VERSION,
    "unknown_currency": _R.UNKNOWN_CURRENCY,
    "card_data": _R.CARD_DATA,
    "missing_related_field": _R.MISSING_FIELD,
    "unexpected_related_field": _R.INVALID_VALUE,
}
_JSON_TYPES = {
    type(None): "null",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}


class _Fill(dict[str, object]):
    def __missing__(self, key: str) -> str:
        return "?"


def _show(value: object, limit: int = 40) -> str:
    """A short repr for a message: card data redacted, and a cut never leaves part of a number."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    text = redact(repr(value))
    if len(text) <= limit:
        return text
    return text[: limit - 1].rstrip("0123456789 -") + "…"


def contract_error(exc: ValidationError, *, contract: str) -> ContractError:
    """The first error of ``exc`` as a ContractError with a reason code and a dotted field path."""
    first: ErrorDetails = exc.errors(include_url=False)[0]
    kind = first["type"]
    ctx: dict[str, Any] = first.get("ctx") or {}
    loc = [str(part) for part in first["loc"]]
    # A discriminated union puts the tag in the path (payload.txn.amount_minor): drop it.
    loc = [p for i, p in enumerate(loc) if not (i and loc[i - 1] == "payload" and p in _KINDS)]
    if "field" in ctx:
        loc.append(str(ctx["field"]))
    field = ".".join(loc) or None
    value = first.get("input")

    if kind in _CUSTOM:
        reason, problem = _CUSTOM[kind], first["msg"]
    else:
        if kind == "int_type" and loc and loc[-1] in MONEY_FIELDS and isinstance(value, float):
            reason, template = _FLOAT_MONEY
        elif kind.startswith(("datetime_", "date_", "time_")) and kind != "datetime_type":
            reason, template = _TIMESTAMP
        else:
            reason, template = _MESSAGES.get(kind, (_R.INVALID_VALUE, "{msg}, got {value}"))
        if field is None and reason is _R.WRONG_TYPE:
            template = "payload must be a JSON object, got {type}"
        fill = _Fill(ctx)
        fill.update(
            value=_show(value),
            type=_JSON_TYPES.get(type(value), type(value).__name__),
            got="null" if value is None else f"{_JSON_TYPES.get(type(value), '?')} {_show(value)}",
            length=len(value) if isinstance(value, str) else "?",
            contract=contract,
            msg=first["msg"],
        )
        problem = template.format_map(fill)
    where = f"field {field}: " if field else ""
    return ContractError(reason, where + problem, field)
