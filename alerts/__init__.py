"""Proactive support alerts: rules, engine, notifiers (see docs/architecture.md)."""

__all__: list[str] = []
