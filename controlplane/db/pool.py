"""asyncpg pool creation, versioned migrations, and the database a process should use."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from importlib import resources
from pathlib import Path

import asyncpg

from controlplane.db.embedded import EmbeddedPostgres
from controlplane.settings import Settings
from controlplane.store.sql import json_default

log = logging.getLogger(__name__)

Warm = Callable[[asyncpg.Connection], Awaitable[None]]
# PostgreSQL's states for an object that does not exist (yet: before the migrations)
_NOT_MIGRATED = ("42883", "42P01", "42704")

MIGRATIONS_PACKAGE = "controlplane.db"
# Any constant works: it only has to be the same for every process migrating this database.
MIGRATION_LOCK_KEY = 7_140_001


class DatabaseUnavailable(RuntimeError):
    """PostgreSQL could not be reached or answered too slowly."""


def resolve_dsn(settings: Settings) -> str:
    """The configured DSN, or one to an embedded PostgreSQL under the data directory."""
    if settings.dsn:
        return settings.dsn
    return EmbeddedPostgres(settings.postgres_dir).start()


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=lambda v: json.dumps(v, default=json_default), decoder=json.loads,
        schema="pg_catalog",
    )


async def _release_connection(conn: asyncpg.Connection) -> None:
    """What the pool does to a connection coming back, after asyncpg itself has rolled back
    a transaction left open and dropped the connection's Python listeners: nothing more.

    asyncpg's default sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL` on every release, a round trip costing as much as the request's own query.
    The service leaves no session state behind on pooled connections: it sets no session
    variables (only `SET LOCAL`, which ends with the transaction), holds cursors only inside
    transactions, creates temporary tables `ON COMMIT DROP`, releases the one session
    advisory lock it takes (`migrate`) itself, and LISTENs on dedicated connections or
    UNLISTENs before giving a connection back (`controlplane.api.oauth`).
    """
    return None


async def _init_warm_connection(warm: Warm, conn: asyncpg.Connection) -> None:
    await _init_connection(conn)
    try:
        await warm(conn)
    except asyncpg.PostgresError as exc:
        if getattr(exc, "sqlstate", None) not in _NOT_MIGRATED:
            raise
        # a database not migrated yet: warm_pool warms the connections after the migrations


async def create_pool(dsn: str, settings: Settings, *, warm: Warm | None = None
                      ) -> asyncpg.Pool:
    """The pool of a process. `warm`, for a pool on the calls' path (the node agent): run on
    every new connection before its first use, and connections are then kept for the
    process's life, not closed after 300 s idle or 50,000 queries (asyncpg's defaults), so
    that no call waits for a connection to be opened and warmed again."""
    extra: dict[str, object] = {}
    if warm is not None:
        extra = {"max_inactive_connection_lifetime": 0, "max_queries": 2**62}
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            timeout=settings.db_timeout,
            command_timeout=settings.db_timeout,
            init=_init_connection if warm is None else functools.partial(
                _init_warm_connection, warm),
            reset=_release_connection,
            **extra,
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL ({exc}); check PBX_DSN or the embedded server"
        ) from exc
    assert pool is not None
    return pool


async def warm_pool(pool: asyncpg.Pool, warm: Warm) -> None:
    """Warm every connection the pool can open, holding them all at once so that each is
    another one (the pool hands out the connection released last)."""
    async with AsyncExitStack() as stack:
        for _ in range(pool.get_max_size()):
            conn = await stack.enter_async_context(pool.acquire())
            await warm(conn)


def migration_files() -> list[tuple[str, str]]:
    """(version, sql) for every migration shipped with the package, in order."""
    folder = resources.files(MIGRATIONS_PACKAGE) / "migrations"
    found = sorted(
        (Path(str(item)).name, item.read_text("utf-8"))
        for item in folder.iterdir()
        if str(item).endswith(".sql")
    )
    return [(name.removesuffix(".sql"), sql) for name, sql in found]


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply the migrations this database lacks, each in its own transaction. Returns them."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            log.info("applied migration %s", version)
            applied_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now
