"""posflow wire contracts, version 1: MQTT topics and payloads, Kafka records, validation.

Everything that crosses a process boundary is defined here once; the bridge, the
stream processors and the simulator all import it.
"""

from posflow.contracts._common import (
    CONTRACT_VERSION,
    ContractError,
    Kind,
    Reason,
    TopicRef,
    parse_topic,
)
from posflow.contracts.cardguard import find_card_data, luhn_valid, redact
from posflow.contracts.money import (
    CashflowRecord,
    FeePlan,
    FeeRule,
    IntegrityEvent,
    IntegrityKind,
    SettlementRule,
)
from posflow.contracts.records import DeadLetter, IngestEnvelope
from posflow.contracts.schema import export_schemas, payload_schema
from posflow.contracts.terminal import (
    ISO_4217_CODES,
    MAX_AMOUNT_MINOR,
    Battery,
    Location,
    Printer,
    Signal,
    Status,
    Telemetry,
    TerminalPayload,
    Transaction,
)
from posflow.contracts.validate import DEFAULT_MAX_BYTES, Accepted, Rejected, validate_message

__all__ = [
    "CONTRACT_VERSION",
    "DEFAULT_MAX_BYTES",
    "ISO_4217_CODES",
    "MAX_AMOUNT_MINOR",
    "Accepted",
    "Battery",
    "CashflowRecord",
    "ContractError",
    "DeadLetter",
    "FeePlan",
    "FeeRule",
    "IngestEnvelope",
    "IntegrityEvent",
    "IntegrityKind",
    "Kind",
    "Location",
    "Printer",
    "Reason",
    "Rejected",
    "SettlementRule",
    "Signal",
    "Status",
    "Telemetry",
    "TerminalPayload",
    "TopicRef",
    "Transaction",
    "export_schemas",
    "find_card_data",
    "luhn_valid",
    "parse_topic",
    "payload_schema",
    "redact",
    "validate_message",
]
