"""Grafana dashboards as code (see docs/architecture.md)."""

__all__: list[str] = []
