"""Tenants (customer PBXs): owned by a dealer, living on its node, within its caps."""

from __future__ import annotations

import re
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
    json_response,
    path_id,
    principal_of,
    register_crud,
    subtree_filter,
    text_filter,
)
from controlplane.api.routes import RouteTable
from controlplane.model.principal import Principal
from controlplane.rating.classify import AREA_CODES
from controlplane.store import audit
from controlplane.store.sql import dealer_chain_active

STATUSES = ("active", "suspended", "cancelled")

TENANT_FIELDS = {
    "dealer_id": F.reference("owning dealer; defaults to the caller"),
    "name": F.text(100, required=True),
    "external_ref": F.text(100, min_len=0,
                           description="reference in another system; shown on billing outputs"),
    "country": F.pattern(r"^[A-Z]{2}$", "an ISO 3166 alpha-2 code such as BR", max_len=2),
    "notes": F.notes(),
    "product_type": F.text(50),
    "trial": F.boolean("trial period"),
    "internal": F.boolean("internal or demo system: never billed"),
    "sip_domain": F.domain("SIP domain of the tenant; generated when not given"),
    "max_extensions": F.integer(nullable=True),
    "max_calls": F.integer(nullable=True, description="cap on simultaneous calls"),
    "status": F.choice(STATUSES),
    "area_code": F.Field({"type": "string", "enum": sorted(AREA_CODES)}, F.area_code,
                         description="the tenant's area code (DDD) in service, e.g. 11: local"
                                     " and national calls are classified from it"),
    "shared_credit": F.boolean("the tenant's own credit account pays for all its extensions'"
                               " calls (otherwise each extension pays from its own)"),
    "billing_mode": F.choice(("prepaid", "postpaid"), "of the tenant's credit account"),
    "credit_limit": F.money(Decimal(0), description="postpaid: how far the tenant's balance"
                            " may go negative"),
}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:30] or "pbx"


class Tenants(Resource):
    name = "tenants"
    entity = "tenant"
    table = "tenants"
    alias = "t"
    tag = "tenants"
    select_sql = ("SELECT t.id, t.dealer_id, t.name, t.external_ref, t.country, t.notes,"
                  " t.product_type, t.trial, t.internal, t.sip_domain, t.node_id,"
                  " t.max_extensions, t.max_calls, t.extension_count, t.status::text AS status,"
                  " t.cancelled_at, t.area_code, t.shared_credit,"
                  " t.billing_mode::text AS billing_mode, t.credit_limit::text AS credit_limit,"
                  " t.created_at, t.updated_at, d.path AS owner_path"
                  " FROM tenants t JOIN dealers d ON d.id = t.dealer_id"
                  " WHERE d.path @> ARRAY[$1]::bigint[]")
    create_schema = F.Schema("tenant_create", TENANT_FIELDS)
    update_schema = F.Schema("tenant_update", TENANT_FIELDS).without("dealer_id")
    filters = (
        subtree_filter("d.path"),
        text_filter("status", "t.status::text = ${}", "tenant status", choices=STATUSES),
        text_filter("external_ref", "t.external_ref = ${}", "exact external reference"),
    )
    columns = frozenset(TENANT_FIELDS)

    async def before_create(self, conn: asyncpg.Connection, p: Principal,
                            data: dict[str, Any]) -> dict[str, Any]:
        dealer_id = data.setdefault("dealer_id", p.scope_id)
        dealer = await conn.fetchrow(
            f"SELECT {dealer_chain_active('d')} AS active, d.portal_domain"
            " FROM dealers d WHERE d.id = $1 AND d.path @> ARRAY[$2]::bigint[]",
            dealer_id, p.scope_id)
        if dealer is None:
            raise invalid([("/dealer_id", "is not a dealer you manage")])
        if not dealer["active"]:
            raise conflict("the dealer is deactivated", "/dealer_id")
        if data.get("status") == "cancelled":
            raise invalid([("/status", "a tenant cannot be created cancelled")])
        if "sip_domain" not in data:
            suffix = dealer["portal_domain"] or "pbx.local"
            data["sip_domain"] = f"{_slug(data['name'])}-{secrets.token_hex(3)}.{suffix}"
        return data

    async def before_delete(self, conn: asyncpg.Connection, p: Principal,
                            current: asyncpg.Record) -> None:
        if current["status"] != "cancelled":
            raise conflict("only a cancelled tenant can be deleted; cancel it first "
                           f"(POST /api/v1/tenants/{current['id']}/cancel)")


TENANTS = Tenants()


async def cancel(request: web.Request) -> web.Response:
    """Contract cancellation: the tenant and all its extensions are deactivated at once."""
    p, key = principal_of(request), path_id(request)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        current = await TENANTS.require(conn, p, key, lock=True)
        if current["status"] != "cancelled":
            await conn.execute("UPDATE tenants SET status = 'cancelled' WHERE id = $1", key)
        row = await TENANTS.require(conn, p, key)
        await audit.record(conn, p, "cancel", "tenant", key, row["owner_path"],
                           TENANTS.present(current), TENANTS.present(row))
        await TENANTS.after_write(conn, p, key)
    return json_response(TENANTS.present(row))


def register(routes: RouteTable) -> None:
    register_crud(routes, TENANTS)
    routes.add("POST", "/api/v1/tenants/{id}/cancel", cancel,
               "Cancel the tenant's contract: deactivates all its extensions", "tenants",
               response={"$ref": "#/components/schemas/tenant"})
