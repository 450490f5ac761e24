"""Shared fixtures: a real PostgreSQL, the real application, and an API helper.

PostgreSQL is the embedded server (a fresh data directory per run) unless PBX_TEST_DSN
names another one, whose `public` schema the tests then own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from controlplane import bootstrap
from controlplane.api.app import build_app
from controlplane.db.embedded import EmbeddedPostgres
from controlplane.db.pool import create_pool, migrate
from controlplane.settings import Settings
from tests.api_helper import Api

TABLES = ("registrations", "audit_log", "oauth_tokens", "api_clients", "dids", "number_ranges",
          "extensions", "plans", "rates", "rate_tables", "tenants", "dealers", "nodes",
          "call_counters", "calls", "cdrs", "cdr_import_state", "credit_movements",
          "credit_accounts", "carriers")


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    if os.environ.get("PBX_TEST_DSN"):
        yield os.environ["PBX_TEST_DSN"]
        return
    base = Path(tempfile.mkdtemp(prefix="pbx-test-"))
    server = EmbeddedPostgres(base / "pg")
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("data"), dsn=pg_dsn, db_pool_max=8)


@pytest.fixture(scope="session")
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    conn = await asyncpg.connect(settings.dsn)
    await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    await migrate(conn)
    await conn.close()
    p = await create_pool(settings.dsn, settings)
    yield p
    await p.close()


@pytest.fixture
async def db(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    """An empty database (schema kept) for each test."""
    # Work a previous test left behind (a decision still being released, say) may hold a
    # table TRUNCATE wants while waiting for one it already took: PostgreSQL then ends one
    # of the two; TRUNCATE tries again once that work is done.
    for attempt in range(5):
        try:
            async with pool.acquire() as conn:
                await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
            break
        except asyncpg.DeadlockDetectedError:
            if attempt == 4:
                raise
            await asyncio.sleep(0.2)
    yield pool


@pytest.fixture
async def client(db: asyncpg.Pool, settings: Settings) -> AsyncIterator[TestClient]:
    server = TestServer(build_app(settings, db), host="127.0.0.1")
    async with TestClient(server) as c:
        yield c


@pytest.fixture
async def api(client: TestClient, db: asyncpg.Pool) -> Api:
    """Logged in as the platform operator."""
    async with db.acquire() as conn:
        creds = await bootstrap.ensure_operator(conn)
    helper = Api(client, db)
    await helper.login(creds["login"], creds["password"], creds["client_id"],
                       creds["client_secret"])
    return helper
