"""The alert engine's commands: ``posflow alerts [run|list|ack|silence|...|check]``.

Every command but ``run`` and ``check`` goes through the running engine's HTTP API
(``services.alerts``) with a staff API key (``posflow api keys issue --role
support_agent|support_lead``), given as ``--key`` or, better (it stays out of the
shell history and the process list), in ``POSFLOW_STAFF_KEY``. The engine
authenticates the key, authorises the action by the role matrix and records it in
the audit trail (refusals too), exactly as for any HTTP client; the CLI adds
``X-Posflow-Client: cli:<user>@<host>``, recorded as the (unverified) client. A
refusal prints one line and exits 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from posflow.cli_support import STAFF_KEY_ENV, staff_key_option

if TYPE_CHECKING:
    from posflow.settings import Settings

__all__ = ["KEY_ENV", "register"]

KEY_ENV = STAFF_KEY_ENV

Key = Annotated[
    str | None,
    staff_key_option("your staff API key (`posflow api keys issue --role support_agent`)"),
]


def _settings() -> Settings:
    from posflow.cli_support import load_settings as load

    return load()


def _client() -> str:
    from posflow.cli_support import cli_source

    return cli_source()


def _api(method: str, path: str, key: str | None, body: dict[str, Any] | None = None) -> Any:
    """One call to the running engine; an error answer becomes a one-line PosflowError."""
    import httpx

    from posflow.errors import PosflowError

    if not key:
        raise PosflowError(
            "no staff API key: the alert engine's API needs one",
            fix=f"export {KEY_ENV}=pf_... (from `posflow api keys issue --role support_agent`) "
            "or pass --key",
        )
    s = _settings().services
    host = s.bind_host if s.bind_host != "0.0.0.0" else "127.0.0.1"  # noqa: S104
    url = f"http://{host}:{s.alerts}{path}"
    headers = {"Authorization": f"Bearer {key}", "X-Posflow-Client": _client()}
    try:
        r = httpx.request(method, url, json=body, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise PosflowError(
            f"the alert engine at {url} did not answer ({exc})",
            fix="start it with `posflow alerts run`",
        ) from None
    try:
        data = r.json()
    except ValueError:
        data = {"detail": r.text.strip()[:200]}
    if r.status_code >= 300:
        detail = data.get("detail") if isinstance(data, dict) else None
        raise PosflowError(f"{method} {path}: HTTP {r.status_code}: {detail or r.reason_phrase}")
    return data


def register(app: typer.Typer) -> None:  # noqa: PLR0915 - one closure per command
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
        from posflow.cli_support import service_settings
        from posflow.logs import configure_logging

        settings = service_settings()
        configure_logging()
        run_service(settings)

    @alerts.command("list")
    def list_(
        key: Key = None,
        state: Annotated[
            str | None, typer.Option(help="pending|firing|acknowledged|resolved")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
        limit: int = 100,
    ) -> None:
        """Alerts (open ones unless --state says otherwise); needs alert.read."""
        query = f"?limit={limit}" + (f"&state={state}" if state else "")
        for a in _api("GET", f"/alerts{query}", key)["alerts"]:
            if as_json:
                typer.echo(json.dumps(a, sort_keys=True))
            else:
                muted = f" [{a['suppressed_by']}]" if a.get("suppressed_by") else ""
                typer.echo(
                    f"{a['alert_id']}  {a['state']:<12} {a['severity']:<8} {a['rule']:<28} "
                    f"{a['subject_id']:<16} {a['summary']}{muted}"
                )

    @alerts.command("ack")
    def ack(alert_id: str, key: Key = None) -> None:
        """Acknowledge a firing alert; needs alert.acknowledge (support agent or lead)."""
        data = _api("POST", f"/alerts/{alert_id}/ack", key, {})
        typer.echo(
            f"acknowledged {data['alert_id']} ({data['rule']} {data['subject_id']}) "
            f"by {data['acknowledged_by']}"
        )

    @alerts.command("silence")
    def silence(
        match: Annotated[list[str], typer.Option("--match", "-m", help="label=value, repeatable")],
        duration: Annotated[str, typer.Option("--for", help="e.g. 30m, 2h")] = "1h",
        comment: str = "",
        key: Key = None,
    ) -> None:
        """Silence matching alerts for a while; needs silence.manage (support lead)."""
        from posflow.errors import PosflowError

        matchers = {}
        for m in match:
            name, sep, value = m.partition("=")
            if not sep or not name:
                raise PosflowError(f"--match {m!r}: expected label=value")
            matchers[name] = value
        body: dict[str, Any] = {"matchers": matchers, "duration": duration, "comment": comment}
        data = _api("POST", "/silences", key, body)
        from datetime import UTC, datetime

        until = datetime.fromtimestamp(float(data["ends_at"]), UTC).isoformat(timespec="seconds")
        typer.echo(f"silence {data['silence_id']} until {until} by {data['created_by']}")

    @alerts.command("silences")
    def silences(key: Key = None) -> None:
        """Active silences; needs alert.read."""
        for s in _api("GET", "/silences", key)["silences"]:
            matchers = ",".join(f"{k}={v}" for k, v in sorted(s["matchers"].items()))
            typer.echo(f"{s['silence_id']}  {matchers}  by {s['created_by']}  {s['comment']}")

    @alerts.command("unsilence")
    def unsilence(silence_id: str, key: Key = None) -> None:
        """End a silence now; needs silence.manage (support lead)."""
        data = _api("DELETE", f"/silences/{silence_id}", key)
        typer.echo(f"silence {data['silence_id']} expired")

    @alerts.command("reload")
    def reload(key: Key = None) -> None:
        """Reload the rules file now (a rule change: support lead; recorded)."""
        data = _api("POST", "/rules/reload", key, {})
        typer.echo(f"rules reloaded: {len(data['rules'])} rules, file sha256 {data['file_sha256']}")

    @alerts.command("check")
    def check(path: Path) -> None:
        """Validate a rules file (the defaults plus it), as the engine would."""
        from alerts.rules import load_rules

        rules = load_rules(path)
        typer.echo(f"{path}: ok, {len(rules.rules)} rules with the defaults")
