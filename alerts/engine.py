"""The alert engine: pure, incremental, clock injected. No I/O here.

Each record touches one terminal (or one merchant, for an integrity event): its
facts are folded in, the terminal's rules are evaluated, and the groups it
belongs to (merchant, carrier/area, fleet) have their counts moved by one and
are evaluated. Time-driven changes (a ``for`` running out, a terminal silent
for days, an event alert's ``resolve_after``) come from a heap of wake-ups
popped by :meth:`Engine.tick`; nothing ever scans the whole fleet.

What an evaluation does to an alert (pending, firing, acknowledged, resolved,
suppressed, notified) is :mod:`alerts.lifecycle`.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from alerts.facts import Fleet, Merchant, apply_record, derive
from alerts.lifecycle import Alert, Changes, Key, Lifecycle, Notification, Silence, Subject
from alerts.rules import Rule, RuleSet

__all__ = ["Alert", "Changes", "Engine", "Notification", "Silence"]


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
        self.lifecycle = Lifecycle(self._schedule, self._inhibition_key)
        self.evaluations = 0
        self._heap: list[tuple[float, int, Subject]] = []
        self._wake_at: dict[Subject, float] = {}
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
        self.lifecycle.set_inhibitors(self.rules.values())
        now = self.clock()
        for alert in list(self.alerts.values()):
            if alert.rule not in self.rules:
                self.lifecycle.close(alert, now)
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
        self.lifecycle.changes.terminals[terminal] = facts
        self._eval_terminal(terminal, now)

    def tick(self) -> None:
        """Run every wake-up that is due, expire silences, lift ended suppressions."""
        now = self.clock()
        while self._heap and self._heap[0][0] <= now:
            at, _, subject = heapq.heappop(self._heap)
            if self._wake_at.get(subject) == at:
                del self._wake_at[subject]
            self._wake(subject, now)
        self.lifecycle.tick(now)

    def ack(self, alert_id: str, by: str) -> Alert:
        """Acknowledge a firing alert; KeyError when no open alert has this id."""
        return self.lifecycle.ack(alert_id, by, self.clock())

    def add_silence(
        self, matchers: dict[str, str], duration_s: float, *, by: str = "", comment: str = ""
    ) -> Silence:
        return self.lifecycle.add_silence(
            matchers, duration_s, self.clock(), by=by, comment=comment
        )

    def expire_silence(self, silence_id: str) -> Silence:
        return self.lifecycle.expire_silence(silence_id, self.clock())

    def drain(self) -> Changes:
        return self.lifecycle.drain()

    @property
    def alerts(self) -> dict[Key, Alert]:
        """The open alerts (pending, firing, acknowledged) by (rule, kind, subject)."""
        return self.lifecycle.alerts

    @property
    def silences(self) -> dict[str, Silence]:
        return self.lifecycle.silences

    @property
    def suppressed(self) -> dict[str, Alert]:
        return self.lifecycle.suppressed

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
            self.lifecycle.adopt(alert)
            rule = self.rules.get(alert.rule)
            if rule is None:
                continue
            if alert.state == "pending":
                self._schedule(self._subject_of(alert), alert.started_at + rule.for_s)
            if rule.event is not None and alert.last_event_at is not None:
                self._schedule(self._subject_of(alert), alert.last_event_at + rule.resolve_after_s)
        for silence in silences:
            self.lifecycle.silences[silence.silence_id] = silence
        self.set_rules(RuleSet(rules=list(self.rules.values())))
        for terminal, facts in terminals.items():
            self._schedule_silence(terminal, facts, now)

    # --- evaluation ------------------------------------------------------------------------

    def _subject_of(self, alert: Alert) -> Subject:
        rule = self.rules.get(alert.rule)
        if alert.subject_kind == "terminal":
            return ("t", alert.subject_id)
        if rule is not None and rule.event is not None:
            return ("e", alert.rule, alert.subject_id)
        return ("g", alert.rule, alert.subject_id)

    def _wake(self, subject: Subject, now: float) -> None:
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
                self.lifecycle.close(alert, now)
            else:
                self._schedule(subject, alert.last_event_at + rule.resolve_after_s)

    def _schedule(self, subject: Subject, at: float) -> None:
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
            self.lifecycle.step(
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
        self.lifecycle.step(
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
            self.lifecycle.event(rule, ("e", rule.name, mid), mid, context, now)
            self.evaluations += 1

    def _inhibition_key(self, inhibitor: Rule, alert: Alert, now: float) -> str | None:
        """The group of ``inhibitor`` that the terminal of ``alert`` is in (None: none)."""
        facts = self.terminals.get(alert.subject_id)
        if facts is None:
            return None
        if inhibitor.scope == "terminal":
            return alert.subject_id
        m = self.merchants.get(facts["merchant_id"])
        d = derive(
            alert.subject_id, facts, now, merchant=m, fleet=self.fleet, area_deg=self.area_deg
        )
        return self._group_key(inhibitor, d)
