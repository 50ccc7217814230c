"""The alert engine: pure, incremental, clock injected. No I/O here.

Each record touches one terminal (or one merchant, for an integrity event): its
facts are folded in, the terminal's rules are evaluated, and the groups it
belongs to (merchant, carrier/area, fleet) have their counts moved by one and
are evaluated. Time-driven changes (a ``for`` running out, a terminal silent
for days, an event alert's ``resolve_after``) come from a heap of wake-ups
popped by :meth:`Engine.tick`; nothing ever scans the whole fleet.

Lifecycle per (rule, subject), at most one open alert::

    (none) --cond--> pending --held `for`--> firing --ack--> acknowledged
       ^                |  cond gone: dropped,     |  cleared (hysteresis:   |
       |                |  never notified          v  clear_when)            v
       +------------------------------------ resolved <-----------------------+

A firing alert is *suppressed* (stored, not notified) while a matching silence
is active or an inhibiting rule has an open alert on its group; when that ends
while it still fires, the firing notice goes out then. A resolve notice goes out
only for an alert whose firing notice went out.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import secrets
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from alerts.facts import Fleet, Merchant, apply_record, derive
from alerts.rules import Rule, RuleSet

__all__ = ["Alert", "Changes", "Engine", "Notification", "Silence"]

Key = tuple[str, str, str]  # (rule, subject kind, subject id)
OPEN = ("pending", "firing", "acknowledged")


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


@dataclass
class _Groups:
    members: dict[str, set[str]] = field(default_factory=dict)
    matching: dict[str, set[str]] = field(default_factory=dict)
    of: dict[str, tuple[str | None, bool]] = field(default_factory=dict)


class Engine:
    """All alert state in memory; :meth:`drain` hands over what changed."""

    def __init__(
        self,
        rules: RuleSet,
        clock: Callable[[], float],
        *,
        area_deg: float = 0.1,
        merchants: dict[str, Merchant] | None = None,
        terminal_merchants: dict[str, str] | None = None,
    ) -> None:
        self.clock = clock
        self.area_deg = area_deg
        self.merchants: dict[str, Merchant] = {}
        self.terminal_merchants: dict[str, str] = {}
        self._merchant_sizes: dict[str, int] = {}
        self.set_reference(merchants or {}, terminal_merchants or {})
        self.terminals: dict[str, dict[str, Any]] = {}
        self.fleet = Fleet()
        self.alerts: dict[Key, Alert] = {}
        self.silences: dict[str, Silence] = {}
        self.suppressed: dict[str, Alert] = {}
        self.evaluations = 0
        self._changes = Changes()
        self._heap: list[tuple[float, int, tuple[str, ...]]] = []
        self._wake_at: dict[tuple[str, ...], float] = {}
        self._seq = itertools.count()
        self._groups: dict[str, _Groups] = {}
        self.set_rules(rules)

    # --- rules ---------------------------------------------------------------------------

    def set_rules(self, rules: RuleSet) -> None:
        """Swap the rule set (hot reload). Open alerts of removed rules resolve."""
        self.rules = rules.by_name()
        self._terminal_rules = [r for r in self.rules.values() if r.when]
        self._group_rules = [r for r in self.rules.values() if r.group is not None]
        self._event_rules = [r for r in self.rules.values() if r.event is not None]
        self._inhibitors: dict[str, list[Rule]] = {}
        for rule in self.rules.values():
            for target in rule.inhibits:
                self._inhibitors.setdefault(target, []).append(rule)
        now = self.clock()
        for alert in list(self.alerts.values()):
            if alert.rule not in self.rules:
                self._close(alert, now)
        self._groups = {r.name: _Groups() for r in self._group_rules}
        for terminal in self.terminals:
            self._regroup(terminal, now, evaluate=False)
        for rule in self._group_rules:
            keys = set(self._groups[rule.name].members) | {
                a.subject_id for a in self.alerts.values() if a.rule == rule.name
            }
            for key in keys:
                self._eval_group(rule, key, now)

    # --- input -----------------------------------------------------------------------------

    def on_record(self, kind: str, record: dict[str, Any]) -> None:
        """One record from a stream: kind is window, state, status, telemetry or integrity."""
        now = self.clock()
        if kind == "integrity":
            self._on_integrity(record, now)
            return
        terminal = str(record["terminal_id"])
        facts = self.terminals.get(terminal)
        if facts is None:
            facts = {"merchant_id": str(record["merchant_id"])}
            self.terminals[terminal] = facts
        old_version = facts.get("app_version")
        apply_record(facts, kind, record)
        self.fleet.move(old_version, facts.get("app_version"))
        self._changes.terminals[terminal] = facts
        self._eval_terminal(terminal, now)

    def tick(self) -> None:
        """Run every wake-up that is due, expire silences, lift ended suppressions."""
        now = self.clock()
        while self._heap and self._heap[0][0] <= now:
            at, _, subject = heapq.heappop(self._heap)
            if self._wake_at.get(subject) == at:
                del self._wake_at[subject]
            self._wake(subject, now)
        for silence in list(self.silences.values()):
            if silence.ends_at <= now:
                del self.silences[silence.silence_id]
        for alert in list(self.suppressed.values()):
            self._announce_firing(alert, now)

    def ack(self, alert_id: str, by: str) -> Alert:
        """Acknowledge a firing alert; KeyError when no open alert has this id."""
        alert = next((a for a in self.alerts.values() if a.alert_id == alert_id), None)
        if alert is None or alert.state not in ("firing", "acknowledged"):
            raise KeyError(alert_id)
        if alert.state == "firing":
            now = self.clock()
            alert.state, alert.acknowledged_at, alert.acknowledged_by = "acknowledged", now, by
            self._changes.alerts[alert.alert_id] = alert
            if alert.notified:
                self._notify(alert, "acknowledged", now)
        return alert

    def add_silence(
        self, matchers: dict[str, str], duration_s: float, *, by: str = "", comment: str = ""
    ) -> Silence:
        now = self.clock()
        silence = Silence(secrets.token_hex(8), dict(matchers), now, now + duration_s, by, comment)
        self.silences[silence.silence_id] = silence
        self._changes.silences[silence.silence_id] = silence
        return silence

    def expire_silence(self, silence_id: str) -> Silence:
        silence = self.silences.pop(silence_id)
        silence.ends_at = self.clock()
        self._changes.silences[silence_id] = silence
        return silence

    def drain(self) -> Changes:
        changes, self._changes = self._changes, Changes()
        return changes

    # --- restore (after a restart) ---------------------------------------------------------

    def restore(
        self,
        terminals: dict[str, dict[str, Any]],
        alerts: Iterable[Alert],
        silences: Iterable[Silence],
    ) -> None:
        """Load the stored state; nothing is notified again."""
        now = self.clock()
        self.terminals = terminals
        for facts in terminals.values():
            self.fleet.move(None, facts.get("app_version"))
        for alert in alerts:
            self.alerts[alert.key] = alert
            if alert.suppressed_by and alert.state != "pending":
                self.suppressed[alert.alert_id] = alert
            rule = self.rules.get(alert.rule)
            if rule is None:
                continue
            if alert.state == "pending":
                self._schedule(self._subject_of(alert), alert.started_at + rule.for_s)
            if rule.event is not None and alert.last_event_at is not None:
                self._schedule(self._subject_of(alert), alert.last_event_at + rule.resolve_after_s)
        for silence in silences:
            self.silences[silence.silence_id] = silence
        self.set_rules(RuleSet(rules=list(self.rules.values())))
        for terminal, facts in terminals.items():
            self._schedule_silence(terminal, facts, now)

    # --- evaluation ------------------------------------------------------------------------

    def _subject_of(self, alert: Alert) -> tuple[str, ...]:
        rule = self.rules.get(alert.rule)
        if alert.subject_kind == "terminal":
            return ("t", alert.subject_id)
        if rule is not None and rule.event is not None:
            return ("e", alert.rule, alert.subject_id)
        return ("g", alert.rule, alert.subject_id)

    def _wake(self, subject: tuple[str, ...], now: float) -> None:
        if subject[0] == "t":
            if subject[1] in self.terminals:
                self._eval_terminal(subject[1], now)
        elif subject[0] == "g":
            rule = self.rules.get(subject[1])
            if rule is not None and rule.group is not None:
                self._eval_group(rule, subject[2], now)
        else:
            alert = self.alerts.get((subject[1], "merchant", subject[2]))
            rule = self.rules.get(subject[1])
            if alert is None or rule is None or alert.last_event_at is None:
                return
            if now - alert.last_event_at >= rule.resolve_after_s:
                self._close(alert, now)
            else:
                self._schedule(subject, alert.last_event_at + rule.resolve_after_s)

    def _schedule(self, subject: tuple[str, ...], at: float) -> None:
        current = self._wake_at.get(subject)
        if current is not None and current <= at:
            return
        self._wake_at[subject] = at
        heapq.heappush(self._heap, (at, next(self._seq), subject))

    def _schedule_silence(self, terminal: str, facts: dict[str, Any], now: float) -> None:
        """A 'silent for N' rule needs a wake-up when N runs out, as no record will come."""
        seen = facts.get("last_seen")
        if not seen:
            return
        for rule in self._terminal_rules:
            for p in rule.when:
                if p.fact == "silent_s" and p.op in ("gt", "ge") and seen + p.value >= now:
                    self._schedule(("t", terminal), seen + float(p.value) + 0.001)

    def _eval_terminal(self, terminal: str, now: float) -> None:
        facts = self.terminals[terminal]
        mid = facts["merchant_id"]
        derived = derive(
            terminal,
            facts,
            now,
            merchant=self.merchants.get(mid),
            fleet=self.fleet,
            area_deg=self.area_deg,
        )
        derived.setdefault("online", True)
        self.evaluations += 1
        for rule in self._terminal_rules:
            cond = all(p.holds(derived) for p in rule.when)
            if rule.clear_when:
                cleared = any(p.holds(derived) for p in rule.clear_when)
            else:
                cleared = not cond
            self._step(
                rule, ("t", terminal), terminal,
                merchant_id=mid, cond=cond, cleared=cleared, context=derived, now=now,
            )  # fmt: skip
        self._schedule_silence(terminal, facts, now)
        self._regroup(terminal, now, derived=derived)

    def _group_key(self, rule: Rule, d: dict[str, Any]) -> str | None:
        if rule.scope == "merchant":
            return str(d["merchant_id"])
        if rule.scope == "area":
            if d.get("carrier") is None or d.get("area") is None:
                return None
            return f"{d['carrier']}/{d['area']}"
        return "fleet"

    def _regroup(
        self,
        terminal: str,
        now: float,
        *,
        derived: dict[str, Any] | None = None,
        evaluate: bool = True,
    ) -> None:
        if not self._group_rules:
            return
        if derived is None:
            facts = self.terminals[terminal]
            mid = facts["merchant_id"]
            m = self.merchants.get(mid)
            derived = derive(
                terminal, facts, now, merchant=m, fleet=self.fleet, area_deg=self.area_deg
            )
            derived.setdefault("online", True)
        for rule in self._group_rules:
            if rule.group is None:
                continue
            groups = self._groups[rule.name]
            key = self._group_key(rule, derived)
            match = key is not None and all(p.holds(derived) for p in rule.group.where)
            old = groups.of.get(terminal)
            if old == (key, match):
                continue
            touched = set()
            if old is not None and old[0] is not None:
                groups.members[old[0]].discard(terminal)
                groups.matching.get(old[0], set()).discard(terminal)
                if not groups.members[old[0]]:
                    del groups.members[old[0]]
                touched.add(old[0])
            groups.of[terminal] = (key, match)
            if key is not None:
                groups.members.setdefault(key, set()).add(terminal)
                if match:
                    groups.matching.setdefault(key, set()).add(terminal)
                touched.add(key)
            if evaluate:
                for k in touched:
                    self._eval_group(rule, k, now)

    def _eval_group(self, rule: Rule, key: str, now: float) -> None:
        if rule.group is None:
            return
        groups = self._groups[rule.name]
        count = len(groups.matching.get(key, ()))
        total = len(groups.members.get(key, ()))
        if rule.scope == "merchant":
            # Terminals registered but never heard from count too (the terminals table).
            total = max(total, self._known_terminals(key))
        fraction = count / total if total else 0.0
        self.evaluations += 1
        cond = count >= rule.group.min_count and fraction >= rule.group.min_fraction
        cleared = count < rule.group.clear_below if rule.group.clear_below is not None else not cond
        mid = key if rule.scope == "merchant" else None
        m = self.merchants.get(mid) if mid else None
        context = {
            "count": count,
            "total": total,
            "fraction": round(fraction, 3),
            "merchant_id": mid,
            "merchant_name": (m.name if m and m.name else mid),
        }
        self._step(
            rule, ("g", rule.name, key), key,
            merchant_id=mid, cond=cond, cleared=cleared, context=context, now=now,
        )  # fmt: skip

    def set_reference(self, merchants: dict[str, Merchant], terminals: dict[str, str]) -> None:
        """Merchants and registered terminals (terminal -> merchant), from the database."""
        self.merchants, self.terminal_merchants = merchants, terminals
        self._merchant_sizes = {}
        for m in terminals.values():
            self._merchant_sizes[m] = self._merchant_sizes.get(m, 0) + 1

    def _known_terminals(self, merchant: str) -> int:
        return self._merchant_sizes.get(merchant, 0)

    def _on_integrity(self, record: dict[str, Any], now: float) -> None:
        mid = str(record["merchant_id"])
        context = {
            "merchant_id": mid,
            "merchant_name": (self.merchants[mid].name if mid in self.merchants else mid),
            "txn_id": record.get("txn_id"),
            "kind": record.get("kind") or record.get("reason"),
            "reason": record.get("reason") or record.get("kind"),
            "terminal_id": record.get("terminal_id"),
        }
        for rule in self._event_rules:
            subject = ("e", rule.name, mid)
            alert = self.alerts.get((rule.name, "merchant", mid))
            count = 1 if alert is None else int(alert.value or 0) + 1
            context["count"] = count
            self._step(
                rule, subject, mid,
                merchant_id=mid, cond=True, cleared=False, context=context, now=now,
            )  # fmt: skip
            alert = self.alerts.get((rule.name, "merchant", mid))
            if alert is not None:
                alert.last_event_at = now
                alert.value = count
                alert.summary = self._render(rule, alert.subject_id, context, rule_value=count)[0]
                self._changes.alerts[alert.alert_id] = alert
                self._schedule(subject, now + rule.resolve_after_s)
            self.evaluations += 1

    # --- the state machine -----------------------------------------------------------------

    def _step(
        self,
        rule: Rule,
        subject: tuple[str, ...],
        subject_id: str,
        *,
        merchant_id: str | None,
        cond: bool,
        cleared: bool,
        context: dict[str, Any],
        now: float,
    ) -> None:
        key = (rule.name, rule.scope, subject_id)
        alert = self.alerts.get(key)
        if alert is None:
            if not cond:
                return
            alert = self._open(rule, subject_id, merchant_id, context, now)
        elif alert.state != "pending":
            if cleared:
                self._close(alert, now)
            else:
                summary = self._render(rule, subject_id, context)[0]
                if summary != alert.summary:
                    alert.summary = summary
                    self._changes.alerts[alert.alert_id] = alert
            return
        if not cond:  # pending whose condition went away: never fired, never notified
            del self.alerts[key]
            self._changes.alerts.pop(alert.alert_id, None)
            self._changes.dropped.add(alert.alert_id)
            return
        if now - alert.started_at >= rule.for_s:
            alert.summary, alert.annotations = self._render(rule, subject_id, context)
            alert.state, alert.fired_at = "firing", now
            self._changes.alerts[alert.alert_id] = alert
            self._announce_firing(alert, now)
        else:
            self._schedule(subject, alert.started_at + rule.for_s)

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
        summary, annotations = self._render(rule, subject_id, context)
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
        self._changes.alerts[alert.alert_id] = alert
        return alert

    def _render(
        self, rule: Rule, subject_id: str, context: dict[str, Any], rule_value: Any = None
    ) -> tuple[str, dict[str, str]]:
        values = {
            **context,
            "rule": rule.name,
            "severity": rule.severity,
            "subject_id": subject_id,
            "value": rule_value,
        }
        annotations = {k: _FMT.vformat(v, (), values) for k, v in rule.annotations.items()}
        return annotations.get("summary", ""), annotations

    def _close(self, alert: Alert, now: float) -> None:
        del self.alerts[alert.key]
        self.suppressed.pop(alert.alert_id, None)
        if alert.state == "pending":
            self._changes.alerts.pop(alert.alert_id, None)
            self._changes.dropped.add(alert.alert_id)
            return
        alert.state, alert.resolved_at = "resolved", now
        self._changes.alerts[alert.alert_id] = alert
        if alert.notified:
            self._notify(alert, "resolved", now)

    def _suppression(self, alert: Alert, now: float) -> str | None:
        for silence in self.silences.values():
            if silence.active(now) and silence.matches(alert.labels):
                return f"silence {silence.silence_id}"
        for inhibitor in self._inhibitors.get(alert.rule, ()):
            if alert.subject_kind != "terminal":
                continue
            facts = self.terminals.get(alert.subject_id)
            if facts is None:
                continue
            if inhibitor.scope == "terminal":
                key: str | None = alert.subject_id
            else:
                m = self.merchants.get(facts["merchant_id"])
                d = derive(
                    alert.subject_id,
                    facts,
                    now,
                    merchant=m,
                    fleet=self.fleet,
                    area_deg=self.area_deg,
                )
                key = self._group_key(inhibitor, d)
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
            self._changes.alerts[alert.alert_id] = alert
        if reason is not None:
            self.suppressed[alert.alert_id] = alert
            return
        self.suppressed.pop(alert.alert_id, None)
        alert.notified = True
        self._changes.alerts[alert.alert_id] = alert
        self._notify(alert, "firing", now)

    def _notify(self, alert: Alert, event: str, now: float) -> None:
        self._changes.notifications.append(
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
