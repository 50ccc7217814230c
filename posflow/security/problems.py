"""Errors as RFC 9457 problem details (``application/problem+json``), free of any framework.

Every 4xx/5xx an HTTP API of posflow sends has ``type``, ``title``, ``status`` and
``detail``; a bad parameter also lists ``errors`` with the parameter's ``name`` and
where it was (``query``, ``path``, ``header``), so a client can point at it. The
merchant API (FastAPI, ``api.problems``) and the alert engine (aiohttp) render the
same :class:`Problem`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PROBLEM_JSON", "Problem", "bad_parameter"]

PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "https://posflow.dev/problems/"


class Problem(Exception):  # noqa: N818 - it is the RFC's name for the thing
    """An error the client can act on; becomes one problem+json response."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}

    def body(self, instance: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": _TYPE_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
        }
        if self.errors:
            body["errors"] = self.errors
        return body


def bad_parameter(where: str, name: str, detail: str) -> Problem:
    """400 naming the parameter that was wrong."""
    return Problem(
        400,
        "invalid-parameter",
        "Invalid parameter",
        f"{where} parameter '{name}': {detail}",
        errors=[{"in": where, "name": name, "detail": detail}],
    )
