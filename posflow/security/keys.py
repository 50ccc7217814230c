"""Merchant keys: derived per merchant from one master key, revocable, rotatable.

- A :class:`KeyProvider` holds the master key. :class:`LocalMasterKey` reads it from
  a file or the environment; a cloud KMS or an HSM implements the same one method
  (``derive``: HKDF-SHA256 / a KMS MAC inside the device).
- Each merchant key version has a random 32-byte seed, stored only wrapped
  (AES-256-GCM under a key-encryption key derived from the master). The merchant
  key is ``HKDF-SHA256(master, salt=seed, info=["posflow/v1/merchant-key", merchant,
  version])``: neither the database nor the master key alone gives it.
- Merchant secrets (webhook signing secrets, payout account details) are AES-256-GCM
  under the merchant key, with AAD ``["posflow/v1/merchant-secret", merchant, purpose,
  version]``.
- Revoking deletes every wrapped seed of the merchant (crypto-shredding): its secrets
  no longer decrypt, with any master key, and :func:`is_merchant_active` is False,
  which the API checks to refuse the merchant's API keys.
- Rotating adds a new active version, marks the old ``retiring`` (still readable),
  re-encrypts the secrets in small batches (each its own short transaction), then
  retires the old version (seed deleted). Readers use each row's own version, so
  nothing is unreadable at any moment.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from posflow.errors import PosflowError
from posflow.security.roles import Action, Principal, Target, authorize_audited, record_action
from posflow.settings import Settings

__all__ = [
    "KeyProvider",
    "KeyVersion",
    "LocalMasterKey",
    "MerchantKeyRevokedError",
    "get_secret",
    "is_merchant_active",
    "issue_merchant_key",
    "key_versions",
    "master_key_from_settings",
    "put_secret",
    "revoke_merchant_key",
    "rotate_merchant_key",
]

Conn = psycopg.Connection[Any]
_KEK_INFO = b"posflow/v1/key-encryption-key"
_NONCE = 12


class KeyProvider(Protocol):
    """The master key's holder. A KMS or HSM implements this; the key never leaves it."""

    @property
    def key_id(self) -> str:
        """Names the master key (stored with each wrapped seed, for master rotation)."""
        ...

    def derive(self, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
        """HKDF-SHA256 of the master key with this salt and info."""
        ...


class LocalMasterKey:
    """A master key held in this process (from a file or an environment variable)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise PosflowError(
                f"the master key is {len(key)} bytes; at least 32 are required",
                fix="generate one: `python -c 'import os,base64;"
                "print(base64.b64encode(os.urandom(32)).decode())'`",
            )
        self._key = key
        fingerprint = HKDF(hashes.SHA256(), 8, salt=None, info=b"posflow/v1/key-id").derive(key)
        self._id = f"local:{fingerprint.hex()}"

    @property
    def key_id(self) -> str:
        return self._id

    def derive(self, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
        return HKDF(hashes.SHA256(), length, salt=salt or None, info=info).derive(self._key)

    def __repr__(self) -> str:  # never the key itself
        return f"LocalMasterKey({self._id})"


def _decode_key(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise PosflowError(
            f"the master key in {where} is not base64", fix="store base64 of 32 random bytes"
        ) from None


def master_key_from_settings(settings: Settings) -> LocalMasterKey:
    """The master key: ``security.master_key`` (env), else ``master_key_file``.

    In the dev profile with neither set, a key is created once under
    ``<stack>/keys/master.key`` (mode 0600); production refuses to run without one.
    """
    sec = settings.security
    if sec.master_key is not None:
        return LocalMasterKey(
            _decode_key(sec.master_key.get_secret_value(), "POSFLOW_SECURITY__MASTER_KEY")
        )
    path = sec.master_key_file
    if path is None:
        if sec.profile == "production":
            raise PosflowError(
                "no master key configured for the production profile",
                fix="set POSFLOW_SECURITY__MASTER_KEY_FILE (mode 0600) or "
                "POSFLOW_SECURITY__MASTER_KEY, or implement KeyProvider for your KMS",
            )
        path = settings.stack.root / "keys" / "master.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise PosflowError(
            f"cannot read the master key file {path}: {exc.strerror}",
            fix="check POSFLOW_SECURITY__MASTER_KEY_FILE",
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PosflowError(
            f"the master key file {path} is readable by group or others "
            f"(mode {stat.S_IMODE(mode):o})",
            fix=f"chmod 600 {path}",
        )
    return LocalMasterKey(_decode_key(text, str(path)))


class MerchantKeyRevokedError(PosflowError):
    """The merchant's key was revoked (or the version retired): the data is unreadable."""


@dataclass(frozen=True)
class KeyVersion:
    merchant_id: str
    version: int
    status: str
    created_by: str
    revoked_by: str | None
    has_material: bool


def _info(*parts: str | int) -> bytes:
    return json.dumps(list(parts), separators=(",", ":")).encode()


def _kek(provider: KeyProvider) -> AESGCM:
    return AESGCM(provider.derive(salt=b"", info=_KEK_INFO))


def _wrap_seed(provider: KeyProvider, merchant_id: str, version: int, seed: bytes) -> bytes:
    nonce = secrets.token_bytes(_NONCE)
    aad = _info("posflow/v1/seed", merchant_id, version)
    return nonce + _kek(provider).encrypt(nonce, seed, aad)


def _merchant_key(conn: Conn, provider: KeyProvider, merchant_id: str, version: int) -> AESGCM:
    row = conn.execute(
        "SELECT status, wrapped_seed FROM merchant_keys WHERE merchant_id = %s AND version = %s",
        [merchant_id, version],
    ).fetchone()
    if row is None:
        raise PosflowError(f"merchant {merchant_id!r} has no key version {version}")
    status, wrapped = str(row[0]), row[1]
    if wrapped is None:
        raise MerchantKeyRevokedError(
            f"merchant {merchant_id!r} key version {version} is {status}: "
            "its data can no longer be decrypted",
            fix="issue a new key (`posflow keys issue`) and have the merchant set its secrets again"
            if status == "revoked"
            else None,
        )
    blob = bytes(wrapped)
    try:
        seed = _kek(provider).decrypt(
            blob[:_NONCE], blob[_NONCE:], _info("posflow/v1/seed", merchant_id, version)
        )
    except InvalidTag:
        raise PosflowError(
            f"merchant {merchant_id!r} key version {version} does not unwrap with master key "
            f"{provider.key_id}",
            fix="configure the master key this database was created with",
        ) from None
    key = provider.derive(salt=seed, info=_info("posflow/v1/merchant-key", merchant_id, version))
    return AESGCM(key)


_ACTIVE = "SELECT version FROM merchant_keys WHERE merchant_id = %s AND status = 'active'"
_ACTIVE_SHARE = _ACTIVE + " FOR SHARE"


def _active_version(conn: Conn, merchant_id: str, *, share: bool = False) -> int:
    # FOR SHARE (writers of secrets): a rotation cannot retire this version before the
    # write commits, and a version turned 'retiring' meanwhile is not returned.
    row = conn.execute(_ACTIVE_SHARE if share else _ACTIVE, [merchant_id]).fetchone()
    if row is None:
        raise MerchantKeyRevokedError(
            f"merchant {merchant_id!r} has no active key (never issued, or revoked)",
            fix=f"`posflow keys issue --merchant {merchant_id}`",
        )
    return int(row[0])


def _lock_merchant(conn: Conn, merchant_id: str) -> None:
    # Serialise key changes of one merchant (issue / rotate / revoke) across processes.
    conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('posflow.merchant_keys:' || %s, 0))",
        [merchant_id],
    )


def is_merchant_active(conn: Conn, merchant_id: str) -> bool:
    """True when the merchant has an active, usable key: the API accepts its API keys."""
    row = conn.execute(
        "SELECT 1 FROM merchant_keys WHERE merchant_id = %s AND status = 'active'"
        " AND wrapped_seed IS NOT NULL",
        [merchant_id],
    ).fetchone()
    return row is not None


def key_versions(conn: Conn, merchant_id: str) -> list[KeyVersion]:
    rows = conn.execute(
        "SELECT merchant_id, version, status, created_by, revoked_by, wrapped_seed IS NOT NULL"
        " FROM merchant_keys WHERE merchant_id = %s ORDER BY version",
        [merchant_id],
    ).fetchall()
    return [KeyVersion(str(a), int(b), str(c), str(d), e, bool(f)) for a, b, c, d, e, f in rows]


def _target(merchant_id: str) -> Target:
    return Target("merchant", merchant_id, merchant_id)


def _audit(
    conn: Conn, actor: Principal, action: Action, merchant_id: str, source: str, **detail: Any
) -> None:
    record_action(conn, actor, action, _target(merchant_id), source=source, detail=detail)


def issue_merchant_key(
    conn: Conn, provider: KeyProvider, merchant_id: str, *, actor: Principal, source: str
) -> int:
    """Create the merchant's first (or, after a revocation, a new) key; returns its version."""
    authorize_audited(conn, actor, Action.KEY_ISSUE, _target(merchant_id), source=source)
    with conn.transaction():
        _lock_merchant(conn, merchant_id)
        if (
            conn.execute("SELECT 1 FROM merchants WHERE merchant_id = %s", [merchant_id]).fetchone()
            is None
        ):
            raise PosflowError(f"no merchant {merchant_id!r}", fix="check the merchant id")
        row = conn.execute(
            "SELECT max(version), bool_or(status IN ('active', 'retiring'))"
            " FROM merchant_keys WHERE merchant_id = %s",
            [merchant_id],
        ).fetchone()
        last, live = (int(row[0] or 0), bool(row[1])) if row else (0, False)
        if live:
            raise PosflowError(
                f"merchant {merchant_id!r} already has a key",
                fix=f"rotate it instead: `posflow keys rotate --merchant {merchant_id}`",
            )
        version = last + 1
        conn.execute(
            "INSERT INTO merchant_keys (merchant_id, version, status, wrapped_seed,"
            " master_key_id, created_by) VALUES (%s, %s, 'active', %s, %s, %s)",
            [
                merchant_id,
                version,
                _wrap_seed(provider, merchant_id, version, secrets.token_bytes(32)),
                provider.key_id,
                actor.id,
            ],
        )
        _audit(conn, actor, Action.KEY_ISSUE, merchant_id, source, version=version)
    return version


def put_secret(
    conn: Conn, provider: KeyProvider, merchant_id: str, purpose: str, value: bytes | str
) -> int:
    """Store (or replace) a merchant secret, encrypted with its active key; returns the version.

    Authorisation is the caller's (the API checks the merchant's own principal).
    """
    plain = value.encode() if isinstance(value, str) else value
    with conn.transaction():
        version = _active_version(conn, merchant_id, share=True)
        key = _merchant_key(conn, provider, merchant_id, version)
        nonce = secrets.token_bytes(_NONCE)
        aad = _info("posflow/v1/merchant-secret", merchant_id, purpose, version)
        sealed = key.encrypt(nonce, plain, aad)
        conn.execute(
            "INSERT INTO merchant_secrets (merchant_id, purpose, key_version, nonce, ciphertext)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (merchant_id, purpose) DO UPDATE SET"
            " key_version = EXCLUDED.key_version, nonce = EXCLUDED.nonce,"
            " ciphertext = EXCLUDED.ciphertext, updated_at = now()",
            [merchant_id, purpose, version, nonce, sealed],
        )
    return version


def get_secret(conn: Conn, provider: KeyProvider, merchant_id: str, purpose: str) -> bytes:
    """Decrypt a merchant secret; MerchantKeyRevokedError once the merchant's key is revoked."""
    row = conn.execute(
        "SELECT key_version, nonce, ciphertext FROM merchant_secrets"
        " WHERE merchant_id = %s AND purpose = %s",
        [merchant_id, purpose],
    ).fetchone()
    if row is None:
        raise PosflowError(f"merchant {merchant_id!r} has no {purpose!r} secret")
    version, nonce, sealed = int(row[0]), bytes(row[1]), bytes(row[2])
    key = _merchant_key(conn, provider, merchant_id, version)
    aad = _info("posflow/v1/merchant-secret", merchant_id, purpose, version)
    try:
        return key.decrypt(nonce, sealed, aad)
    except InvalidTag:
        raise PosflowError(
            f"merchant {merchant_id!r} secret {purpose!r} fails authentication "
            "(altered, or moved from another merchant or purpose)"
        ) from None


def revoke_merchant_key(
    conn: Conn, merchant_id: str, *, actor: Principal, source: str, reason: str = ""
) -> list[int]:
    """Crypto-shred the merchant: every live key version revoked, its seed deleted."""
    authorize_audited(conn, actor, Action.KEY_REVOKE, _target(merchant_id), source=source)
    with conn.transaction():
        _lock_merchant(conn, merchant_id)
        rows = conn.execute(
            "UPDATE merchant_keys SET status = 'revoked', wrapped_seed = NULL,"
            " revoked_at = now(), revoked_by = %s"
            " WHERE merchant_id = %s AND status IN ('active', 'retiring') RETURNING version",
            [actor.id, merchant_id],
        ).fetchall()
        if not rows:
            raise PosflowError(
                f"merchant {merchant_id!r} has no live key to revoke",
                fix=f"`posflow keys status --merchant {merchant_id}` shows its key versions",
            )
        versions = sorted(int(r[0]) for r in rows)
        _audit(
            conn, actor, Action.KEY_REVOKE, merchant_id, source, versions=versions, reason=reason
        )
    return versions


@dataclass(frozen=True)
class Rotation:
    old_versions: list[int]
    new_version: int
    reencrypted: int


def rotate_merchant_key(
    conn: Conn,
    provider: KeyProvider,
    merchant_id: str,
    *,
    actor: Principal,
    source: str,
    batch: int = 100,
) -> Rotation:
    """New key version; secrets re-encrypted in batches; old version retired at the end.

    Safe to run again after a crash: a version left ``retiring`` is finished first.
    """
    authorize_audited(conn, actor, Action.KEY_ROTATE, _target(merchant_id), source=source)
    with conn.transaction():
        _lock_merchant(conn, merchant_id)
        old = _active_version(conn, merchant_id)
        new = old + 1
        last = conn.execute(
            "SELECT max(version) FROM merchant_keys WHERE merchant_id = %s", [merchant_id]
        ).fetchone()
        new = max(new, int(last[0]) + 1 if last and last[0] is not None else 1)
        conn.execute(
            "UPDATE merchant_keys SET status = 'retiring' WHERE merchant_id = %s AND version = %s",
            [merchant_id, old],
        )
        conn.execute(
            "INSERT INTO merchant_keys (merchant_id, version, status, wrapped_seed,"
            " master_key_id, created_by) VALUES (%s, %s, 'active', %s, %s, %s)",
            [
                merchant_id,
                new,
                _wrap_seed(provider, merchant_id, new, secrets.token_bytes(32)),
                provider.key_id,
                actor.id,
            ],
        )
    moved = 0
    retiring = [v.version for v in key_versions(conn, merchant_id) if v.status == "retiring"]
    for version in retiring:
        moved += _reencrypt(conn, provider, merchant_id, old=version, new=new, batch=batch)
    with conn.transaction():
        _lock_merchant(conn, merchant_id)
        left = conn.execute(
            "SELECT count(*) FROM merchant_secrets s JOIN merchant_keys k"
            " ON k.merchant_id = s.merchant_id AND k.version = s.key_version"
            " WHERE s.merchant_id = %s AND k.status = 'retiring'",
            [merchant_id],
        ).fetchone()
        if left and int(left[0]):
            raise PosflowError(
                f"merchant {merchant_id!r}: {left[0]} secrets were written under the old key "
                "during the rotation",
                fix=f"run `posflow keys rotate --merchant {merchant_id}` again to finish",
            )
        conn.execute(
            "UPDATE merchant_keys SET status = 'retired', wrapped_seed = NULL, retired_at = now()"
            " WHERE merchant_id = %s AND status = 'retiring'",
            [merchant_id],
        )
        _audit(
            conn,
            actor,
            Action.KEY_ROTATE,
            merchant_id,
            source,
            old_versions=retiring,
            new_version=new,
            reencrypted=moved,
        )
    return Rotation(retiring, new, moved)


def _reencrypt(
    conn: Conn, provider: KeyProvider, merchant_id: str, *, old: int, new: int, batch: int
) -> int:
    moved = 0
    old_key = _merchant_key(conn, provider, merchant_id, old)
    new_key = _merchant_key(conn, provider, merchant_id, new)
    for _ in range(1_000_000):  # bounded: each pass moves up to `batch` rows or ends
        with conn.transaction():
            rows = conn.execute(
                "SELECT purpose, nonce, ciphertext FROM merchant_secrets"
                " WHERE merchant_id = %s AND key_version = %s"
                " LIMIT %s FOR UPDATE SKIP LOCKED",
                [merchant_id, old, batch],
            ).fetchall()
            for purpose, nonce, sealed in rows:
                plain = old_key.decrypt(
                    bytes(nonce),
                    bytes(sealed),
                    _info("posflow/v1/merchant-secret", merchant_id, str(purpose), old),
                )
                fresh = secrets.token_bytes(_NONCE)
                conn.execute(
                    "UPDATE merchant_secrets SET key_version = %s, nonce = %s, ciphertext = %s,"
                    " updated_at = now() WHERE merchant_id = %s AND purpose = %s",
                    [
                        new,
                        fresh,
                        new_key.encrypt(
                            fresh,
                            plain,
                            _info("posflow/v1/merchant-secret", merchant_id, str(purpose), new),
                        ),
                        merchant_id,
                        purpose,
                    ],
                )
            moved += len(rows)
        if not rows:
            break
    left = conn.execute(
        "SELECT count(*) FROM merchant_secrets WHERE merchant_id = %s AND key_version = %s",
        [merchant_id, old],
    ).fetchone()
    if left and int(left[0]):
        raise PosflowError(
            f"merchant {merchant_id!r}: {left[0]} secrets still under key version {old} "
            "(locked by another writer)",
            fix=f"run `posflow keys rotate --merchant {merchant_id}` again to finish",
        )
    return moved
