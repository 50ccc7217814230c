"""The webhook deliverer (``posflow api webhooks deliver``): cash-flow events to merchants.

Its own process, not a task of ``posflow api``: a slow or dead receiver never
competes with API requests, it scales apart from the API (which may run N uvicorn
workers that would otherwise each deliver), and it can be stopped without
stopping the API. Several deliverers may run: each endpoint is claimed with a
lease (``webhook_cursors.lease_owner/lease_until``, ``FOR UPDATE SKIP LOCKED``),
renewed with every delivered event.

Per endpoint, events go out **in seq order, one in flight**: POST JSON with
``Posflow-Event-Id: <merchant>:<seq>`` (receivers de-duplicate on it: delivery
is at least once), ``Posflow-Timestamp`` and ``Posflow-Signature`` (see
:mod:`api.signing`). A 2xx moves the cursor; anything else (or no answer within
``webhook_timeout_s``) schedules a retry after an exponential, jittered backoff.
An event failing for ``webhook_give_up_s`` parks the endpoint as ``dead`` at that
event (nothing later is sent, nothing is skipped); ``webhooks replay`` restarts it.
The signing secret is read per round with ``get_secret``: once the merchant key
is revoked it no longer decrypts, and the endpoint becomes ``revoked`` with the
reason logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg

from api.feed import EventRow, fetch_events
from api.metrics import DeliveryMetrics
from api.pools import async_pool, sync_pool
from api.signing import backoff_s, sign
from api.webhooks import CHANNEL, secret_purpose
from posflow.cost import Handled
from posflow.errors import PosflowError
from posflow.runtime import Endpoints, listen_forever, run_service
from posflow.security.keys import KeyProvider, MerchantKeyRevokedError, get_secret
from posflow.security.tls import postgres_dsn
from posflow.settings import ApiSettings, Settings

__all__ = ["DeliveryMetrics", "WebhookDeliverer", "WebhookService", "build_deliverer"]

log = logging.getLogger("posflow.api.webhooks")


@dataclass
class _Claim:
    endpoint_id: str
    merchant_id: str
    url: str
    delivered_seq: int
    attempts: int


_CLAIM = """
UPDATE webhook_cursors c
   SET lease_owner = %(me)s, lease_until = now() + make_interval(secs => %(lease)s)
  FROM merchant_webhooks w
 WHERE w.endpoint_id = c.endpoint_id
   AND c.endpoint_id IN (
       SELECT c2.endpoint_id
         FROM webhook_cursors c2 JOIN merchant_webhooks w2 USING (endpoint_id)
        WHERE c2.state = 'active' AND c2.next_attempt_at <= now()
          AND (c2.lease_until IS NULL OR c2.lease_until < now())
          AND EXISTS (SELECT 1 FROM cashflow_events e
                       WHERE e.merchant_id = w2.merchant_id AND e.seq > c2.delivered_seq)
        ORDER BY c2.next_attempt_at
        LIMIT %(n)s
          FOR UPDATE OF c2 SKIP LOCKED)
RETURNING c.endpoint_id, w.merchant_id, w.url, c.delivered_seq, c.attempts
"""

_DELIVERED = """
UPDATE webhook_cursors
   SET delivered_seq = %(seq)s, attempts = 0, failing_since = NULL, last_error = NULL,
       next_attempt_at = now(), lease_until = now() + make_interval(secs => %(lease)s),
       updated_at = now()
 WHERE endpoint_id = %(ep)s AND lease_owner = %(me)s
"""

_FAILED = """
UPDATE webhook_cursors
   SET attempts = attempts + 1,
       failing_since = coalesce(failing_since, now()),
       last_error = %(error)s,
       state = CASE WHEN now() - coalesce(failing_since, now())
                           >= make_interval(secs => %(give_up)s) THEN 'dead' ELSE 'active' END,
       dead_at = CASE WHEN now() - coalesce(failing_since, now())
                           >= make_interval(secs => %(give_up)s) THEN now() END,
       next_attempt_at = now() + make_interval(secs => %(wait)s),
       lease_owner = NULL, lease_until = NULL, updated_at = now()
 WHERE endpoint_id = %(ep)s AND lease_owner = %(me)s
RETURNING state, attempts
"""

_REVOKED = """
UPDATE webhook_cursors
   SET state = 'revoked', last_error = %(error)s, lease_owner = NULL, lease_until = NULL,
       updated_at = now()
 WHERE endpoint_id = %(ep)s AND lease_owner = %(me)s
"""

_RELEASE = """
UPDATE webhook_cursors SET lease_owner = NULL, lease_until = NULL
 WHERE endpoint_id = %(ep)s AND lease_owner = %(me)s
"""


def _body(merchant_id: str, row: EventRow) -> bytes:
    event_id = json.dumps(f"{merchant_id}:{row.seq}")
    merchant = json.dumps(merchant_id)
    return (
        f'{{"id":{event_id},"type":"cashflow","merchant_id":{merchant},"data":{row.data}}}'
    ).encode()


class WebhookDeliverer:
    """Claims due endpoints and delivers their events; :meth:`round` is one pass."""

    def __init__(
        self,
        settings: ApiSettings,
        conninfo: str,
        provider: KeyProvider,
        metrics: DeliveryMetrics,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.conninfo = conninfo
        self.provider = provider
        self.metrics = metrics
        self.clock = clock
        self.rand = rand
        self.me = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.pool = async_pool(
            conninfo, max_size=settings.webhook_concurrency + 1, name="posflow-webhooks"
        )
        # get_secret is synchronous (psycopg): it runs in threads on this pool.
        self.sync_pool = sync_pool(
            conninfo, max_size=settings.webhook_concurrency, name="posflow-webhooks-secrets"
        )
        self.client = httpx.AsyncClient(
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,
            headers={"User-Agent": "posflow-webhooks/1"},
        )
        self.listening = False
        self.wake = asyncio.Event()

    async def open(self) -> None:
        await self.pool.open(wait=True, timeout=30)
        await asyncio.to_thread(self.sync_pool.open, True, 30.0)

    async def close(self) -> None:
        await self.client.aclose()
        await self.pool.close()
        await asyncio.to_thread(self.sync_pool.close)

    # --- one pass ------------------------------------------------------------------------

    async def round(self) -> int:
        """Claim due endpoints, deliver each (concurrently); returns events delivered."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                _CLAIM,
                {
                    "me": self.me,
                    "lease": self.settings.webhook_lease_s,
                    "n": self.settings.webhook_concurrency,
                },
            )
            claims = [_Claim(*row) for row in await cur.fetchall()]
        if not claims:
            return 0
        counts = await asyncio.gather(*(self._endpoint(c) for c in claims))
        return sum(counts)

    def _secret(self, merchant_id: str, endpoint_id: str) -> bytes:
        with self.sync_pool.connection() as conn:
            return get_secret(conn, self.provider, merchant_id, secret_purpose(endpoint_id))

    async def _update(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, {"me": self.me, **params})
            return await cur.fetchall() if cur.description else [("updated",)] * cur.rowcount

    async def _endpoint(self, claim: _Claim) -> int:
        delivered = 0
        try:
            try:
                secret = await asyncio.to_thread(self._secret, claim.merchant_id, claim.endpoint_id)
            except MerchantKeyRevokedError as exc:
                reason = f"merchant key revoked, signing secret unreadable: {exc}"
                log.error(  # noqa: TRY400 - an expected state, the reason says it all
                    "webhook %s of merchant %s stopped: %s",
                    claim.endpoint_id,
                    claim.merchant_id,
                    reason,
                )
                await self._update(_REVOKED, ep=claim.endpoint_id, error=reason)
                self.metrics.parked.labels("revoked").inc()
                return 0
            except PosflowError as exc:
                await self._failed(claim, f"signing secret unavailable: {exc}")
                return 0
            rows = await fetch_events(
                self.pool, claim.merchant_id, claim.delivered_seq, self.settings.webhook_batch
            )
            for row in rows:
                error = await self._post(claim, row, secret)
                if error is not None:
                    await self._failed(claim, f"event {row.seq}: {error}")
                    return delivered
                updated = await self._update(
                    _DELIVERED,
                    ep=claim.endpoint_id,
                    seq=row.seq,
                    lease=self.settings.webhook_lease_s,
                )
                delivered += 1
                claim.attempts = 0
                if not updated:
                    # Replayed, removed or taken over meanwhile: the cursor is not ours.
                    log.info("webhook %s: lease lost, stopping this round", claim.endpoint_id)
                    return delivered
            await self._update(_RELEASE, ep=claim.endpoint_id)
        except (psycopg.Error, OSError) as exc:
            # The lease expires on its own; the endpoint is picked up again then.
            log.warning("webhook %s: database error (%s)", claim.endpoint_id, exc)
        return delivered

    async def _post(self, claim: _Claim, row: EventRow, secret: bytes) -> str | None:
        body = _body(claim.merchant_id, row)
        stamp = str(int(self.clock()))
        headers = {
            "Content-Type": "application/json",
            "Posflow-Event-Id": f"{claim.merchant_id}:{row.seq}",
            "Posflow-Timestamp": stamp,
            "Posflow-Signature": sign(secret, stamp, body),
        }
        started = time.perf_counter()
        try:
            resp = await self.client.post(claim.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            self.metrics.attempts.labels("failed").inc()
            return f"{type(exc).__name__}: {exc}"[:500]
        finally:
            self.metrics.seconds.observe(time.perf_counter() - started)
        if 200 <= resp.status_code < 300:
            self.metrics.attempts.labels("delivered").inc()
            return None
        self.metrics.attempts.labels("failed").inc()
        return f"HTTP {resp.status_code}"

    async def _failed(self, claim: _Claim, error: str) -> None:
        s = self.settings
        wait = backoff_s(
            claim.attempts + 1,
            base_s=s.webhook_backoff_base_s,
            max_s=s.webhook_backoff_max_s,
            jitter=s.webhook_jitter,
            rand=self.rand,
        )
        rows = await self._update(
            _FAILED, ep=claim.endpoint_id, error=error, give_up=s.webhook_give_up_s, wait=wait
        )
        if rows and rows[0][0] == "dead":
            self.metrics.parked.labels("dead").inc()
            log.error(
                "webhook %s of merchant %s is dead after %d attempts (%s); "
                "`posflow api webhooks replay --merchant %s --from-seq %d` restarts it",
                claim.endpoint_id,
                claim.merchant_id,
                rows[0][1],
                error,
                claim.merchant_id,
                claim.delivered_seq + 1,
            )
        else:
            log.warning("webhook %s: %s; retry in %.1f s", claim.endpoint_id, error, wait)

    # --- the loop ------------------------------------------------------------------------

    def _listening(self, up: bool) -> None:
        self.listening = up
        self.metrics.listening.set(1 if up else 0)
        if up:
            self.wake.set()  # whatever was committed while we were not listening

    def _notified(self, _merchant_id: str) -> None:
        self.wake.set()

    async def _gauge(self) -> None:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT state, count(*) FROM webhook_cursors GROUP BY state")
            counts: dict[str, int] = {str(k): int(v) for k, v in await cur.fetchall()}
        for state in ("active", "dead", "revoked"):
            self.metrics.endpoints.labels(state).set(int(counts.get(state, 0)))

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds until ``stop`` is set; a NOTIFY or the poll period starts the next."""
        listener = asyncio.create_task(
            listen_forever(self.conninfo, CHANNEL, self._notified, on_state=self._listening)
        )
        gauged = 0.0
        try:
            while not stop.is_set():
                self.wake.clear()
                try:
                    busy = await self.round()
                    if time.monotonic() - gauged > 10:
                        await self._gauge()
                        gauged = time.monotonic()
                except (psycopg.Error, OSError) as exc:
                    log.warning("webhook round failed (%s); retrying", exc)
                    busy = 0
                if busy:
                    continue  # more may be waiting (batch limit)
                waits = [asyncio.create_task(self.wake.wait()), asyncio.create_task(stop.wait())]
                await asyncio.wait(
                    waits, timeout=self.settings.webhook_poll_s, return_when="FIRST_COMPLETED"
                )
                for task in waits:
                    task.cancel()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


@dataclass
class WebhookService:
    deliverer: WebhookDeliverer
    endpoints: Endpoints

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Deliver until SIGTERM/SIGINT (or ``stop``): the current POSTs finish (bounded by
        the timeout), then the endpoints and the pools close."""
        await self.deliverer.open()
        try:
            name = f"webhook deliverer {self.deliverer.me}"
            await run_service(name, self.endpoints, self.deliverer.run, stop=stop)
        finally:
            await self.deliverer.close()

    def run(self) -> None:
        asyncio.run(self.serve())


def build_deliverer(settings: Settings, provider: KeyProvider | None = None) -> WebhookService:
    """Composition root of the webhook deliverer."""
    if provider is None:
        from posflow.security.keys import master_key_from_settings

        provider = master_key_from_settings(settings)
    deliverer = WebhookDeliverer(settings.api, postgres_dsn(settings), provider, DeliveryMetrics())
    endpoints = Endpoints(
        settings.services.bind_host,
        settings.api.webhook_port,
        deliverer.metrics.registry,
        lambda: deliverer.listening,
        handled=Handled("webhooks", ("posflow_webhook_attempts",)),
    )
    return WebhookService(deliverer, endpoints)
