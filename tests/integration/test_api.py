"""The merchant feed API on a real uvicorn server and a real PostgreSQL database.

Cash-flow rows are produced the way the settlement writer does it: INSERT into
cashflow_events and pg_notify('posflow_cashflow', merchant_id) in one transaction.
"""

from __future__ import annotations

import json
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from api.app import ApiService, build
from posflow.security.apikeys import issue_key, revoke_key
from posflow.security.keys import LocalMasterKey, issue_merchant_key
from posflow.security.roles import Principal, Role
from posflow.settings import ApiSettings, PostgresSettings, ServicePorts, Settings
from posflow.storage import migrate
from tests.conftest import free_port, unique

T0 = datetime(2026, 11, 5, 12, 0, tzinfo=UTC)


@dataclass
class Api:
    base: str
    service: ApiService
    server: Any  # uvicorn.Server
    thread: threading.Thread
    conn: psycopg.Connection[tuple[Any, ...]]
    dsn: str
    provider: LocalMasterKey

    def activate(self, merchant: str) -> None:
        """The merchant exists and has a merchant key (else its API keys get 401)."""
        self.conn.execute(
            "INSERT INTO merchants (merchant_id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            [merchant, f"shop {merchant}"],
        )
        row = self.conn.execute(
            "SELECT 1 FROM merchant_keys WHERE merchant_id = %s AND status = 'active'", [merchant]
        ).fetchone()
        if row is None:
            admin = Principal("test-admin", Role.SECURITY_ADMIN)
            issue_merchant_key(self.conn, self.provider, merchant, actor=admin, source="test")

    def key(self, merchant: str) -> str:
        self.activate(merchant)
        return issue_key(self.conn, merchant, "test").token

    def staff_key(self, role: Role) -> str:
        return issue_key(self.conn, None, f"test {role}", role=role).token

    def get(self, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.get(self.base + path, headers=headers, timeout=10, **kw)


def add_events(
    conn: psycopg.Connection[tuple[Any, ...]], merchant: str, seqs: range, currency: str = "EUR"
) -> None:
    """Append cash-flow events like the settlement writer: rows + NOTIFY in one transaction."""
    with conn.transaction():
        for seq in seqs:
            conn.execute(
                """
                INSERT INTO cashflow_events (merchant_id, seq, txn_id, kind, currency,
                    amount_minor, pending_minor, available_minor, paid_out_minor, occurred_at)
                VALUES (%s, %s, %s, 'sale', %s, %s, %s, 0, 0, %s)
                """,
                [merchant, seq, f"{merchant}-t{seq}", currency, seq * 100, seq * 100, T0],
            )
        conn.execute("SELECT pg_notify('posflow_cashflow', %s)", [merchant])


@pytest.fixture
def start_api(pg: PostgresSettings, settings: Settings) -> Iterator[Callable[..., Api]]:
    """Start the API (uvicorn on a free loopback port) on this test's own database."""
    conn = psycopg.connect(pg.dsn(), autocommit=True)
    migrate(conn)
    provider = LocalMasterKey(secrets.token_bytes(32))
    running: list[tuple[Any, threading.Thread]] = []

    def start(**api: Any) -> Api:
        port = free_port()
        defaults: dict[str, Any] = {"sse_heartbeat_s": 1.0, "sse_poll_s": 1.0}
        test_settings = Settings(
            stack=settings.stack,
            postgres=pg,
            services=ServicePorts(api=port),
            api=ApiSettings(**{**defaults, **api}),
        )
        service = build(test_settings)
        server = service.server("127.0.0.1", port)
        thread = threading.Thread(target=server.run, name=f"api-{port}", daemon=True)
        thread.start()
        running.append((server, thread))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "API did not become ready in 15 s"
            time.sleep(0.05)
        return Api(base, service, server, thread, conn, pg.dsn(), provider)

    yield start
    for server, thread in running:
        if thread.is_alive():
            server.handle_exit(signal.SIGTERM, None)
        thread.join(timeout=20)
        assert not thread.is_alive(), "API server did not stop within 20 s of SIGTERM"
    conn.close()


@pytest.fixture
def api(start_api: Callable[..., Api]) -> Api:
    return start_api()


def problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert body["status"] == status
    assert body["type"].startswith("https://")
    assert body["title"]
    return body


class SseReader:
    """Reads server-sent events from one HTTP response, with a deadline."""

    def __init__(self, resp: httpx.Response) -> None:
        self.lines = resp.iter_lines()

    def events(self, count: int, timeout_s: float = 10.0) -> list[tuple[str, str, str]]:
        """The next ``count`` events as (event, id, data); comments and retry are skipped."""
        out: list[tuple[str, str, str]] = []
        fields: dict[str, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < count:
            assert time.monotonic() < deadline, f"only {len(out)} of {count} events in time"
            line = next(self.lines)
            if line == "":
                if "data" in fields:
                    out.append(
                        (fields.get("event", "message"), fields.get("id", ""), fields["data"])
                    )
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
        return out


def stream(api: Api, merchant: str, key: str, last: int | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"}
    if last is not None:
        headers["Last-Event-ID"] = str(last)
    return httpx.stream(
        "GET",
        f"{api.base}/v1/merchants/{merchant}/events/stream",
        headers=headers,
        timeout=httpx.Timeout(10.0),
    )


def seqs_and_amounts(events: list[tuple[str, str, str]]) -> list[tuple[int, int]]:
    out = []
    for kind, event_id, data in events:
        assert kind == "cashflow"
        body = json.loads(data)
        assert int(event_id) == body["seq"]
        out.append((body["seq"], body["amount_minor"]))
    return out


# --- authentication and scope ---------------------------------------------------------------


def test_missing_malformed_unknown_and_revoked_keys_get_401_problem_json(api: Api) -> None:
    merchant = unique("m")
    key = api.key(merchant)
    path = f"/v1/merchants/{merchant}/balances"

    body = problem(api.get(path), 401)
    assert "missing Authorization header" in body["detail"]
    assert problem(api.get(path, headers={"Authorization": f"Basic {key}"}), 401)["detail"] == (
        "Authorization header must be 'Bearer <API key>'"
    )
    assert "malformed API key" in problem(api.get(path, "pf_nothex_x"), 401)["detail"]
    wrong_secret = key[: -len("x")] + ("A" if key[-1] != "A" else "B")
    assert problem(api.get(path, wrong_secret), 401)["detail"] == "unknown API key"
    resp = api.get(path, key)
    assert resp.status_code == 200, resp.text

    key_id = key.split("_")[1]
    revoke_key(api.conn, key_id)
    resp = api.get(path, key)
    assert problem(resp, 401)["detail"] == f"API key {key_id} was revoked"
    assert resp.headers["www-authenticate"] == 'Bearer realm="posflow"'
    # A revoked key cannot open a stream either.
    assert problem(api.get(f"/v1/merchants/{merchant}/events/stream", key), 401)


def test_another_merchants_data_answers_404_like_an_unknown_merchant(api: Api) -> None:
    mine, theirs = unique("m"), unique("m")
    key = api.key(mine)
    add_events(api.conn, theirs, range(1, 3))
    api.conn.execute(
        "INSERT INTO merchant_balances (merchant_id, currency, pending_minor) VALUES (%s,'EUR',5)",
        [theirs],
    )
    for path in ("balances", "transactions", "events", "events/stream"):
        body = problem(api.get(f"/v1/merchants/{theirs}/{path}", key), 404)
        assert body["detail"] == f"merchant {theirs!r} not found for this API key"
        assert theirs not in api.get(f"/v1/merchants/{mine}/events", key).text
    unknown = problem(api.get("/v1/merchants/nobody/balances", key), 404)
    assert unknown["title"] == "Not found"


# --- REST -----------------------------------------------------------------------------------


def _ledger(conn: psycopg.Connection[tuple[Any, ...]], merchant: str, n: int) -> list[str]:
    """n transactions one minute apart (two share a timestamp to test the tie-break)."""
    ids = []
    for i in range(n):
        at = T0 + timedelta(minutes=i if i != 3 else 2)
        txn = f"{merchant}-x{i}"
        conn.execute(
            """
            INSERT INTO ledger_entries (txn_id, merchant_id, terminal_id, txn_type, currency,
                gross_minor, fee_minor, net_minor, body_sha256, occurred_at)
            VALUES (%s, %s, 'T-1', 'sale', 'EUR', %s, %s, %s, 'h', %s)
            """,
            [txn, merchant, 1000 + i, 20, 980 + i, at],
        )
        ids.append(txn)
    return ids


def test_balances_in_minor_units_and_transactions_paged_newest_first(api: Api) -> None:
    merchant, other = unique("m"), unique("m")
    key = api.key(merchant)
    api.conn.execute(
        "INSERT INTO merchant_balances (merchant_id, currency, pending_minor, available_minor,"
        " paid_out_minor) VALUES (%s,'EUR',1234,500,70), (%s,'USD',1,2,3), (%s,'EUR',9,9,9)",
        [merchant, merchant, other],
    )
    body = api.get(f"/v1/merchants/{merchant}/balances", key).json()
    assert [(b["currency"], b["pending_minor"], b["available_minor"], b["paid_out_minor"])
            for b in body["balances"]] == [("EUR", 1234, 500, 70), ("USD", 1, 2, 3)]  # fmt: skip

    ids = _ledger(api.conn, merchant, 7)
    _ledger(api.conn, other, 3)
    # Newest first; x2 and x3 share a time: higher entry id first.
    expected = [ids[6], ids[5], ids[4], ids[3], ids[2], ids[1], ids[0]]
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = api.get(f"/v1/merchants/{merchant}/transactions", key, params=params).json()
        seen += [t["txn_id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == expected
    first = api.get(f"/v1/merchants/{merchant}/transactions", key, params={"limit": 1}).json()
    assert first["items"][0] == {
        "txn_id": ids[6], "terminal_id": "T-1", "type": "sale", "currency": "EUR",
        "gross_minor": 1006, "fee_minor": 20, "net_minor": 986,
        "occurred_at": "2026-11-05T12:06:00Z", "recorded_at": first["items"][0]["recorded_at"],
    }  # fmt: skip

    window = api.get(
        f"/v1/merchants/{merchant}/transactions",
        key,
        params={"from": "2026-11-05T12:02:00Z", "to": "2026-11-05T14:05:00+02:00"},
    ).json()
    # from inclusive, to exclusive; +02:00 is honoured (14:05+02 = 12:05Z).
    assert [t["txn_id"] for t in window["items"]] == [ids[4], ids[3], ids[2]]
    assert window["next_cursor"] is None


def test_events_page_by_seq(api: Api) -> None:
    merchant = unique("m")
    key = api.key(merchant)
    add_events(api.conn, merchant, range(1, 6))
    page = api.get(f"/v1/merchants/{merchant}/events", key, params={"after": 2, "limit": 2}).json()
    assert [(e["seq"], e["amount_minor"], e["currency"]) for e in page["items"]] == [
        (3, 300, "EUR"),
        (4, 400, "EUR"),
    ]
    assert page["next_after"] == 4


@pytest.mark.parametrize(
    ("path", "params", "headers", "name", "fragment"),
    [
        ("transactions", {"limit": "0"}, {}, "limit", "greater than or equal to 1"),
        ("transactions", {"limit": "501"}, {}, "limit", "less than or equal to 500"),
        ("transactions", {"limit": "ten"}, {}, "limit", "valid integer"),
        ("transactions", {"from": "2026-11-05T12:00:00"}, {}, "from", "with a timezone"),
        ("transactions", {"to": "yesterday"}, {}, "to", "RFC 3339"),
        (
            "transactions",
            {"from": "2026-11-05T12:00:00Z", "to": "2026-11-05T11:00:00Z"},
            {},
            "to",
            "later than 'from'",
        ),
        ("transactions", {"cursor": "bm90LWEtY3Vyc29y"}, {}, "cursor", "not a cursor"),
        ("events", {"after": "-1"}, {}, "after", "greater than or equal to 0"),
        ("events/stream", {}, {"Last-Event-ID": "abc"}, "Last-Event-ID", "non-negative integer"),
    ],
)
def test_bad_parameters_give_400_naming_the_parameter(
    api: Api,
    path: str,
    params: dict[str, str],
    headers: dict[str, str],
    name: str,
    *,
    fragment: str,
) -> None:
    merchant = unique("m")
    key = api.key(merchant)
    resp = api.get(f"/v1/merchants/{merchant}/{path}", key, params=params, headers=headers)
    body = problem(resp, 400)
    assert body["errors"][0]["name"] == name
    assert f"'{name}'" in body["detail"]
    assert fragment in body["detail"]


def test_rate_limit_answers_429_with_retry_after(start_api: Callable[..., Api]) -> None:
    api = start_api(rate_per_s=0.5, rate_burst=3)
    merchant = unique("m")
    key, other_key = api.key(merchant), api.key(merchant)
    path = f"/v1/merchants/{merchant}/balances"
    assert [api.get(path, key).status_code for _ in range(3)] == [200, 200, 200]
    resp = api.get(path, key)
    body = problem(resp, 429)
    # One token back at 0.5/s: 2 s, or 1 s if the first requests took over 0.5 s.
    assert resp.headers["retry-after"] in {"1", "2"}
    assert "rate limit" in body["detail"]
    # Buckets are per key.
    assert api.get(path, other_key).status_code == 200
    metrics = httpx.get(api.base + "/metrics").text
    assert "posflow_api_rate_limited_total 1.0" in metrics
    assert (
        'posflow_api_requests_total{method="GET",route="/v1/merchants/{merchant_id}/balances",'
        'status="429"} 1.0' in metrics
    )


def test_openapi_is_published_with_problem_responses_and_bearer_auth(api: Api) -> None:
    spec = httpx.get(api.base + "/openapi.json").json()
    paths = spec["paths"]
    for path in ("balances", "transactions", "events", "events/stream"):
        assert f"/v1/merchants/{{merchant_id}}/{path}" in paths
    tx = paths["/v1/merchants/{merchant_id}/transactions"]["get"]
    assert {p["name"] for p in tx["parameters"]} >= {"merchant_id", "limit", "cursor", "from", "to"}
    assert "application/problem+json" in tx["responses"]["429"]["content"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    stream_doc = paths["/v1/merchants/{merchant_id}/events/stream"]["get"]
    assert "text/event-stream" in stream_doc["responses"]["200"]["content"]


# --- server-sent events ---------------------------------------------------------------------


def test_sse_resume_after_a_dropped_connection_delivers_every_event_once(api: Api) -> None:
    merchant, other = unique("m"), unique("m")
    key = api.key(merchant)
    add_events(api.conn, merchant, range(1, 6))
    add_events(api.conn, other, range(1, 4))

    with stream(api, merchant, key) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        reader = SseReader(resp)
        got = seqs_and_amounts(reader.events(3))
    # Dropped after 3 events; more arrive while the client is away.
    add_events(api.conn, merchant, range(6, 9))
    with stream(api, merchant, key, last=3) as resp:
        reader = SseReader(resp)
        got += seqs_and_amounts(reader.events(5))
        add_events(api.conn, other, range(4, 6))
        add_events(api.conn, merchant, range(9, 11))  # live, through NOTIFY
        got += seqs_and_amounts(reader.events(2))
    assert got == [(s, s * 100) for s in range(1, 11)]


def test_sse_exactly_once_while_a_writer_runs_and_the_client_reconnects(api: Api) -> None:
    merchant = unique("m")
    key = api.key(merchant)
    total = 300
    writer_conn = psycopg.connect(api.dsn, autocommit=True)

    def write() -> None:
        seq = 1
        while seq <= total:
            batch = range(seq, min(seq + 7, total + 1))
            add_events(writer_conn, merchant, batch)
            seq = batch.stop
            time.sleep(0.005)

    writer = threading.Thread(target=write)
    writer.start()
    got: list[tuple[int, int]] = []
    try:
        connections = 0
        for _ in range(200):
            connections += 1
            last = got[-1][0] if got else None
            with stream(api, merchant, key, last=last) as resp:
                reader = SseReader(resp)
                want = min(23, total - len(got))
                got += seqs_and_amounts(reader.events(want))
            if len(got) >= total:
                break
        assert connections > 5, "the client should have reconnected many times"
    finally:
        writer.join(timeout=30)
        writer_conn.close()
    assert got == [(s, s * 100) for s in range(1, total + 1)]


def test_sse_client_behind_its_queue_bound_catches_up_from_the_database(
    start_api: Callable[..., Api],
) -> None:
    api = start_api(sse_queue_max=2)
    merchant = unique("m")
    key = api.key(merchant)
    with stream(api, merchant, key) as resp:
        reader = SseReader(resp)
        add_events(api.conn, merchant, range(1, 2))
        assert seqs_and_amounts(reader.events(1)) == [(1, 100)]
        add_events(api.conn, merchant, range(2, 30))  # one NOTIFY, 28 rows > queue bound 2
        got = seqs_and_amounts(reader.events(28))
    assert got == [(s, s * 100) for s in range(2, 30)]
    metrics = httpx.get(api.base + "/metrics").text
    assert 'posflow_api_sse_catchups_total{reason="slow_client"} 1.0' in metrics
    assert "posflow_api_events_delivered_total 29.0" in metrics


def test_sse_keepalive_metrics_and_sigterm_closes_streams(start_api: Callable[..., Api]) -> None:
    api = start_api(sse_heartbeat_s=0.3)
    merchant = unique("m")
    key = api.key(merchant)
    add_events(api.conn, merchant, range(1, 3))
    with stream(api, merchant, key) as resp:
        reader = SseReader(resp)
        seen: list[str] = []
        deadline = time.monotonic() + 5
        while ": keepalive" not in seen and time.monotonic() < deadline:
            seen.append(next(reader.lines))
        assert seen[0] == "retry: 1000"
        assert seen.index("id: 1") < seen.index("id: 2") < seen.index(": keepalive")
        metrics = httpx.get(api.base + "/metrics").text
        assert "posflow_api_sse_clients 1.0" in metrics
        assert "posflow_api_events_delivered_total 2.0" in metrics
        assert "posflow_api_delivery_latency_seconds_count 2.0" in metrics
        assert "posflow_api_listening 1.0" in metrics
        # SIGTERM (what uvicorn's signal handler calls): the stream ends with a reason.
        api.server.handle_exit(signal.SIGTERM, None)
        assert reader.events(1, timeout_s=5) == [
            ("close", "", '{"reason": "server shutting down"}')
        ]
    api.thread.join(timeout=20)
    assert not api.thread.is_alive()
    with pytest.raises(httpx.TransportError):
        httpx.get(api.base + "/healthz", timeout=1)
