"""Loss accounting: what the simulator sent against what reached Kafka and the database.

Every message carries a unique (terminal_id, seq). The :class:`Recorder` keeps, per
terminal, each sent seq with its publish time and what the pipeline should do with
it (accept, dead-letter with a reason, or see it twice). :func:`reconcile`
compares that with the records read back from Kafka.
"""

from __future__ import annotations

import json
import re
import time
from array import array
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from simulator.engine import EXPECT_DUPLICATE, EXPECT_OK, Message

__all__ = [
    "KafkaSeen",
    "Recorder",
    "expected_rows",
    "parse_deadletter",
    "parse_envelope",
    "percentiles",
    "reconcile",
    "wait_for_rows",
]

_OK, _DUP = 0, 1


def expected_rows(counts: Mapping[str, Any]) -> int:
    """Readings and payments the database must hold after a run: those published
    (``SimMetrics.counts()``), less the expected dead letters and deliberate duplicates."""
    sent = counts["published"]
    return (
        int(sent.get("telemetry", 0))
        + int(sent.get("txn", 0))
        - int(counts["expected_dead_letters"])
        - int(counts["duplicates"])
    )


def wait_for_rows(
    dsn: str,
    fleet: str,
    expected: int,
    *,
    timeout_s: float,
    still_s: float,
    since: datetime | None = None,
) -> int:
    """The fleet's rows in ``telemetry`` + ``transactions`` once the raw sink has them all,
    has not moved for ``still_s``, or ``timeout_s`` passed (-1: the database never answered).

    ``since``: only rows the bridge received from then on (this run's, when the same fleet
    ran on this database before)."""
    import psycopg

    like = f"T-{fleet}-%"
    after = since or datetime.min.replace(tzinfo=UTC)
    query = (
        b"SELECT (SELECT count(*) FROM telemetry WHERE terminal_id LIKE %s"
        b" AND received_at >= %s)"
        b" + (SELECT count(*) FROM transactions WHERE terminal_id LIKE %s"
        b" AND received_at >= %s)"
    )
    start = time.monotonic()
    stored, still_since = -1, start
    while True:
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
                row = conn.execute(query, (like, after, like, after)).fetchone()
            now_stored = int(row[0]) if row else 0
        except psycopg.Error:
            now_stored = stored
        now = time.monotonic()
        if now_stored != stored:
            stored, still_since = now_stored, now
        if stored >= expected or now - start > timeout_s or now - still_since > still_s:
            return stored
        time.sleep(min(1.0, still_s / 2))


_TERMINAL = re.compile(rb'"terminal_id":"([^"]+)"')
_SEQ = re.compile(rb'"seq":(\d+)')
_SEQ_TEXT = re.compile(r'"seq":\s*(\d+)')


@dataclass
class _Sent:
    seqs: array[int] = field(default_factory=lambda: array("q"))
    times: array[float] = field(default_factory=lambda: array("d"))
    codes: array[int] = field(default_factory=lambda: array("h"))


class Recorder:
    """Sent messages, compactly: about 18 bytes each."""

    def __init__(self, terminal_ids: dict[int, str]) -> None:
        self.ids = terminal_ids
        self.sent: dict[int, _Sent] = {}
        self._codes: dict[str, int] = {EXPECT_OK: _OK, EXPECT_DUPLICATE: _DUP}
        self.by_kind: Counter[str] = Counter()
        self.by_expect: Counter[str] = Counter()
        self.first_at: float | None = None
        self.last_at = 0.0

    def __call__(self, msg: Message) -> None:
        now = time.time()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        s = self.sent.get(msg.terminal)
        if s is None:
            s = self.sent[msg.terminal] = _Sent()
        s.seqs.append(msg.seq)
        s.times.append(now)
        s.codes.append(self._codes.setdefault(msg.expect, len(self._codes)))
        self.by_kind[msg.kind] += 1
        self.by_expect[msg.expect] += 1

    @property
    def total(self) -> int:
        return sum(self.by_expect.values())

    def publish_times(self, terminals: set[str]) -> dict[tuple[str, int], float]:
        """(terminal, seq) -> first publish time, for the given terminals only."""
        out: dict[tuple[str, int], float] = {}
        for index, sent in self.sent.items():
            terminal = self.ids[index]
            if terminal in terminals:
                for seq, at in zip(sent.seqs, sent.times, strict=True):
                    out.setdefault((terminal, seq), at)
        return out

    def expectations(self) -> dict[int, str]:
        return {code: name for name, code in self._codes.items()}


@dataclass
class KafkaSeen:
    """Records read back from the run's topics: (terminal, seq) -> timestamps (ms)."""

    valid: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    dead: dict[tuple[str, int], str] = field(default_factory=dict)
    dead_unmatched: Counter[str] = field(default_factory=Counter)
    other_terminals: int = 0
    by_topic: Counter[str] = field(default_factory=Counter)
    first_ms: int | None = None
    last_ms: int = 0

    def add_valid(self, topic: str, value: bytes, timestamp_ms: int, ours: set[str]) -> None:
        parsed = parse_envelope(value)
        if parsed is None or parsed[0] not in ours:
            self.other_terminals += 1
            return
        self.by_topic[topic] += 1
        self.valid.setdefault(parsed, []).append(timestamp_ms)
        self._span(timestamp_ms)

    def add_dead(self, value: bytes, timestamp_ms: int, ours: set[str]) -> None:
        parsed = parse_deadletter(value)
        if parsed is None:
            self.dead_unmatched["unparseable"] += 1
            return
        terminal, seq, reason = parsed
        if terminal not in ours:
            self.other_terminals += 1
            return
        self.by_topic["deadletter"] += 1
        self._span(timestamp_ms)
        if seq is None:
            self.dead_unmatched[reason] += 1
        else:
            self.dead[(terminal, seq)] = reason

    def _span(self, ms: int) -> None:
        self.first_ms = ms if self.first_ms is None else min(self.first_ms, ms)
        self.last_ms = max(self.last_ms, ms)


def parse_envelope(value: bytes) -> tuple[str, int] | None:
    """(terminal id, payload seq) of an ingest envelope, without a full JSON parse."""
    t = _TERMINAL.search(value)
    s = _SEQ.search(value)
    if t is None or s is None:
        return None
    return t.group(1).decode(), int(s.group(1))


def parse_deadletter(value: bytes) -> tuple[str, int | None, str] | None:
    """(terminal id, seq if the redacted preview still shows it, reason) of a dead letter."""
    try:
        doc: dict[str, Any] = json.loads(value)
        parts = str(doc["original_topic"]).split("/")
        reason = str(doc["reason"])
    except (ValueError, KeyError, TypeError):
        return None
    if len(parts) != 5:
        return None
    seq = _SEQ_TEXT.search(str(doc.get("payload_redacted", "")))
    return parts[3], int(seq.group(1)) if seq else None, reason


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    v = sorted(values)

    def at(q: float) -> float:
        return round(v[min(len(v) - 1, int(q * len(v)))], 1)

    return {"n": len(v), "p50": at(0.5), "p95": at(0.95), "p99": at(0.99), "max": round(v[-1], 1)}


def reconcile(rec: Recorder, seen: KafkaSeen) -> dict[str, Any]:  # noqa: PLR0912 - one pass
    """Sent vs. seen: delivered, expected and unexpected dead letters, lost, duplicates."""
    names = rec.expectations()
    delivered = lost_valid = lost_dead = expected_dead = 0
    dead_keys: set[tuple[str, int]] = set()
    dup_expected = dup_unexpected = wrong_reason = 0
    lost_examples: list[str] = []
    latencies: list[float] = []
    dead_reasons: Counter[str] = Counter()
    for index, sent in rec.sent.items():
        terminal = rec.ids[index]
        copies: Counter[int] = Counter()
        first_time: dict[int, float] = {}
        wants: dict[int, str] = {}
        for seq, at, code in zip(sent.seqs, sent.times, sent.codes, strict=True):
            copies[seq] += 1
            first_time.setdefault(seq, at)
            name = names[code]
            if name != EXPECT_DUPLICATE:
                wants[seq] = name
        for seq, want in wants.items():
            key = (terminal, seq)
            if want == EXPECT_OK:
                stamps = seen.valid.get(key)
                if stamps is None:
                    lost_valid += 1
                    if len(lost_examples) < 10:
                        lost_examples.append(f"{terminal}#{seq}")
                    continue
                delivered += 1
                latencies.append(min(stamps) - first_time[seq] * 1000)
                extra = len(stamps) - 1
                dup_expected += min(extra, copies[seq] - 1)
                dup_unexpected += max(0, extra - (copies[seq] - 1))
            else:
                dead_keys.add(key)
                reason = seen.dead.get(key)
                if reason is None:
                    if key in seen.valid:  # accepted although it should not have been
                        wrong_reason += 1
                    else:
                        lost_dead += 1
                        if len(lost_examples) < 10:
                            lost_examples.append(f"{terminal}#{seq} ({want})")
                    continue
                expected_dead += 1
                dead_reasons[reason] += 1
                if f"dl:{reason}" != want:
                    wrong_reason += 1
    sent_keys = {(rec.ids[i], seq) for i, sent in rec.sent.items() for seq in sent.seqs}
    stale = sum(len(v) for k, v in seen.valid.items() if k not in sent_keys)
    ours = {rec.ids[i] for i in rec.sent}
    unexpected_dead = sum(1 for key in seen.dead if key[0] in ours and key not in dead_keys)
    return {
        "sent": rec.total,
        "sent_by_kind": dict(rec.by_kind),
        "sent_by_expectation": dict(rec.by_expect),
        "in_kafka_valid": sum(len(v) for v in seen.valid.values()),
        "in_kafka_by_topic": dict(seen.by_topic),
        "in_kafka_not_this_run": stale,  # e.g. retained status of an earlier run
        "delivered": delivered,
        "dead_letters_expected": expected_dead,
        "dead_letters_expected_by_reason": dict(dead_reasons),
        "dead_letters_unexpected": unexpected_dead + sum(seen.dead_unmatched.values()),
        "wrong_verdict": wrong_reason,
        "lost": lost_valid + lost_dead,
        "lost_examples": lost_examples,
        "duplicates_expected": dup_expected,
        "duplicates_unexpected": dup_unexpected,
        "latency_publish_to_kafka_ms": percentiles(latencies),
    }
