"""CDRs for billing systems: the CSV export route and the periodic export files."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from controlplane.api.resources import cdrs
from controlplane.billing import export
from tests.api_helper import Api

APRIL = "since=2026-04-01T00:00:00Z&until=2026-05-01T00:00:00Z"


async def create_node(api: Api) -> dict:
    return api.ok(await api.post("/api/v1/nodes", {
        "name": "n1", "sip_address": "198.51.100.1", "ami_host": "10.0.0.1",
        "ami_username": "admin", "ami_secret": "ami-secret-123456",
        "ari_url": "http://10.0.0.1:8088", "ari_username": "ari",
        "ari_password": "ari-password-123456"}), 201)


async def seed(api: Api, db: asyncpg.Pool) -> tuple[dict, dict]:
    node = await create_node(api)
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


async def test_export_route_answers_json_with_the_same_filters(api: Api, db: asyncpg.Pool):
    dealer, tenant = await seed(api, db)
    reply = await api.get(f"/api/v1/cdrs/export?format=json&tenant_id={tenant['id']}&{APRIL}")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("application/json")
    items = reply.body["items"]
    assert [i["started_at"][:10] for i in items] == ["2026-04-01", "2026-04-30"]
    assert {i["dealer_id"] for i in items} == {dealer["id"]}
    assert items[0]["hangup_cause"] == "" and items[0]["dealer_path"][-1] == dealer["id"]
    csv_reply = await api.get(f"/api/v1/cdrs/export?tenant_id={tenant['id']}&{APRIL}")
    rows = list(csv.DictReader(io.StringIO(csv_reply.body.decode())))
    assert [r["id"] for r in rows] == [str(i["id"]) for i in items]
    assert "hangup_cause" in rows[0]
    empty = await api.get(f"/api/v1/cdrs/export?format=json&tenant_id=999999&{APRIL}")
    assert empty.status == 200 and empty.body == {"items": []}
    wrong = await api.get(f"/api/v1/cdrs/export?format=xml&{APRIL}")
    assert wrong.status == 422
    assert [e["pointer"] for e in wrong.body["errors"]] == ["#/query/format"]


async def test_an_export_whose_query_fails_answers_an_error_not_an_empty_csv(
        api: Api, db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch):
    await seed(api, db)
    # a query the database fails while reading the rows
    monkeypatch.setattr(cdrs, "SCOPED", cdrs.SCOPED.replace(
        "WHERE (", "WHERE 1 / (c.id - c.id) = 1 AND (", 1))
    reply = await api.get(f"/api/v1/cdrs/export?{APRIL}")
    assert reply.status == 500
    assert reply.headers["Content-Type"].startswith("application/problem+json")


async def test_an_export_failing_once_started_cuts_the_connection(
        api: Api, db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture):
    await seed(api, db)
    plain = cdrs.FORMATS["csv"]
    seen = []

    def line_then_failure(row: asyncpg.Record) -> bytes:
        seen.append(row["id"])
        if len(seen) > 1:
            raise RuntimeError("the second row cannot be written")
        return plain.item(row)

    monkeypatch.setattr(cdrs, "EXPORT_CHUNK", 1)
    monkeypatch.setitem(cdrs.FORMATS, "csv", dataclasses.replace(plain, item=line_then_failure))
    headers = {"Authorization": f"Bearer {api.token}"}
    with caplog.at_level(logging.ERROR, "controlplane.api.resources.cdrs"):
        async with api.client.get(f"/api/v1/cdrs/export?{APRIL}", headers=headers) as resp:
            assert resp.status == 200  # already sent when the second row failed
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
    assert "CDR export broken off after 1 CDRs" in caplog.text


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
    async with db.acquire() as conn:
        await conn.execute("TRUNCATE cdr_exports, cdr_export_horizon")
    try:
        written = await export.export_closed_periods(db, tmp_path, "monthly")
        assert written[:3] == [tmp_path / f"cdrs-2026-0{m}.csv" for m in (3, 4, 5)]
        lines = (tmp_path / "cdrs-2026-04.csv").read_text().splitlines()
        assert len(lines) == 3 and lines[0].startswith("id,node_id,call_id")
        assert "hangup_cause" in lines[0].split(",")
        assert await export.export_closed_periods(db, tmp_path, "monthly") == []
    finally:
        async with db.acquire() as conn:
            await conn.execute("TRUNCATE cdr_exports, cdr_export_horizon")
