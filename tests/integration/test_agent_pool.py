"""The node agent's pool against the real PostgreSQL: its connections are warmed before a
call uses them (no type lookup, no function compiled on a call's path), the warming writes
and locks nothing, and it copes with a database not migrated yet."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from controlplane.calls.admission import Admission
from controlplane.db.pool import Warm, create_pool, migrate, warm_pool
from controlplane.settings import Settings
from controlplane.store import calls as store
from tests.api_helper import Api
from tests.integration.test_admission import request, setup
from tests.integration.test_admission_parties import did_of, inbound, internal

# asyncpg's lookup of a type it has not seen on this connection yet
TYPE_LOOKUP = "typeinfo_tree"


async def first_decisions(settings: Settings, api: Api, warm: Warm | None) -> list[str]:
    """The statements of a new connection's first three decisions (outbound, internal,
    inbound), parties read from the database."""
    node_id, dist, exts = await setup(api)
    did = await did_of(api, dist, exts[2])
    pool = await create_pool(settings.dsn, dataclasses.replace(settings, db_pool_min=1,
                                                               db_pool_max=1), warm=warm)
    statements: list[str] = []
    try:
        async with pool.acquire() as conn:
            conn.add_query_logger(lambda record: statements.append(record.query))
        admission = Admission(pool)
        for req in (request(node_id, exts[0], 1), internal(node_id, exts[0], exts[1], 2),
                    inbound(node_id, did["e164"], 3)):
            assert (await admission.decide(req)).admitted
    finally:
        await pool.close()
    return statements


async def test_a_warmed_connection_looks_up_no_type_on_a_calls_path(
        api: Api, db: asyncpg.Pool, settings: Settings):
    statements = await first_decisions(settings, api, store.warm)
    assert statements, "no statement recorded"
    assert not [s for s in statements if TYPE_LOOKUP in s], statements


async def test_a_connection_not_warmed_looks_up_types_on_its_first_call(
        api: Api, db: asyncpg.Pool, settings: Settings):
    """What warming saves: without it, the first call waits for the lookups."""
    statements = await first_decisions(settings, api, None)
    assert [s for s in statements if TYPE_LOOKUP in s], statements


async def test_warming_writes_nothing_and_locks_no_row(api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api)
    assert (await Admission(db).decide(request(node_id, exts[0], 1))).admitted
    async with db.acquire() as conn:
        before = await conn.fetch("SELECT * FROM calls ORDER BY id")
        async with conn.transaction():
            await store.warm(conn)
            # a row written or locked would have given the transaction an id
            assert await conn.fetchval("SELECT pg_current_xact_id_if_assigned()") is None
        assert await conn.fetch("SELECT * FROM calls ORDER BY id") == before
        assert await conn.fetchval("SELECT count(*) FROM cdrs") == 0


@pytest.fixture
async def empty_database(settings: Settings) -> AsyncIterator[str]:
    name = f"warm_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(settings.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        base, sep, query = settings.dsn.partition("?")
        yield f"{base.rsplit('/', 1)[0]}/{name}{sep}{query}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_an_agents_pool_opens_on_a_database_not_migrated_and_warms_after(
        empty_database: str, settings: Settings):
    warmed: list[int] = []

    async def warm(conn: asyncpg.Connection) -> None:
        await store.warm(conn)
        warmed.append(await conn.fetchval("SELECT pg_backend_pid()"))

    pool = await create_pool(empty_database, dataclasses.replace(
        settings, dsn=empty_database, db_pool_min=3, db_pool_max=3), warm=warm)
    try:
        assert warmed == []  # no schema yet: nothing to warm, and no failure
        async with pool.acquire() as conn:
            assert await migrate(conn)
        await warm_pool(pool, warm)
        assert len(set(warmed)) == 3  # each connection of the pool, once
    finally:
        await pool.close()


async def test_the_tables_every_call_writes_are_vacuumed_early_and_at_full_speed(db):
    rows = await db.fetch("SELECT relname, reloptions FROM pg_class WHERE relname = ANY ($1)",
                          ["calls", "call_counters", "credit_accounts"])
    options = {r["relname"]: set(r["reloptions"] or []) for r in rows}
    assert set(options) == {"calls", "call_counters", "credit_accounts"}
    for table, opts in options.items():
        assert {"autovacuum_vacuum_scale_factor=0", "autovacuum_vacuum_threshold=2000",
                "autovacuum_vacuum_cost_delay=0"} <= opts, table
    # the embedded server looks for work every 5 s, not once a minute
    if not os.environ.get("PBX_TEST_DSN"):
        assert await db.fetchval("SHOW autovacuum_naptime") == "5s"
