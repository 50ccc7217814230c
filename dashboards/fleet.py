"""Fleet overview: how many terminals work, which do not and why, where they are."""

from __future__ import annotations

from grafana_foundation_sdk.builders import (
    barchart,
    geomap,
    heatmap,
    piechart,
    stat,
    table,
)
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import piechart as piechart_model

from dashboards._panels import (
    TAGS,
    fixed_colour,
    health_thresholds,
    link,
    links_to,
    reduce_last,
    steps,
)
from dashboards._targets import PG, Kind, Sql

__all__ = ["UID", "build"]

UID = "posflow-fleet"

ONLINE = Sql(
    """
    SELECT count(*) FILTER (WHERE online) AS online,
           count(*) FILTER (WHERE NOT online) AS offline
      FROM terminal_state
    """,
    online="number",
    offline="number",
)

# Ten bands of ten points; the band label sorts as text ("00-09" ... "90-100").
HEALTH_BANDS = Sql(
    """
    SELECT CASE WHEN b = 9 THEN '90-100' ELSE lpad((b * 10)::text, 2, '0') || '-'
                || lpad((b * 10 + 9)::text, 2, '0') END AS band,
           count(s.terminal_id) AS terminals
      FROM generate_series(0, 9) AS b
      LEFT JOIN terminal_state s ON least(s.health_score / 10, 9) = b
     GROUP BY b
     ORDER BY b
    """,
    band="string",
    terminals="number",
)

# Each terminal's latest window in the range, by primary key (used by both branches).
_LATEST_IN_RANGE = """             CROSS JOIN LATERAL (
                   SELECT terminal_id, merchant_id, score, signal_score, battery_score,
                          txn_score, printer_score, window_start
                     FROM terminal_health
                    WHERE terminal_id = s.terminal_id AND $__timeFilter(window_start)
                    ORDER BY window_start DESC
                    LIMIT 1) AS l"""


# The latest health window of each terminal in the range, worst first, with its reasons.
# One probe of terminal_health's primary key (terminal_id, window_start), newest first,
# per terminal with a terminal_state row: no sort of every window in the range (DISTINCT
# ON did that: seconds at 50,000 terminals). When the range ends now (within a minute),
# each terminal's latest window in the range is its latest window, whose score
# terminal_state.health_score holds: the terminals are taken worst first by that score
# and probed until 25 have a window in the range (tens of probes, not 50,000). A range
# ending earlier probes every terminal and sorts by the windows' scores (one-time
# filters: only one branch runs). The reasons are read for the 25 shown only.
WORST = Sql(
    """
    SELECT w.terminal_id, w.merchant_id, w.score, w.signal_score, w.battery_score,
           w.txn_score, w.printer_score,
           coalesce((SELECT string_agg(r, '; ')
                       FROM jsonb_array_elements_text(h.details -> 'reasons') AS r),
                    '') AS why,
           w.window_start AS "time"
      FROM ((SELECT l.*
               FROM terminal_state AS s
@LATEST@
              WHERE $__timeTo() >= now() - interval '1 minute'
              ORDER BY s.health_score, s.terminal_id
              LIMIT 25)
            UNION ALL
            (SELECT l.*
               FROM terminal_state AS s
@LATEST@
              WHERE $__timeTo() < now() - interval '1 minute'
              ORDER BY l.score, l.terminal_id
              LIMIT 25)) AS w
      JOIN terminal_health AS h USING (terminal_id, window_start)
     ORDER BY w.score, w.terminal_id
    """.replace("@LATEST@", _LATEST_IN_RANGE),
    terminal_id="string",
    merchant_id="string",
    score="number",
    signal_score="number",
    battery_score="number",
    txn_score="number",
    printer_score="number",
    why="string",
    time_="time",
)

# Pre-bucketed heatmaps: readings per time bucket and band from the fleet-wide banded
# aggregates (migration 0011), one column per band named by its lower bound (Grafana's
# heatmap reads the names as bucket bounds, rowsFrame layout "ge"). Rows: one per time
# bucket, whatever the fleet's size.
BATTERY_BANDS = tuple(range(0, 100, 10))
SIGNAL_BANDS = tuple(range(-130, -40, 10))


def _banded(view: str, bands: tuple[int, ...]) -> Sql:
    per_band = [f'coalesce(sum(readings) FILTER (WHERE band = {b}), 0) AS "{b}"' for b in bands]
    lines = [
        "SELECT $__timeGroupAlias(bucket, $__interval),",
        *(f"       {c}," for c in per_band[:-1]),
        f"       {per_band[-1]}",
        f"  FROM {view}",
        " WHERE $__timeFilter(bucket)",
        " GROUP BY 1",
        " ORDER BY 1",
    ]
    columns: dict[str, Kind] = {"time_": "time", **{str(b): "number" for b in bands}}
    return Sql("\n".join(lines), fmt="time_series", **columns)


BATTERY = _banded("fleet_battery_1m", BATTERY_BANDS)
SIGNAL = _banded("fleet_signal_1m", SIGNAL_BANDS)

OPEN_ALERTS = Sql(
    """
    SELECT s.severity, count(a.alert_id) AS alerts
      FROM unnest(ARRAY['critical', 'warning', 'info']) WITH ORDINALITY AS s (severity, rank)
      LEFT JOIN alerts AS a ON a.severity = s.severity AND a.state <> 'resolved'
     GROUP BY s.severity, s.rank
     ORDER BY s.rank
    """,
    severity="string",
    alerts="number",
)

# Offline or below 50: placed where the terminal last reported, else where it is registered.
PROBLEMS_MAP = Sql(
    """
    SELECT s.terminal_id, s.merchant_id, coalesce(s.lat, t.lat) AS latitude,
           coalesce(s.lon, t.lon) AS longitude, s.health_score, s.online
      FROM terminal_state AS s
      LEFT JOIN terminals AS t USING (terminal_id)
     WHERE (NOT s.online OR s.health_score < 50)
       AND coalesce(s.lat, t.lat) IS NOT NULL AND coalesce(s.lon, t.lon) IS NOT NULL
    """,
    terminal_id="string",
    merchant_id="string",
    latitude="number",
    longitude="number",
    health_score="number",
    online="bool",
)

APP_VERSIONS = Sql(
    """
    SELECT coalesce(app_version, 'unknown') AS app_version, count(*) AS terminals
      FROM terminal_state
     GROUP BY 1
     ORDER BY 2 DESC, 1
    """,
    app_version="string",
    terminals="number",
)


def build() -> db.Dashboard:
    to_terminal = link("Terminal drill-down", "posflow-terminal", "var-terminal=${__value.raw}")
    problems_layer = (
        common_builders.MapLayerOptions()
        .type("markers")
        .name("Terminals with problems")
        .location(
            common_builders.FrameGeometrySource()
            .mode(common.FrameGeometrySourceMode.COORDS)
            .latitude("latitude")
            .longitude("longitude")
        )
        .tooltip(True)
        .config(
            {
                "showLegend": True,
                "style": {
                    "color": {"field": "health_score", "fixed": "red"},
                    "size": {"fixed": 6},
                },
            }
        )
    )
    return (
        db.Dashboard("posflow · Fleet overview")
        .uid(UID)
        .tags(TAGS)
        .description("Terminals online, their health, the worst ones and why, where they are.")
        .time("now-6h", "now")
        .refresh("30s")
        .with_panel(
            stat.Panel()
            .title("Terminals online / offline")
            .datasource(PG)
            .with_target(ONLINE)
            .reduce_options(reduce_last())
            .color_mode(common.BigValueColorMode.BACKGROUND)
            .graph_mode(common.BigValueGraphMode.NONE)
            .override_by_name("offline", fixed_colour("red"))
            .override_by_name("online", fixed_colour("green"))
            .height(6)
            .span(6)
        )
        .with_panel(
            barchart.Panel()
            .title("Health score distribution (now)")
            .datasource(PG)
            .with_target(HEALTH_BANDS)
            .x_field("band")
            .height(6)
            .span(9)
        )
        .with_panel(
            stat.Panel()
            .title("Open alerts by severity")
            .datasource(PG)
            .with_target(OPEN_ALERTS)
            .reduce_options(reduce_last(values=True))
            .color_mode(common.BigValueColorMode.VALUE)
            .graph_mode(common.BigValueGraphMode.NONE)
            .thresholds(steps([(None, "green"), (1, "orange")]))
            .height(6)
            .span(9)
        )
        .with_panel(
            table.Panel()
            .title("Worst terminals, and why")
            .description("The latest health window of each terminal in the range, worst first.")
            .datasource(PG)
            .with_target(WORST)
            .thresholds(health_thresholds())
            .override_by_name("terminal_id", links_to(to_terminal))
            .height(10)
            .span(24)
        )
        .with_panel(
            heatmap.Panel()
            .title("Battery level across the fleet")
            .datasource(PG)
            .with_target(BATTERY)
            .calculate(False)
            .rows_frame(
                heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.GE).value("readings")
            )
            .y_axis(heatmap.YAxisConfig().unit("percent"))
            .height(8)
            .span(12)
        )
        .with_panel(
            heatmap.Panel()
            .title("Signal strength across the fleet")
            .datasource(PG)
            .with_target(SIGNAL)
            .calculate(False)
            .rows_frame(
                heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.GE).value("readings")
            )
            .y_axis(heatmap.YAxisConfig().unit("dBm"))
            .height(8)
            .span(12)
        )
        .with_panel(
            geomap.Panel()
            .title("Terminals with problems (offline or health below 50)")
            .datasource(PG)
            .with_target(PROBLEMS_MAP)
            .view(geomap.MapViewConfig().id("fit").lat(0).lon(0).zoom(2))
            .basemap(common_builders.MapLayerOptions().type("default").name("Basemap"))
            .layers([problems_layer])
            .thresholds(health_thresholds())
            .height(12)
            .span(16)
        )
        .with_panel(
            piechart.Panel()
            .title("App versions in the fleet")
            .datasource(PG)
            .with_target(APP_VERSIONS)
            .pie_type(piechart_model.PieChartType.DONUT)
            .reduce_options(reduce_last(values=True))
            .height(12)
            .span(8)
        )
    )
