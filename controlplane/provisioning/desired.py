"""The desired state of a node, read from PostgreSQL (the one source of truth)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from controlplane.provisioning.render import ExtensionState, TenantState, transport_name

# The registration address a tenant's phones use: its dealer's, or the nearest ancestor's.
REGISTRATION_ADDRESS = """
(SELECT a.registration_address FROM dealers a
  WHERE a.id = ANY (d.path) AND a.registration_address IS NOT NULL
  ORDER BY array_position(d.path, a.id) DESC LIMIT 1)
"""

EXTENSIONS_SQL = f"""
SELECT e.account_code, e.tenant_id, e.number, e.name, e.sip_password, e.max_calls,
       {REGISTRATION_ADDRESS} AS registration_address
  FROM extensions e JOIN tenants t ON t.id = e.tenant_id JOIN dealers d ON d.id = t.dealer_id
 WHERE t.node_id = $1 AND e.active AND t.status = 'active'
"""

# bpchar[], as the column is char(6): against text[] the column is cast, and its unique index
# cannot serve the look-up (each one scanned all of the node's extensions).
EXTENSIONS_BY_CODE_SQL = EXTENSIONS_SQL + " AND e.account_code = ANY ($2::bpchar[])"


@dataclass(frozen=True)
class NodeRecord:
    id: int
    name: str
    sip_address: str
    ami_host: str
    ami_port: int
    ami_username: str
    ami_secret: str
    ari_url: str
    ari_username: str
    ari_password: str


async def load_node(conn: asyncpg.Connection, name: str) -> NodeRecord | None:
    row = await conn.fetchrow(
        "SELECT id, name, sip_address, ami_host, ami_port, ami_username, ami_secret, ari_url,"
        " ari_username, ari_password FROM nodes WHERE name = $1", name)
    return NodeRecord(**dict(row)) if row else None


def _state(row: asyncpg.Record, transports: set[str]) -> ExtensionState:
    addr = row["registration_address"]
    transport = f"{transport_name(addr)}-udp" if addr and transport_name(addr) in transports \
        else None
    return ExtensionState(account_code=row["account_code"], tenant_id=row["tenant_id"],
                          number=row["number"], name=row["name"],
                          sip_password=row["sip_password"], max_calls=row["max_calls"],
                          transport=transport)


async def extensions(conn: asyncpg.Connection, node_id: int, transports: set[str],
                     account_codes: Iterable[str] | None = None) -> dict[str, ExtensionState]:
    """Active extensions of active tenants on the node (optionally only these codes)."""
    if account_codes is None:
        rows = await conn.fetch(EXTENSIONS_SQL, node_id)
    else:
        rows = await conn.fetch(EXTENSIONS_BY_CODE_SQL,
                                node_id, list(account_codes))
    return {r["account_code"]: _state(r, transports) for r in rows}


async def tenants(conn: asyncpg.Connection, node_id: int) -> dict[int, TenantState]:
    """Tenants whose dialplan the node carries (all but cancelled ones)."""
    rows = await conn.fetch("SELECT id, name FROM tenants WHERE node_id = $1"
                            " AND status <> 'cancelled'", node_id)
    return {r["id"]: TenantState(r["id"], r["name"]) for r in rows}


async def registration_addresses(conn: asyncpg.Connection, node_id: int) -> list[str]:
    rows = await conn.fetch("SELECT DISTINCT registration_address FROM dealers"
                            " WHERE node_id = $1 AND registration_address IS NOT NULL", node_id)
    return [r["registration_address"] for r in rows]
