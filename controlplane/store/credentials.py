"""API clients (client id + secret bound to source networks) and OAuth2 tokens."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from controlplane.store.sql import dealer_chain_active

PRINCIPAL_SQL = f"""
SELECT tk.dealer_id, tk.acting_as_id, c.client_id, s.id AS scope_id, s.level::text AS level,
       s.path, ($2::inet <<= ANY (c.allowed_cidrs)) AS source_allowed, tk.expires_at
  FROM oauth_tokens tk
  JOIN api_clients c ON c.id = tk.client_pk
  JOIN dealers s ON s.id = COALESCE(tk.acting_as_id, tk.dealer_id)
 WHERE tk.access_hash = $1 AND tk.revoked_at IS NULL AND c.revoked_at IS NULL
   AND tk.expires_at > now()
   AND {dealer_chain_active("s")}
"""


async def principal_for_token(conn: asyncpg.Connection, access_hash: bytes,
                              source_ip: str) -> asyncpg.Record | None:
    return await conn.fetchrow(PRINCIPAL_SQL, access_hash, source_ip)


async def client_for_grant(conn: asyncpg.Connection, client_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT c.*, d.login, d.password_hash,"
        f" {dealer_chain_active('d')} AS dealer_active"
        " FROM api_clients c JOIN dealers d ON d.id = c.dealer_id"
        " WHERE c.client_id = $1 AND c.revoked_at IS NULL",
        client_id,
    )


async def source_allowed(conn: asyncpg.Connection, client_pk: int, source_ip: str) -> bool:
    return bool(await conn.fetchval(
        "SELECT $2::inet <<= ANY (allowed_cidrs) FROM api_clients WHERE id = $1",
        client_pk, source_ip))


async def issue(conn: asyncpg.Connection, *, access_hash: bytes, refresh_hash: bytes | None,
                client_pk: int, dealer_id: int, acting_as_id: int | None, scope: str,
                expires_at: datetime, refresh_expires_at: datetime | None) -> None:
    await conn.execute(
        "INSERT INTO oauth_tokens (access_hash, refresh_hash, client_pk, dealer_id,"
        " acting_as_id, scope, expires_at, refresh_expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        access_hash, refresh_hash, client_pk, dealer_id, acting_as_id, scope, expires_at,
        refresh_expires_at,
    )


async def take_refresh(conn: asyncpg.Connection, refresh_hash: bytes,
                       client_pk: int) -> asyncpg.Record | None:
    """Revoke a live refresh token of this client and return it (rotation: used once)."""
    return await conn.fetchrow(
        "UPDATE oauth_tokens SET revoked_at = now()"
        " WHERE refresh_hash = $1 AND client_pk = $2 AND revoked_at IS NULL"
        "   AND refresh_expires_at > now()"
        " RETURNING dealer_id, scope",
        refresh_hash, client_pk,
    )


async def revoke_token(conn: asyncpg.Connection, token_hash: bytes, client_pk: int) -> None:
    await conn.execute(
        "UPDATE oauth_tokens SET revoked_at = now()"
        " WHERE (access_hash = $1 OR refresh_hash = $1) AND client_pk = $2"
        "   AND revoked_at IS NULL", token_hash, client_pk)


async def create_client(conn: asyncpg.Connection, *, client_id: str, secret_hash: str,
                        dealer_id: int, name: str, email: str,
                        allowed_cidrs: list[str]) -> asyncpg.Record:
    return await conn.fetchrow(
        "INSERT INTO api_clients (client_id, secret_hash, dealer_id, name, email, allowed_cidrs)"
        " VALUES ($1, $2, $3, $4, $5, $6::cidr[]) RETURNING " + CLIENT_COLUMNS,
        client_id, secret_hash, dealer_id, name, email, allowed_cidrs,
    )


CLIENT_COLUMNS = ("client_id, dealer_id, name, email, allowed_cidrs::text[] AS allowed_cidrs,"
                  " revoked_at, created_at")


async def list_clients(conn: asyncpg.Connection, dealer_id: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {CLIENT_COLUMNS} FROM api_clients WHERE dealer_id = $1 ORDER BY id", dealer_id)
    return [dict(r) for r in rows]


async def revoke_client(conn: asyncpg.Connection, dealer_id: int,
                        client_id: str) -> asyncpg.Record | None:
    row = await conn.fetchrow(
        "UPDATE api_clients SET revoked_at = COALESCE(revoked_at, now())"
        f" WHERE dealer_id = $1 AND client_id = $2 RETURNING id, {CLIENT_COLUMNS}",
        dealer_id, client_id)
    if row is not None:
        await conn.execute(
            "UPDATE oauth_tokens SET revoked_at = now() WHERE client_pk = $1"
            " AND revoked_at IS NULL", row["id"])
    return row


async def revoke_dealer_tokens(conn: asyncpg.Connection, dealer_id: int) -> None:
    """Password change: every token issued to the dealer stops working."""
    await conn.execute(
        "UPDATE oauth_tokens SET revoked_at = now()"
        " WHERE (dealer_id = $1 OR acting_as_id = $1) AND revoked_at IS NULL", dealer_id)
