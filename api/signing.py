"""Webhook signatures and retry timing (pure functions).

A delivery carries ``Posflow-Timestamp: <unix seconds>`` and
``Posflow-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``. A
receiver recomputes the HMAC over the raw body, compares in constant time and
refuses timestamps older than a few minutes (a captured request cannot be
replayed later). ``v1=`` names the scheme, so a future scheme can be sent
alongside during a migration (``v1=...,v2=...``).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

__all__ = ["backoff_s", "sign", "verify"]


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``Posflow-Signature`` header value."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(
    secret: bytes,
    timestamp: str,
    body: bytes,
    header: str,
    *,
    now: float,
    tolerance_s: float = 300.0,
) -> bool:
    """What a receiver does: a fresh timestamp and one matching ``v1=`` signature."""
    if not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body)
    return any(hmac.compare_digest(part.strip(), expected) for part in header.split(","))


def backoff_s(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    jitter: float,
    rand: Callable[[], float],
) -> float:
    """Wait after failed attempt number ``attempt`` (1, 2, ...): exponential, capped, jittered.

    The cap ``d = min(max_s, base_s * 2**(attempt-1))``, then a uniform draw in
    ``[d * (1 - jitter), d]``: receivers that come back are not hit by every
    sender at the same instant.
    """
    exponent = min(max(attempt, 1) - 1, 62)
    ceiling = min(max_s, base_s * 2.0**exponent)
    return ceiling * (1.0 - jitter * rand())
