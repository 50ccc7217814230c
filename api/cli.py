"""The merchant feed API's commands: ``posflow api`` and ``posflow api keys ...``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    import psycopg

    from posflow.settings import Settings

__all__ = ["register"]


def _settings() -> Settings:
    from posflow.cli import _settings as load

    return load()


def _connect() -> psycopg.Connection[tuple[Any, ...]]:
    from posflow.cli import _connect as connect

    return connect()


def _print(line: str) -> None:
    typer.echo(line)


def register(app: typer.Typer) -> None:
    """Add the merchant API's commands to the ``posflow`` command line."""
    api_app = typer.Typer(
        help="The merchant feed API (REST + server-sent events) and its API keys.",
        invoke_without_command=True,
    )
    keys_app = typer.Typer(help="Per-merchant API keys (stored hashed).", no_args_is_help=True)
    api_app.add_typer(keys_app, name="keys")
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

    @keys_app.command("issue")
    def keys_issue(
        merchant: Annotated[str, typer.Option("--merchant", help="merchant id the key reads")],
        label: Annotated[str, typer.Option("--label", help="a note: who or what uses it")] = "",
    ) -> None:
        """Create a key for a merchant and print it once (only its hash is stored)."""
        from api.keys import issue_key

        with _connect() as conn:
            known = conn.execute(
                "SELECT 1 FROM merchants WHERE merchant_id = %s", [merchant]
            ).fetchone()
            issued = issue_key(conn, merchant, label)
        if known is None:
            typer.echo(f"warning: merchant {merchant!r} is not in the merchants table", err=True)
        _print(f"key id:   {issued.key_id}")
        _print(f"merchant: {issued.merchant_id}")
        _print(f"api key:  {issued.token}")
        _print("store the key now: it is not shown again and cannot be recovered")

    @keys_app.command("revoke")
    def keys_revoke(
        key_id: Annotated[str, typer.Argument(help="the key id (from `keys list`)")],
    ) -> None:
        """Revoke a key: requests with it get 401 from then on."""
        from api.keys import revoke_key

        with _connect() as conn:
            record = revoke_key(conn, key_id)
        assert record.revoked_at is not None  # noqa: S101 - revoke_key sets it
        _print(
            f"revoked {record.key_id} (merchant {record.merchant_id})"
            f" at {record.revoked_at.isoformat()}"
        )

    @keys_app.command("list")
    def keys_list(
        merchant: Annotated[str, typer.Option("--merchant", help="merchant id")],
    ) -> None:
        """A merchant's keys: id, label, created, revoked (never the secret)."""
        from api.keys import list_keys

        with _connect() as conn:
            records = list_keys(conn, merchant)
        if not records:
            _print(f"no API keys for merchant {merchant}")
            return
        for r in records:
            state = f"revoked {r.revoked_at.isoformat()}" if r.revoked_at else "active"
            _print(f"{r.key_id}  {state:<40}  created {r.created_at.isoformat()}  {r.label}")
