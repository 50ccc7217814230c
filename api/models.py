"""The API's JSON bodies (also its OpenAPI schema). Money: integer minor units + currency."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Balance",
    "Balances",
    "CashflowEventOut",
    "EventsPage",
    "MerchantSummary",
    "MerchantsPage",
    "Transaction",
    "TransactionsPage",
]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Balance(_Out):
    currency: str = Field(description="ISO 4217")
    pending_minor: int
    available_minor: int
    paid_out_minor: int
    updated_at: datetime


class Balances(_Out):
    merchant_id: str
    balances: list[Balance]


class Transaction(_Out):
    txn_id: str
    terminal_id: str
    type: str
    currency: str
    gross_minor: int
    fee_minor: int
    net_minor: int
    occurred_at: datetime
    recorded_at: datetime


class TransactionsPage(_Out):
    merchant_id: str
    items: list[Transaction] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: last")


class CashflowEventOut(_Out):
    seq: int = Field(description="per merchant, only grows; the SSE event id")
    txn_id: str | None
    kind: str
    currency: str
    amount_minor: int
    pending_minor: int
    available_minor: int
    paid_out_minor: int
    occurred_at: datetime
    recorded_at: datetime


class EventsPage(_Out):
    merchant_id: str
    items: list[CashflowEventOut] = Field(description="oldest first, seq > `after`")
    next_after: int | None = Field(description="pass as `after` for the next page; null: none yet")


class MerchantSummary(_Out):
    merchant_id: str
    name: str
    terminals: int = Field(description="terminals registered to the merchant")
    balances: list[Balance] | None = Field(
        description="per currency; null when the caller's role may not read money (support)"
    )


class MerchantsPage(_Out):
    items: list[MerchantSummary] = Field(description="by merchant_id")
    next_after: str | None = Field(description="pass as `after` for the next page; null: last")
