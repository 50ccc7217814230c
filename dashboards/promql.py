"""The metric names a PromQL expression reads (enough of PromQL for our dashboards).

Label matchers (``{...}``), strings, range and offset durations, grouping
clauses (``by (...)``, ``without (...)``, ``on (...)``, ``ignoring (...)``,
``group_left (...)``, ``group_right (...)``) and Grafana variables are removed
first; what remains that looks like a name and is not followed by ``(`` (a
function) nor is a keyword is a metric name.
"""

from __future__ import annotations

import re

__all__ = ["metric_names"]

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
