"""Parties kept between calls, against the real PostgreSQL: a decision from kept parties is one
statement, and a kept party that changed never decides a call: the admission notices, writes
nothing, and the call is decided again from what the database says now."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest

from controlplane.calls.admission import Admission, CallRequest, PartyCache, rate_from_json
from controlplane.db.pool import create_pool
from controlplane.settings import Settings
from controlplane.store import calls as calls_store
from tests.api_helper import Api
from tests.integration.test_admission import request, setup


@pytest.fixture
async def one_connection(db: asyncpg.Pool, settings: Settings
                         ) -> AsyncIterator[tuple[asyncpg.Pool, list[str]]]:
    """A pool of one connection whose statements are recorded."""
    pool = await create_pool(settings.dsn, dataclasses.replace(settings, db_pool_min=1,
                                                               db_pool_max=1))
    statements: list[str] = []
    async with pool.acquire() as conn:
        conn.add_query_logger(lambda record: statements.append(record.query))
    yield pool, statements
    await pool.close()


async def settle_rates(admission: Admission) -> None:
    """Let the rate tables the first decisions asked for finish loading."""
    for _ in range(100):
        if not admission.rates._loading:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the rate table never finished loading")


def inbound(node_id: int, e164: str, n: int) -> CallRequest:
    return CallRequest(node_id=node_id, direction="inbound", dialled=e164, caller="carrier",
                       caller_number="551199998888", tenant_id=None,
                       channel=f"in-{n}-{uuid.uuid4()}", channel_name=f"PJSIP/carrier-{n:08x}")


async def did_of(api: Api, dealer: dict, ext: dict) -> dict:
    """A DID of `dealer`'s that rings `ext`."""
    rng = api.ok(await api.post("/api/v1/number-ranges", {
        "dealer_id": dealer["id"], "name": "DIDs", "country_code": "55", "area_code": "11",
        "first_number": 30000000, "last_number": 30000099}), 201)
    return api.ok(await api.post("/api/v1/dids", {
        "range_id": rng["id"], "local_number": 30000042, "extension_id": ext["id"]}), 201)


def internal(node_id: int, ext: dict, callee: dict, n: int) -> CallRequest:
    return dataclasses.replace(request(node_id, ext, n), direction="internal",
                               dialled=callee["number"])


async def test_a_decision_from_kept_parties_is_one_statement(
        api: Api, one_connection: tuple[asyncpg.Pool, list[str]]):
    pool, statements = one_connection
    node_id, dist, exts = await setup(api)
    did = await did_of(api, dist, exts[2])
    admission = Admission(pool)
    cold = [request(node_id, exts[0], 1), internal(node_id, exts[0], exts[1], 2),
            inbound(node_id, did["e164"], 3)]
    for req in cold:
        assert (await admission.decide(req)).admitted
    await settle_rates(admission)
    statements.clear()

    warm = [request(node_id, exts[0], 4), internal(node_id, exts[0], exts[1], 5),
            inbound(node_id, did["e164"], 6)]
    decisions = [await admission.decide(req) for req in warm]

    assert [d.admitted for d in decisions] == [True, True, True]
    assert decisions[1].target == exts[1]["account_code"]
    assert decisions[2].target == exts[2]["account_code"]
    assert len(statements) == 3, statements
    assert all(s.startswith("CALL admit_call_checked") for s in statements), statements
    assert admission.parties.stale == 0
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM calls") == 6


async def test_a_kept_party_that_changed_is_read_again_before_the_call_is_decided(
        api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api)
    caller = exts[0]
    admission = Admission(db)
    assert (await admission.decide(request(node_id, caller, 1))).admitted

    # deactivated: the kept copy says active, the admission finds it changed
    api.ok(await api.patch(f"/api/v1/extensions/{caller['id']}", {"active": False}))
    refused = await admission.decide(request(node_id, caller, 2))
    assert (refused.admitted, refused.reason) == (False, "caller_inactive")
    assert admission.parties.stale == 1

    # active again: the kept copy (inactive) refuses, the fresh read admits
    api.ok(await api.patch(f"/api/v1/extensions/{caller['id']}", {"active": True}))
    assert (await admission.decide(request(node_id, caller, 3))).admitted
    assert admission.parties.stale == 2

    # the tenant suspended
    api.ok(await api.patch(f"/api/v1/tenants/{caller['tenant_id']}", {"status": "suspended"}))
    refused = await admission.decide(request(node_id, caller, 4))
    assert (refused.admitted, refused.reason) == (False, "caller_tenant_suspended")
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM calls") == 2


async def test_new_rates_price_the_very_next_call_of_a_kept_caller(api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api)
    admission = Admission(db)
    first = await admission.decide(request(node_id, exts[0], 1))
    await settle_rates(admission)
    async with db.acquire() as conn:
        table_id = await conn.fetchval("SELECT id FROM rate_tables")
    csv = ("prefix;description;price_per_minute;connection_fee;first_increment;"
           "next_increment;free_seconds\n55;Brazil;9.00;0;6;6;0\n")
    api.ok(await api.call("POST", f"/api/v1/rate-tables/{table_id}/import", raw=csv.encode(),
                          content_type="text/csv"))

    second = await admission.decide(request(node_id, exts[0], 2))

    assert first.admitted and second.admitted
    async with db.acquire() as conn:
        prices = {r["id"]: rate_from_json(r["rate"]).price_per_minute  # type: ignore[union-attr]
                  for r in await conn.fetch("SELECT id, rate FROM calls")}
    assert prices == {first.call_id: Decimal("6.00"), second.call_id: Decimal("9.00")}


async def test_a_did_given_to_another_extension_rings_the_new_one_at_once(
        api: Api, db: asyncpg.Pool):
    node_id, dist, exts = await setup(api)
    did = await did_of(api, dist, exts[2])
    admission = Admission(db)
    assert (await admission.decide(inbound(node_id, did["e164"], 1))).target == \
        exts[2]["account_code"]

    api.ok(await api.patch(f"/api/v1/dids/{did['id']}", {"extension_id": exts[3]["id"]}))
    moved = await admission.decide(inbound(node_id, did["e164"], 2))

    assert moved.admitted and moved.target == exts[3]["account_code"]
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT extension_id FROM calls WHERE id = $1",
                                   moved.call_id) == exts[3]["id"]


async def test_refusals_by_the_admission_itself_are_not_tried_twice(
        api: Api, one_connection: tuple[asyncpg.Pool, list[str]]):
    """A full cap or an empty balance is the database's answer after it checked the kept
    parties: the call is not decided again."""
    pool, statements = one_connection
    node_id, _, exts = await setup(api, credit="0.00")
    admission = Admission(pool)
    assert (await admission.decide(request(node_id, exts[0], 1))).reason == "no_credit"
    await settle_rates(admission)
    statements.clear()

    refused = await admission.decide(request(node_id, exts[0], 2))

    assert (refused.admitted, refused.sip_code, refused.reason) == (False, 402, "no_credit")
    assert len(statements) == 1 and admission.parties.stale == 0, statements


def test_the_kept_parties_are_bounded_and_the_least_recently_used_leave_first():
    cache = PartyCache(max_size=3)
    for n in range(3):
        cache.put(("account", str(n), None), {"facts": str(n)})  # type: ignore[arg-type]
    assert cache.get(("account", "0", None)) is not None  # now the most recent
    cache.put(("account", "3", None), {"facts": "3"})  # type: ignore[arg-type]
    assert len(cache) == 3
    assert cache.get(("account", "1", None)) is None
    assert [cache.get(("account", k, None)) is not None for k in "023"] == [True] * 3
    cache.put(("account", "0", None), None)  # no such party any more
    assert cache.get(("account", "0", None)) is None and len(cache) == 2



async def test_a_party_changed_between_its_read_and_the_admission_never_decides_the_call(
        api: Api, db: asyncpg.Pool, monkeypatch):
    """Read afresh (nothing kept), the caller is deactivated before the admission runs: the
    admission notices, writes nothing, and the call is decided from the new state."""
    node_id, _, exts = await setup(api)
    caller = exts[0]
    read = calls_store.party
    changed = []

    async def read_then_deactivate(conn, kind, key, tenant_id=None):
        party = await read(conn, kind, key, tenant_id)
        if not changed:
            changed.append(key)
            await api.patch(f"/api/v1/extensions/{caller['id']}", {"active": False})
        return party

    monkeypatch.setattr(calls_store, "party", read_then_deactivate)
    refused = await Admission(db).decide(request(node_id, caller, 1))
    assert changed == [caller["account_code"]]
    assert (refused.admitted, refused.reason) == (False, "caller_inactive")
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM calls") == 0


async def test_deactivating_a_distributor_stops_the_calls_of_its_whole_subtree(
        api: Api, db: asyncpg.Pool):
    node_id, dist, exts = await setup(api)
    admission = Admission(db)
    assert (await admission.decide(request(node_id, exts[0], 1))).admitted
    api.ok(await api.patch(f"/api/v1/dealers/{dist['id']}", {"active": False}))
    for n, ext in enumerate(exts[:2], 2):  # a kept caller and one read afresh
        refused = await admission.decide(request(node_id, ext, n))
        assert (refused.admitted, refused.sip_code, refused.reason) == (
            False, 403, "caller_dealer_inactive")
    api.ok(await api.patch(f"/api/v1/dealers/{dist['id']}", {"active": True}))
    assert (await admission.decide(request(node_id, exts[0], 4))).admitted
