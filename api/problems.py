"""Problem details (:mod:`posflow.security.problems`) as FastAPI responses and OpenAPI docs.

Every 4xx/5xx the API sends is ``application/problem+json``: a :class:`Problem`
raised by a route, FastAPI's validation errors and Starlette's own HTTP errors alike.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from posflow.security.problems import PROBLEM_JSON, Problem

__all__ = ["ProblemResponse", "install_handlers", "problem_responses"]


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_JSON


def _respond(request: Request, problem: Problem) -> ProblemResponse:
    return ProblemResponse(
        problem.body(request.url.path), status_code=problem.status, headers=problem.headers
    )


def _validation(request: Request, exc: RequestValidationError) -> ProblemResponse:
    errors = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ())]
        where = loc[0] if loc else "request"
        name = ".".join(loc[1:]) or where
        errors.append({"in": where, "name": name, "detail": str(err.get("msg", "invalid"))})
    first = errors[0] if errors else {"in": "request", "name": "request", "detail": "invalid"}
    problem = Problem(
        400,
        "invalid-parameter",
        "Invalid parameter",
        f"{first['in']} parameter '{first['name']}': {first['detail']}",
        errors=errors,
    )
    return _respond(request, problem)


_TITLES = {403: "Forbidden", 404: "Not found", 405: "Method not allowed"}


def install_handlers(app: FastAPI) -> None:
    """Turn Problem, validation errors and Starlette's own HTTP errors into problem+json."""

    async def on_problem(request: Request, exc: Exception) -> ProblemResponse:
        assert isinstance(exc, Problem)  # noqa: S101 - registered for Problem only
        return _respond(request, exc)

    async def on_validation(request: Request, exc: Exception) -> ProblemResponse:
        assert isinstance(exc, RequestValidationError)  # noqa: S101
        return _validation(request, exc)

    async def on_http(request: Request, exc: Exception) -> ProblemResponse:
        assert isinstance(exc, StarletteHTTPException)  # noqa: S101
        title = _TITLES.get(exc.status_code, "HTTP error")
        slug = title.lower().replace(" ", "-")
        headers = dict(exc.headers) if exc.headers else None
        problem = Problem(exc.status_code, slug, title, str(exc.detail), headers=headers)
        return _respond(request, problem)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)


_PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "format": "uri"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "in": {"type": "string"},
                    "name": {"type": "string"},
                    "detail": {"type": "string"},
                },
            },
        },
    },
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the problem statuses a route can return."""
    descriptions = {
        400: "a parameter is invalid (named in `errors`)",
        401: "missing, malformed, unknown or revoked API key, or the merchant was revoked",
        403: "the key's role may not do this (recorded in the audit trail)",
        404: "no such merchant for this key (another merchant's data is never shown)",
        429: "rate limit exceeded; retry after `Retry-After` seconds",
        503: "the audit trail cannot record a staff read now; retry after `Retry-After`",
    }
    return {
        status: {
            "description": descriptions.get(status, "error"),
            "content": {PROBLEM_JSON: {"schema": _PROBLEM_SCHEMA}},
        }
        for status in statuses
    }
