"""Extensions ("ramais"): SIP accounts of a tenant with their limits and permissions."""

from __future__ import annotations

import secrets
from decimal import Decimal
from typing import Any

import asyncpg
from aiohttp import web

from controlplane.api import fields as F
from controlplane.api.keys import POOL
from controlplane.api.problems import conflict, invalid
from controlplane.api.resource import (
    Resource,
    bool_filter,
    int_filter,
    json_response,
    path_id,
    principal_of,
    register_crud,
    subtree_filter,
    text_filter,
)
from controlplane.api.routes import RouteTable
from controlplane.model.principal import Principal
from controlplane.secrets import new_sip_password
from controlplane.store import audit

SIP_PASSWORD = r"^[A-Za-z0-9._~@%^*+=!-]{12,64}$"

EXTENSION_FIELDS = {
    "tenant_id": F.reference("tenant the extension belongs to", required=True),
    "number": F.pattern(r"^[0-9]{2,8}$", "2 to 8 digits", max_len=8, required=True),
    "name": F.text(100, min_len=0, description="display name"),
    "account_code": F.pattern(r"^[0-9]{6}$", "6 digits", max_len=6,
                              description="platform-unique; generated when not given"),
    "sip_password": F.pattern(SIP_PASSWORD, "12 to 64 letters, digits or . _ ~ @ % ^ * + = ! -",
                              write_only=True, description="generated strong when not given"),
    "active": F.boolean(),
    "max_calls": F.integer(nullable=True, description="cap on simultaneous calls"),
    "callerid_enabled": F.boolean("present the caller ID (BINA)"),
    "callerid_number": F.pattern(r"^\+?[0-9]{2,20}$", "a phone number", max_len=21,
                                 nullable=True),
    "billing_type": F.choice(("prepaid", "postpaid")),
    "credit_limit": F.money(Decimal(0)),
    "plan_id": F.reference("calling plan", nullable=True),
    "intl_plan_id": F.reference("international calling plan", nullable=True),
    "invoice_day": F.integer(1, 28, description="day of the month the invoice closes"),
    "allow_local": F.boolean("local calls (LC)"),
    "allow_national": F.boolean("national long distance (LDN)"),
    "allow_international": F.boolean("international (LDI)"),
    "allow_vc1": F.boolean("mobile VC1"),
    "allow_vc2": F.boolean("mobile VC2"),
    "allow_vc3": F.boolean("mobile VC3"),
}


class Extensions(Resource):
    name = "extensions"
    entity = "extension"
    table = "extensions"
    alias = "e"
    tag = "extensions"
    select_sql = ("SELECT e.id, e.tenant_id, e.number, e.name, e.account_code, e.sip_password,"
                  " e.active, e.max_calls, e.callerid_enabled, e.callerid_number,"
                  " e.billing_type, e.credit_limit::text AS credit_limit, e.plan_id,"
                  " e.intl_plan_id, e.invoice_day, e.allow_local, e.allow_national,"
                  " e.allow_international, e.allow_vc1, e.allow_vc2, e.allow_vc3, e.created_at,"
                  " e.updated_at, t.dealer_id,"
                  " d.path AS owner_path"
                  " FROM extensions e JOIN tenants t ON t.id = e.tenant_id"
                  " JOIN dealers d ON d.id = t.dealer_id WHERE d.path @> ARRAY[$1]::bigint[]")
    create_schema = F.Schema("extension_create", EXTENSION_FIELDS)
    update_schema = F.Schema("extension_update", EXTENSION_FIELDS).without("tenant_id")
    filters = (
        int_filter("tenant_id", "e.tenant_id = ${}", "extensions of this tenant"),
        subtree_filter("d.path"),
        bool_filter("active", "e.active = ${}", "active or not"),
        text_filter("number", "e.number = ${}", "exact extension number", max_len=8),
        text_filter("account_code", "e.account_code = ${}", "exact account code", max_len=6),
    )
    columns = frozenset(EXTENSION_FIELDS)
    hidden = frozenset({"sip_password"})

    async def _check_plans(self, conn: asyncpg.Connection, tenant_id: int,
                           data: dict[str, Any]) -> None:
        for key, kind in (("plan_id", "national"), ("intl_plan_id", "international")):
            if data.get(key) is None:
                continue
            ok = await conn.fetchval(
                "SELECT pl.kind = $3 FROM plans pl, tenants t JOIN dealers d ON d.id = t.dealer_id"
                " WHERE pl.id = $1 AND t.id = $2 AND pl.dealer_id = ANY (d.path)",
                data[key], tenant_id, kind)
            if ok is None:
                raise invalid([(f"/{key}", "is not a plan available to this tenant's dealer")])
            if not ok:
                raise invalid([(f"/{key}", f"must be a {kind} plan")])

    async def before_create(self, conn: asyncpg.Connection, p: Principal,
                            data: dict[str, Any]) -> dict[str, Any]:
        status = await conn.fetchval(
            "SELECT t.status::text FROM tenants t JOIN dealers d ON d.id = t.dealer_id"
            " WHERE t.id = $1 AND d.path @> ARRAY[$2]::bigint[]", data["tenant_id"], p.scope_id)
        if status is None:
            raise invalid([("/tenant_id", "is not a tenant you manage")])
        if status == "cancelled":
            raise conflict("the tenant is cancelled", "/tenant_id")
        await self._check_plans(conn, data["tenant_id"], data)
        data.setdefault("sip_password", new_sip_password())
        if "account_code" not in data:
            data["account_code"] = await _free_account_code(conn)
        return data

    async def before_update(self, conn: asyncpg.Connection, p: Principal,
                            current: asyncpg.Record, data: dict[str, Any]) -> dict[str, Any]:
        await self._check_plans(conn, current["tenant_id"], data)
        return data


async def _free_account_code(conn: asyncpg.Connection) -> str:
    for _ in range(20):
        code = f"{secrets.randbelow(900000) + 100000}"
        if not await conn.fetchval("SELECT 1 FROM extensions WHERE account_code = $1", code):
            return code
    raise conflict("no free account code found; pass one explicitly", "/account_code")


EXTENSIONS = Extensions()


async def reveal_password(request: web.Request) -> web.Response:
    """The SIP password, on explicit request only; every reveal is audited."""
    p, key = principal_of(request), path_id(request)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        row = await EXTENSIONS.require(conn, p, key)
        await audit.record(conn, p, "reveal_password", "extension", key, row["owner_path"],
                           None, None)
    return json_response({"id": key, "account_code": row["account_code"],
                          "sip_password": row["sip_password"]})


async def rotate_password(request: web.Request) -> web.Response:
    p, key = principal_of(request), path_id(request)
    password = new_sip_password()
    async with request.app[POOL].acquire() as conn, conn.transaction():
        row = await EXTENSIONS.require(conn, p, key, lock=True)
        await conn.execute("UPDATE extensions SET sip_password = $2 WHERE id = $1", key, password)
        await audit.record(conn, p, "rotate_password", "extension", key, row["owner_path"],
                           None, None)
        await EXTENSIONS.after_write(conn, p, key)
    return json_response({"id": key, "account_code": row["account_code"],
                          "sip_password": password})


def register(routes: RouteTable) -> None:
    register_crud(routes, EXTENSIONS)
    secret = {"type": "object", "properties": {"id": {"type": "integer"},
                                               "account_code": {"type": "string"},
                                               "sip_password": {"type": "string"}}}
    routes.add("POST", "/api/v1/extensions/{id}/reveal-password", reveal_password,
               "Show the SIP password (audited)", "extensions", response=secret)
    routes.add("POST", "/api/v1/extensions/{id}/rotate-password", rotate_password,
               "Replace the SIP password with a new strong one", "extensions", response=secret)
