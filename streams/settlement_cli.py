"""The settlement worker's and the payouts' commands.

The money-moving commands (payout, set-plan, release, set-payout-account) need a
staff API key of the finance role (``--key`` or ``POSFLOW_STAFF_KEY``, as ``posflow
alerts``) and are recorded in the audit trail: see :mod:`streams.settlement_access`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from posflow.cli_support import connect, staff_key_option
from posflow.errors import PosflowError

if TYPE_CHECKING:
    import psycopg

    from posflow.security.roles import Target
    from posflow.settings import Settings
    from streams.settlement_access import Command, Operator

__all__ = ["register"]

PAYOUT_ACCOUNT = "payout_account"  # the merchant secret's purpose

T = TypeVar("T")

StaffKey = Annotated[
    str | None,
    staff_key_option(
        "your staff API key of the finance role (`posflow api keys issue --role finance`)"
    ),
]


def _settings() -> Settings:
    from posflow.cli_support import service_settings

    return service_settings()


def _conninfo(settings: Settings) -> str:
    from posflow.security.tls import postgres_dsn

    return postgres_dsn(settings)


@contextmanager
def _connect(conninfo: str, settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with connect(settings, conninfo=conninfo) as conn:
        yield conn


def _guarded(
    key: str | None,
    command: Command,
    target: Target,
    change: Callable[[psycopg.Connection[Any], Operator], T],
) -> T:
    """Authorise, then run ``change`` in one transaction that also holds its audit record.

    ``change`` records itself (``operator.record(conn, detail)``) inside the transaction;
    a business refusal (PosflowError) rolls back and is recorded as ``failed`` apart.
    """
    from streams.settlement_access import authenticate_operator

    settings = _settings()
    conninfo = _conninfo(settings)
    # An autocommit connection: refusals and failures recorded on it commit at once.
    with _connect(conninfo, settings) as conn:
        operator = authenticate_operator(conn, conninfo, key, command, target)
        try:
            with conn.transaction():
                return change(conn, operator)
        except PosflowError as exc:
            operator.record(conn, {"reason": str(exc)}, outcome="failed")
            raise


settlement_app = typer.Typer(
    help="Settlement: the ledger worker, releases, merchants' fee plans and settlement rules.",
    no_args_is_help=True,
)


@settlement_app.command("worker")
def worker() -> None:
    """Run the settlement worker until SIGTERM (/metrics /healthz /readyz on port 9404)."""
    import asyncio

    from posflow.logs import configure_logging
    from streams.settlement import build

    settings = _settings()  # refuses development defaults in the production profile
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
    key: StaffKey = None,
) -> None:
    """Move pending money whose daily cut-off passed to available (the worker also does it).

    Manual release needs the finance role: with --now in the future it releases early.
    """
    from posflow.security.roles import Target
    from posflow.storage.settlement import release_due
    from streams.settlement_access import RELEASE

    when = _parse_time(now) if now else None

    def change(conn: psycopg.Connection[Any], operator: Operator) -> list[Any]:
        events = release_due(conn, when)
        operator.record(
            conn,
            {
                "as_of": when.isoformat() if when else "now",
                "released": [
                    {"merchant_id": e.merchant_id, "currency": e.currency,
                     "amount_minor": e.amount_minor, "seq": e.seq}
                    for e in events[:100]
                ],
                "pairs": len(events),
            },
        )  # fmt: skip
        return events

    events = _guarded(key, RELEASE, Target("settlement", "release"), change)
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
    key: StaffKey = None,
) -> None:
    """Set a merchant's fee plan and/or settlement rule (creates the merchant if unknown).

    Needs the finance role (a fee plan decides how much money the merchant gets).
    """
    from psycopg import sql
    from pydantic import BaseModel

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
    from posflow.security.roles import Target
    from streams.settlement_access import SET_PLAN

    def change(conn: psycopg.Connection[Any], operator: Operator) -> None:
        conn.execute(
            "INSERT INTO merchants (merchant_id, name) VALUES (%s, %s)"
            " ON CONFLICT (merchant_id) DO NOTHING",
            [merchant, merchant],
        )
        before = conn.execute(
            "SELECT fee_plan, settlement_rule FROM merchants WHERE merchant_id = %s FOR UPDATE",
            [merchant],
        ).fetchone()
        detail: dict[str, Any] = {}
        docs: tuple[tuple[str, BaseModel | None], ...] = (
            ("fee_plan", plan),
            ("settlement_rule", rule),
        )
        for i, (column, new) in enumerate(docs):  # the columns in the order of ``before``
            if new is None:
                continue
            conn.execute(
                sql.SQL("UPDATE merchants SET {} = %s::jsonb WHERE merchant_id = %s").format(
                    sql.Identifier(column)
                ),
                [new.model_dump_json(), merchant],
            )
            detail[column] = json.loads(new.model_dump_json())
            detail[f"previous_{column}"] = before[i] if before else None
        operator.record(conn, detail)

    _guarded(key, SET_PLAN, Target("merchant", merchant, merchant), change)
    typer.echo(f"merchant {merchant}: " + ", ".join(sorted(doc)) + " set")


@settlement_app.command("set-payout-account")
def set_payout_account(
    merchant: Annotated[str, typer.Option(help="merchant id")],
    file: Annotated[
        Path | None,
        typer.Option(
            help="read the account details from this file ('-': standard input); "
            "default: ask without echo",
            dir_okay=False,
        ),
    ] = None,
    key: StaffKey = None,
) -> None:
    """Store the merchant's payout account details, encrypted with its merchant key.

    Kept as the merchant secret 'payout_account' (AES-256-GCM, `posflow keys`); the
    details are never printed, logged or recorded. Needs the merchant's key issued.
    """
    from posflow.security.keys import master_key_from_settings, put_secret
    from posflow.security.roles import Target
    from streams.settlement_access import SET_PAYOUT_ACCOUNT

    if file is None:
        details = typer.prompt("payout account details", hide_input=True)
    elif str(file) == "-":
        details = sys.stdin.read()
    else:
        try:
            details = file.read_text()
        except OSError as exc:
            raise PosflowError(f"{file}: cannot read ({exc.strerror})") from None
    details = details.strip()
    if not details:
        raise PosflowError("the payout account details are empty")
    provider = master_key_from_settings(_settings())

    def change(conn: psycopg.Connection[Any], operator: Operator) -> int:
        version = put_secret(conn, provider, merchant, PAYOUT_ACCOUNT, details)
        operator.record(conn, {"purpose": PAYOUT_ACCOUNT, "key_version": version})
        return version

    version = _guarded(key, SET_PAYOUT_ACCOUNT, Target("merchant", merchant, merchant), change)
    typer.echo(f"merchant {merchant}: payout account stored encrypted (merchant key v{version})")


def payout(
    merchant: Annotated[str, typer.Option(help="merchant id")],
    currency: Annotated[str, typer.Option(help="ISO 4217 code, e.g. EUR")],
    amount_minor: Annotated[int, typer.Option("--amount-minor", help="minor units (cents)")],
    idempotency_key: Annotated[
        str,
        typer.Option("--idempotency-key", help="the same idempotency key pays out once"),
    ],
    key: StaffKey = None,
) -> None:
    """Pay out available money to the merchant (at most what is available); finance role."""
    from posflow.security.roles import Target
    from posflow.storage.settlement import PayoutResult
    from posflow.storage.settlement import payout as do_payout
    from streams.settlement_access import PAYOUT

    def change(conn: psycopg.Connection[Any], operator: Operator) -> PayoutResult:
        result = do_payout(conn, merchant, currency, amount_minor, idempotency_key)
        operator.record(
            conn,
            {
                "currency": currency, "amount_minor": amount_minor,
                "idempotency_key": idempotency_key, "seq": result.seq,
                "replayed": result.replayed, "available_minor": result.available_minor,
                "paid_out_minor": result.paid_out_minor,
            },
        )  # fmt: skip
        return result

    result = _guarded(key, PAYOUT, Target("merchant", merchant, merchant), change)
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
