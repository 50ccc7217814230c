"""The settlement worker's and the payouts' commands."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from posflow.errors import PosflowError

__all__ = ["register"]

settlement_app = typer.Typer(
    help="Settlement: the ledger worker, releases, merchants' fee plans and settlement rules.",
    no_args_is_help=True,
)


@settlement_app.command("worker")
def worker() -> None:
    """Run the settlement worker until SIGTERM (/metrics /healthz /readyz on port 9404)."""
    import asyncio

    from posflow.cli import _settings
    from posflow.logs import configure_logging
    from streams.settlement import build

    settings = _settings()
    configure_logging()

    async def serve() -> None:
        # aiokafka clients must be created inside the running event loop.
        await build(settings).run()

    asyncio.run(serve())


@settlement_app.command("release")
def release(
    now: Annotated[
        str | None, typer.Option(help="release as of this RFC 3339 time (default: now)")
    ] = None,
) -> None:
    """Move pending money whose daily cut-off passed to available (the worker also does it)."""
    from posflow.cli import _connect
    from posflow.storage.settlement import release_due

    when = _parse_time(now) if now else None
    with _connect() as conn:
        conn.autocommit = False
        events = release_due(conn, when)
    for ev in events:
        typer.echo(
            f"{ev.merchant_id} {ev.currency}: released {ev.amount_minor}"
            f" (pending {ev.pending_minor}, available {ev.available_minor}, seq {ev.seq})"
        )
    typer.echo(f"released for {len(events)} merchant/currency pair(s)")


@settlement_app.command("set-plan")
def set_plan(
    merchant: Annotated[str, typer.Option(help="merchant id")],
    file: Annotated[
        Path,
        typer.Option(
            help='JSON: {"fee_plan": {...}, "settlement_rule": {...}}, either key optional',
            exists=True,
            dir_okay=False,
        ),
    ],
) -> None:
    """Set a merchant's fee plan and/or settlement rule (creates the merchant if unknown)."""
    from posflow.cli import _connect
    from posflow.contracts import ContractError
    from posflow.contracts.money import FeePlan, SettlementRule

    try:
        doc = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise PosflowError(f"{file}: not a JSON file ({exc})") from None
    if not isinstance(doc, dict) or not set(doc) or set(doc) - {"fee_plan", "settlement_rule"}:
        raise PosflowError(
            f"{file}: expected an object with keys fee_plan and/or settlement_rule",
            fix='e.g. {"fee_plan": {"default": {"percent": "1.4", "fixed_minor": 10}}, '
            '"settlement_rule": {"kind": "daily", "cutoff": "18:00"}}',
        )
    try:
        plan = FeePlan.from_json(json.dumps(doc["fee_plan"])) if "fee_plan" in doc else None
        rule = (
            SettlementRule.from_json(json.dumps(doc["settlement_rule"]))
            if "settlement_rule" in doc
            else None
        )
    except ContractError as exc:
        raise PosflowError(f"{file}: {exc.field or ''} {exc.message}".strip()) from None
    with _connect() as conn:
        conn.execute(
            "INSERT INTO merchants (merchant_id, name) VALUES (%s, %s)"
            " ON CONFLICT (merchant_id) DO NOTHING",
            [merchant, merchant],
        )
        if plan is not None:
            conn.execute(
                "UPDATE merchants SET fee_plan = %s::jsonb WHERE merchant_id = %s",
                [plan.model_dump_json(), merchant],
            )
        if rule is not None:
            conn.execute(
                "UPDATE merchants SET settlement_rule = %s::jsonb WHERE merchant_id = %s",
                [rule.model_dump_json(), merchant],
            )
    typer.echo(f"merchant {merchant}: " + ", ".join(sorted(doc)) + " set")


def payout(
    merchant: Annotated[str, typer.Option(help="merchant id")],
    currency: Annotated[str, typer.Option(help="ISO 4217 code, e.g. EUR")],
    amount_minor: Annotated[int, typer.Option("--amount-minor", help="minor units (cents)")],
    key: Annotated[str, typer.Option(help="idempotency key: the same key pays out once")],
) -> None:
    """Pay out available money to the merchant (at most what is available)."""
    from posflow.cli import _connect
    from posflow.storage.settlement import payout as do_payout

    with _connect() as conn:
        conn.autocommit = False
        result = do_payout(conn, merchant, currency, amount_minor, key)
    verb = "already paid out (same key), nothing moved" if result.replayed else "paid out"
    typer.echo(
        f"{merchant} {currency}: {verb} {result.amount_minor}; available "
        f"{result.available_minor}, paid out {result.paid_out_minor} (seq {result.seq})"
    )


def _parse_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise PosflowError(f"--now {text!r} is not an RFC 3339 time") from None
    if value.tzinfo is None:
        raise PosflowError(f"--now {text!r} needs a UTC offset, e.g. 2026-11-23T18:00:00Z")
    return value


def register(app: typer.Typer) -> None:
    """Add the settlement commands to the ``posflow`` command line."""
    app.add_typer(settlement_app, name="settlement")
    app.command("payout")(payout)
