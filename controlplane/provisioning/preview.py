"""The text an operator inspects: what a tenant looks like on its node (secrets masked)."""

from __future__ import annotations

import asyncpg

from controlplane.provisioning.desired import REGISTRATION_ADDRESS
from controlplane.provisioning.render import (
    ExtensionState,
    TenantState,
    render_tenant_dialplan,
    transport_name,
)

SQL = f"""
SELECT e.account_code, e.tenant_id, e.number, e.name, e.sip_password, e.max_calls, e.active,
       {REGISTRATION_ADDRESS} AS registration_address
  FROM extensions e JOIN tenants t ON t.id = e.tenant_id JOIN dealers d ON d.id = t.dealer_id
 WHERE e.tenant_id = $1 ORDER BY e.number
"""


async def render_tenant(conn: asyncpg.Connection, tenant_id: int) -> str | None:
    tenant = await conn.fetchrow("SELECT id, name, status::text AS status, node_id FROM tenants"
                                 " WHERE id = $1", tenant_id)
    if tenant is None:
        return None
    parts = [f"; tenant {tenant['id']} on node {tenant['node_id']}, status {tenant['status']}",
             f"; --- dialplan (file tenants/extensions/t{tenant_id}.conf) ---",
             render_tenant_dialplan(TenantState(tenant["id"], tenant["name"])),
             "; --- PJSIP objects (pushed through ARI into the node's astdb) ---"]
    for row in await conn.fetch(SQL, tenant_id):
        addr = row["registration_address"]
        state = ExtensionState(row["account_code"], row["tenant_id"], row["number"], row["name"],
                               row["sip_password"], row["max_calls"],
                               f"{transport_name(addr)}-udp" if addr else None)
        if not row["active"] or tenant["status"] != "active":
            parts.append(f"; extension {row['number']} ({row['account_code']}) is inactive: "
                         "not on the node")
            continue
        parts.append(state.render())
        parts.append(f"; astdb pbx-ext/{row['tenant_id']}/{row['number']} = "
                     f"{row['account_code']}\n")
    return "\n".join(parts)
