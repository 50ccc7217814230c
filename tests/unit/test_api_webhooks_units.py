"""Webhook signatures, retry timing and URL rules (no services)."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from api.signing import backoff_s, sign, verify
from api.webhooks import validate_url
from posflow.errors import PosflowError

NOW = 1_800_000_000.0


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"id":"M-1:7"}'
    expected = hmac.new(b"s3cret", b"1800000000." + body, hashlib.sha256).hexdigest()
    assert sign(b"s3cret", "1800000000", body) == f"v1={expected}"


@given(st.binary(max_size=200), st.binary(min_size=1, max_size=40))
def test_verify_accepts_the_signature_and_nothing_altered(body: bytes, secret: bytes) -> None:
    stamp = str(int(NOW))
    header = sign(secret, stamp, body)
    assert verify(secret, stamp, body, header, now=NOW)
    assert verify(secret, stamp, body, f"v0=abc, {header}", now=NOW)  # several schemes
    assert not verify(secret, stamp, body + b"x", header, now=NOW)
    assert not verify(secret + b"x", stamp, body, header, now=NOW)
    assert not verify(secret, str(int(NOW) - 1), body, header, now=NOW)


def test_verify_refuses_stale_or_malformed_timestamps() -> None:
    stamp = str(int(NOW) - 301)
    assert not verify(b"k", stamp, b"{}", sign(b"k", stamp, b"{}"), now=NOW)
    assert verify(b"k", stamp, b"{}", sign(b"k", stamp, b"{}"), now=NOW, tolerance_s=400)
    assert not verify(b"k", "-5", b"{}", sign(b"k", "-5", b"{}"), now=NOW)


@given(
    st.integers(min_value=1, max_value=200),
    st.floats(min_value=0.01, max_value=10),
    st.floats(min_value=0, max_value=1),
    st.floats(min_value=0, max_value=0.999),
)
def test_backoff_doubles_is_capped_and_jitters_within_bounds(
    attempt: int, base: float, jitter: float, draw: float
) -> None:
    wait = backoff_s(attempt, base_s=base, max_s=300.0, jitter=jitter, rand=lambda: draw)
    ceiling = min(300.0, base * 2.0 ** min(attempt - 1, 62))
    assert ceiling * (1 - jitter) - 1e-9 <= wait <= ceiling + 1e-9


def test_backoff_sequence_without_jitter() -> None:
    waits = [
        backoff_s(n, base_s=1.0, max_s=10.0, jitter=0.0, rand=lambda: 0.5) for n in range(1, 7)
    ]
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


@pytest.mark.parametrize(
    ("url", "allow_http", "error"),
    [
        ("https://example.com/h", False, None),
        ("http://127.0.0.1:8000/h", False, None),
        ("http://localhost/h", False, None),
        ("http://example.com/h", True, None),
        ("http://example.com/h", False, "plain http"),
        ("example.com/h", False, "not an absolute http(s) URL"),
        ("https://u:p@example.com/h", False, "must not carry credentials"),
    ],
)
def test_webhook_url_rules(url: str, *, allow_http: bool, error: str | None) -> None:
    if error is None:
        assert validate_url(url, allow_http=allow_http) == url
    else:
        with pytest.raises(PosflowError, match=error.replace("(", r"\(").replace(")", r"\)")):
            validate_url(url, allow_http=allow_http)
