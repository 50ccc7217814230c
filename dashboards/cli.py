"""``posflow dashboards generate|publish``: dashboards as code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register"]

dashboards_app = typer.Typer(help="Grafana dashboards: generated from Python, committed as JSON.")


@dashboards_app.command("generate")
def generate(
    out: Annotated[
        Path | None, typer.Option("--out", help="directory to write into (default dashboards/json)")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="write nothing; exit 1 if the JSON is not current")
    ] = False,
) -> None:
    """Write every dashboard's JSON (what Grafana provisions and `publish` pushes)."""
    from dashboards import catalog

    directory = out or catalog.JSON_DIR
    if check:
        stale = catalog.check(directory)
        if stale:
            typer.echo(f"out of date in {directory}: {', '.join(stale)} (run without --check)")
            raise typer.Exit(1)
        typer.echo(f"{len(catalog.BUILDERS)} dashboards current in {directory}")
        return
    for path in catalog.write(directory):
        typer.echo(f"  wrote {path}")


@dashboards_app.command("publish")
def publish(
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite/--no-overwrite", help="replace dashboards changed in Grafana"),
    ] = True,
    source: Annotated[
        Path | None,
        typer.Option("--from", help="publish these JSON files instead of generating them"),
    ] = None,
) -> None:
    """Push the dashboards to Grafana (POSFLOW_GRAFANA__URL, token or user/password)."""
    from dashboards import catalog
    from dashboards.publish import publish as push
    from posflow.cli_support import load_settings

    if source is None:
        bodies = {name: json.loads(catalog.render(d)) for name, d in catalog.build_all().items()}
    else:
        bodies = {p.stem: json.loads(p.read_text("utf-8")) for p in sorted(source.glob("*.json"))}
    settings = load_settings().grafana
    done = push(
        settings, bodies, overwrite=overwrite, progress=lambda line: typer.echo(f"  {line}")
    )
    typer.echo(f"published {len(done)} dashboards to folder {settings.folder!r}")


def register(app: typer.Typer) -> None:
    app.add_typer(dashboards_app, name="dashboards")
