"""``posflow pki``, ``posflow keys`` and ``posflow audit``.

Every change (certificate issued or revoked, merchant key issued, rotated or revoked)
is recorded in the audit trail with the operator (``--actor``, default: the login
name), the role ``security_admin`` and the source ``cli:<user>@<host>``.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from posflow.errors import PosflowError

if TYPE_CHECKING:
    import psycopg

    from posflow.security.roles import Action, Principal
    from posflow.settings import Settings

__all__ = ["register"]

T = TypeVar("T")

pki_app = typer.Typer(help="Terminal certificates: the project CA, issue, list, revoke (TLS).")
keys_app = typer.Typer(help="Merchant keys: issue, rotate, revoke (crypto-shredding), status.")
audit_app = typer.Typer(help="The hash-chained audit trail: verify, tail, head.")

Actor = Annotated[
    str | None, typer.Option("--actor", help="who acts (recorded); default: your login name")
]


def register(app: typer.Typer) -> None:
    """Add the security subcommands to the ``posflow`` command line."""
    app.add_typer(pki_app, name="pki")
    app.add_typer(keys_app, name="keys")
    app.add_typer(audit_app, name="audit")


def _echo(line: str) -> None:
    typer.echo(line)


def _settings() -> Settings:
    from posflow.cli_support import service_settings

    return service_settings()


def _principal(actor: str | None) -> Principal:
    from posflow.security.roles import Principal, Role

    return Principal(actor or getpass.getuser(), Role.SECURITY_ADMIN)


def _source() -> str:
    from posflow.cli_support import cli_source

    return cli_source()


def _connect(settings: Settings) -> psycopg.Connection[Any]:
    from posflow.cli_support import connect

    return connect(
        settings, fix="start it (`posflow stack up postgres`) and run `posflow db migrate`"
    )


def _require_schema(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute("SELECT to_regclass('audit_log') IS NOT NULL").fetchone()
    if not row or not row[0]:
        raise PosflowError(
            "the audit trail's tables are missing", fix="run `posflow db migrate` first"
        )


@contextmanager
def _database() -> Iterator[tuple[Settings, psycopg.Connection[Any]]]:
    """The settings, and a connection to their database once it has the audit trail."""
    settings = _settings()
    with _connect(settings) as conn:
        _require_schema(conn)
        yield settings, conn


Done = Callable[[dict[str, Any]], object]


@contextmanager
def _terminal_change(
    action: Action, terminal_id: str, actor: str | None
) -> Iterator[tuple[Settings, psycopg.Connection[Any], Done]]:
    """The database with ``action`` on the terminal's certificate authorised (a refusal is
    recorded), and ``done(detail)``, which records the change once it is made."""
    from posflow.security.roles import Target, authorize_audited, record_action

    principal, source = _principal(actor), _source()
    target = Target("terminal", terminal_id)
    with _database() as (settings, conn):
        authorize_audited(conn, principal, action, target, source=source)

        def done(detail: dict[str, Any]) -> object:
            return record_action(conn, principal, action, target, source=source, detail=detail)

        yield settings, conn, done


# -- pki ------------------------------------------------------------------------------


@pki_app.command("init")
def pki_init() -> None:
    """Create the CA and the broker's certificate if missing (`stack up` does it too)."""
    from posflow.security.pki import Pki

    settings = _settings()
    pki = Pki.from_settings(settings)
    created = pki.ensure_ca()
    m = settings.mosquitto
    pki.ensure_server_cert(sorted({m.host, "127.0.0.1", "localhost"}))
    _echo(f"CA {'created' if created else 'present'}: {pki.ca_cert_path} (key 0600)")


@pki_app.command("issue")
def pki_issue(
    terminal_id: Annotated[str, typer.Argument(help="terminal id = certificate common name")],
    days: Annotated[int | None, typer.Option(help="lifetime (default security.cert_days)")] = None,
    kind: Annotated[
        str,
        typer.Option(
            help="terminal, or service: a posflow service's account (security.mqtt_client_tls)"
        ),
    ] = "terminal",
    actor: Actor = None,
) -> None:
    """Issue a terminal's client certificate; its common name is its MQTT username."""
    from posflow.security.pki import Pki
    from posflow.security.roles import Action

    with _terminal_change(Action.CERT_ISSUE, terminal_id, actor) as (settings, _, done):
        pki = Pki.from_settings(settings)
        if kind not in ("terminal", "service"):
            raise PosflowError(
                f"--kind {kind!r}: a client certificate is for a terminal or a service",
                fix="--kind terminal or --kind service",
            )
        cert = pki.issue(
            terminal_id,
            kind="service" if kind == "service" else "terminal",
            days=days or settings.security.cert_days,
        )
        done({"serial": cert.serial, "not_after": cert.not_after, "kind": cert.kind})
    _echo(f"issued {terminal_id} serial {cert.serial} valid until {cert.not_after}")
    _echo(f"  certificate {pki.cert_path(terminal_id)}")
    _echo(f"  private key {pki.key_path(terminal_id)} (0600: deliver it to the terminal)")
    _echo(f"  CA          {pki.ca_cert_path}")


@pki_app.command("list")
def pki_list() -> None:
    """Every certificate issued, with its status."""
    from posflow.security.pki import Pki

    for r in Pki.from_settings(_settings()).records():
        extra = f"  revoked {r.revoked_at} ({r.reason})" if r.status == "revoked" else ""
        _echo(f"{r.name:<24} {r.kind:<8} {r.serial:<40} {r.status:<7} until {r.not_after}{extra}")


@pki_app.command("revoke")
def pki_revoke(
    terminal_id: Annotated[str, typer.Argument(help="terminal whose certificate to revoke")],
    reason: Annotated[str, typer.Option(help="why (recorded)")] = "unspecified",
    restart: Annotated[
        bool,
        typer.Option(
            help="restart the stack's broker so a revoked terminal that is connected "
            "right now is cut off too (a moment's outage on every listener)"
        ),
    ] = False,
    actor: Actor = None,
) -> None:
    """Revoke a terminal's certificate; the stack's broker re-reads its CRL (SIGHUP)."""
    from posflow.security.pki import Pki
    from posflow.security.roles import Action

    with _terminal_change(Action.CERT_REVOKE, terminal_id, actor) as (settings, _, done):
        revoked = Pki.from_settings(settings).revoke(terminal_id, reason=reason)
        done({"serials": [r.serial for r in revoked], "reason": reason})
    _echo(f"revoked {terminal_id}: serials {', '.join(r.serial for r in revoked)}")
    _echo(_apply_to_broker(settings, restart=restart))


def _apply_to_broker(settings: Settings, *, restart: bool) -> str:
    from posflow.stack import Stack

    stack = Stack(settings)
    broker = stack.mosquitto
    if not broker.process.running():
        return "the stack's broker is not running: it reads the CRL when it starts"
    if restart:
        broker.configure()
        broker.process.stop(settings.stack.stop_timeout_s)
        stack.up(["mosquitto"])
        return "broker restarted with the new CRL (live sessions of revoked terminals cut)"
    broker.install_tls_files()
    broker.process.reload()
    return (
        "broker re-reads the CRL (SIGHUP): new connections with the revoked certificate are "
        "refused; one already connected stays until it reconnects (use --restart to cut it)"
    )


@pki_app.command("refresh-crl")
def pki_refresh_crl() -> None:
    """Re-sign the CRL (it is valid 30 days) and have the stack's broker re-read it."""
    from posflow.security.pki import Pki

    settings = _settings()
    Pki.from_settings(settings).refresh_crl()
    _echo(_apply_to_broker(settings, restart=False))


@pki_app.command("apply")
def pki_apply(
    restart: Annotated[
        bool, typer.Option(help="restart the broker if its configuration changed listeners")
    ] = False,
) -> None:
    """Write the broker's configuration and TLS files; reload it (SIGHUP) or restart it."""
    from posflow.stack import Stack
    from posflow.stack._process import port_answers

    settings = _settings()
    broker = Stack(settings).mosquitto
    m = settings.mosquitto
    if not broker.process.running():
        _echo("the stack's broker is not running: `posflow stack up mosquitto` configures it")
        return
    tls_up = port_answers(m.host, m.tls_port)
    if settings.security.mqtt_tls and not tls_up and not restart:
        raise PosflowError(
            f"the running broker has no TLS listener on {m.host}:{m.tls_port} yet; "
            "Mosquitto adds listeners only when it starts",
            fix="`posflow pki apply --restart` (a moment's outage on every listener), "
            "or it comes with the next start of the stack's broker",
        )
    _echo(_apply_to_broker(settings, restart=restart))


# -- keys -----------------------------------------------------------------------------

# One convention across the command line: the merchant is named by `--merchant M` (as in
# `posflow api keys issue`, `webhooks`, `payout`, `settlement`). The positional spelling of
# the first release (`posflow keys issue M`) still works, with a warning, and is not shown.
Merchant = Annotated[str | None, typer.Option("--merchant", help="merchant id")]
_POSITIONAL_MERCHANT = {"allow_extra_args": True}


def _merchant(option: str | None, ctx: typer.Context) -> str:
    """The merchant id from ``--merchant`` (or, deprecated, one positional argument)."""
    command = ctx.info_name
    if len(ctx.args) > 1:
        raise typer.BadParameter(f"one merchant, not {ctx.args}", param_hint="'--merchant'")
    positional = ctx.args[0] if ctx.args else None
    if positional is not None:
        if option is not None and option != positional:
            raise typer.BadParameter(
                f"two merchants given ({positional!r} and --merchant {option!r})",
                param_hint="'--merchant'",
            )
        typer.echo(
            f"posflow: warning: `posflow keys {command} {positional}` is deprecated; "
            f"use `posflow keys {command} --merchant {positional}`",
            err=True,
        )
    merchant = option or positional
    if not merchant:
        raise typer.BadParameter("a merchant id is needed", param_hint="'--merchant'")
    return merchant


def _with_master_key(change: Callable[..., T], merchant_id: str, actor: str | None) -> T:
    """``change(conn, master key, merchant_id, actor=, source=)``: a change of the
    merchant's key, made by the operator."""
    from posflow.security.keys import master_key_from_settings

    with _database() as (settings, conn):
        provider = master_key_from_settings(settings)
        return change(conn, provider, merchant_id, actor=_principal(actor), source=_source())


@keys_app.command("issue", context_settings=_POSITIONAL_MERCHANT)
def keys_issue(ctx: typer.Context, merchant: Merchant = None, actor: Actor = None) -> None:
    """Create the merchant's key (its secrets can then be stored)."""
    from posflow.security.keys import issue_merchant_key

    merchant_id = _merchant(merchant, ctx)
    version = _with_master_key(issue_merchant_key, merchant_id, actor)
    _echo(f"merchant {merchant_id}: key version {version} active")


@keys_app.command("rotate", context_settings=_POSITIONAL_MERCHANT)
def keys_rotate(ctx: typer.Context, merchant: Merchant = None, actor: Actor = None) -> None:
    """New key version; re-encrypt the merchant's secrets; retire the old version."""
    from posflow.security.keys import rotate_merchant_key

    merchant_id = _merchant(merchant, ctx)
    result = _with_master_key(rotate_merchant_key, merchant_id, actor)
    _echo(
        f"merchant {merchant_id}: key version {result.new_version} active, "
        f"{result.reencrypted} secrets re-encrypted, retired {result.old_versions}"
    )


@keys_app.command("revoke", context_settings=_POSITIONAL_MERCHANT)
def keys_revoke(
    ctx: typer.Context,
    merchant: Merchant = None,
    reason: Annotated[str, typer.Option(help="why (recorded)")] = "unspecified",
    yes: Annotated[bool, typer.Option("--yes", help="confirm: this cannot be undone")] = False,
    actor: Actor = None,
) -> None:
    """Revoke the merchant's key: its secrets become unreadable, its API keys invalid."""
    from posflow.security.keys import revoke_merchant_key

    merchant_id = _merchant(merchant, ctx)
    if not yes:
        raise PosflowError(
            f"revoking {merchant_id}'s key destroys its encrypted secrets for good",
            fix="add --yes to confirm",
        )
    with _database() as (_, conn):
        versions = revoke_merchant_key(
            conn, merchant_id, actor=_principal(actor), source=_source(), reason=reason
        )
    _echo(f"merchant {merchant_id}: key versions {versions} revoked (secrets shredded)")


@keys_app.command("status", context_settings=_POSITIONAL_MERCHANT)
def keys_status(ctx: typer.Context, merchant: Merchant = None) -> None:
    """The merchant's key versions."""
    from posflow.security.keys import key_versions

    merchant_id = _merchant(merchant, ctx)
    with _database() as (_, conn):
        rows = key_versions(conn, merchant_id)
    if not rows:
        _echo(f"merchant {merchant_id}: no key")
    for v in rows:
        by = f" revoked by {v.revoked_by}" if v.revoked_by else ""
        _echo(f"v{v.version:<4} {v.status:<9} created by {v.created_by}{by}")


# -- audit ----------------------------------------------------------------------------


@audit_app.command("verify")
def audit_verify() -> None:
    """Check the whole chain; names the first broken record and exits 1 if any."""
    from posflow.security.audit import verify

    with _database() as (_, conn):
        result = verify(conn)
    if not result.ok:
        raise PosflowError(
            f"audit trail broken at record #{result.broken_seq}: {result.reason} "
            f"({result.checked} records verified before it)",
            fix="restore the audit_log table from a backup and investigate who changed it",
        )
    _echo(f"audit trail intact: {result.checked} records, head #{result.head_seq}")


@audit_app.command("tail")
def audit_tail(
    lines: Annotated[int, typer.Option("--lines", "-n", help="how many records")] = 20,
    target: Annotated[str | None, typer.Option(help="only this target (kind:id)")] = None,
) -> None:
    """The newest records."""
    from posflow.security.audit import records

    with _database() as (_, conn):
        rows = records(conn, target=target, limit=lines)
    for r in rows:
        _echo(
            f"#{r.seq} {r.at.isoformat(timespec='seconds')} {r.actor} ({r.role}) "
            f"{r.action} {r.target} from {r.source}: {r.outcome} {r.detail or ''}"
        )


@audit_app.command("head")
def audit_head() -> None:
    """The chain head (sequence and hash): copy it somewhere else to anchor the chain."""
    with _database() as (_, conn):
        row = conn.execute("SELECT seq, hash FROM audit_chain_head WHERE id").fetchone()
    if row is None:
        raise PosflowError("the audit chain head row is missing")
    _echo(f"#{row[0]} {row[1]}")
