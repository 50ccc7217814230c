"""The alert engine's commands: ``posflow alerts [run|list|ack|silence|check]``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from posflow.settings import Settings

__all__ = ["register"]


def _settings() -> Settings:
    from posflow.cli import _settings as load

    return load()


def _api(path: str, body: dict[str, object] | None = None) -> dict[str, object]:
    import httpx

    from posflow.errors import PosflowError

    s = _settings().services
    url = f"http://{s.bind_host if s.bind_host != '0.0.0.0' else '127.0.0.1'}:{s.alerts}{path}"  # noqa: S104
    try:
        r = httpx.post(url, json=body or {}, timeout=10)
    except httpx.HTTPError as exc:
        raise PosflowError(
            f"the alert engine at {url} did not answer ({exc})",
            fix="start it with `posflow alerts run`",
        ) from None
    data: dict[str, object] = r.json()
    if r.status_code >= 300:
        raise PosflowError(f"{path}: {data.get('error', r.status_code)}")
    return data


def register(app: typer.Typer) -> None:
    """Add the alert engine's commands to the ``posflow`` command line."""
    alerts = typer.Typer(help="The alert engine: rules, lifecycle, notifications.")
    app.add_typer(alerts, name="alerts")

    @alerts.callback(invoke_without_command=True)
    def default(ctx: typer.Context) -> None:
        """Without a subcommand: run the engine."""
        if ctx.invoked_subcommand is None:
            run()

    @alerts.command("run")
    def run() -> None:
        """Run the alert engine until SIGTERM (SIGHUP reloads the rules)."""
        from alerts.service import run_service
        from posflow.logs import configure_logging

        configure_logging()
        run_service(_settings())

    @alerts.command("list")
    def list_(
        state: Annotated[
            str | None, typer.Option(help="pending|firing|acknowledged|resolved")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
        limit: int = 100,
    ) -> None:
        """Alerts from the database (open ones unless --state says otherwise)."""
        import psycopg

        q = (
            "SELECT alert_id, state, severity, rule, subject_id, summary, started_at, suppressed_by"
            " FROM alerts WHERE (%s::text IS NULL AND state <> 'resolved') OR state = %s"
            " ORDER BY started_at DESC LIMIT %s"
        )
        with psycopg.connect(_settings().postgres.dsn()) as conn:
            rows = conn.execute(q, [state, state, limit]).fetchall()
        for r in rows:
            if as_json:
                keys = ("alert_id", "state", "severity", "rule", "subject_id", "summary")
                item = dict(zip(keys, r[:6], strict=True))
                item.update(started_at=r[6].isoformat(), suppressed_by=r[7])
                typer.echo(json.dumps(item))
            else:
                muted = f" [{r[7]}]" if r[7] else ""
                typer.echo(f"{r[0]}  {r[1]:<12} {r[2]:<8} {r[3]:<28} {r[4]:<16} {r[5]}{muted}")

    @alerts.command("ack")
    def ack(alert_id: str, by: Annotated[str, typer.Option(help="who")] = "cli") -> None:
        """Acknowledge a firing alert (through the running engine's API)."""
        data = _api(f"/alerts/{alert_id}/ack", {"by": by})
        typer.echo(f"acknowledged {data['alert_id']} ({data['rule']} {data['subject_id']})")

    @alerts.command("silence")
    def silence(
        match: Annotated[list[str], typer.Option("--match", "-m", help="label=value, repeatable")],
        duration: Annotated[str, typer.Option("--for", help="e.g. 30m, 2h")] = "1h",
        by: str = "cli",
        comment: str = "",
    ) -> None:
        """Silence matching alerts for a while (a maintenance window)."""
        from posflow.errors import PosflowError

        matchers = {}
        for m in match:
            key, sep, value = m.partition("=")
            if not sep or not key:
                raise PosflowError(f"--match {m!r}: expected label=value")
            matchers[key] = value
        body: dict[str, object] = {
            "matchers": matchers,
            "duration": duration,
            "by": by,
            "comment": comment,
        }
        data = _api("/silences", body)
        typer.echo(f"silence {data['silence_id']} until {data['ends_at']:.0f} (epoch s)")

    @alerts.command("check")
    def check(path: Path) -> None:
        """Validate a rules file (the defaults plus it), as the engine would."""
        from alerts.rules import load_rules

        rules = load_rules(path)
        typer.echo(f"{path}: ok, {len(rules.rules)} rules with the defaults")
