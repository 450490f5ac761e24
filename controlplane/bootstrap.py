"""First start: the operator account, its API credentials, and an optional demo dealer."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import asyncpg

from controlplane.secrets import digest, hash_password, new_sip_password, new_token

LOOPBACK = ["127.0.0.0/8", "::1/128"]


async def ensure_operator(conn: asyncpg.Connection, login: str = "operator") -> dict[str, Any]:
    """Create the operator (tree root) with loopback-only API credentials if it is missing.

    Returns the new credentials, or {} when the operator already existed (its secrets are
    hashed and cannot be shown again)."""
    async with conn.transaction():
        if await conn.fetchval("SELECT 1 FROM dealers WHERE level = 'operator'"):
            return {}
        password = secrets.token_urlsafe(18)
        op_id = await conn.fetchval(
            "INSERT INTO dealers (level, name, login, password_hash)"
            " VALUES ('operator', 'Platform operator', $1, $2) RETURNING id",
            login, await hash_password(password))
        client = await _api_client(conn, op_id, "operator console")
    return {"login": login, "password": password, **client}


async def _api_client(conn: asyncpg.Connection, dealer_id: int, name: str) -> dict[str, str]:
    client_id, secret = new_token(12), new_token(30)
    await conn.execute(
        "INSERT INTO api_clients (client_id, secret_hash, dealer_id, name, allowed_cidrs)"
        " VALUES ($1, $2, $3, $4, $5::cidr[])",
        client_id, digest(secret).hex(), dealer_id, name, LOOPBACK)
    return {"client_id": client_id, "client_secret": secret}


async def ensure_demo(conn: asyncpg.Connection, registration_address: str = "127.0.0.10",
                      node_id: int | None = None) -> dict[str, Any]:
    """A distributor > reseller with one tenant and two extensions, for a first look."""
    async with conn.transaction():
        if await conn.fetchval("SELECT 1 FROM dealers WHERE login = 'demo-reseller'"):
            return {}
        op = await conn.fetchrow("SELECT id, node_id FROM dealers WHERE level = 'operator'")
        dist = await conn.fetchval(
            "INSERT INTO dealers (parent_id, level, name, login, password_hash, max_tenants,"
            " max_extensions, max_calls, node_id) VALUES ($1, 'distributor',"
            " 'Demo Distribution', 'demo-distributor', $2, 100, 1000, 200, $3) RETURNING id",
            op["id"], await hash_password(secrets.token_urlsafe(18)), node_id)
        password = secrets.token_urlsafe(18)
        reseller = await conn.fetchval(
            "INSERT INTO dealers (parent_id, level, name, login, password_hash, brand_name,"
            " portal_domain, registration_address, max_tenants, max_extensions, max_calls)"
            " VALUES ($1, 'reseller', 'Demo Telecom', 'demo-reseller', $2, 'Demo Telecom',"
            " 'pbx.demo.test', $3, 10, 100, 20) RETURNING id",
            dist, await hash_password(password), registration_address)
        client = await _api_client(conn, reseller, "demo reseller")
        tenant = await conn.fetchrow(
            "INSERT INTO tenants (dealer_id, name, external_ref, sip_domain, internal)"
            " VALUES ($1, 'Demo PBX', 'DEMO-1', 'demo.pbx.demo.test', true)"
            " RETURNING id, sip_domain", reseller)
        phones = []
        for number, code in (("1001", "900001"), ("1002", "900002")):
            pw = new_sip_password()
            await conn.execute(
                "INSERT INTO extensions (tenant_id, number, name, account_code, sip_password)"
                " VALUES ($1, $2, $3, $4, $5)", tenant["id"], number, f"Phone {number}", code, pw)
            phones.append({"extension": number, "username": code, "password": pw,
                           "registrar": registration_address, "domain": tenant["sip_domain"]})
    return {"reseller": {"login": "demo-reseller", "password": password, **client},
            "tenant": tenant["sip_domain"], "phones": phones}


def save_credentials(path: Path, data: dict[str, Any]) -> None:
    """Keep first-start credentials for the developer (0600); they exist nowhere else."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
