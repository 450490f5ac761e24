"""Credit accounts of extensions and tenants: balance, what calls in progress hold, what is
available, and top-ups (or debits). A tenant with shared credit pays for all its extensions'
calls from its own account; otherwise each extension pays from its own."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg
from aiohttp import web

from controlplane.api import fields as F
from controlplane.api.keys import POOL
from controlplane.api.problems import conflict
from controlplane.api.resource import (
    Resource,
    json_response,
    path_id,
    principal_of,
    read_json,
    validate,
)
from controlplane.api.resources.extensions import EXTENSIONS
from controlplane.api.resources.tenants import TENANTS
from controlplane.api.routes import RouteTable
from controlplane.store import audit

CREDIT_SCHEMA = F.Schema("account_credit", {
    "amount": F.money(required=True, description="added to the balance (negative debits)"),
    "description": F.text(200, min_len=0),
})
ACCOUNT_SQL = {
    "extension": (
        "SELECT a.id, coalesce(a.balance, 0) AS balance, coalesce(a.reserved, 0) AS reserved,"
        " e.billing_type::text AS billing_mode, e.credit_limit, t.shared_credit"
        " FROM extensions e JOIN tenants t ON t.id = e.tenant_id"
        " LEFT JOIN credit_accounts a ON a.extension_id = e.id WHERE e.id = $1"),
    "tenant": (
        "SELECT a.id, coalesce(a.balance, 0) AS balance, coalesce(a.reserved, 0) AS reserved,"
        " t.billing_mode::text AS billing_mode, t.credit_limit, t.shared_credit"
        " FROM tenants t LEFT JOIN credit_accounts a ON a.tenant_id = t.id"
        " AND a.extension_id IS NULL WHERE t.id = $1"),
}
ENSURE_SQL = {
    "extension": ("INSERT INTO credit_accounts (tenant_id, extension_id)"
                  " SELECT tenant_id, id FROM extensions WHERE id = $1"
                  " ON CONFLICT (extension_id) DO NOTHING"),
    "tenant": ("INSERT INTO credit_accounts (tenant_id) VALUES ($1)"
               " ON CONFLICT (tenant_id) WHERE extension_id IS NULL DO NOTHING"),
}
LOCK_SQL = {
    "extension": "SELECT id FROM credit_accounts WHERE extension_id = $1 FOR UPDATE",
    "tenant": ("SELECT id FROM credit_accounts WHERE tenant_id = $1 AND extension_id IS NULL"
               " FOR UPDATE"),
}


def floor_of(row: asyncpg.Record) -> Decimal:
    """How low the balance may go: 0 prepaid, minus the credit limit postpaid."""
    return -row["credit_limit"] if row["billing_mode"] == "postpaid" else Decimal(0)


def available(row: asyncpg.Record) -> Decimal:
    return row["balance"] - row["reserved"] - floor_of(row)


def present(kind: str, key: int, row: asyncpg.Record) -> dict[str, Any]:
    paid_by = "tenant" if kind == "extension" and row["shared_credit"] else kind
    return {"id": key, "balance": str(row["balance"]), "reserved": str(row["reserved"]),
            "available": str(max(available(row), Decimal(0))),
            "billing_mode": row["billing_mode"], "credit_limit": str(row["credit_limit"]),
            "floor": str(floor_of(row)), "calls_paid_by": paid_by}


def _owner(kind: str) -> Resource:
    return EXTENSIONS if kind == "extension" else TENANTS


def handlers(kind: str) -> tuple[Any, Any]:
    async def show(request: web.Request) -> web.Response:
        p, key = principal_of(request), path_id(request)
        async with request.app[POOL].acquire() as conn:
            await _owner(kind).require(conn, p, key)
            row = await conn.fetchrow(ACCOUNT_SQL[kind], key)
        return json_response(present(kind, key, row))

    async def add(request: web.Request) -> web.Response:
        p, key = principal_of(request), path_id(request)
        data = validate(CREDIT_SCHEMA, await read_json(request))
        async with request.app[POOL].acquire() as conn, conn.transaction():
            owner = await _owner(kind).require(conn, p, key)
            await conn.execute(ENSURE_SQL[kind], key)
            account = await conn.fetchval(LOCK_SQL[kind], key)
            row = await conn.fetchrow(ACCOUNT_SQL[kind], key)
            if data["amount"] < 0 and \
                    row["balance"] + data["amount"] - row["reserved"] < floor_of(row):
                # calls in progress hold `reserved`; a debit must leave it to them
                raise conflict(
                    f"a debit of {-data['amount']} would take the balance below its floor"
                    f" ({floor_of(row)}); at most {max(Decimal(0), available(row))} can be"
                    " debited now (calls in progress hold the reserved credit)", "/amount")
            before = present(kind, key, row)
            balance = await conn.fetchval(
                "UPDATE credit_accounts SET balance = balance + $2, updated_at = now()"
                " WHERE id = $1 RETURNING balance", account, data["amount"])
            await conn.execute(
                "INSERT INTO credit_movements (account_id, amount, balance, reason)"
                " VALUES ($1, $2, $3, $4)", account, data["amount"], balance,
                data.get("description") or "credit")
            after = present(kind, key, await conn.fetchrow(ACCOUNT_SQL[kind], key))
            await audit.record(conn, p, "credit", kind, key, owner["owner_path"], before,
                               {**after, "amount": str(data["amount"]),
                                "description": data.get("description", "")})
        return json_response(after)

    return show, add


def register(routes: RouteTable) -> None:
    for kind, base in (("extension", "/api/v1/extensions/{id}/credit"),
                       ("tenant", "/api/v1/tenants/{id}/credit")):
        show, add = handlers(kind)
        tag = f"{kind}s"
        routes.add("GET", base, show, f"The {kind}'s credit account", tag,
                   response={"type": "object"})
        routes.add("POST", base, add, f"Add credit to (or debit) the {kind}'s balance", tag,
                   body=CREDIT_SCHEMA, response={"type": "object"})
