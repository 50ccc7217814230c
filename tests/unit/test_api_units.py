"""Pure parts of the merchant feed API: keys, rate limits, times, cursors, stream inbox."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from api.feed import EventRow, Subscription
from api.paging import decode_cursor, encode_cursor, parse_time
from api.ratelimit import RateLimiter
from posflow.security.apikeys import hash_matches, parse_key, secret_hash
from posflow.security.problems import Problem

NOW = datetime(2026, 11, 5, 12, 0, tzinfo=UTC)


def test_key_format_is_parsed_and_anything_else_refused() -> None:
    secret = "A" * 40 + "-_b"
    key = parse_key(f"pf_0123456789abcdef_{secret}")
    assert key is not None
    assert (key.key_id, key.secret) == ("0123456789abcdef", secret)
    for bad in ("", "pf_0123456789abcdef", f"pk_0123456789abcdef_{secret}",
                f"pf_0123456789ABCDEF_{secret}", f"pf_0123456789abcdef_{secret}x"):  # fmt: skip
        assert parse_key(bad) is None, bad
    assert hash_matches(secret, secret_hash(secret))
    assert not hash_matches(secret + "x", secret_hash(secret))


def test_token_bucket_allows_burst_then_refuses_until_refilled() -> None:
    clock = [100.0]
    limiter = RateLimiter(2.0, 3, clock=lambda: clock[0])
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k") == pytest.approx(0.5)
    assert limiter.take("other") == 0.0  # per key
    clock[0] += 0.5
    assert limiter.take("k") == 0.0
    assert limiter.take("k") == pytest.approx(0.5)
    assert RateLimiter.retry_after(0.01) == "1"
    assert RateLimiter.retry_after(2.2) == "3"


def test_token_bucket_forgets_least_recent_keys_beyond_its_bound() -> None:
    limiter = RateLimiter(1.0, 1, max_keys=2, clock=lambda: 0.0)
    for key in ("a", "b", "c"):
        assert limiter.take(key) == 0.0
    assert limiter.take("a") == 0.0  # evicted, so full again
    assert limiter.take("c") == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-05T12:00:00Z", NOW),
        ("2026-11-05t14:00:00.5+02:00", NOW + timedelta(milliseconds=500)),
        ("2026-11-05T12:00:00.123456789Z", NOW + timedelta(microseconds=123456)),
    ],
)
def test_rfc3339_times_with_offsets_are_parsed(text: str, expected: datetime) -> None:
    assert parse_time("from", text) == expected


@pytest.mark.parametrize(
    "text", ["2026-11-05T12:00:00", "2026-11-05", "2026-11-05 12:00:00Z", "2026-13-05T12:00:00Z"]
)
def test_times_without_timezone_or_invalid_name_the_parameter(text: str) -> None:
    with pytest.raises(Problem) as info:
        parse_time("to", text)
    assert info.value.status == 400
    errors = info.value.errors
    assert errors is not None
    assert errors == [{"in": "query", "name": "to", "detail": errors[0]["detail"]}]
    assert text in info.value.detail


@given(
    st.datetimes(timezones=st.just(timezone(timedelta(hours=-3)))),
    st.integers(min_value=0, max_value=2**63 - 1),
)
def test_cursor_round_trips(at: datetime, entry_id: int) -> None:
    assert decode_cursor(encode_cursor(at, entry_id)) == (at, entry_id)


@pytest.mark.parametrize(
    "cursor", ["", "!!!", "djF8eHx5", "djJ8MjAyNi0xMS0wNVQxMjowMDowMCswMDowMHwx"]
)
def test_foreign_cursors_are_refused_naming_cursor(cursor: str) -> None:
    with pytest.raises(Problem) as info:
        decode_cursor(cursor)
    assert info.value.errors is not None
    assert info.value.errors[0]["name"] == "cursor"


def _rows(*seqs: int) -> list[EventRow]:
    return [EventRow(s, NOW, f'{{"seq":{s}}}') for s in seqs]


async def test_subscription_overflow_drops_its_queue_and_asks_for_a_catch_up() -> None:
    sub = Subscription("m", last=0, max_events=3)
    sub.offer(0, _rows(1, 2))
    assert not sub.behind
    sub.offer(2, _rows(3, 4))  # 4 > 3 events buffered
    assert sub.behind
    assert sub.take() is None
    sub.offer(4, _rows(5))  # ignored until the stream has caught up
    assert sub.take() is None
    sub.reset()
    sub.offer(5, _rows(6))
    assert sub.take() == (5, _rows(6))


async def test_subscription_wait_returns_on_offer_close_or_timeout() -> None:
    sub = Subscription("m", last=0, max_events=10)
    started = asyncio.get_running_loop().time()
    await sub.wait(0.05)
    assert asyncio.get_running_loop().time() - started >= 0.04
    waiter = asyncio.create_task(sub.wait(5))
    await asyncio.sleep(0)
    sub.close("bye")
    await asyncio.wait_for(waiter, 1)
    assert sub.closed == "bye"
