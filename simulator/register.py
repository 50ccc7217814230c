"""Registering a fleet: merchants and terminals in the database, accounts in Mosquitto."""

from __future__ import annotations

import json

import psycopg

from posflow.security.tls import postgres_dsn
from posflow.settings import Settings
from posflow.stack import Stack
from posflow.storage.setup import prepare_database
from simulator.fleet import Fleet

__all__ = ["gateway_account", "register_fleet"]


def gateway_account(settings: Settings, run_name: str) -> tuple[str, str]:
    """The multiplexed connections' account for a fleet (username, password)."""
    import hashlib

    name = f"posflow-gw-{run_name}"
    password = hashlib.blake2b(
        f"{settings.simulator.seed}/{name}".encode(), digest_size=12
    ).hexdigest()
    return name, password


def register_fleet(
    settings: Settings,
    fleet: Fleet,
    *,
    database: bool = True,
    mqtt: bool = True,
    certificates: bool = False,
) -> dict[str, int]:
    """Upsert the fleet's merchants and terminals, and its terminal and gateway accounts.

    ``certificates``: also a client certificate from the project CA for each terminal
    and the gateway account that has none yet (``posflow simulate --tls``).
    Idempotent: registering the same fleet again changes nothing but the passwords'
    salts. Returns how many of each were written.
    """
    out = {"merchants": 0, "terminals": 0, "mqtt_accounts": 0, "certificates": 0}
    if database:
        with psycopg.connect(postgres_dsn(settings)) as conn:
            prepare_database(conn, settings.storage)
            with conn.cursor() as cur:
                cur.executemany(
                    b"INSERT INTO merchants (merchant_id, name, category, lat, lon, timezone,"
                    b" opening_hours, fee_plan, settlement_rule)"
                    b" VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    b" ON CONFLICT (merchant_id) DO UPDATE SET name = excluded.name,"
                    b" category = excluded.category, lat = excluded.lat, lon = excluded.lon,"
                    b" timezone = excluded.timezone, opening_hours = excluded.opening_hours,"
                    b" fee_plan = excluded.fee_plan, settlement_rule = excluded.settlement_rule",
                    [
                        (m.merchant_id, m.name, m.category, m.lat, m.lon, m.city.timezone,
                         json.dumps(m.opening_hours), json.dumps(m.fee_plan),
                         json.dumps(m.settlement_rule))
                        for m in fleet.merchants
                    ],
                )  # fmt: skip
                cur.executemany(
                    b"INSERT INTO terminals (terminal_id, merchant_id, model, lat, lon)"
                    b" VALUES (%s, %s, %s, %s, %s)"
                    b" ON CONFLICT (terminal_id) DO UPDATE SET merchant_id = excluded.merchant_id,"
                    b" model = excluded.model, lat = excluded.lat, lon = excluded.lon",
                    [
                        (t.terminal_id, t.merchant.merchant_id, t.model, t.lat, t.lon)
                        for t in fleet.terminals
                    ],
                )
        out["merchants"], out["terminals"] = len(fleet.merchants), len(fleet.terminals)
    if mqtt:
        mosquitto = Stack(settings).mosquitto
        mosquitto.set_users({t.terminal_id: t.password for t in fleet.terminals}, reload=False)
        mosquitto.set_gateways(dict([gateway_account(settings, fleet.name)]))  # reloads
        out["mqtt_accounts"] = len(fleet.terminals) + 1
    if certificates:
        from posflow.security.pki import Pki

        pki = Pki.from_settings(settings)
        days = settings.security.cert_days
        issued = pki.issue_missing([t.terminal_id for t in fleet.terminals], days=days)
        gateway = gateway_account(settings, fleet.name)[0]
        issued += pki.issue_missing([gateway], kind="service", days=days)
        out["certificates"] = len(issued)
    return out
