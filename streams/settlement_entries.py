"""Transaction records -> ledger entries, or refusals for the dead-letter topic.

A record that is not a valid transaction envelope is refused, not written: it goes to
the dead-letter topic (after the batch's commit) with the contract's reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from aiokafka.structs import ConsumerRecord

from posflow.contracts import ContractError, DeadLetter, IngestEnvelope, Reason, Transaction
from posflow.contracts.money import FeePlan
from posflow.storage.ledger import LedgerEntry
from streams.fees import fee_minor

__all__ = ["EntryConverter", "Refusal", "refusal_letter", "to_entry"]

log = logging.getLogger("posflow.settlement")

_NO_PLAN = FeePlan()

# A record refused before the ledger, and why.
Refusal = tuple[ConsumerRecord[bytes, bytes], ContractError]


def to_entry(
    envelope: IngestEnvelope, plan: FeePlan, source: tuple[str, int, int] | None = None
) -> LedgerEntry:
    """A ledger entry for one transaction envelope, fee from the merchant's plan.

    gross = amount + tip. Sale and capture pay the plan's fee; a refund posts -amount
    without a fee; void/reversal take the original's amounts in the ledger writer.
    """
    txn = envelope.payload
    if not isinstance(txn, Transaction):
        raise ContractError(Reason.INVALID_VALUE, f"a {txn.kind} record on the transaction topic")
    gross = txn.amount_minor + txn.tip_minor
    fee = 0
    if txn.type in ("sale", "capture") and txn.status == "approved":
        fee = fee_minor(
            plan, gross=gross, currency=txn.currency, scheme=txn.scheme, entry_mode=txn.entry_mode
        )
    return LedgerEntry(
        txn_id=txn.txn_id, merchant_id=txn.merchant_id, terminal_id=txn.terminal_id,
        txn_type=txn.type, currency=txn.currency, gross_minor=gross, fee_minor=fee,
        net_minor=gross - fee, occurred_at=txn.ts, body=txn.model_dump(mode="json"),
        source=source, status=txn.status, original_txn_id=txn.original_txn_id,
        received_at=envelope.received_at,
    )  # fmt: skip


@dataclass
class EntryConverter:
    """Records -> ledger entries; bad records are kept in ``rejected`` (dead letters,
    sent after the commit)."""

    conn: psycopg.Connection[tuple[Any, ...]]
    rejected: list[Refusal] = field(default_factory=list)

    def __call__(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> list[LedgerEntry]:
        parsed: list[tuple[IngestEnvelope, tuple[str, int, int]]] = []
        for record in records:
            try:
                envelope = IngestEnvelope.from_json(record.value or b"")
            except ContractError as exc:
                self.rejected.append((record, exc))
                continue
            if not isinstance(envelope.payload, Transaction):
                self.rejected.append(
                    (
                        record,
                        ContractError(
                            Reason.INVALID_VALUE,
                            f"a {envelope.kind} record on the transaction topic",
                            "kind",
                        ),
                    )
                )
                continue
            parsed.append((envelope, (record.topic, record.partition, record.offset)))
        # Fee plans read per batch: a plan set with `settlement set-plan` applies at once.
        merchants = sorted({e.merchant_id for e, _ in parsed})
        plans: dict[str, FeePlan] = {}
        if merchants:
            for merchant, raw in self.conn.execute(
                "SELECT merchant_id, fee_plan::text FROM merchants WHERE merchant_id = ANY(%s)",
                [merchants],
            ).fetchall():
                try:
                    plans[str(merchant)] = FeePlan.from_json(raw)
                except ContractError as exc:
                    log.error(  # noqa: TRY400 - the reason is the message
                        "merchant %s: invalid fee_plan (%s); charging no fee", merchant, exc
                    )
            self.conn.commit()
        return [to_entry(env, plans.get(env.merchant_id, _NO_PLAN), src) for env, src in parsed]


def refusal_letter(record: ConsumerRecord[bytes, bytes], error: ContractError) -> DeadLetter:
    """The dead letter of a refused record: the contract's reason, where the record was."""
    return DeadLetter(
        reason=error.reason, message=error.message, field=error.field,
        original_topic=f"{record.topic}/{record.partition}/{record.offset}",
        received_at=datetime.now(UTC), payload_redacted=(record.value or b"")[:4096]
        .decode("utf-8", "replace"), payload_size=len(record.value or b""),
    )  # fmt: skip
