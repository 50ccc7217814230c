"""The merchant feed API's commands: ``posflow api``, ``posflow api keys ...``, ``... webhooks``.

Key and webhook changes are recorded in the audit trail with the operator
(``--actor``, default: the login name) and the source ``cli:<user>@<host>``.
"""

from __future__ import annotations

import getpass
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    import psycopg

    from posflow.settings import Settings

__all__ = ["register"]

Actor = Annotated[
    str | None, typer.Option("--actor", help="who acts (recorded); default: your login name")
]
_ROLES = "merchant, support_agent, support_lead, finance, security_admin"


def _settings() -> Settings:
    """For the server, the deliverer and secrets: the production profile is checked."""
    from posflow.cli_support import service_settings

    return service_settings()


def _connect() -> psycopg.Connection[tuple[Any, ...]]:
    from posflow.cli_support import connect

    return connect()


def _print(line: str) -> None:
    typer.echo(line)


def _actor(actor: str | None) -> str:
    return actor or getpass.getuser()


def _source() -> str:
    from posflow.cli_support import cli_source

    return cli_source()


def register(app: typer.Typer) -> None:  # noqa: PLR0915 - one closure per command
    """Add the merchant API's commands to the ``posflow`` command line."""
    api_app = typer.Typer(
        help="The merchant feed API (REST + server-sent events), its API keys and webhooks.",
        invoke_without_command=True,
    )
    keys_app = typer.Typer(help="API keys with a role (stored hashed).", no_args_is_help=True)
    hooks_app = typer.Typer(
        help="Webhooks per merchant: signed cash-flow events, retried, replayable.",
        no_args_is_help=True,
    )
    api_app.add_typer(keys_app, name="keys")
    api_app.add_typer(hooks_app, name="webhooks")
    app.add_typer(api_app, name="api")

    @api_app.callback()
    def serve(ctx: typer.Context) -> None:
        """Run the API server (uvicorn) until SIGTERM; `posflow api keys --help` for keys."""
        if ctx.invoked_subcommand is not None:
            return
        from api.app import build
        from posflow.logs import configure_logging

        configure_logging()
        build(_settings()).run()

    # -- keys ---------------------------------------------------------------------------

    @keys_app.command("issue")
    def keys_issue(
        merchant: Annotated[
            str | None, typer.Option("--merchant", help="merchant id (merchant keys only)")
        ] = None,
        role: Annotated[str, typer.Option("--role", help=_ROLES)] = "merchant",
        label: Annotated[str, typer.Option("--label", help="a note: who or what uses it")] = "",
        actor: Actor = None,
    ) -> None:
        """Create a key and print it once (only its hash is stored)."""
        from posflow.errors import PosflowError
        from posflow.security.apikeys import issue_key_as
        from posflow.security.roles import Principal, Role

        try:
            key_role = Role(role)
        except ValueError:
            raise PosflowError(f"unknown role {role!r}", fix=f"one of: {_ROLES}") from None
        operator = Principal(_actor(actor), Role.SECURITY_ADMIN)
        with _connect() as conn:
            warnings = []
            if merchant is not None:
                known = conn.execute(
                    "SELECT 1 FROM merchants WHERE merchant_id = %s", [merchant]
                ).fetchone()
                if known is None:
                    warnings.append(f"merchant {merchant!r} is not in the merchants table")
                active = conn.execute(
                    "SELECT 1 FROM merchant_keys WHERE merchant_id = %s AND status = 'active'",
                    [merchant],
                ).fetchone()
                if active is None:
                    warnings.append(
                        f"merchant {merchant!r} has no active merchant key: the API answers 401 "
                        f"until `posflow keys issue --merchant {merchant}`"
                    )
            issued = issue_key_as(conn, operator, merchant, label, role=key_role, source=_source())
        for warning in warnings:
            typer.echo(f"warning: {warning}", err=True)
        _print(f"key id:   {issued.key_id}")
        _print(f"role:     {issued.role}")
        if issued.merchant_id is not None:
            _print(f"merchant: {issued.merchant_id}")
        _print(f"api key:  {issued.token}")
        _print("store the key now: it is not shown again and cannot be recovered")

    @keys_app.command("revoke")
    def keys_revoke(
        key_id: Annotated[str, typer.Argument(help="the key id (from `keys list`)")],
        actor: Actor = None,
    ) -> None:
        """Revoke a key: requests with it get 401 from then on."""
        from posflow.security.apikeys import revoke_key_as
        from posflow.security.roles import Principal, Role

        operator = Principal(_actor(actor), Role.SECURITY_ADMIN)
        with _connect() as conn:
            rec = revoke_key_as(conn, operator, key_id, source=_source())
        assert rec.revoked_at is not None  # noqa: S101 - revoke_key sets it
        owner = f"merchant {rec.merchant_id}" if rec.merchant_id else f"role {rec.role}"
        _print(f"revoked {rec.key_id} ({owner}) at {rec.revoked_at.isoformat()}")

    @keys_app.command("list")
    def keys_list(
        merchant: Annotated[str | None, typer.Option("--merchant", help="merchant id")] = None,
        role: Annotated[str | None, typer.Option("--role", help=_ROLES)] = None,
    ) -> None:
        """Keys of a merchant or a role: id, state, created, label (never the secret)."""
        from posflow.errors import PosflowError
        from posflow.security.apikeys import list_keys
        from posflow.security.roles import Role

        if merchant is None and role is None:
            raise PosflowError("say whose keys", fix="pass --merchant M or --role ROLE")
        try:
            key_role = Role(role) if role else None
        except ValueError:
            raise PosflowError(f"unknown role {role!r}", fix=f"one of: {_ROLES}") from None
        with _connect() as conn:
            records = list_keys(conn, merchant, role=key_role)
        if not records:
            _print(f"no API keys for {'merchant ' + merchant if merchant else 'role ' + str(role)}")
            return
        for r in records:
            state = f"revoked {r.revoked_at.isoformat()}" if r.revoked_at else "active"
            _print(
                f"{r.key_id}  {state:<40}  {r.role:<14}  created {r.created_at.isoformat()}"
                f"  {r.label}"
            )

    # -- webhooks -----------------------------------------------------------------------

    @hooks_app.command("add")
    def hooks_add(
        merchant: Annotated[str, typer.Option("--merchant", help="merchant id")],
        url: Annotated[str, typer.Option("--url", help="https URL receiving POSTs")],
        from_seq: Annotated[
            int | None,
            typer.Option("--from-seq", help="first event to send (default: only new events)"),
        ] = None,
        actor: Actor = None,
    ) -> None:
        """Add an endpoint; prints its signing secret ONCE (stored encrypted)."""
        from api.webhooks import add_endpoint
        from posflow.security.keys import master_key_from_settings

        settings = _settings()
        provider = master_key_from_settings(settings)
        with _connect() as conn:
            ep, secret = add_endpoint(
                conn,
                provider,
                merchant,
                url,
                actor=_actor(actor),
                source=_source(),
                allow_http=settings.api.webhook_allow_http,
                from_seq=from_seq,
            )
        _print(f"endpoint:       {ep.endpoint_id}")
        _print(f"merchant:       {ep.merchant_id}")
        _print(f"url:            {ep.url}")
        _print(f"first event:    seq {ep.delivered_seq + 1}")
        _print(f"signing secret: {secret}")
        _print("store the secret now: it is not shown again (verify Posflow-Signature with it)")

    @hooks_app.command("list")
    def hooks_list(
        merchant: Annotated[
            str | None, typer.Option("--merchant", help="merchant id (default: all)")
        ] = None,
    ) -> None:
        """Endpoints: state (active / dead / revoked), delivered up to, retries, last error."""
        from api.webhooks import list_endpoints

        with _connect() as conn:
            endpoints = list_endpoints(conn, merchant)
        if not endpoints:
            _print("no webhook endpoints" + (f" for merchant {merchant}" if merchant else ""))
            return
        for ep in endpoints:
            line = (
                f"{ep.endpoint_id}  {ep.merchant_id}  {ep.state:<7}  delivered {ep.delivered_seq}"
                f"  attempts {ep.attempts}  {ep.url}"
            )
            if ep.state == "dead" and ep.dead_at is not None:
                line += (
                    f"  DEAD since {ep.dead_at.isoformat()} at seq {ep.delivered_seq + 1}"
                    f" (replay --from-seq {ep.delivered_seq + 1})"
                )
            elif ep.state == "active" and ep.attempts:
                line += f"  next attempt {ep.next_attempt_at.isoformat()}"
            if ep.last_error:
                line += f"  last error: {ep.last_error}"
            _print(line)

    @hooks_app.command("remove")
    def hooks_remove(
        endpoint_id: Annotated[str, typer.Argument(help="endpoint id (from `webhooks list`)")],
        actor: Actor = None,
    ) -> None:
        """Remove an endpoint and its signing secret."""
        from api.webhooks import remove_endpoint

        with _connect() as conn:
            ep = remove_endpoint(conn, endpoint_id, actor=_actor(actor), source=_source())
        _print(f"removed {ep.endpoint_id} ({ep.merchant_id} {ep.url})")

    @hooks_app.command("replay")
    def hooks_replay(
        merchant: Annotated[str, typer.Option("--merchant", help="merchant id")],
        from_seq: Annotated[int, typer.Option("--from-seq", help="first event to send again")],
        endpoint: Annotated[
            str | None, typer.Option("--endpoint", help="only this endpoint (default: all)")
        ] = None,
        actor: Actor = None,
    ) -> None:
        """Send events again from a seq (receivers de-duplicate on Posflow-Event-Id)."""
        from api.webhooks import replay

        with _connect() as conn:
            endpoints = replay(
                conn,
                merchant,
                from_seq,
                actor=_actor(actor),
                source=_source(),
                endpoint_id=endpoint,
            )
        for ep in endpoints:
            _print(f"{ep.endpoint_id}: delivering again from seq {from_seq} ({ep.url})")

    @hooks_app.command("deliver")
    def hooks_deliver() -> None:
        """Run the webhook deliverer until SIGTERM (several may run: endpoints are leased)."""
        from api.delivery import build_deliverer
        from posflow.logs import configure_logging

        configure_logging()
        build_deliverer(_settings()).run()
