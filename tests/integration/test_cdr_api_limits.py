"""What the CDR, credit and call routes refuse or bound: reversed periods, debits below the
floor, amounts the schema does not describe, exports clients stop reading, CDRs committed
out of id order while a client pages, and hang-ups no agent heard."""

from __future__ import annotations

import asyncio
import csv
import io
from decimal import Decimal

import asyncpg
import pytest

from controlplane.api.resources import cdrs
from controlplane.calls.admission import Admission
from controlplane.store import calls as store
from tests.api_helper import Api
from tests.integration.test_admission import request, setup
from tests.integration.test_cdr_export import APRIL, create_node, seed

REVERSED = "since=2026-05-01T00:00:00Z&until=2026-04-01T00:00:00Z"


async def test_a_reversed_period_is_refused_not_answered_empty(api: Api, db: asyncpg.Pool):
    await seed(api, db)
    for path in (f"/api/v1/cdrs?{REVERSED}", f"/api/v1/cdrs/export?{REVERSED}",
                 f"/api/v1/audit?{REVERSED}",
                 "/api/v1/cdrs?since=2026-04-01T00:00:00Z&until=2026-04-01T00:00:00Z"):
        reply = await api.get(path)
        assert reply.status == 422, path
        assert {e["pointer"] for e in reply.body["errors"]} == {"#/query/since",
                                                                "#/query/until"}, path
    assert len(api.ok(await api.get(f"/api/v1/cdrs?{APRIL}"))["items"]) == 2


async def test_a_debit_never_takes_what_calls_in_progress_hold_below_the_floor(
        api: Api, db: asyncpg.Pool):
    dealer = await api.dealer("reseller")
    tenant = await api.tenant(dealer["id"])
    ext = await api.extension(tenant["id"], "2001")
    base = f"/api/v1/extensions/{ext['id']}/credit"
    api.ok(await api.post(base, {"amount": "10.00"}))
    await db.execute("UPDATE credit_accounts SET reserved = 4 WHERE extension_id = $1",
                     ext["id"])
    movements = await db.fetchval("SELECT count(*) FROM credit_movements")
    refused = await api.post(base, {"amount": "-6.01"})
    assert refused.status == 409
    assert refused.body["errors"][0]["pointer"] == "#/amount"
    assert "at most 6.0000 can be debited" in refused.body["detail"]
    shown = api.ok(await api.get(base))
    assert (shown["balance"], shown["available"]) == ("10.0000", "6.0000")
    assert await db.fetchval("SELECT count(*) FROM credit_movements") == movements
    done = api.ok(await api.post(base, {"amount": "-6"}))
    assert (done["balance"], done["available"]) == ("4.0000", "0.0000")
    # a prepaid tenant with nothing cannot be debited at all
    empty = await api.post(f"/api/v1/tenants/{tenant['id']}/credit", {"amount": "-50"})
    assert empty.status == 409
    # crediting is never limited by the floor
    api.ok(await api.post(f"/api/v1/tenants/{tenant['id']}/credit", {"amount": "5"}))


@pytest.mark.parametrize("amount", [" 5 ", "1e3", "1_0", "+5", "5.", "0x10", "５"])
async def test_an_amount_outside_the_published_schema_is_refused(api: Api, db: asyncpg.Pool,
                                                                amount):
    dealer = await api.dealer("reseller")
    tenant = await api.tenant(dealer["id"])
    reply = await api.post(f"/api/v1/tenants/{tenant['id']}/credit", {"amount": amount})
    assert reply.status == 422
    assert reply.body["errors"][0]["pointer"] == "#/amount"
    assert await db.fetchval("SELECT count(*) FROM credit_movements") == 0


async def test_the_csv_export_keeps_a_network_callers_formula_from_spreadsheets(
        api: Api, db: asyncpg.Pool):
    dealer, _ = await seed(api, db)
    await db.execute("UPDATE cdrs SET caller = '=HYPERLINK(\"http://x\",\"y\")'"
                     " WHERE uniqueid = 'u1'")
    reply = await api.client.get(f"/api/v1/cdrs/export?{APRIL}",
                                 headers={"Authorization": f"Bearer {api.token}"})
    rows = {r["caller"] for r in csv.DictReader(io.StringIO(await reply.text()))}
    assert rows == {"'=HYPERLINK(\"http://x\",\"y\")", "2001"}
    listed = api.ok(await api.get(f"/api/v1/cdrs?{APRIL}"))["items"]
    assert {i["caller"] for i in listed} == {'=HYPERLINK("http://x","y")', "2001"}


async def _insert_cdr(conn: asyncpg.Connection, node: int, tenant: int, path: list[int],
                      uniqueid: str) -> int:
    return await conn.fetchval(
        "INSERT INTO cdrs (node_id, uniqueid, tenant_id, dealer_path, caller, callee,"
        " started_at, ended_at) VALUES ($1, $2, $3, $4, '2001', '2002',"
        " '2026-04-02T00:00:00Z', '2026-04-02T00:01:00Z') RETURNING id",
        node, uniqueid, tenant, path)


async def test_a_cdr_committed_after_a_higher_id_is_not_skipped_by_paging(
        api: Api, db: asyncpg.Pool):
    node = await create_node(api)
    dealer = await api.dealer("reseller")
    tenant = await api.tenant(dealer["id"])
    path = await db.fetchval("SELECT path FROM dealers WHERE id = $1", dealer["id"])
    async with db.acquire() as slow, db.acquire() as fast:
        storing = slow.transaction()
        await storing.start()
        low = await _insert_cdr(slow, node["id"], tenant["id"], path, "slow")
        high = await _insert_cdr(fast, node["id"], tenant["id"], path, "fast")
        assert low < high
        # a page read now would end at `high` and never show `low`: it waits instead
        page = asyncio.ensure_future(api.get("/api/v1/cdrs?limit=10"))
        await asyncio.sleep(0.5)
        assert not page.done()
        await storing.commit()
        reply = await asyncio.wait_for(page, 5)
    assert [i["id"] for i in api.ok(reply)["items"]] == [low, high]


async def test_a_page_waits_for_a_stuck_storing_transaction_at_most_a_bounded_time(
        api: Api, db: asyncpg.Pool, monkeypatch):
    monkeypatch.setattr(cdrs, "LIST_LOCK_WAIT_MS", 300)
    node = await create_node(api)
    dealer = await api.dealer("reseller")
    tenant = await api.tenant(dealer["id"])
    path = await db.fetchval("SELECT path FROM dealers WHERE id = $1", dealer["id"])
    async with db.acquire() as slow, slow.transaction():
        await _insert_cdr(slow, node["id"], tenant["id"], path, "stuck")
        reply = await asyncio.wait_for(api.get("/api/v1/cdrs"), 5)
        assert reply.status == 503
        assert reply.headers.get("Retry-After")


async def _stalled_export(host: str, port: int, token: str
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An export request whose client never reads the answer."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write((f"GET /api/v1/cdrs/export?{APRIL} HTTP/1.1\r\nHost: test\r\n"
                  f"Authorization: Bearer {token}\r\n\r\n").encode())
    await writer.drain()
    return reader, writer


async def test_exports_no_client_reads_neither_starve_the_api_nor_last(
        api: Api, db: asyncpg.Pool, settings, monkeypatch, caplog):
    monkeypatch.setattr(cdrs, "EXPORT_WRITE_TIMEOUT", 2.0)
    slots = max(1, settings.db_pool_max // 4)
    node = await create_node(api)
    dealer = await api.dealer("reseller")
    tenant = await api.tenant(dealer["id"])
    path = await db.fetchval("SELECT path FROM dealers WHERE id = $1", dealer["id"])
    # far more than the socket buffers between the two ends hold
    await db.execute(
        "INSERT INTO cdrs (node_id, uniqueid, tenant_id, dealer_path, caller, callee,"
        " started_at, ended_at) SELECT $1, 'u' || g, $2, $3, '+5511999999999',"
        " '+5511888888888', '2026-04-02T00:00:00Z', '2026-04-02T00:01:00Z'"
        " FROM generate_series(1, 60000) g", node["id"], tenant["id"], path)
    host, port = api.client.server.host, api.client.server.port
    stalled = []
    for _ in range(slots):
        stalled.append(await _stalled_export(host, port, api.token))
        await asyncio.sleep(0.3)
    busy = await api.get(f"/api/v1/cdrs/export?{APRIL}")
    assert busy.status == 503 and busy.headers.get("Retry-After")
    assert "CDR exports are running" in busy.body["detail"]
    # the rest of the API answers meanwhile
    assert (await asyncio.wait_for(api.get("/api/v1/tenants"), 5)).status == 200
    # the stalled ones are cut off, their connections given back: exports run again
    for _ in range(100):
        cut = [r for r in caplog.records if "CDR export cut off" in r.getMessage()]
        if len(cut) == slots:
            break
        await asyncio.sleep(0.1)
    assert len(cut) == slots
    for _, writer in stalled:
        writer.close()
    reply = await api.client.get(f"/api/v1/cdrs/export?{APRIL}",
                                 headers={"Authorization": f"Bearer {api.token}"})
    assert reply.status == 200
    assert (await reply.text()).count("\n") == 60001
    assert await db.fetchval("SELECT count(*) FROM pg_stat_activity"
                             " WHERE state = 'idle in transaction'") == 0


async def test_a_hangup_no_agent_heard_is_kept_with_its_call_for_the_agent(
        api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api)
    decision = await Admission(db).decide(request(node_id, exts[0], 0))
    assert decision.admitted
    call = await db.fetchrow("SELECT channel, channel_name FROM calls WHERE id = $1",
                             decision.call_id)
    live = [call["channel"], "other-1"]
    async with db.acquire() as conn:
        assert await store.hangups_asked(conn, node_id, 0.0, live) == []
    # nobody LISTENs: the NOTIFY is lost, the request is not
    reply = await api.delete(f"/api/v1/calls/{decision.call_id}")
    assert reply.status == 202
    async with db.acquire() as conn:
        assert await store.hangups_asked(conn, node_id, 0.0, live) == [
            (call["channel_name"], call["channel"])]
        assert await store.hangups_asked(conn, node_id, 60.0, live) == []  # asked just now
        assert await store.hangups_asked(conn, node_id + 1, 0.0, live) == []
        # not on the node any more (it restarted): its name may be a new call's, left alone
        assert await store.hangups_asked(conn, node_id, 0.0, ["other-1"]) == []
    first = await db.fetchval("SELECT hangup_requested_at FROM calls WHERE id = $1",
                              decision.call_id)
    assert (await api.delete(f"/api/v1/calls/{decision.call_id}")).status == 202
    assert await db.fetchval("SELECT hangup_requested_at FROM calls WHERE id = $1",
                             decision.call_id) == first  # asked again: the first time stays
    await db.execute("UPDATE calls SET channel_name = '' WHERE id = $1", decision.call_id)
    nameless = await api.delete(f"/api/v1/calls/{decision.call_id}")
    assert nameless.status == 409
    assert Decimal(api.ok(await api.get(f"/api/v1/calls/{decision.call_id}"))["reserved"]) > 0


async def test_the_live_calls_list_says_when_more_matched_than_it_holds(
        api: Api, db: asyncpg.Pool, monkeypatch):
    from controlplane.api.resources import calls as calls_route

    node_id, _, exts = await setup(api)
    admission = Admission(db)
    first = await admission.decide(request(node_id, exts[0], 0))
    await admission.decide(request(node_id, exts[1], 1))
    whole = api.ok(await api.get("/api/v1/calls"))
    assert (len(whole["items"]), whole["truncated"]) == (2, False)
    monkeypatch.setattr(calls_route, "LIMIT", 1)
    capped = api.ok(await api.get("/api/v1/calls"))
    assert capped["truncated"] is True
    assert [i["id"] for i in capped["items"]] == [str(first.call_id)]  # the oldest first
