"""The HTTP surface: balances, transaction history, cash-flow events (page and stream).

No ``from __future__ import annotations`` here: FastAPI reads the route signatures,
whose bounds (``Limit``) come from the settings inside :func:`make_router`.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Security
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import AsyncConnectionPool

from api.access import Access, ListLevel
from api.feed import FeedHub, fetch_events
from api.metrics import ApiMetrics
from api.models import (
    Balance,
    Balances,
    CashflowEventOut,
    EventsPage,
    MerchantsPage,
    MerchantSummary,
    Transaction,
    TransactionsPage,
)
from api.paging import decode_cursor, encode_cursor, parse_time
from api.problems import problem_responses
from api.ratelimit import RateLimiter
from api.stream import event_stream
from posflow.security.apiauth import Authenticator, Principal
from posflow.security.problems import Problem, bad_parameter
from posflow.settings import ApiSettings

__all__ = ["ApiContext", "make_router", "make_staff_router"]

_MAX_SEQ = 2**63 - 1
# Shown in OpenAPI as the security scheme; the checks themselves are Authenticator's.
_bearer = HTTPBearer(auto_error=False, description="API key: `Bearer pf_<key id>_<secret>`")


@dataclass
class ApiContext:
    settings: ApiSettings
    pool: AsyncConnectionPool
    auth: Authenticator
    access: Access
    limiter: RateLimiter
    hub: FeedHub
    metrics: ApiMetrics


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


async def _principal(
    request: Request,
    _scheme: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    ctx = _ctx(request)
    principal = await ctx.auth.authenticate(request.headers.get("authorization"))
    wait = ctx.limiter.take(principal.key_id)
    if wait > 0:
        ctx.metrics.rate_limited.inc()
        retry = RateLimiter.retry_after(wait)
        raise Problem(
            429,
            "rate-limited",
            "Too many requests",
            f"rate limit of API key {principal.key_id} exceeded "
            f"({ctx.settings.rate_per_s:g}/s, burst {ctx.settings.rate_burst}); "
            f"retry after {retry} s",
            headers={"Retry-After": retry},
        )
    return principal


def _source(request: Request) -> str:
    """Where a call came from, for the audit trail: the peer address (no proxy header trusted)."""
    return f"api:{request.client.host if request.client else 'unknown'}"


async def _merchant(
    request: Request,
    merchant_id: Annotated[str, Path(min_length=1, max_length=128, description="merchant id")],
    principal: Annotated[Principal, Depends(_principal)],
) -> str:
    await _ctx(request).access.merchant_read(principal, merchant_id, _source(request))
    return merchant_id


Merchant = Annotated[str, Depends(_merchant)]


def _last_event_id(header: str | None, query: int | None) -> int:
    if header is not None:
        value = header.strip()
        if not value.isdigit() or int(value) > _MAX_SEQ:
            raise bad_parameter(
                "header", "Last-Event-ID", f"{header!r} is not an event id (a non-negative integer)"
            )
        return int(value)
    return query or 0


def _balance(row: tuple[Any, ...]) -> Balance:
    c, p, a, o, u = row
    return Balance(
        currency=str(c).strip(), pending_minor=p, available_minor=a, paid_out_minor=o, updated_at=u
    )


def make_staff_router(settings: ApiSettings) -> APIRouter:
    """``GET /v1/merchants``: the merchant list for staff roles."""
    router = APIRouter(prefix="/v1/merchants", tags=["staff"])

    @router.get(
        "", response_model=MerchantsPage, responses=problem_responses(400, 401, 403, 429, 503)
    )
    async def merchants(
        request: Request,
        principal: Annotated[Principal, Depends(_principal)],
        *,
        after: Annotated[
            str | None, Query(max_length=128, description="merchants with id > after")
        ] = None,
        limit: Annotated[
            int, Query(ge=1, le=settings.page_max, description=f"page size, 1..{settings.page_max}")
        ] = settings.page_default,
    ) -> MerchantsPage:
        """Merchants by id. Finance: with balances; support roles: without (no money read)."""
        ctx = _ctx(request)
        level = await ctx.access.merchant_list(principal, _source(request))
        async with ctx.pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT m.merchant_id, m.name,
                       (SELECT count(*) FROM terminals t WHERE t.merchant_id = m.merchant_id)
                  FROM merchants m
                 WHERE %(after)s::text IS NULL OR m.merchant_id > %(after)s
                 ORDER BY m.merchant_id
                 LIMIT %(n)s
                """,
                {"after": after, "n": limit + 1},
            )
            rows = await cur.fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            balances: dict[str, list[Balance]] | None = None
            if level is ListLevel.WITH_BALANCES:
                cur = await conn.execute(
                    """
                    SELECT merchant_id, currency, pending_minor, available_minor,
                           paid_out_minor, updated_at
                      FROM merchant_balances WHERE merchant_id = ANY(%s)
                     ORDER BY merchant_id, currency
                    """,
                    [[r[0] for r in rows]],
                )
                balances = {}
                for row in await cur.fetchall():
                    balances.setdefault(str(row[0]), []).append(_balance(row[1:]))
        items = [
            MerchantSummary(
                merchant_id=m,
                name=name,
                terminals=int(n),
                balances=None if balances is None else balances.get(m, []),
            )
            for m, name, n in rows
        ]
        return MerchantsPage(items=items, next_after=rows[-1][0] if more else None)

    return router


def make_router(settings: ApiSettings) -> APIRouter:
    """The /v1 routes; bounds come from the settings (and show in OpenAPI)."""
    router = APIRouter(prefix="/v1/merchants/{merchant_id}", tags=["merchant feed"])
    common = problem_responses(400, 401, 403, 404, 429, 503)
    Limit = Annotated[  # noqa: N806 - a type alias
        int,
        Query(ge=1, le=settings.page_max, description=f"page size, 1..{settings.page_max}"),
    ]

    @router.get("/balances", response_model=Balances, responses=common)
    async def balances(request: Request, merchant_id: Merchant) -> Balances:
        """The merchant's balances per currency, in minor units."""
        async with _ctx(request).pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT currency, pending_minor, available_minor, paid_out_minor, updated_at
                  FROM merchant_balances WHERE merchant_id = %s ORDER BY currency
                """,
                [merchant_id],
            )
            rows = await cur.fetchall()
        return Balances(merchant_id=merchant_id, balances=[_balance(r) for r in rows])

    @router.get("/transactions", response_model=TransactionsPage, responses=common)
    async def transactions(
        request: Request,
        merchant_id: Merchant,
        *,
        limit: Limit = settings.page_default,
        cursor: Annotated[str | None, Query(max_length=200, description="next_cursor")] = None,
        from_: Annotated[
            str | None,
            Query(alias="from", description="RFC 3339 with timezone; occurred_at >= from"),
        ] = None,
        to: Annotated[
            str | None, Query(description="RFC 3339 with timezone; occurred_at < to")
        ] = None,
    ) -> TransactionsPage:
        """The merchant's transactions, newest first, one keyset page at a time."""
        start = parse_time("from", from_)
        end = parse_time("to", to)
        if start is not None and end is not None and end <= start:
            raise bad_parameter("query", "to", f"must be later than 'from' ({from_})")
        position: tuple[datetime, int] | None = decode_cursor(cursor) if cursor else None
        params: dict[str, Any] = {
            "m": merchant_id,
            "start": start,
            "end": end,
            "ct": position[0] if position else None,
            "cid": position[1] if position else None,
            "n": limit + 1,
        }
        async with _ctx(request).pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT entry_id, txn_id, terminal_id, txn_type, currency, gross_minor,
                       fee_minor, net_minor, occurred_at, recorded_at
                  FROM ledger_entries
                 WHERE merchant_id = %(m)s
                   AND (%(start)s::timestamptz IS NULL OR occurred_at >= %(start)s)
                   AND (%(end)s::timestamptz IS NULL OR occurred_at < %(end)s)
                   AND (%(ct)s::timestamptz IS NULL
                        OR (occurred_at, entry_id) < (%(ct)s::timestamptz, %(cid)s::bigint))
                 ORDER BY occurred_at DESC, entry_id DESC
                 LIMIT %(n)s
                """,
                params,
            )
            rows = await cur.fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        items = [
            Transaction(
                txn_id=t,
                terminal_id=term,
                type=kind,
                currency=str(c).strip(),
                gross_minor=g,
                fee_minor=f,
                net_minor=n,
                occurred_at=occ,
                recorded_at=rec,
            )
            for _, t, term, kind, c, g, f, n, occ, rec in rows
        ]
        next_cursor = encode_cursor(rows[-1][8], rows[-1][0]) if more else None
        return TransactionsPage(merchant_id=merchant_id, items=items, next_cursor=next_cursor)

    @router.get("/events", response_model=EventsPage, responses=common)
    async def events(
        request: Request,
        merchant_id: Merchant,
        *,
        after: Annotated[int, Query(ge=0, le=_MAX_SEQ, description="events with seq > after")] = 0,
        limit: Limit = settings.page_default,
    ) -> EventsPage:
        """Cash-flow events by seq, oldest first (the stream's history, as pages)."""
        rows = await fetch_events(_ctx(request).pool, merchant_id, after, limit)
        items = [CashflowEventOut.model_validate_json(r.data) for r in rows]
        return EventsPage(
            merchant_id=merchant_id,
            items=items,
            next_after=rows[-1].seq if rows else None,
        )

    @router.get(
        "/events/stream",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "server-sent events: `id` = seq, `event: cashflow`, JSON `data`"
                " (a CashflowEventOut); comments are keep-alives",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            **common,
        },
    )
    async def stream(
        request: Request,
        merchant_id: Merchant,
        principal: Annotated[Principal, Depends(_principal)],
        *,
        last_event_id: Annotated[
            str | None,
            Header(alias="Last-Event-ID", description="resume after this seq (sent on reconnect)"),
        ] = None,
        after: Annotated[
            int | None,
            Query(ge=0, le=_MAX_SEQ, description="resume after this seq when no Last-Event-ID"),
        ] = None,
    ) -> StreamingResponse:
        """Live cash-flow events; every event exactly once across reconnects."""
        ctx = _ctx(request)
        last = _last_event_id(last_event_id, after)
        body = event_stream(
            ctx.hub,
            merchant_id,
            last,
            ctx.metrics,
            queue_max=ctx.settings.sse_queue_max,
            heartbeat_s=ctx.settings.sse_heartbeat_s,
            retry_ms=ctx.settings.sse_retry_ms,
            recheck=lambda: ctx.auth.recheck(principal),
            recheck_s=ctx.settings.auth_recheck_s,
        )
        return StreamingResponse(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router
