"""Merchant keys on a real PostgreSQL: secrets at rest, revocation (crypto-shredding), rotation."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from posflow.security.audit import records, verify
from posflow.security.keys import (
    LocalMasterKey,
    MerchantKeyRevokedError,
    get_secret,
    is_merchant_active,
    issue_merchant_key,
    key_versions,
    put_secret,
    revoke_merchant_key,
    rotate_merchant_key,
)
from posflow.security.roles import AccessDeniedError, Principal, Role
from posflow.settings import PostgresSettings
from posflow.storage import migrate

ADMIN = Principal("carol", Role.SECURITY_ADMIN)
SOURCE = "cli:carol@ops-1"
WEBHOOK = b"whsec_4f1d8c2a9b7e"
PAYOUT = "IBAN DE89 3704 0044 0532 0130 00"


@pytest.fixture
def conn(pg: PostgresSettings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
        conn.execute(
            "INSERT INTO merchants (merchant_id, name) VALUES"
            " ('M-1', 'Cafe Luna'), ('M-2', 'Bakery Sol')"
        )
        yield conn


@pytest.fixture
def master() -> LocalMasterKey:
    return LocalMasterKey(os.urandom(32))


def test_secrets_are_stored_encrypted_and_read_back(
    conn: psycopg.Connection[Any], master: LocalMasterKey
) -> None:
    assert issue_merchant_key(conn, master, "M-1", actor=ADMIN, source=SOURCE) == 1
    assert is_merchant_active(conn, "M-1")
    assert not is_merchant_active(conn, "M-2")  # no key yet
    put_secret(conn, master, "M-1", "webhook_signing", WEBHOOK)
    put_secret(conn, master, "M-1", "payout_account", PAYOUT)
    raw = conn.execute("SELECT ciphertext FROM merchant_secrets").fetchall()
    assert all(WEBHOOK not in bytes(r[0]) and PAYOUT.encode() not in bytes(r[0]) for r in raw)
    assert get_secret(conn, master, "M-1", "webhook_signing") == WEBHOOK
    assert get_secret(conn, master, "M-1", "payout_account") == PAYOUT.encode()
    # Another master key cannot unwrap this merchant's key.
    with pytest.raises(Exception, match="does not unwrap"):
        get_secret(conn, LocalMasterKey(os.urandom(32)), "M-1", "webhook_signing")


def test_ciphertext_moved_to_another_purpose_or_merchant_does_not_decrypt(
    conn: psycopg.Connection[Any], master: LocalMasterKey
) -> None:
    issue_merchant_key(conn, master, "M-1", actor=ADMIN, source=SOURCE)
    put_secret(conn, master, "M-1", "webhook_signing", WEBHOOK)
    put_secret(conn, master, "M-1", "payout_account", PAYOUT)
    conn.execute(
        "UPDATE merchant_secrets SET nonce = w.nonce, ciphertext = w.ciphertext"
        " FROM merchant_secrets w WHERE w.purpose = 'webhook_signing'"
        " AND merchant_secrets.purpose = 'payout_account'"
    )
    with pytest.raises(Exception, match="fails authentication"):
        get_secret(conn, master, "M-1", "payout_account")


def test_revoked_merchant_key_shreds_its_secrets_and_the_trail_names_who(
    conn: psycopg.Connection[Any], master: LocalMasterKey
) -> None:
    for merchant in ("M-1", "M-2"):
        issue_merchant_key(conn, master, merchant, actor=ADMIN, source=SOURCE)
        put_secret(conn, master, merchant, "webhook_signing", WEBHOOK + merchant.encode())
    dave = Principal("dave", Role.SECURITY_ADMIN)
    assert revoke_merchant_key(
        conn, "M-1", actor=dave, source="cli:dave@ops-2", reason="contract ended"
    ) == [1]
    with pytest.raises(MerchantKeyRevokedError, match="revoked"):
        get_secret(conn, master, "M-1", "webhook_signing")
    assert not is_merchant_active(conn, "M-1")
    # The wrapped seed is gone: not even the master key can derive the key again.
    row = conn.execute(
        "SELECT status, wrapped_seed, revoked_by FROM merchant_keys WHERE merchant_id = 'M-1'"
    ).fetchone()
    assert row == ("revoked", None, "dave")
    with pytest.raises(MerchantKeyRevokedError):
        put_secret(conn, master, "M-1", "webhook_signing", b"new")
    # The other merchant is untouched.
    assert get_secret(conn, master, "M-2", "webhook_signing") == WEBHOOK + b"M-2"
    assert is_merchant_active(conn, "M-2")
    trail = records(conn, target="merchant:M-1")
    assert [(r.actor, r.role, r.action, r.source, r.outcome) for r in trail] == [
        ("carol", "security_admin", "key.issue", SOURCE, "ok"),
        ("dave", "security_admin", "key.revoke", "cli:dave@ops-2", "ok"),
    ]
    assert trail[-1].detail == {"versions": [1], "reason": "contract ended"}
    assert verify(conn).ok


def test_refused_revocation_is_audited_and_changes_nothing(
    conn: psycopg.Connection[Any], master: LocalMasterKey
) -> None:
    issue_merchant_key(conn, master, "M-1", actor=ADMIN, source=SOURCE)
    agent = Principal("erin", Role.SUPPORT_AGENT)
    with pytest.raises(AccessDeniedError, match=r"may not key\.revoke"):
        revoke_merchant_key(conn, "M-1", actor=agent, source="api:10.0.0.7")
    assert is_merchant_active(conn, "M-1")
    last = records(conn, limit=1)[0]
    assert (last.actor, last.action, last.target, last.source, last.outcome) == (
        "erin",
        "key.revoke",
        "merchant:M-1",
        "api:10.0.0.7",
        "refused",
    )


def test_rotation_reencrypts_without_downtime(
    conn: psycopg.Connection[Any], master: LocalMasterKey, pg: PostgresSettings
) -> None:
    issue_merchant_key(conn, master, "M-1", actor=ADMIN, source=SOURCE)
    expected = {f"secret_{i:02d}": os.urandom(24) for i in range(40)}
    for purpose, value in expected.items():
        put_secret(conn, master, "M-1", purpose, value)
    failures: list[str] = []
    reads = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        with psycopg.connect(pg.dsn(), autocommit=True) as other:
            while not stop.is_set() and reads < 100_000:
                for purpose, value in expected.items():
                    try:
                        if get_secret(other, master, "M-1", purpose) != value:
                            failures.append(f"{purpose}: wrong value")
                    except Exception as exc:
                        failures.append(f"{purpose}: {exc}")
                    reads += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        result = rotate_merchant_key(conn, master, "M-1", actor=ADMIN, source=SOURCE, batch=3)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert failures == []
    assert reads > 0
    assert (result.old_versions, result.new_version, result.reencrypted) == ([1], 2, 40)
    assert [(v.version, v.status, v.has_material) for v in key_versions(conn, "M-1")] == [
        (1, "retired", False),
        (2, "active", True),
    ]
    versions = conn.execute("SELECT DISTINCT key_version FROM merchant_secrets").fetchall()
    assert versions == [(2,)]
    for purpose, value in expected.items():
        assert get_secret(conn, master, "M-1", purpose) == value
    assert records(conn, limit=1)[0].detail == {
        "old_versions": [1],
        "new_version": 2,
        "reencrypted": 40,
    }


def test_issue_twice_is_refused_and_reissue_after_revocation_starts_clean(
    conn: psycopg.Connection[Any], master: LocalMasterKey
) -> None:
    issue_merchant_key(conn, master, "M-1", actor=ADMIN, source=SOURCE)
    with pytest.raises(Exception, match="already has a key"):
        issue_merchant_key(conn, master, "M-1", actor=ADMIN, source=SOURCE)
    put_secret(conn, master, "M-1", "webhook_signing", WEBHOOK)
    revoke_merchant_key(conn, "M-1", actor=ADMIN, source=SOURCE)
    assert issue_merchant_key(conn, master, "M-1", actor=ADMIN, source=SOURCE) == 2
    assert is_merchant_active(conn, "M-1")
    # The old secret stays shredded; the merchant sets a new one under the new key.
    with pytest.raises(MerchantKeyRevokedError):
        get_secret(conn, master, "M-1", "webhook_signing")
    put_secret(conn, master, "M-1", "webhook_signing", b"fresh")
    assert get_secret(conn, master, "M-1", "webhook_signing") == b"fresh"
