"""Every service's HTTP endpoints: /metrics, /healthz (alive), /readyz (its own readiness).

/metrics carries what the service costs too (CPU seconds, messages handled; see
:mod:`posflow.cost`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from posflow.cost import Handled, cost_registry, exposition

__all__ = ["Route", "start_http"]


Route = tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]


async def start_http(
    host: str,
    port: int,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    routes: Iterable[Route] = (),
    *,
    ready_detail: Callable[[], Mapping[str, object]] | None = None,
    handled: Handled | None = None,
) -> web.AppRunner:
    """Serve the endpoints (and ``routes``: ``(method, path, handler)``) until the returned
    runner is cleaned up. ``ready_detail()``, when given, adds its fields to /readyz's body
    (e.g. why the last configuration reload was refused). /metrics serves ``registry`` and
    the process's CPU and memory, plus ``posflow_messages_handled_total`` when ``handled``
    says which of the service's counters count its messages."""
    cost = cost_registry(registry, handled)

    async def metrics(_: web.Request) -> web.Response:
        body = exposition(registry, cost)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        is_ready = ready()
        body: dict[str, object] = {"status": "ready" if is_ready else "not ready"}
        if ready_detail is not None:
            body |= ready_detail()
        return web.json_response(body, status=200 if is_ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
