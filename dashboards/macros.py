"""Turn a panel's SQL into the SQL Grafana sends to PostgreSQL, for a time range.

Grafana does this in two steps, and so does :func:`expand`:

1. The frontend's template service replaces variables: ``$name``, ``${name}``,
   ``${name:raw}``, ``[[name]]`` and the built-ins ``$__interval``,
   ``$__interval_ms``, ``$__from``, ``$__to``, ``$__range_s``. A value of the
   PostgreSQL datasource is formatted like its ``interpolateVariable``: a single
   value (variable neither multi nor include-all) goes in raw with ``'`` doubled,
   so queries write ``'$terminal'``; a list becomes ``'a','b'``.
   ``$__interval`` is the range divided by the panel's data points (its width),
   rounded to a "nice" step by Grafana's ``roundInterval`` table, and never below
   the datasource's minimum interval.
2. The backend's macro engine (``grafana-postgresql-datasource/macros.go``)
   rewrites ``$__macro(args)``: arguments are split at commas and trimmed, and
   the pattern stops at the first ``)``, so a macro argument cannot contain
   parentheses (Grafana then sends broken SQL, and so does this: the database
   refuses it, as it would refuse Grafana's).

Times are written as Go's RFC 3339 (nanosecond form, UTC, trailing zeros of the
fraction dropped), intervals in seconds as Go's ``%v`` prints a float.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

__all__ = [
    "MacroError",
    "TimeRange",
    "Variable",
    "expand",
    "format_interval",
    "interval_for",
    "parse_interval",
    "round_interval_ms",
]


class MacroError(ValueError):
    """A query Grafana could not expand (unknown macro, bad arguments, bad interval)."""


@dataclass(frozen=True)
class Variable:
    value: str | Sequence[str]
    multi: bool = False
    include_all: bool = False


@dataclass(frozen=True)
class TimeRange:
    start: datetime
    end: datetime
    max_data_points: int = 1000  # Grafana uses the panel's width in pixels
    # The datasource's timeInterval, as provisioned in deploy/grafana (1m).
    min_interval: timedelta = field(default=timedelta(minutes=1))

    @property
    def interval(self) -> timedelta:
        return interval_for(self)


# Grafana's rangeutil.roundInterval: (upper bound exclusive, result), milliseconds.
_ROUND_MS = (
    (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000),
    (3500, 2000), (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000),
    (45000, 30000), (90000, 60000), (210000, 120000), (450000, 300000), (750000, 600000),
    (1050000, 900000), (1500000, 1200000), (2700000, 1800000), (5400000, 3600000),
    (9000000, 7200000), (16200000, 10800000), (32400000, 21600000), (86400000, 43200000),
    (604800000, 86400000), (1814400000, 604800000), (3628800000, 2592000000),
)  # fmt: skip
_YEAR_MS = 31536000000


def round_interval_ms(ms: float) -> int:
    for bound, result in _ROUND_MS:
        if ms < bound:
            return result
    return _YEAR_MS


def interval_for(time_range: TimeRange) -> timedelta:
    """``$__interval``: range / data points, rounded, at least the minimum interval."""
    span_ms = (time_range.end - time_range.start).total_seconds() * 1000
    ms = round_interval_ms(span_ms / max(1, time_range.max_data_points))
    return max(timedelta(milliseconds=ms), time_range.min_interval)


_UNITS = (("y", 31536000000), ("w", 604800000), ("d", 86400000), ("h", 3600000),
          ("m", 60000), ("s", 1000), ("ms", 1))  # fmt: skip


def format_interval(interval: timedelta) -> str:
    """Like Grafana's secondsToHms for one unit: 30s, 1m, 2h, 1d, 100ms."""
    ms = round(interval.total_seconds() * 1000)
    for unit, size in _UNITS:
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


_INTERVAL = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)$")


def parse_interval(text: str) -> timedelta:
    """Grafana's gtime.ParseInterval: ``10s``, ``5m``, ``1h``, ``1d``, ``1w``, ``100ms``."""
    match = _INTERVAL.match(text.strip().strip("'"))
    if not match:
        raise MacroError(f"error parsing interval {text!r}")
    size = dict(_UNITS)[match.group(2)]
    return timedelta(milliseconds=float(match.group(1)) * size)


def _rfc3339(ts: datetime) -> str:
    ts = ts.astimezone(UTC)
    text = ts.strftime("%Y-%m-%dT%H:%M:%S")
    if ts.microsecond:
        text += "." + f"{ts.microsecond:06d}".rstrip("0")
    return text + "Z"


def _go_float(value: float) -> str:
    """Go's %v of a float64: shortest digits, exponent form from 1e+06 (and below 1e-4)."""
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    dec = Decimal(repr(float(value))).normalize()
    exp = dec.adjusted()
    if exp < -4 or exp >= 6:
        digits = str(dec.scaleb(-exp))
        return f"{digits}e{'+' if exp >= 0 else '-'}{abs(exp):02d}"
    return format(dec, "f")


# --- step 1: template variables -------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^}]+))?(?::([^}]+))?\}"
)


def _sql_value(var: Variable, fmt: str | None) -> str:
    if isinstance(var.value, str):
        if fmt == "raw":
            return var.value
        if var.multi or var.include_all:
            return "'" + var.value.replace("'", "''") + "'"
        return var.value.replace("'", "''")
    return ",".join("'" + v.replace("'", "''") + "'" for v in var.value)


def _builtins(time_range: TimeRange) -> dict[str, Variable]:
    interval = time_range.interval
    return {
        "__interval": Variable(format_interval(interval)),
        "__interval_ms": Variable(str(round(interval.total_seconds() * 1000))),
        "__from": Variable(str(round(time_range.start.timestamp() * 1000))),
        "__to": Variable(str(round(time_range.end.timestamp() * 1000))),
        "__range_s": Variable(str(round((time_range.end - time_range.start).total_seconds()))),
    }


def replace_variables(
    sql: str, time_range: TimeRange, variables: Mapping[str, Variable] | None = None
) -> str:
    known = {**_builtins(time_range), **(variables or {})}

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        fmt = match.group(3) or match.group(6)
        var = known.get(name)
        # Unknown names stay as written (Grafana does the same): macros are step 2.
        return match.group(0) if var is None else _sql_value(var, fmt)

    return _VARIABLE.sub(one, sql)


# --- step 2: macros ---------------------------------------------------------------------

_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^)]*)\)")


def _needs(name: str, args: list[str], count: int, what: str) -> None:
    if len(args) < count or any(not a for a in args[:count]):
        raise MacroError(f"macro {name} needs {what}")


def _time_group(name: str, args: list[str], timescaledb: bool) -> str:
    _needs(name, args, 2, "time column and interval and optional fill value")
    seconds = parse_interval(args[1]).total_seconds()
    if timescaledb:
        return f"time_bucket('{seconds:.0f}s',{args[0]})"
    s = _go_float(seconds)
    return f"floor(extract(epoch from {args[0]})/{s})*{s}"


def _macro(  # noqa: PLR0911 - one case per macro of macros.go
    name: str, args: list[str], time_range: TimeRange, timescaledb: bool
) -> str:
    start, end = _rfc3339(time_range.start), _rfc3339(time_range.end)
    unix_from, unix_to = int(time_range.start.timestamp()), int(time_range.end.timestamp())
    match name:
        case "__time":
            _needs(name, args, 1, "time column")
            return f'{args[0]} AS "time"'
        case "__timeEpoch":
            _needs(name, args, 1, "time column")
            return f'extract(epoch from {args[0]}) as "time"'
        case "__timeFilter":
            _needs(name, args, 1, "time column")
            return f"{args[0]} BETWEEN '{start}' AND '{end}'"
        case "__timeFrom":
            return f"'{start}'"
        case "__timeTo":
            return f"'{end}'"
        case "__timeGroup":
            return _time_group(name, args, timescaledb)
        case "__timeGroupAlias":
            return _time_group("__timeGroup", args, timescaledb) + ' AS "time"'
        case "__unixEpochFilter":
            _needs(name, args, 1, "time column")
            return f"{args[0]} >= {unix_from} AND {args[0]} <= {unix_to}"
        case "__unixEpochFrom":
            return str(unix_from)
        case "__unixEpochTo":
            return str(unix_to)
        case "__unixEpochGroup" | "__unixEpochGroupAlias":
            _needs(name, args, 2, "time column and interval and optional fill value")
            s = _go_float(parse_interval(args[1]).total_seconds())
            alias = ' AS "time"' if name.endswith("Alias") else ""
            return f"floor(({args[0]})/{s})*{s}{alias}"
        case _:
            raise MacroError(f"unknown macro {name!r}")


def expand(
    sql: str,
    time_range: TimeRange,
    variables: Mapping[str, Variable] | None = None,
    *,
    timescaledb: bool = False,
) -> str:
    """The SQL Grafana's PostgreSQL datasource runs for ``sql`` over ``time_range``.

    ``timescaledb`` is the datasource's TimescaleDB switch: ``$__timeGroup`` then
    uses ``time_bucket``.
    """
    with_vars = replace_variables(sql, time_range, variables)

    def one(match: re.Match[str]) -> str:
        args = [a.strip(" ") for a in match.group(2).split(",")] if match.group(2) else []
        return _macro(match.group(1), args, time_range, timescaledb)

    out = _MACRO.sub(one, with_vars)
    leftover = re.search(r"\$\{?\w+", out)
    if leftover:
        raise MacroError(f"{leftover.group(0)} is neither a variable nor a macro")
    return out
