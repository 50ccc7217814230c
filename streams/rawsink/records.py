"""Kafka records -> envelopes for the raw sink, or dead letters saying why not.

Pure functions, no I/O: the raw sink (:mod:`streams.rawsink.sink`) routes what these
return to the writers or to the dead-letter topic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeAlias

from aiokafka.structs import ConsumerRecord

from posflow.contracts import ContractError, DeadLetter, Kind, Reason, redact
from posflow.contracts.internal import DecodedEnvelope, decode_envelope
from posflow.contracts.records import PAYLOAD_PREVIEW_CHARS

__all__ = ["Record", "Rejection", "Sorted", "dead_letter", "refused_by_database", "sort_records"]

Record: TypeAlias = ConsumerRecord[bytes, bytes]

# Room for the redaction marks: a redacted preview never grows past the contract's limit.
_PREVIEW_CHARS = PAYLOAD_PREVIEW_CHARS - 512


@dataclass(frozen=True)
class Rejection:
    """A record that will not be written, and why."""

    record: Record
    error: ContractError


@dataclass
class Sorted:
    """One Kafka batch, sorted by destination."""

    telemetry: list[DecodedEnvelope] = field(default_factory=list)
    transactions: list[DecodedEnvelope] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    dead_letters: list[Record] = field(default_factory=list)  # to count, per minute and reason
    # id(envelope) -> its record, to dead-letter a row the database refuses.
    origin: dict[int, Record] = field(default_factory=dict)


def sort_records(
    records: Iterable[Record],
    *,
    telemetry_topic: str,
    txn_topic: str,
    deadletter_topic: str | None = None,
) -> Sorted:
    """Decode each record as an ingest envelope of the kind its topic carries.

    A record the bridge marked as its own (header ``posflow-record: bridge/1``) gets
    the typed decoder; any other record the full contract check and card scan
    (:func:`~posflow.contracts.internal.decode_envelope`). A record is rejected if it
    is not a valid envelope, holds a kind other than its topic's, or carries card data.
    """
    out = Sorted()
    expected = {telemetry_topic: Kind.TELEMETRY, txn_topic: Kind.TXN}
    for record in records:
        if record.topic == deadletter_topic:
            out.dead_letters.append(record)
            continue
        try:
            envelope = decode_envelope(record.value, record.headers)
        except ContractError as exc:
            out.rejected.append(Rejection(record, exc))
            continue
        kind = expected.get(record.topic)
        if envelope.kind is not kind:
            error = ContractError(
                Reason.INVALID_VALUE,
                f"a {envelope.kind.value} envelope on {record.topic}, which carries "
                f"{kind.value if kind else 'nothing for this sink'}",
                "kind",
            )
            out.rejected.append(Rejection(record, error))
            continue
        out.origin[id(envelope)] = record
        if kind is Kind.TELEMETRY:
            out.telemetry.append(envelope)
        else:
            out.transactions.append(envelope)
    return out


def refused_by_database(batch: Sorted, envelope: DecodedEnvelope, why: str) -> Rejection:
    """The rejection of an envelope the database refused, with its record."""
    error = ContractError(
        Reason.INVALID_VALUE,
        f"the database refused the {envelope.kind.value} row of terminal "
        f"{envelope.terminal_id}: {why}",
    )
    return Rejection(batch.origin[id(envelope)], error)


def dead_letter(rejection: Rejection, *, now: datetime | None = None) -> DeadLetter:
    """The dead letter of a rejected record: reason, where it was, a redacted preview.

    The whole text is redacted before it is cut, so a cut can never leave the first
    digits of a card number behind; DeadLetter redacts its text fields once more.
    """
    record, error = rejection.record, rejection.error
    raw = record.value or b""
    preview = redact(raw.decode("utf-8", "replace"))[:_PREVIEW_CHARS]
    return DeadLetter(
        reason=error.reason,
        message=error.message,
        field=error.field,
        original_topic=f"{record.topic}/{record.partition}/{record.offset}",
        received_at=now or datetime.now(UTC),
        payload_redacted=preview,
        payload_size=len(raw),
    )
