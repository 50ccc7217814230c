"""Composition root of the merchant feed API: ``build(settings)`` (and ``create_app``, its app)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import FrameType

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.access import Access
from api.feed import FeedHub
from api.metrics import ApiMetrics, RequestMetricsMiddleware
from api.pools import async_pool
from api.problems import install_handlers
from api.ratelimit import RateLimiter
from api.routes import ApiContext, make_router, make_staff_router
from posflow.cost import Handled, cost_registry, exposition
from posflow.security.apiauth import Authenticator
from posflow.security.tls import postgres_dsn
from posflow.settings import Settings

__all__ = ["ApiService", "app_from_environment", "build", "create_app"]

log = logging.getLogger("posflow.api")

_DESCRIPTION = """\
Balances, transaction history and a live cash-flow stream, per merchant.

* Authenticate with `Authorization: Bearer pf_<key id>_<secret>` (issued with
  `posflow api keys issue`). A key has a role: `merchant` keys read their own merchant
  (another merchant's id answers 404, like one that does not exist); staff keys read what
  their role allows (`finance`: every merchant's data; `support_agent`/`support_lead`: the
  merchant list without money); other refusals answer 403 and are recorded in the audit trail.
* A merchant whose merchant key was revoked (crypto-shredded) is refused with 401.
* Money is integer minor units with an ISO 4217 currency.
* Errors are RFC 9457 problem details (`application/problem+json`); a bad parameter is named in
  `errors[].name`.
* Rate limit: a token bucket per key and API process; 429 carries `Retry-After`.
* The stream (`/events/stream`) is server-sent events with `id` = seq; reconnect with
  `Last-Event-ID` to get every later event exactly once.
"""


def create_app(settings: Settings, metrics: ApiMetrics | None = None) -> FastAPI:
    """The ASGI app; its lifespan opens the database pools and the LISTEN connection."""
    return build(settings, metrics).app


def build(settings: Settings, metrics: ApiMetrics | None = None) -> ApiService:
    """The composition root of the merchant feed API: every client, the app and its hub."""
    api = settings.api
    metrics = metrics or ApiMetrics()
    conninfo = postgres_dsn(settings)
    pool = async_pool(conninfo, max_size=api.db_pool_max, name="posflow-api")
    hub = FeedHub(pool, conninfo, metrics, poll_s=api.sse_poll_s)
    access = Access(conninfo, audit_staff_reads=api.audit_staff_reads)
    ctx = ApiContext(
        settings=api,
        pool=pool,
        auth=Authenticator(pool),
        access=access,
        limiter=RateLimiter(api.rate_per_s, api.rate_burst),
        hub=hub,
        metrics=metrics,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pool.open(wait=False)
        access.open()
        hub.start()
        try:
            yield
        finally:
            await hub.stop()
            await pool.close()
            await asyncio.to_thread(access.close)

    app = FastAPI(
        title="posflow merchant feed API",
        version="1",
        description=_DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    install_handlers(app)
    app.include_router(make_staff_router(api))
    app.include_router(make_router(api))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        if hub.listening:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready", "reason": "no LISTEN connection"}, 503)

    cost = cost_registry(metrics.registry, Handled("api", ("posflow_api_requests",)))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(_: Request) -> Response:
        return Response(exposition(metrics.registry, cost), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return ApiService(settings=settings, app=app, metrics=metrics, hub=hub)


class _Server(uvicorn.Server):
    """uvicorn, but SIGTERM first ends the open streams so the graceful drain can finish."""

    def __init__(self, config: uvicorn.Config, hub: FeedHub) -> None:
        super().__init__(config)
        self.hub = hub
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.hub.close_streams, "server shutting down")
        super().handle_exit(sig, frame)


@dataclass
class ApiService:
    settings: Settings
    app: FastAPI
    metrics: ApiMetrics
    hub: FeedHub

    def server(self, host: str | None = None, port: int | None = None) -> uvicorn.Server:
        config = uvicorn.Config(
            self.app,
            host=host or self.settings.services.bind_host,
            port=port if port is not None else self.settings.services.api,
            log_config=None,  # posflow.logs owns logging
            access_log=False,  # requests are counted in Prometheus instead
            timeout_graceful_shutdown=int(self.settings.api.shutdown_grace_s),
            lifespan="on",
        )
        return _Server(config, self.hub)

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT: streams end with a `close` event, then the server stops."""
        if self.settings.api.workers > 1:
            # Each process has its own pool, LISTEN connection and rate-limit buckets.
            uvicorn.run(
                "api.app:app_from_environment",
                factory=True,
                workers=self.settings.api.workers,
                host=self.settings.services.bind_host,
                port=self.settings.services.api,
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=int(self.settings.api.shutdown_grace_s),
            )
            return
        server = self.server()
        log.info(
            "merchant feed API on http://%s:%d (OpenAPI at /openapi.json, metrics at /metrics)",
            server.config.host,
            server.config.port,
        )
        server.run()


def app_from_environment() -> FastAPI:
    """uvicorn's factory in multi-process mode (``ApiSettings.workers > 1``)."""
    return create_app(Settings())
