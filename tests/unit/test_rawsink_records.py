"""The raw sink's record sorting and dead letters (no services)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry, Histogram

from posflow.contracts import Accepted, IngestEnvelope, Reason, validate_message
from posflow.contracts.records import PAYLOAD_PREVIEW_CHARS
from streams.rawsink.metrics import observe_many
from streams.rawsink.records import Rejection, dead_letter, sort_records
from tests.unit import samples

TEL, TXN = "p.telemetry.v1", "p.txn.v1"
CARD = "4111 1111 1111 1111"
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _record(topic: str, value: bytes, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic, 1, offset, 0, 0, b"k", value, None, 1, len(value), ())


def _envelope(kind: str, body: dict[str, object]) -> IngestEnvelope:
    result = validate_message(
        samples.topic(kind), json.dumps(body).encode(), received_at=NOW, mqtt_mid=3
    )
    assert isinstance(result, Accepted)
    return result.envelope


def test_valid_envelopes_go_to_their_table_and_keep_their_values() -> None:
    tel = _envelope("telemetry", samples.telemetry())
    txn = _envelope("txn", samples.txn(amount_minor=4321))
    out = sort_records(
        [_record(TEL, tel.to_json()), _record(TXN, txn.to_json())],
        telemetry_topic=TEL,
        txn_topic=TXN,
    )
    assert out.rejected == []
    assert out.telemetry == [tel]
    assert out.transactions == [txn]
    assert out.transactions[0].payload.amount_minor == 4321  # type: ignore[union-attr]


def test_bad_json_wrong_kind_and_card_data_are_rejected_with_reasons() -> None:
    txn = _envelope("txn", samples.txn())
    # A valid telemetry contract whose free-text field carries a card number: only the
    # sink's own scan can catch it (a producer other than the bridge wrote it).
    sneaky = (
        _envelope("telemetry", samples.telemetry())
        .to_json()
        .replace(b'"Telstra"', f'"{CARD}"'.encode())
    )
    records = [
        _record(TEL, b'{"v": 1, "kind": "telem', 5),
        _record(TEL, txn.to_json(), 6),
        _record(TEL, sneaky, 7),
    ]
    out = sort_records(records, telemetry_topic=TEL, txn_topic=TXN)
    assert out.telemetry == []
    assert out.transactions == []
    got = [(r.record.offset, r.error.reason, r.error.field) for r in out.rejected]
    assert got == [
        (5, Reason.MALFORMED_JSON, None),
        (6, Reason.INVALID_VALUE, "kind"),
        (7, Reason.CARD_DATA, None),
    ]
    letter = dead_letter(out.rejected[2], now=NOW)
    assert letter.original_topic == f"{TEL}/1/7"
    assert CARD not in letter.payload_redacted
    assert "[REDACTED-PAN]" in letter.payload_redacted
    assert "16-digit card number" in letter.message
    assert letter.payload_size == len(sneaky)


def test_a_long_record_is_cut_after_redaction_so_no_card_digits_survive_the_cut() -> None:
    # The card number straddles the preview limit: cut first, its first digits would stay.
    # The sink keeps PAYLOAD_PREVIEW_CHARS - 512 characters; the card starts 4 before that.
    pad = "x" * (PAYLOAD_PREVIEW_CHARS - 512 - len('{"pad": "') - len('", "note": "') - 4)
    value = f'{{"pad": "{pad}", "note": "{CARD}"}}'.encode()
    rejection = sort_records([_record(TXN, value)], telemetry_topic=TEL, txn_topic=TXN).rejected
    letter = dead_letter(Rejection(rejection[0].record, rejection[0].error), now=NOW)
    assert len(letter.payload_redacted) <= PAYLOAD_PREVIEW_CHARS
    assert letter.payload_redacted.endswith('"note": "[RED')
    assert "4111" not in letter.payload_redacted


def test_observing_a_batch_at_once_gives_the_buckets_and_sum_of_one_observe_each() -> None:
    amounts = [0.0, 0.005, 0.0051, 0.3, 1.0, 1.0000001, 29.9, 30.0, 299.0, 301.0, 1e9, 0.25]
    one, batch = CollectorRegistry(), CollectorRegistry()
    bounds = (0.005, 0.01, 0.25, 1, 30, 300)
    single = Histogram("h", "h", buckets=bounds, registry=one)
    for amount in amounts:
        single.observe(amount)
    observe_many(Histogram("h", "h", buckets=bounds, registry=batch), amounts)
    observe_many(Histogram("h2", "h", buckets=bounds, registry=batch), [])
    samples_of = {s.name + str(s.labels): s.value for m in one.collect() for s in m.samples
                  if not s.name.endswith("_created")}  # fmt: skip
    got = {s.name + str(s.labels): s.value for m in batch.collect() for s in m.samples
           if s.name.startswith("h_") and not s.name.endswith("_created")}  # fmt: skip
    assert got == pytest.approx(samples_of)
    assert samples_of["h_bucket{'le': '0.005'}"] == 2
