"""Proactive support alerts: rules, engine, notifiers (see docs/architecture.md)."""

from alerts.engine import Engine
from alerts.lifecycle import Alert, Notification, Silence
from alerts.rules import Rule, RuleSet, load_rules

__all__ = ["Alert", "Engine", "Notification", "Rule", "RuleSet", "Silence", "load_rules"]
