"""Grafana dashboards as code: built with the Grafana Foundation SDK, committed as JSON.

``catalog`` builds and renders them, ``macros`` expands Grafana's SQL macros the way
its PostgreSQL datasource does, ``promql`` names the metrics an expression reads,
``publish`` pushes them to a running Grafana.
"""

from dashboards.catalog import BUILDERS, JSON_DIR, build_all, check, render, write

__all__ = ["BUILDERS", "JSON_DIR", "build_all", "check", "render", "write"]
