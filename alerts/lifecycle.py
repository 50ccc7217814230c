"""What an alert goes through: open, fire, acknowledge, resolve; silences; notifications.

Lifecycle per (rule, subject), at most one open alert::

    (none) --cond--> pending --held `for`--> firing --ack--> acknowledged
       ^                |  cond gone: dropped,     |  cleared (hysteresis:   |
       |                |  never notified          v  clear_when)            v
       +------------------------------------ resolved <-----------------------+

A firing alert is *suppressed* (stored, not notified) while a matching silence
is active or an inhibiting rule has an open alert on its group; when that ends
while it still fires, the firing notice goes out then. A resolve notice goes out
only for an alert whose firing notice went out.

:class:`Lifecycle` is pure like the engine that drives it (:mod:`alerts.engine` decides
*when* a rule's condition holds; this module decides what that does to its alert).
"""

from __future__ import annotations

import hashlib
import secrets
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from alerts.rules import Rule

__all__ = ["Alert", "Changes", "Key", "Lifecycle", "Notification", "Silence", "Subject"]

Key = tuple[str, str, str]  # (rule, subject kind, subject id)
# What a wake-up re-evaluates: ("t", terminal), ("g", rule, group key), ("e", rule, merchant).
Subject = tuple[str, ...]


@dataclass
class Alert:
    alert_id: str
    rule: str
    severity: str
    subject_kind: str
    subject_id: str
    merchant_id: str | None
    state: str
    started_at: float
    summary: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    fired_at: float | None = None
    acknowledged_at: float | None = None
    acknowledged_by: str | None = None
    resolved_at: float | None = None
    notified: bool = False
    suppressed_by: str | None = None
    last_event_at: float | None = None
    value: float | None = None

    @property
    def key(self) -> Key:
        return (self.rule, self.subject_kind, self.subject_id)

    def as_dict(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id,
            "rule": self.rule,
            "severity": self.severity,
            "subject_kind": self.subject_kind,
            "subject_id": self.subject_id,
            "merchant_id": self.merchant_id,
            "state": self.state,
            "summary": self.summary,
            "labels": self.labels,
            "annotations": self.annotations,
            "started_at": self.started_at,
            "fired_at": self.fired_at,
            "acknowledged_at": self.acknowledged_at,
            "acknowledged_by": self.acknowledged_by,
            "resolved_at": self.resolved_at,
            "suppressed_by": self.suppressed_by,
        }


@dataclass(frozen=True)
class Notification:
    notification_id: str  # alert id + event: the receiver's deduplication key
    alert_id: str
    event: str  # firing | acknowledged | resolved
    created_at: float
    payload: dict[str, Any]


@dataclass
class Silence:
    silence_id: str
    matchers: dict[str, str]
    starts_at: float
    ends_at: float
    created_by: str = ""
    comment: str = ""

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.matchers.items())


@dataclass
class Changes:
    """What one batch changed: to be stored in one transaction with the offsets."""

    terminals: dict[str, dict[str, Any]] = field(default_factory=dict)
    alerts: dict[str, Alert] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)  # pending alerts that never fired
    notifications: list[Notification] = field(default_factory=list)
    silences: dict[str, Silence] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(
            self.terminals or self.alerts or self.dropped or self.notifications or self.silences
        )


class _Formatter(string.Formatter):
    def get_value(self, key: int | str, args: Any, kwargs: Any) -> Any:
        value = kwargs.get(key) if isinstance(key, str) else None
        return "?" if value is None else value

    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, float) and not format_spec:
            return f"{value:g}"
        try:
            return str(super().format_field(value, format_spec))
        except (ValueError, TypeError):
            return str(value)


_FMT = _Formatter()


def render(
    rule: Rule, subject_id: str, context: dict[str, Any], rule_value: Any = None
) -> tuple[str, dict[str, str]]:
    """The rule's annotations filled in from ``context`` (a missing value shows ``?``);
    returns (summary, annotations)."""
    values = {
        **context,
        "rule": rule.name,
        "severity": rule.severity,
        "subject_id": subject_id,
        "value": rule_value,
    }
    annotations = {k: _FMT.vformat(v, (), values) for k, v in rule.annotations.items()}
    return annotations.get("summary", ""), annotations


class Lifecycle:
    """The open alerts, the silences, and what changed since the last :meth:`drain`.

    ``schedule(subject, at)`` asks the engine for a wake-up (a ``for`` running out, an
    event alert's ``resolve_after``); ``inhibition_key(inhibitor, alert, now)`` is the
    group of ``inhibitor`` the terminal of ``alert`` belongs to (None: none).
    """

    def __init__(
        self,
        schedule: Callable[[Subject, float], None],
        inhibition_key: Callable[[Rule, Alert, float], str | None],
    ) -> None:
        self.alerts: dict[Key, Alert] = {}
        self.silences: dict[str, Silence] = {}
        self.suppressed: dict[str, Alert] = {}
        self.changes = Changes()
        self._inhibitors: dict[str, list[Rule]] = {}
        self._schedule = schedule
        self._inhibition_key = inhibition_key

    def set_inhibitors(self, rules: Iterable[Rule]) -> None:
        self._inhibitors = {}
        for rule in rules:
            for target in rule.inhibits:
                self._inhibitors.setdefault(target, []).append(rule)

    def drain(self) -> Changes:
        changes, self.changes = self.changes, Changes()
        return changes

    def adopt(self, alert: Alert) -> None:
        """A stored open alert, after a restart (nothing is notified again)."""
        self.alerts[alert.key] = alert
        if alert.suppressed_by and alert.state != "pending":
            self.suppressed[alert.alert_id] = alert

    # --- operators -------------------------------------------------------------------------

    def ack(self, alert_id: str, by: str, now: float) -> Alert:
        """Acknowledge a firing alert; KeyError when no open alert has this id."""
        alert = next((a for a in self.alerts.values() if a.alert_id == alert_id), None)
        if alert is None or alert.state not in ("firing", "acknowledged"):
            raise KeyError(alert_id)
        if alert.state == "firing":
            alert.state, alert.acknowledged_at, alert.acknowledged_by = "acknowledged", now, by
            self.changes.alerts[alert.alert_id] = alert
            if alert.notified:
                self._notify(alert, "acknowledged", now)
        return alert

    def add_silence(
        self, matchers: dict[str, str], duration_s: float, now: float, *, by: str, comment: str
    ) -> Silence:
        silence = Silence(secrets.token_hex(8), dict(matchers), now, now + duration_s, by, comment)
        self.silences[silence.silence_id] = silence
        self.changes.silences[silence.silence_id] = silence
        return silence

    def expire_silence(self, silence_id: str, now: float) -> Silence:
        silence = self.silences.pop(silence_id)
        silence.ends_at = now
        self.changes.silences[silence_id] = silence
        return silence

    def tick(self, now: float) -> None:
        """Expire ended silences; announce suppressed alerts whose suppression ended."""
        for silence in list(self.silences.values()):
            if silence.ends_at <= now:
                del self.silences[silence.silence_id]
        for alert in list(self.suppressed.values()):
            self._announce_firing(alert, now)

    # --- the state machine -----------------------------------------------------------------

    def step(
        self,
        rule: Rule,
        subject: Subject,
        subject_id: str,
        *,
        merchant_id: str | None,
        cond: bool,
        cleared: bool,
        context: dict[str, Any],
        now: float,
    ) -> None:
        """One evaluation of ``rule`` on a subject: ``cond`` (the rule holds) and
        ``cleared`` (an open alert may resolve) move its alert along."""
        key = (rule.name, rule.scope, subject_id)
        alert = self.alerts.get(key)
        if alert is None:
            if not cond:
                return
            alert = self._open(rule, subject_id, merchant_id, context, now)
        elif alert.state != "pending":
            if cleared:
                self.close(alert, now)
            else:
                summary = render(rule, subject_id, context)[0]
                if summary != alert.summary:
                    alert.summary = summary
                    self.changes.alerts[alert.alert_id] = alert
            return
        if not cond:  # pending whose condition went away: never fired, never notified
            del self.alerts[key]
            self.changes.alerts.pop(alert.alert_id, None)
            self.changes.dropped.add(alert.alert_id)
            return
        if now - alert.started_at >= rule.for_s:
            alert.summary, alert.annotations = render(rule, subject_id, context)
            alert.state, alert.fired_at = "firing", now
            self.changes.alerts[alert.alert_id] = alert
            self._announce_firing(alert, now)
        else:
            self._schedule(subject, alert.started_at + rule.for_s)

    def event(
        self, rule: Rule, subject: Subject, merchant_id: str, context: dict[str, Any], now: float
    ) -> None:
        """One more event for an event rule (e.g. an integrity event): the merchant's
        alert counts it and resolves ``resolve_after`` the last one."""
        alert = self.alerts.get((rule.name, "merchant", merchant_id))
        count = 1 if alert is None else int(alert.value or 0) + 1
        context["count"] = count
        self.step(
            rule, subject, merchant_id,
            merchant_id=merchant_id, cond=True, cleared=False, context=context, now=now,
        )  # fmt: skip
        alert = self.alerts.get((rule.name, "merchant", merchant_id))
        if alert is not None:
            alert.last_event_at = now
            alert.value = count
            alert.summary = render(rule, alert.subject_id, context, rule_value=count)[0]
            self.changes.alerts[alert.alert_id] = alert
            self._schedule(subject, now + rule.resolve_after_s)

    def _open(
        self,
        rule: Rule,
        subject_id: str,
        merchant_id: str | None,
        context: dict[str, Any],
        now: float,
    ) -> Alert:
        ident = f"{rule.name}|{rule.scope}|{subject_id}|{now:.6f}"
        labels = {
            **rule.labels,
            "alertname": rule.name,
            "severity": rule.severity,
            "scope": rule.scope,
            "subject_id": subject_id,
        }
        if merchant_id:
            labels["merchant_id"] = merchant_id
        if rule.scope == "terminal":
            labels["terminal_id"] = subject_id
        summary, annotations = render(rule, subject_id, context)
        alert = Alert(
            alert_id=hashlib.sha256(ident.encode()).hexdigest()[:24],
            rule=rule.name,
            severity=rule.severity,
            subject_kind=rule.scope,
            subject_id=subject_id,
            merchant_id=merchant_id,
            state="pending",
            started_at=now,
            summary=summary,
            labels=labels,
            annotations=annotations,
        )
        self.alerts[alert.key] = alert
        self.changes.alerts[alert.alert_id] = alert
        return alert

    def close(self, alert: Alert, now: float) -> None:
        """Resolve an open alert (a pending one is dropped, never having fired)."""
        del self.alerts[alert.key]
        self.suppressed.pop(alert.alert_id, None)
        if alert.state == "pending":
            self.changes.alerts.pop(alert.alert_id, None)
            self.changes.dropped.add(alert.alert_id)
            return
        alert.state, alert.resolved_at = "resolved", now
        self.changes.alerts[alert.alert_id] = alert
        if alert.notified:
            self._notify(alert, "resolved", now)

    def _suppression(self, alert: Alert, now: float) -> str | None:
        for silence in self.silences.values():
            if silence.active(now) and silence.matches(alert.labels):
                return f"silence {silence.silence_id}"
        for inhibitor in self._inhibitors.get(alert.rule, ()):
            if alert.subject_kind != "terminal":
                continue
            key = self._inhibition_key(inhibitor, alert, now)
            if key is None:
                continue
            by = self.alerts.get((inhibitor.name, inhibitor.scope, key))
            if by is not None:
                return f"inhibited by {by.rule} {by.alert_id}"
        return None

    def _announce_firing(self, alert: Alert, now: float) -> None:
        if alert.notified or alert.state not in ("firing", "acknowledged"):
            self.suppressed.pop(alert.alert_id, None)
            return
        reason = self._suppression(alert, now)
        if reason != alert.suppressed_by:
            alert.suppressed_by = reason
            self.changes.alerts[alert.alert_id] = alert
        if reason is not None:
            self.suppressed[alert.alert_id] = alert
            return
        self.suppressed.pop(alert.alert_id, None)
        alert.notified = True
        self.changes.alerts[alert.alert_id] = alert
        self._notify(alert, "firing", now)

    def _notify(self, alert: Alert, event: str, now: float) -> None:
        self.changes.notifications.append(
            Notification(
                notification_id=f"{alert.alert_id}:{event}",
                alert_id=alert.alert_id,
                event=event,
                created_at=now,
                payload={
                    "notification_id": f"{alert.alert_id}:{event}",
                    "event": event,
                    "sent_for": now,
                    "alert": alert.as_dict(),
                },
            )
        )
