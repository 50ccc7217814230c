"""The JSON Schemas for terminal vendors: exported from the models, committed in docs/schemas."""

from __future__ import annotations

import json
from pathlib import Path

from posflow.contracts import Kind, export_schemas, payload_schema

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"
FILES = ["telemetry.v1.json", "txn.v1.json", "status.v1.json"]


def test_export_writes_one_file_per_kind(tmp_path: Path) -> None:
    written = export_schemas(tmp_path / "out")
    assert [path.name for path in written] == FILES
    assert all(path.parent == tmp_path / "out" for path in written)


def test_committed_schemas_equal_a_fresh_export_byte_for_byte(tmp_path: Path) -> None:
    # On failure regenerate them: python -c "from pathlib import Path;
    #   from posflow.contracts import export_schemas; export_schemas(Path('docs/schemas'))"
    for path in export_schemas(tmp_path):
        committed = SCHEMAS / path.name
        assert committed.exists(), f"{committed} is missing"
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is out of date"


def test_exported_schema_is_pretty_sorted_and_ends_with_a_newline(tmp_path: Path) -> None:
    text = export_schemas(tmp_path)[1].read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert text.startswith('{\n  "$schema": "https://json-schema.org/draft/2020-12/schema",\n')
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_transaction_schema_states_the_money_and_identity_rules() -> None:
    schema = payload_schema(Kind.TXN)
    assert schema["additionalProperties"] is False
    amount = schema["properties"]["amount_minor"]
    assert amount == {
        "description": "integer minor units (cents), never a float",
        "maximum": 10**12,
        "minimum": 0,
        "title": "Amount Minor",
        "type": "integer",
    }
    assert "EUR" in schema["properties"]["currency"]["enum"]
    assert "XYZ" not in schema["properties"]["currency"]["enum"]
    assert schema["properties"]["v"]["const"] == 1
    assert schema["properties"]["kind"]["const"] == "txn"
    assert schema["x-mqtt-topic"] == "pos/v1/{merchant_id}/{terminal_id}/txn"
    assert "card_data" in schema["description"]


def test_telemetry_schema_describes_nested_blocks() -> None:
    schema = payload_schema(Kind.TELEMETRY)
    battery = schema["$defs"]["Battery"]
    assert battery["properties"]["level_pct"]["maximum"] == 100
    assert battery["additionalProperties"] is False
    assert set(schema["required"]) >= {"battery", "signal", "printer", "app_version"}
    assert "location" not in schema["required"]
