"""CDRs for billing systems: the CSV export route and the periodic export files."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from controlplane.billing import export
from tests.api_helper import Api


async def seed(api: Api, db: asyncpg.Pool) -> tuple[dict, dict]:
    node = api.ok(await api.post("/api/v1/nodes", {
        "name": "n1", "sip_address": "198.51.100.1", "ami_host": "10.0.0.1",
        "ami_username": "admin", "ami_secret": "ami-secret-123456",
        "ari_url": "http://10.0.0.1:8088", "ari_username": "ari",
        "ari_password": "ari-password-123456"}), 201)
    reseller = await api.dealer("distributor")
    tenant = await api.tenant(reseller["id"], external_ref="ACME-42")
    async with db.acquire() as conn:
        path = await conn.fetchval("SELECT path FROM dealers WHERE id = $1", reseller["id"])
        for n, day in enumerate(("2026-03-31T23:59:00Z", "2026-04-01T00:00:00Z",
                                 "2026-04-30T12:00:00Z", "2026-05-01T00:00:01Z")):
            start = datetime.fromisoformat(day)
            await conn.execute(
                "INSERT INTO cdrs (node_id, uniqueid, tenant_id, dealer_path, external_ref,"
                " caller, callee, started_at, ended_at, talk_seconds, billed_seconds, price,"
                " disposition) VALUES ($1, $2, $3, $4, 'ACME-42', '2001', '+551133334444',"
                " $5, $5, 10, 30, 0.6, 'ANSWERED')", node["id"], f"u{n}", tenant["id"], path,
                start)
    return reseller, tenant


async def test_export_route_streams_the_period_as_csv(api: Api, db: asyncpg.Pool):
    dealer, tenant = await seed(api, db)
    reply = await api.get(f"/api/v1/cdrs/export?dealer_id={dealer['id']}"
                          "&since=2026-04-01T00:00:00Z&until=2026-05-01T00:00:00Z")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(reply.body.decode())))
    assert [r["started_at"][:10] for r in rows] == ["2026-04-01", "2026-04-30"]
    assert {r["external_ref"] for r in rows} == {"ACME-42"}
    assert {r["tenant_id"] for r in rows} == {str(tenant["id"])}


async def test_export_route_needs_a_period(api: Api, db: asyncpg.Pool):
    reply = await api.get("/api/v1/cdrs/export?since=2026-04-01T00:00:00Z")
    assert reply.status == 422
    assert [e["pointer"] for e in reply.body["errors"]] == ["#/query/until"]


async def test_monthly_files_hold_each_closed_month_once(db: asyncpg.Pool, api: Api,
                                                         tmp_path: Path):
    await seed(api, db)
    start, end, label = export.period_of(datetime(2026, 4, 15, tzinfo=UTC).date(), "monthly")
    assert (start.isoformat(), end.isoformat(), label) == (
        "2026-04-01T00:00:00+00:00", "2026-05-01T00:00:00+00:00", "2026-04")
    written = await export.write_period(db, tmp_path, start, end, label)
    assert written == tmp_path / "cdrs-2026-04.csv"
    lines = written.read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("id,node_id,call_id")
    assert await export.write_period(db, tmp_path, start, end, label) is None  # kept once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cdrs-2026-04.csv"]


def test_closed_periods_are_those_that_have_ended():
    now = datetime(2026, 5, 3, 10, tzinfo=UTC)
    assert [p[2] for p in export.closed_periods(now, "monthly", 2)] == ["2026-03", "2026-04"]
    assert [p[2] for p in export.closed_periods(now, "daily", 2)] == ["2026-05-01",
                                                                      "2026-05-02"]
