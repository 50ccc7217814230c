"""JSON Schema of the terminal-facing payloads, for terminal vendors (docs/schemas/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from posflow.contracts._common import CONTRACT_VERSION, TOPIC_PREFIX, Kind
from posflow.contracts.terminal import Status, Telemetry, Transaction

__all__ = ["SCHEMA_FILES", "export_schemas", "payload_schema", "render_schema"]

_CARD_DATA_NOTE = (
    "No card data: anything that looks like a card number (13-19 digits, optionally grouped "
    "by single spaces or dashes, passing the Luhn check), magnetic stripe track data, or a "
    "key named like cvv/pan/card_number/track2, anywhere in the payload, rejects the whole "
    "message (reason card_data). Identifiers must not be 13-19 digit numbers."
)
_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_MODELS: dict[Kind, type[BaseModel]] = {
    Kind.TELEMETRY: Telemetry,
    Kind.TXN: Transaction,
    Kind.STATUS: Status,
}
SCHEMA_FILES = {kind: f"{kind.value}.v{CONTRACT_VERSION}.json" for kind in Kind}


def payload_schema(kind: Kind) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) a terminal's ``kind`` payload must satisfy."""
    schema: dict[str, Any] = _MODELS[kind].model_json_schema(mode="validation")
    schema["$schema"] = _DIALECT
    schema["title"] = f"posflow {kind.value} payload v{CONTRACT_VERSION}"
    schema["description"] = f"{schema.get('description', '')}\n\n{_CARD_DATA_NOTE}".lstrip()
    schema["x-mqtt-topic"] = f"{TOPIC_PREFIX}/{{merchant_id}}/{{terminal_id}}/{kind.value}"
    return schema


def render_schema(kind: Kind) -> str:
    """The schema as committed: two-space indent, sorted keys, trailing newline."""
    return json.dumps(payload_schema(kind), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def export_schemas(directory: Path) -> list[Path]:
    """Write telemetry.v1.json, txn.v1.json and status.v1.json into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in Kind:
        path = directory / SCHEMA_FILES[kind]
        path.write_text(render_schema(kind), encoding="utf-8")
        written.append(path)
    return written
