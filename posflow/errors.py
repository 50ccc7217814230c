"""Errors a person acts on: each names what went wrong, where, and the fix."""

from __future__ import annotations

__all__ = ["PosflowError"]


class PosflowError(Exception):
    """A failure with a one-line explanation and a suggested fix.

    The CLI prints ``str(error)`` on one line to stderr and exits non-zero,
    without a traceback: these are situations for the user to fix, not bugs.
    """

    def __init__(self, what: str, *, fix: str | None = None, detail: str | None = None) -> None:
        self.what = what
        self.fix = fix
        self.detail = detail
        super().__init__(what)

    def __str__(self) -> str:
        return f"{self.what} -- fix: {self.fix}" if self.fix else self.what
