"""The metric names a PromQL expression reads (enough of PromQL for our dashboards), and
the names a Prometheus text exposition declares.

Label matchers (``{...}``), strings, range and offset durations, grouping
clauses (``by (...)``, ``without (...)``, ``on (...)``, ``ignoring (...)``,
``group_left (...)``, ``group_right (...)``) and Grafana variables are removed
first; what remains that looks like a name and is not followed by ``(`` (a
function) nor is a keyword is a metric name.
"""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["exposition_names", "metric_names"]

_KEYWORDS = frozenset(
    {
        "and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
        "group_right", "bool", "offset", "atan2", "inf", "nan",
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
        "bottomk", "topk", "quantile", "limitk", "limit_ratio",
    }
)  # fmt: skip

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_NUMBER = re.compile(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", re.IGNORECASE)


def metric_names(expr: str) -> set[str]:
    """Every metric name ``expr`` selects, e.g. ``{"posflow_ingest_received_total"}``."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # $__rate_interval, ${var}
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors and subqueries
    text = re.sub(r"\boffset\s+-?\w+", "", text)
    text = _GROUPING.sub("", text)
    text = _NUMBER.sub("", text)
    names = set()
    for match in _NAME.finditer(text):
        name = match.group(0)
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


# The series names each metric type exposes, from its family name.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def exposition_names(exposition: str) -> set[str]:
    """Every series name a /metrics text can hold, declared or sampled.

    A labelled metric has no sample until a label set is first used, but
    prometheus_client writes its ``# HELP`` / ``# TYPE`` lines from the start, so the
    family (hence e.g. ``x_total`` of counter ``x``, ``x_bucket`` of histogram ``x``)
    counts as exported even with no sample yet.
    """
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names
