"""Prometheus metrics of the merchant feed API and of the webhook deliverer, and the ASGI
middleware counting requests."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ApiMetrics", "DeliveryMetrics", "RequestMetricsMiddleware"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ApiMetrics:
    """One registry per app, so tests can run several servers in one process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "posflow_api_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "posflow_api_request_duration_seconds",
            "time to the response's first byte, by route template",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sse_clients = Gauge(
            "posflow_api_sse_clients", "server-sent-event streams open now", registry=r
        )
        self.events_delivered = Counter(
            "posflow_api_events_delivered", "cash-flow events written to SSE clients", registry=r
        )
        self.delivery_latency = Histogram(
            "posflow_api_delivery_latency_seconds",
            "cash-flow event recorded_at (database) -> handed to the client's connection",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sse_catchups = Counter(
            "posflow_api_sse_catchups",
            "times a stream read from the database instead of the live fan-out",
            ["reason"],
            registry=r,
        )
        self.sse_closed = Counter(
            "posflow_api_sse_closed",
            "streams ended by the server, by reason",
            ["reason"],
            registry=r,
        )
        self.notifications = Counter(
            "posflow_api_notifications", "posflow_cashflow NOTIFYs received", registry=r
        )
        self.listening = Gauge(
            "posflow_api_listening", "1 while the LISTEN connection is up", registry=r
        )
        self.rate_limited = Counter(
            "posflow_api_rate_limited", "requests refused with 429", registry=r
        )


class DeliveryMetrics:
    """The webhook deliverer's metrics (its own process and registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.attempts = Counter(
            "posflow_webhook_attempts",
            "delivery attempts by outcome (delivered, failed)",
            ["outcome"],
            registry=r,
        )
        self.seconds = Histogram(
            "posflow_webhook_attempt_seconds", "one POST, sent to answered", registry=r
        )
        self.parked = Counter(
            "posflow_webhook_parked",
            "endpoints that stopped: dead (gave up) or revoked (merchant key revoked)",
            ["state"],
            registry=r,
        )
        self.endpoints = Gauge(
            "posflow_webhook_endpoints", "endpoints by state", ["state"], registry=r
        )
        self.listening = Gauge(
            "posflow_webhook_listening", "1 while the LISTEN connection is up", registry=r
        )


class RequestMetricsMiddleware:
    """Counts every HTTP request by its route *template* (bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                self.metrics.request_seconds.labels(_route(scope)).observe(
                    time.perf_counter() - started
                )
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(_route(scope), scope["method"], str(status)).inc()


def _route(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"
