"""Rules hot reload: the file is watched, SIGHUP and ``POST /rules/reload`` ask for it.

A bad file never replaces good rules: the last good ones stay in effect and the reason
is kept (``/readyz`` shows it as ``rules_error``). A rule change is an administrative
action, so every reload, refused or not, is in the audit trail.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alerts.access import AlertAccess, Caller
from alerts.live import LiveEngine
from alerts.rules import load_rules, read_rules_file
from alerts.store import AuditEntry
from posflow.errors import PosflowError
from posflow.security.audit import Outcome
from posflow.security.roles import Action, Target

__all__ = ["RulesReloader"]

log = logging.getLogger("posflow.alerts")


@dataclass
class RulesReloader:
    live: LiveEngine
    access: AlertAccess
    rules_file: Path | None
    poll_s: float
    # The SHA-256 of the rules file in effect (None: the defaults alone).
    rules_sha256: str | None = None
    last_error: str | None = None
    _mtime: float | None = None
    _pending: set[asyncio.Task[bool]] = field(default_factory=set)

    @property
    def target(self) -> Target:
        return Target("rules", str(self.rules_file) if self.rules_file else "defaults")

    def _file_mtime(self) -> float | None:
        if self.rules_file is None:
            return None
        try:
            return self.rules_file.stat().st_mtime
        except OSError:
            return None

    def _system(self, trigger: str, detail: dict[str, Any], outcome: Outcome = "ok") -> AuditEntry:
        return AuditEntry(
            actor=f"system:{trigger}",
            role="system",
            action=Action.RULE_CHANGE.value,
            target=str(self.target),
            source=f"system:{socket.gethostname()}",
            outcome=outcome,
            detail=detail,
        )

    async def reload(self, *, trigger: str = "file-reload", caller: Caller | None = None) -> bool:
        """Load the rules again; on an error keep the last good ones and say why.

        Every reload is in the audit trail (actor ``system:<trigger>`` or the API caller,
        the file's SHA-256, the outcome), a successful one in the same transaction as the
        alerts it resolves.
        """
        self._mtime = self._file_mtime()
        metrics = self.live.metrics
        sha: str | None = None
        try:
            text = None
            if self.rules_file is not None:
                text, sha = read_rules_file(self.rules_file)
            rules = load_rules(self.rules_file, text)
        except PosflowError as exc:
            self.last_error = str(exc)
            metrics.reloads.labels("refused").inc()
            log.error("rules refused, keeping the last good rules: %s", exc)  # noqa: TRY400
            failed: dict[str, Any] = {
                "file_sha256": sha,
                "in_effect_sha256": self.rules_sha256,
                "reason": str(exc),
            }
            entry = (
                self._system(trigger, failed, "failed")
                if caller is None
                else caller.audit(Action.RULE_CHANGE, self.target, failed, "failed")
            )
            await self.access.record(entry)
            return False
        detail: dict[str, Any] = {
            "file_sha256": sha,
            "previous_sha256": self.rules_sha256,
            "changed": sha != self.rules_sha256,
            "rules": len(rules.rules),
        }
        entry = (
            self._system(trigger, detail)
            if caller is None
            else caller.audit(Action.RULE_CHANGE, self.target, detail)
        )
        async with self.live.lock:
            self.live.engine.set_rules(rules)
            await self.live.commit({}, [entry])
        self.rules_sha256 = sha
        self.last_error = None
        metrics.reloads.labels("ok").inc()
        log.info("rules loaded: %d rules (file sha256 %s)", len(rules.rules), sha)
        return True

    def on_sighup(self) -> None:
        """SIGHUP reloads the rules (recorded as ``system:sighup``)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload_soon, "sighup")

    def _reload_soon(self, trigger: str) -> None:
        task = asyncio.ensure_future(self.reload(trigger=trigger))
        self._pending.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._pending.discard)

    async def watch(self, stop: asyncio.Event) -> None:
        """Reload when the file's modification time changes, until ``stop``."""
        self._mtime = self._file_mtime()
        while not stop.is_set():
            await asyncio.sleep(self.poll_s)
            if self._file_mtime() != self._mtime:
                await self.reload()
