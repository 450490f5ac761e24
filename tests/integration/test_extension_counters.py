"""Bulk creation of extensions, and the subtree counters under bulk and concurrent writes.

The counters are kept by statement-level triggers (migration 0004): a counter a cap depends
on moves at once, under its row lock and CHECK; the others (an uncapped dealer's) move at
commit. Either way every committed state has exact counts, and no cap is ever exceeded.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime

import asyncpg
import pytest

from tests.api_helper import Api


def same_object(a: dict, b: dict) -> bool:
    """Equal, timestamps compared as instants (PostgreSQL's JSON drops trailing zeros of the
    fraction of a second that Python's isoformat keeps)."""
    def norm(v: object) -> object:
        if isinstance(v, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT[0-9:.]+[+-]\d\d:\d\d", v):
            return datetime.fromisoformat(v)
        return v
    return {k: norm(v) for k, v in a.items()} == {k: norm(v) for k, v in b.items()}


def bulk_path(tenant_id: int) -> str:
    return f"/api/v1/tenants/{tenant_id}/extensions/bulk"


async def counts(api: Api, dealer_ids: list[int]) -> list[tuple[int, int]]:
    out = []
    for key in dealer_ids:
        d = api.ok(await api.get(f"/api/v1/dealers/{key}"))
        out.append((d["tenant_count"], d["extension_count"]))
    return out


async def true_counts(pool: asyncpg.Pool) -> dict[str, set[tuple[int, int, int]]]:
    """Every stored counter next to a count of the rows themselves."""
    async with pool.acquire() as conn:
        dealers = await conn.fetch(
            "SELECT d.id, d.tenant_count, d.extension_count,"
            " (SELECT count(*) FROM tenants t JOIN dealers x ON x.id = t.dealer_id"
            "   WHERE x.path @> ARRAY[d.id] AND t.status <> 'cancelled') AS tenants,"
            " (SELECT count(*) FROM extensions e JOIN tenants t ON t.id = e.tenant_id"
            "   JOIN dealers x ON x.id = t.dealer_id WHERE x.path @> ARRAY[d.id]) AS extensions"
            " FROM dealers d")
        tenants = await conn.fetch(
            "SELECT t.id, t.extension_count,"
            " (SELECT count(*) FROM extensions e WHERE e.tenant_id = t.id) AS n FROM tenants t")
        pending = await conn.fetchval("SELECT current_setting('pbx.uncounted', true)")
    assert not pending, f"uncounted changes left after commit: {pending}"
    return {
        "stored": {(r["id"], r["tenant_count"], r["extension_count"]) for r in dealers}
        | {(-r["id"], 0, r["extension_count"]) for r in tenants},
        "true": {(r["id"], r["tenants"], r["extensions"]) for r in dealers}
        | {(-r["id"], 0, r["n"]) for r in tenants},
    }


async def assert_counters_exact(pool: asyncpg.Pool) -> None:
    c = await true_counts(pool)
    assert c["stored"] == c["true"], sorted(c["stored"] ^ c["true"])


# -- the bulk route ----------------------------------------------------------------------------


async def test_bulk_creates_all_numbers_with_own_codes_and_passwords(api: Api) -> None:
    dist = await api.dealer("distributor")
    t = await api.tenant(dist["id"])
    reply = await api.post(bulk_path(t["id"]), {
        "first_number": "2000", "count": 25, "name": "Desk", "allow_international": True})
    body = api.ok(reply, 201)
    assert body["tenant_id"] == t["id"] and body["count"] == 25
    items = body["items"]
    assert [i["number"] for i in items] == [str(n) for n in range(2000, 2025)]
    assert len({i["account_code"] for i in items}) == 25
    assert all(re.fullmatch(r"[0-9]{6}", i["account_code"]) for i in items)
    assert all(set(i) == {"id", "number", "account_code"} for i in items)
    listed = api.ok(await api.get(f"/api/v1/extensions?tenant_id={t['id']}&limit=500"))
    assert {e["id"] for e in listed["items"]} == {i["id"] for i in items}
    assert all(e["name"] == "Desk" and e["allow_international"] for e in listed["items"])
    passwords = set()
    for item in items[:5]:
        secret = api.ok(await api.post(f"/api/v1/extensions/{item['id']}/reveal-password"))
        passwords.add(secret["sip_password"])
    assert len(passwords) == 5
    audit = api.ok(await api.get("/api/v1/audit?entity=extension&limit=500"))["items"]
    created = {int(a["entity_id"]) for a in audit if a["action"] == "create"}
    assert created >= {i["id"] for i in items}
    one = next(a for a in audit if a["entity_id"] == str(items[0]["id"]))
    shown = api.ok(await api.get(f"/api/v1/extensions/{items[0]['id']}"))
    assert same_object(one["after"], shown) and one["actor_id"] == api.dealer_id
    assert (await counts(api, [dist["id"], api.dealer_id])) == [(1, 25), (1, 25)]
    await assert_counters_exact(api.pool)


async def test_bulk_keeps_the_width_of_the_first_number(api: Api) -> None:
    t = await api.tenant()
    body = api.ok(await api.post(bulk_path(t["id"]), {"first_number": "0098", "count": 3}), 201)
    assert [i["number"] for i in body["items"]] == ["0098", "0099", "0100"]
    reply = await api.post(bulk_path(t["id"]), {"first_number": "98", "count": 3})
    assert reply.status == 422 and reply.body["errors"][0]["pointer"] == "#/count", reply


@pytest.mark.parametrize("body", [
    {"first_number": "100", "count": 0}, {"first_number": "100", "count": 1001},
    {"first_number": "1", "count": 2}, {"count": 2}, {"first_number": "100"},
    {"first_number": "100", "count": 2, "account_code": "123456"},
    {"first_number": "100", "count": 2, "sip_password": "Secret-password-123"},
    {"first_number": "100", "count": 2, "number": "100"},
])
async def test_bulk_refuses_bad_bodies_and_writes_nothing(api: Api, body: dict) -> None:
    t = await api.tenant()
    reply = await api.post(bulk_path(t["id"]), body)
    assert reply.status == 422, reply
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert await api.count("extensions") == 0


async def test_bulk_is_all_or_nothing_on_a_taken_number(api: Api) -> None:
    t = await api.tenant()
    await api.extension(t["id"], "3005")
    before = await api.count("audit_log")
    reply = await api.post(bulk_path(t["id"]), {"first_number": "3000", "count": 10})
    assert reply.status == 409, reply
    assert reply.body["errors"][0]["pointer"] == "#/first_number"
    assert "3005" in reply.body["detail"]
    assert await api.count("extensions") == 1
    assert await api.count("audit_log") == before


async def test_bulk_over_a_cap_is_refused_whole(api: Api) -> None:
    dist = await api.dealer("distributor", max_extensions=30)
    res = await api.dealer("reseller", parent_id=dist["id"])
    t1, t2 = await api.tenant(res["id"]), await api.tenant(res["id"], max_extensions=10)
    api.ok(await api.post(bulk_path(t1["id"]), {"first_number": "100", "count": 20}), 201)
    reply = await api.post(bulk_path(t1["id"]), {"first_number": "200", "count": 11})
    assert reply.status == 409 and "extension cap" in reply.body["detail"], reply
    reply = await api.post(bulk_path(t2["id"]), {"first_number": "100", "count": 11})
    assert reply.status == 409 and "tenant's extension cap" in reply.body["detail"], reply
    api.ok(await api.post(bulk_path(t2["id"]), {"first_number": "100", "count": 10}), 201)
    assert await api.count("extensions") == 30
    assert (await counts(api, [dist["id"], res["id"]])) == [(2, 30), (2, 30)]
    await assert_counters_exact(api.pool)


async def test_bulk_into_a_cancelled_or_foreign_tenant(api: Api) -> None:
    t = await api.tenant()
    api.ok(await api.post(f"/api/v1/tenants/{t['id']}/cancel"))
    reply = await api.post(bulk_path(t["id"]), {"first_number": "100", "count": 2})
    assert reply.status == 409, reply
    d1, d2 = await api.dealer("distributor"), await api.dealer("distributor")
    other = await api.tenant(d2["id"])
    as_d1 = await api.as_dealer(d1)
    reply = await as_d1.post(bulk_path(other["id"]), {"first_number": "100", "count": 2})
    missing = await as_d1.post(bulk_path(10**12), {"first_number": "100", "count": 2})
    assert (reply.status, reply.body) == (missing.status, missing.body) == (404, reply.body)
    assert await api.count("extensions") == 0


async def test_bulk_plan_must_be_offered_to_the_tenant(api: Api) -> None:
    d1, d2 = await api.dealer("distributor"), await api.dealer("distributor")
    foreign = api.ok(await api.post("/api/v1/plans", {"dealer_id": d2["id"], "name": "X"}), 201)
    t = await api.tenant(d1["id"])
    reply = await api.post(bulk_path(t["id"]), {"first_number": "100", "count": 2,
                                                 "plan_id": foreign["id"]})
    assert reply.status == 422 and reply.body["errors"][0]["pointer"] == "#/plan_id", reply


# -- counters ------------------------------------------------------------------------------------


async def test_one_statement_of_many_rows_counts_each_level_once(api: Api) -> None:
    """The seeding pattern of the benchmark: one INSERT ... SELECT over several tenants."""
    dist = await api.dealer("distributor", max_extensions=5000)
    res = await api.dealer("reseller", parent_id=dist["id"])
    other = await api.dealer("reseller")  # under the operator: uncapped all the way up
    tenants = [(await api.tenant(res["id"]))["id"] for _ in range(3)]
    tenants += [(await api.tenant(other["id"]))["id"] for _ in range(2)]
    async with api.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO extensions (tenant_id, number, account_code, sip_password)"
            " SELECT ($1::bigint[])[1 + g % 5], (10000 + g)::text, (100000 + g)::text,"
            "        md5(g::text) FROM generate_series(0, 2999) g", tenants)
    assert (await counts(api, [dist["id"], res["id"], other["id"], api.dealer_id])) == [
        (3, 1800), (3, 1800), (2, 1200), (5, 3000)]
    async with api.pool.acquire() as conn:
        await conn.execute("DELETE FROM extensions WHERE number::int % 2 = 0")
    assert (await counts(api, [dist["id"], res["id"], other["id"], api.dealer_id])) == [
        (3, 900), (3, 900), (2, 600), (5, 1500)]
    await assert_counters_exact(api.pool)


async def test_a_cap_refuses_an_over_cap_statement_in_plain_sql(api: Api) -> None:
    dist = await api.dealer("distributor", max_extensions=10)
    res = await api.dealer("reseller", parent_id=dist["id"])
    tenants = [(await api.tenant(res["id"]))["id"] for _ in range(2)]
    async with api.pool.acquire() as conn:
        with pytest.raises(asyncpg.CheckViolationError, match="dealer_extension_cap"):
            await conn.execute(  # 6 in each tenant: each within its tenant's cap of 10
                "INSERT INTO extensions (tenant_id, number, account_code, sip_password)"
                " SELECT ($1::bigint[])[1 + g % 2], (100 + g)::text, (200000 + g)::text,"
                "        md5(g::text) FROM generate_series(1, 12) g", tenants)
    assert await api.count("extensions") == 0
    await assert_counters_exact(api.pool)


async def test_concurrent_creates_never_exceed_a_cap(api: Api) -> None:
    """Many creates at once through the API, in several tenants under one capped dealer
    and in an uncapped one beside it: exactly the cap succeeds, the counters stay exact."""
    dist = await api.dealer("distributor", max_extensions=40)
    capped = [(await api.tenant(dist["id"]))["id"] for _ in range(4)]
    free = (await api.tenant())["id"]

    async def one(tenant_id: int, n: int) -> int:
        reply = await api.post("/api/v1/extensions",
                               {"tenant_id": tenant_id, "number": f"{5000 + n}"})
        return reply.status

    statuses = await asyncio.gather(*(one(capped[n % 4], n) for n in range(60)),
                                    *(one(free, n) for n in range(30)))
    assert sorted(statuses[:60]).count(201) == 40 and set(statuses[:60]) == {201, 409}
    assert set(statuses[60:]) == {201}
    assert (await counts(api, [dist["id"], api.dealer_id])) == [(4, 40), (5, 70)]
    await assert_counters_exact(api.pool)


async def test_concurrent_bulk_creates_never_exceed_a_cap(api: Api) -> None:
    dist = await api.dealer("distributor", max_extensions=250)
    tenants = [(await api.tenant(dist["id"]))["id"] for _ in range(2)]

    async def one(n: int) -> int:
        reply = await api.post(bulk_path(tenants[n % 2]),
                               {"first_number": f"{1000 + 100 * n}", "count": 50})
        return reply.status

    statuses = await asyncio.gather(*(one(n) for n in range(8)))
    assert statuses.count(201) == 5 and set(statuses) == {201, 409}, statuses
    assert (await counts(api, [dist["id"]])) == [(2, 250)]
    await assert_counters_exact(api.pool)


async def test_uncapped_counts_are_exact_once_the_writer_commits(api: Api) -> None:
    """An uncapped dealer's counter moves at commit: inside the writing transaction it is
    not locked, and once committed it is right."""
    dist = await api.dealer("distributor")
    t = await api.tenant(dist["id"])
    async with api.pool.acquire() as writer, api.pool.acquire() as other:
        async with writer.transaction():
            await writer.execute(
                "INSERT INTO extensions (tenant_id, number, account_code, sip_password)"
                " VALUES ($1, '100', '300100', md5('x'))", t["id"])
            # another transaction may change the uncapped dealer rows meanwhile
            await other.execute("SET lock_timeout = '2s'")
            await other.execute("UPDATE dealers SET brand_name = 'Touched' WHERE id = ANY ($1)",
                                [dist["id"], api.dealer_id])
            await other.execute("RESET lock_timeout")
        assert (await counts(api, [dist["id"], api.dealer_id])) == [(1, 1), (1, 1)]
    await assert_counters_exact(api.pool)


async def test_a_cap_set_while_a_writer_is_open_still_holds(api: Api) -> None:
    """A writer that found the dealer uncapped meets the new cap when it commits."""
    dist = await api.dealer("distributor")
    t = await api.tenant(dist["id"])
    await api.extension(t["id"])
    async with api.pool.acquire() as writer:
        tx = writer.transaction()
        await tx.start()
        await writer.execute(
            "INSERT INTO extensions (tenant_id, number, account_code, sip_password)"
            " VALUES ($1, '101', '300101', md5('x'))", t["id"])
        capped = await api.patch(f"/api/v1/dealers/{dist['id']}", {"max_extensions": 1})
        assert capped.status == 200, capped
        with pytest.raises(asyncpg.CheckViolationError, match="dealer_extension_cap"):
            await tx.commit()
    assert await api.count("extensions") == 1
    await assert_counters_exact(api.pool)


async def test_deleting_a_tenant_and_its_extensions_settles_every_level(api: Api) -> None:
    dist = await api.dealer("distributor", max_extensions=100)
    res = await api.dealer("reseller", parent_id=dist["id"])
    t = await api.tenant(res["id"])
    api.ok(await api.post(bulk_path(t["id"]), {"first_number": "100", "count": 12}), 201)
    api.ok(await api.post(f"/api/v1/tenants/{t['id']}/cancel"))
    assert (await api.delete(f"/api/v1/tenants/{t['id']}")).status == 204
    assert (await counts(api, [dist["id"], res["id"], api.dealer_id])) == [(0, 0)] * 3
    await assert_counters_exact(api.pool)
