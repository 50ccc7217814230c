"""The two storage paths define the same tables and columns (so the same queries work)."""

from __future__ import annotations

import re
from pathlib import Path

from posflow.storage.migrate import _all_migrations
from posflow.storage.writers import TELEMETRY_COLUMNS, TRANSACTION_COLUMNS

MIGRATIONS = Path(__file__).resolve().parents[2] / "posflow" / "storage" / "migrations"


def _create_tables(sql: str) -> dict[str, list[str]]:
    """Table name -> column names, from the CREATE TABLE statements of a migration."""
    tables = {}
    for name, body in re.findall(r"CREATE TABLE (\w+) \((.*?)\n\)", sql, flags=re.S):
        columns = []
        for line in body.splitlines():
            word = line.strip().split(" ", 1)[0]
            if word and word.upper() not in {"PRIMARY", "UNIQUE", "CHECK", "--"}:
                columns.append(word)
        tables[name] = columns
    return tables


def _view_columns(sql: str, view: str) -> list[str]:
    """Output column names of a view or continuous aggregate (the final SELECT list)."""
    match = re.search(rf"CREATE (?:MATERIALIZED )?VIEW {view}\b.*?SELECT (.*?)\n\s*FROM", sql, re.S)
    assert match, view
    selects = re.findall(r"SELECT (.*?)\n\s*FROM", sql[match.start() :], re.S)
    last = selects[-1] if view == "telemetry_1h" and "WITH mark" in sql else selects[0]
    names = []
    for raw in re.split(r",\s*(?![^()]*\))", last):
        item = raw.strip()
        alias = re.search(r"\bAS (\w+)$", item)
        names.append(alias.group(1) if alias else item.split(".")[-1].split()[-1])
    return names


def test_time_series_tables_have_the_same_columns_on_both_paths() -> None:
    plain = _create_tables((MIGRATIONS / "0002_timeseries.plain.sql").read_text())
    timescale = _create_tables((MIGRATIONS / "0002_timeseries.timescaledb.sql").read_text())
    for table in ("telemetry", "transactions", "terminal_health"):
        assert plain[table] == timescale[table], table
    assert tuple(plain["telemetry"]) == TELEMETRY_COLUMNS
    assert tuple(plain["transactions"]) == TRANSACTION_COLUMNS


def test_rollup_views_expose_the_same_columns_on_both_paths() -> None:
    plain = (MIGRATIONS / "0002_timeseries.plain.sql").read_text()
    timescale = (MIGRATIONS / "0002_timeseries.timescaledb.sql").read_text()
    expected = [
        "bucket", "terminal_id", "merchant_id", "samples", "battery_avg", "battery_min",
        "battery_max", "signal_avg_dbm", "signal_min_dbm", "signal_max_dbm", "charging_samples",
    ]  # fmt: skip
    for view in ("telemetry_1m", "telemetry_1h"):
        assert _view_columns(timescale, view) == expected, view
        assert _view_columns(plain, view) == expected, view
    plain = (MIGRATIONS / "0011_fleet_bands.plain.sql").read_text()
    timescale = (MIGRATIONS / "0011_fleet_bands.timescaledb.sql").read_text()
    for view in ("fleet_battery_1m", "fleet_signal_1m"):
        assert _view_columns(timescale, view) == ["bucket", "band", "readings"], view
        assert _view_columns(plain, view) == ["bucket", "band", "readings"], view


def test_migrations_are_numbered_once_per_path_and_money_is_never_a_hypertable() -> None:
    migrations = _all_migrations()
    for path in ("plain", "timescaledb"):
        versions = [m.version for m in migrations if m.path in (None, path)]
        assert versions == sorted(set(versions)), path
    timescale = (MIGRATIONS / "0002_timeseries.timescaledb.sql").read_text()
    hypertables = re.findall(r"create_hypertable\('(\w+)'", timescale)
    assert hypertables == ["telemetry", "transactions", "terminal_health"]
    assert not {"ledger_entries", "merchant_balances", "cashflow_events"} & set(hypertables)
