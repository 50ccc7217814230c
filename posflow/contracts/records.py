"""What the ingest bridge writes to Kafka: an envelope per accepted message, else a dead letter."""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from posflow.contracts._common import (
    Id,
    JsonRecord,
    Kind,
    Reason,
    UtcDatetime,
    Version,
)
from posflow.contracts.cardguard import redact
from posflow.contracts.terminal import TerminalPayload

__all__ = ["PAYLOAD_PREVIEW_CHARS", "DeadLetter", "IngestEnvelope"]

PAYLOAD_PREVIEW_CHARS = 4096


class IngestEnvelope(JsonRecord):
    """An accepted terminal message with where and when the bridge received it.

    Kafka key: the terminal id for telemetry and status (per-terminal order), the
    merchant id for transactions (per-merchant order, which the ledger relies on).
    """

    contract_name = "ingest envelope v1"

    v: Version = 1
    kind: Kind
    merchant_id: Id
    terminal_id: Id
    source_topic: str
    received_at: UtcDatetime
    mqtt_mid: int = Field(ge=0, description="MQTT packet id; 0 for QoS 0")
    # SerializeAsAny: each payload serialises with its own model's serializer, which is
    # twice as fast as pydantic's union serializer trying the members in turn.
    payload: SerializeAsAny[Annotated[TerminalPayload, Field(discriminator="kind")]]

    @model_validator(mode="after")
    def _payload_matches(self) -> Self:
        payload = self.payload
        if (
            payload.kind != self.kind
            or payload.merchant_id != self.merchant_id
            or payload.terminal_id != self.terminal_id
        ):
            raise ValueError(
                "envelope kind/merchant_id/terminal_id must equal the payload's "
                f"({payload.kind}/{payload.merchant_id}/{payload.terminal_id})"
            )
        return self

    def kafka_key(self) -> bytes:
        """Partitioning key: merchant for money, terminal for everything else."""
        key = self.merchant_id if self.kind is Kind.TXN else self.terminal_id
        return key.encode()


class DeadLetter(JsonRecord):
    """A rejected message: why, where, and a redacted preview of what was sent.

    ``message``, ``field`` and ``payload_redacted`` are run through the card redactor
    on construction, so no producer can put a card number in a dead letter.
    """

    contract_name = "dead letter v1"

    v: Version = 1
    reason: Reason
    message: str
    field: str | None = None
    original_topic: str
    received_at: UtcDatetime
    mqtt_mid: int | None = None
    payload_redacted: str = Field(max_length=PAYLOAD_PREVIEW_CHARS)
    payload_size: int = Field(ge=0, description="size of the original payload in bytes")

    @field_validator("message", "field", "payload_redacted")
    @classmethod
    def _no_card_data(cls, value: str | None) -> str | None:
        return None if value is None else redact(value)
