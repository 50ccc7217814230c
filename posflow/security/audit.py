"""The audit trail: who did what, when, from where, to what, and how it ended.

Records are hash-chained: ``hash = sha256(prev_hash + "\\n" + canonical JSON of the
record)``, the canonical JSON covering every column but the hashes (sorted keys, no
spaces, timestamps in UTC with microseconds). Editing a record breaks its hash;
deleting one breaks the sequence and the next record's link; deleting the newest ones
disagrees with the chain head row. :func:`verify` names the first broken record.

Writers lock the single chain-head row (``SELECT ... FOR UPDATE``) inside their
transaction, so concurrent writers append one after another and the chain never
forks; a writer inside a caller's transaction (revoking a key and recording it)
commits or rolls back together with the change it records.

The trail never holds card data or secrets: free text goes through the card-data
redaction, and a detail field named like a secret is refused outright.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from posflow.contracts.cardguard import redact
from posflow.errors import PosflowError

__all__ = [
    "GENESIS",
    "AuditRecord",
    "Outcome",
    "VerifyResult",
    "canonical_json",
    "record",
    "records",
    "verify",
]

Outcome = Literal["ok", "refused", "failed"]
GENESIS = "0" * 64

# Field names that smell of a secret or of card data: such a field is refused, not stored.
_SECRET_NAME = re.compile(
    r"secret|passw|pwd|token|private|credential|api[_-]?key|seed|"
    r"cvv|cvc|^pan$|card[_-]?(?:number|num|no)|track[_-]?[12d]|^pin$|iban|account[_-]?number",
    re.IGNORECASE,
)
_MAX_TEXT = 2000


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    at: datetime
    actor: str
    role: str
    action: str
    target: str
    source: str
    outcome: Outcome
    detail: dict[str, Any]
    prev_hash: str
    hash: str

    def body(self) -> dict[str, Any]:
        """What the hash covers."""
        return {
            "seq": self.seq,
            "at": self.at.astimezone(UTC).isoformat(timespec="microseconds"),
            "actor": self.actor,
            "role": self.role,
            "action": self.action,
            "target": self.target,
            "source": self.source,
            "outcome": self.outcome,
            "detail": self.detail,
        }


def canonical_json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_hash(prev_hash: str, body: Mapping[str, Any]) -> str:
    return hashlib.sha256(f"{prev_hash}\n{canonical_json(body)}".encode()).hexdigest()


def _clean_text(value: str, where: str) -> str:
    if "\x00" in value:
        raise PosflowError(f"audit {where} holds a NUL character", fix="remove it")
    return redact(value)[:_MAX_TEXT]


def _clean_detail(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = str(key)
            if _SECRET_NAME.search(name):
                raise PosflowError(
                    f"audit detail field {where}.{name} is named like a secret or card data "
                    "and is refused",
                    fix="record what happened (ids, versions, outcomes), never the secret",
                )
            out[_clean_text(name, where)] = _clean_detail(item, f"{where}.{name}")
        return out
    if isinstance(value, list | tuple):
        return [_clean_detail(item, f"{where}[]") for item in value]
    if isinstance(value, str):
        return _clean_text(value, where)
    if isinstance(value, bool | int) or value is None:
        return value
    raise PosflowError(
        f"audit detail field {where} has a {type(value).__name__}: only text, integers, "
        "booleans, null, lists and objects are recorded (no floats, no secrets)",
    )


def record(
    conn: psycopg.Connection[Any],
    *,
    actor: str,
    role: str,
    action: str,
    target: str,
    source: str,
    outcome: Outcome = "ok",
    detail: Mapping[str, Any] | None = None,
) -> AuditRecord:
    """Append one record to the chain (in the caller's transaction, if there is one)."""
    if outcome not in ("ok", "refused", "failed"):
        raise PosflowError(f"audit outcome {outcome!r} is not one of ok, refused, failed")
    fields = {
        name: _clean_text(value, name)
        for name, value in (
            ("actor", actor),
            ("role", role),
            ("action", action),
            ("target", target),
            ("source", source),
        )
    }
    clean = _clean_detail(dict(detail or {}), "detail")
    with conn.transaction():
        head = conn.execute("SELECT seq, hash FROM audit_chain_head WHERE id FOR UPDATE").fetchone()
        if head is None:
            raise PosflowError(
                "the audit chain head row is missing",
                fix="run `posflow db migrate`; if it was deleted, restore it from a backup",
            )
        prev_seq, prev_hash = int(head[0]), str(head[1])
        # now() in the database is the transaction start: take the clock here instead, so
        # records of one long transaction still read in order.
        rec = AuditRecord(
            seq=prev_seq + 1,
            at=datetime.now(UTC),
            outcome=outcome,
            detail=clean,
            prev_hash=prev_hash,
            hash="",
            **fields,
        )
        digest = chain_hash(prev_hash, rec.body())
        conn.execute(
            "INSERT INTO audit_log (seq, at, actor, role, action, target, source, outcome,"
            " detail, prev_hash, hash) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            [
                rec.seq,
                rec.at,
                rec.actor,
                rec.role,
                rec.action,
                rec.target,
                rec.source,
                rec.outcome,
                Jsonb(rec.detail),
                prev_hash,
                digest,
            ],
        )
        conn.execute("UPDATE audit_chain_head SET seq = %s, hash = %s WHERE id", [rec.seq, digest])
    return AuditRecord(**{**rec.__dict__, "hash": digest})


def _row(row: Mapping[str, Any]) -> AuditRecord:
    return AuditRecord(**row)


def records(
    conn: psycopg.Connection[Any],
    *,
    target: str | None = None,
    action: str | None = None,
    limit: int = 100,
) -> list[AuditRecord]:
    """The newest records (optionally of one target / action), oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT * FROM (SELECT seq, at, actor, role, action, target, source, outcome,"
            " detail, prev_hash, hash FROM audit_log"
            " WHERE (%(t)s::text IS NULL OR target = %(t)s)"
            " AND (%(a)s::text IS NULL OR action = %(a)s)"
            " ORDER BY seq DESC LIMIT %(n)s) r ORDER BY seq",
            {"t": target, "a": action, "n": limit},
        )
        return [_row(r) for r in cur.fetchall()]


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    head_seq: int
    broken_seq: int | None = None
    reason: str = ""


def _iter_rows(conn: psycopg.Connection[Any]) -> Iterator[AuditRecord]:
    with conn.transaction(), conn.cursor(name="posflow_audit_verify", row_factory=dict_row) as cur:
        cur.itersize = 2000
        cur.execute(
            "SELECT seq, at, actor, role, action, target, source, outcome, detail,"
            " prev_hash, hash FROM audit_log ORDER BY seq"
        )
        for row in cur:
            yield _row(row)


def verify(conn: psycopg.Connection[Any]) -> VerifyResult:  # noqa: PLR0911 - one per break
    """Walk the whole chain; the result names the first broken record, if any."""
    head = conn.execute("SELECT seq, hash FROM audit_chain_head WHERE id").fetchone()
    if head is None:
        return VerifyResult(False, 0, 0, 1, "the chain head row is missing (deleted)")
    head_seq, head_hash = int(head[0]), str(head[1])
    expected_seq, expected_prev, checked = 1, GENESIS, 0
    for rec in _iter_rows(conn):
        if rec.seq != expected_seq:
            return VerifyResult(
                False,
                checked,
                head_seq,
                expected_seq,
                f"record #{expected_seq} is missing (deleted): the chain jumps from "
                f"#{expected_seq - 1} to #{rec.seq}",
            )
        if rec.prev_hash != expected_prev:
            return VerifyResult(
                False,
                checked,
                head_seq,
                rec.seq,
                f"record #{rec.seq} does not link to record #{rec.seq - 1} "
                "(one of them was altered or replaced)",
            )
        if chain_hash(rec.prev_hash, rec.body()) != rec.hash:
            return VerifyResult(
                False,
                checked,
                head_seq,
                rec.seq,
                f"record #{rec.seq} was altered: its content no longer matches its hash",
            )
        checked += 1
        expected_seq += 1
        expected_prev = rec.hash
    last = expected_seq - 1
    if head_seq > last:
        return VerifyResult(
            False,
            checked,
            head_seq,
            last + 1,
            f"record #{last + 1} is missing (deleted): the chain head says #{head_seq} "
            f"but the log ends at #{last}",
        )
    if head_seq != last or head_hash != expected_prev:
        return VerifyResult(
            False,
            checked,
            head_seq,
            last,
            f"the chain head (#{head_seq}) does not match record #{last}",
        )
    return VerifyResult(True, checked, head_seq)
