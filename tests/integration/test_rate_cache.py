"""The agent's copy of rate tables (controlplane.rating.cache) on a real PostgreSQL: it
answers exactly as the database lookup does, and a change of the table's rates is seen by
the very next call."""

import asyncio

from controlplane.rating.cache import RateCache
from controlplane.rating.store import find_rate
from tests.integration.test_rates_api import HEADER, rate_table, upload

CLASSES = (None, "local", "national", "international", "mobile_vc1", "mobile_vc2",
           "mobile_vc3")
TABLE = (HEADER.replace("\n", ";call_class\n")
         + "55;Brasil;0,20;0;30;6;3;\n"
         + "55;VC2;0,50;0;30;6;3;mobile_vc2\n"
         + "5511;São Paulo fixo;0,05;0;30;6;3;\n"
         + "5511;SP VC3;0,90;0;30;6;3;mobile_vc3\n"
         + "551199;São Paulo móvel;0,35;0,01;30;6;3;\n"
         + "551199;SP móvel VC1;0,30;0;30;6;3;mobile_vc1\n"
         + "1;EUA;0,40;0;6;6;0;international\n")
NUMBERS = ("+5511998765432", "+5511987654321", "+552133334444", "+12125551234", "+5511",
           "+4930123456", "+551199")


async def version(conn, table_id: int) -> int:
    return await conn.fetchval("SELECT rates_version FROM rate_tables WHERE id = $1", table_id)


async def loaded(cache: RateCache, table_id: int, at: int) -> None:
    for _ in range(200):
        table = cache._tables.get(table_id)
        if table is not None and table.version == at:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"table {table_id} not cached at version {at}")


async def test_the_copy_answers_as_the_database_does_and_follows_every_import(api, db):
    t = await rate_table(api)
    api.ok(await upload(api, t["id"], TABLE))
    cache = RateCache(db)
    async with db.acquire() as conn:
        v1 = await version(conn, t["id"])
        # the first look-up asks the database and reads the table behind it
        assert (await cache.find(conn, t["id"], v1, "+5511998765432", "mobile_vc1")).prefix \
            == "551199"
        await loaded(cache, t["id"], v1)
        hits = cache.hits
        for number in NUMBERS:
            for call_class in CLASSES:
                mine = await cache.find(conn, t["id"], v1, number, call_class)
                theirs = await find_rate(conn, t["id"], number, call_class)
                assert mine == theirs, (number, call_class)
        assert cache.hits == hits + len(NUMBERS) * len(CLASSES)

        # a merge changes one rate: the version moves, and the old copy is not used
        api.ok(await upload(api, t["id"], HEADER + "5511;SP fixo novo;0,07;0;30;6;3\n",
                            mode="merge"))
        v2 = await version(conn, t["id"])
        assert v2 > v1
        rate = await cache.find(conn, t["id"], v2, "+551133334444", "local")
        assert rate.description == "SP fixo novo" and str(rate.price_per_minute) == "0.070000"
        await loaded(cache, t["id"], v2)
        assert (await cache.find(conn, t["id"], v2, "+551133334444", "local")).description \
            == "SP fixo novo"

        # a replace that drops a prefix: gone from the copy too
        api.ok(await upload(api, t["id"], HEADER + "55;Brasil;0,25;0;30;6;3\n"))
        v3 = await version(conn, t["id"])
        assert v3 > v2
        await cache.find(conn, t["id"], v3, "+551133334444", "local")
        await loaded(cache, t["id"], v3)
        rate = await cache.find(conn, t["id"], v3, "+551133334444", "local")
        assert (rate.prefix, str(rate.price_per_minute)) == ("55", "0.250000")
        assert await cache.find(conn, t["id"], v3, "+12125551234", "international") is None


async def test_a_table_larger_than_the_budget_stays_in_the_database(api, db):
    t = await rate_table(api)
    api.ok(await upload(api, t["id"], TABLE))
    cache = RateCache(db, max_rates=3)
    async with db.acquire() as conn:
        v = await version(conn, t["id"])
        for _ in range(3):
            rate = await cache.find(conn, t["id"], v, "+5511998765432", None)
            assert rate.prefix == "551199"
            await asyncio.sleep(0.05)
    assert t["id"] not in cache._tables and cache.hits == 0 and cache.misses == 3
