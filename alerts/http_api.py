"""The alert engine's HTTP API for staff: alerts, acknowledgements, silences, rules.

Served next to the open /metrics /healthz /readyz of :func:`posflow.runtime.run_service`
(these routes are its ``routes``); every route here needs a staff API key and is
authorised and audited by :class:`alerts.access.AlertAccess`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from alerts.access import AlertAccess, ProblemError
from alerts.live import LiveEngine
from alerts.reload import RulesReloader
from alerts.rules import parse_duration
from posflow.http import Route
from posflow.security.problems import Problem
from posflow.security.roles import Action, Target

__all__ = ["alert_routes", "resolved_alerts"]

Request = web.Request
_STATES = ("pending", "firing", "acknowledged", "resolved")


async def resolved_alerts(pool: AsyncConnectionPool, limit: int) -> list[dict[str, Any]]:
    """The newest resolved alerts, from the table (the engine keeps only open ones)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT alert_id, rule, severity, subject_kind, subject_id, merchant_id, state,"
            " summary, labels, annotations, started_at, fired_at, acknowledged_at,"
            " acknowledged_by, resolved_at, suppressed_by FROM alerts"
            " WHERE state = 'resolved' ORDER BY resolved_at DESC LIMIT %s",
            [limit],
        )
        names = [d.name for d in cur.description or ()]
        rows = await cur.fetchall()
    out = []
    for row in rows:
        item = dict(zip(names, row, strict=True))
        for key in ("started_at", "fired_at", "acknowledged_at", "resolved_at"):
            value = item[key]
            item[key] = None if value is None else value.timestamp()
        out.append(item)
    return out


def _bad_request(request: Request, name: str, detail: str) -> ProblemError:
    return ProblemError(
        Problem(
            400,
            "invalid-parameter",
            "Invalid parameter",
            f"body field '{name}': {detail}",
            errors=[{"in": "body", "name": name, "detail": detail}],
        ),
        request.path,
    )


def _not_found(request: Request, what: str) -> ProblemError:
    return ProblemError(Problem(404, "not-found", "Not found", what), request.path)


async def _json_body(request: Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except json.JSONDecodeError:
        raise _bad_request(request, "(body)", "not JSON") from None
    if not isinstance(body, dict):
        raise _bad_request(request, "(body)", "a JSON object")
    return body


def alert_routes(  # noqa: PLR0915 - one closure per route
    live: LiveEngine, reloader: RulesReloader, access: AlertAccess
) -> list[Route]:
    """The API's routes (``(method, path, handler)``) over the live engine."""
    engine = live.engine

    async def list_alerts(request: Request) -> web.Response:
        await access.check(request, Action.ALERT_READ, Target("alerts", "*"))
        state = request.query.get("state")
        if state is not None and state not in _STATES:
            raise ProblemError(
                Problem(400, "invalid-parameter", "Invalid parameter",
                        f"query parameter 'state': one of {', '.join(_STATES)}",
                        errors=[{"in": "query", "name": "state", "detail": "unknown state"}]),
                request.path,
            )  # fmt: skip
        try:
            limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
        except ValueError:
            limit = 100
        if state == "resolved":  # history: only the database has it
            alerts = await resolved_alerts(access.pool, limit)
        else:
            alerts = sorted(
                (a.as_dict() for a in engine.alerts.values()
                 if state is None or a.state == state),
                key=lambda a: -float(a["started_at"]),
            )[:limit]  # fmt: skip
        return web.json_response({"alerts": alerts})

    async def ack(request: Request) -> web.Response:
        alert_id = request.match_info["alert_id"]
        target = Target("alert", alert_id)
        caller = await access.check(request, Action.ALERT_ACKNOWLEDGE, target)
        async with live.lock:
            before = next((a.state for a in engine.alerts.values() if a.alert_id == alert_id), None)
            try:
                alert = engine.ack(alert_id, caller.name)
            except KeyError:
                alert = None
            if alert is not None:
                detail = {"rule": alert.rule, "subject": alert.subject_id, "state_before": before}
                await live.commit({}, [caller.audit(Action.ALERT_ACKNOWLEDGE, target, detail)])
        if alert is None:
            why = f"no firing alert {alert_id}" + (f" (it is {before})" if before else "")
            await access.record(
                caller.audit(Action.ALERT_ACKNOWLEDGE, target, {"reason": why}, "failed")
            )
            raise _not_found(request, why)
        return web.json_response(alert.as_dict())

    async def list_silences(request: Request) -> web.Response:
        await access.check(request, Action.ALERT_READ, Target("silences", "*"))
        return web.json_response({"silences": [vars(s) for s in engine.silences.values()]})

    async def add_silence(request: Request) -> web.Response:
        caller = await access.check(request, Action.SILENCE_MANAGE, Target("silence", "new"))
        body = await _json_body(request)
        matchers = body.get("matchers")
        if not isinstance(matchers, dict) or not matchers:
            raise _bad_request(request, "matchers", "a non-empty object of label -> value")
        try:
            duration = parse_duration(body.get("duration", "1h"))
        except ValueError as exc:
            raise _bad_request(request, "duration", str(exc)) from None
        if duration <= 0:
            raise _bad_request(request, "duration", "must be longer than 0 s")
        clean = {str(k): str(v) for k, v in matchers.items()}
        comment = str(body.get("comment") or "")
        async with live.lock:
            silence = engine.add_silence(clean, duration, by=caller.name, comment=comment)
            detail = {
                "matchers": [f"{k}={v}" for k, v in sorted(clean.items())],
                "duration_s": round(duration),
                "ends_at": datetime.fromtimestamp(silence.ends_at, UTC).isoformat(),
                "comment": comment,
            }
            entry = caller.audit(
                Action.SILENCE_MANAGE, Target("silence", silence.silence_id), detail
            )
            await live.commit({}, [entry])
        return web.json_response(vars(silence), status=201)

    async def expire_silence(request: Request) -> web.Response:
        silence_id = request.match_info["silence_id"]
        target = Target("silence", silence_id)
        caller = await access.check(request, Action.SILENCE_MANAGE, target)
        async with live.lock:
            try:
                silence = engine.expire_silence(silence_id)
            except KeyError:
                silence = None
            if silence is not None:
                entry = caller.audit(Action.SILENCE_MANAGE, target, {"expired": True})
                await live.commit({}, [entry])
        if silence is None:
            why = f"no active silence {silence_id}"
            await access.record(
                caller.audit(Action.SILENCE_MANAGE, target, {"reason": why}, "failed")
            )
            raise _not_found(request, why)
        return web.json_response(vars(silence))

    async def get_rules(request: Request) -> web.Response:
        await access.check(request, Action.ALERT_READ, reloader.target)
        return web.json_response(
            {
                "file": str(reloader.rules_file) if reloader.rules_file else None,
                "file_sha256": reloader.rules_sha256,
                "rules": sorted(engine.rules),
                "error": reloader.last_error,
            }
        )

    async def reload_rules(request: Request) -> web.Response:
        caller = await access.check(request, Action.RULE_CHANGE, reloader.target)
        if not await reloader.reload(caller=caller):
            raise ProblemError(
                Problem(422, "rules-refused", "Rules refused",
                        f"{reloader.last_error} (the last good rules stay in effect)"),
                request.path,
            )  # fmt: skip
        return web.json_response(
            {"file_sha256": reloader.rules_sha256, "rules": sorted(engine.rules)}
        )

    return [
        ("GET", "/alerts", list_alerts),
        ("POST", "/alerts/{alert_id}/ack", ack),
        ("GET", "/silences", list_silences),
        ("POST", "/silences", add_silence),
        ("DELETE", "/silences/{silence_id}", expire_silence),
        ("GET", "/rules", get_rules),
        ("POST", "/rules/reload", reload_rules),
    ]
