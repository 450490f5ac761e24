"""Which extensions are registered, from where, with which phone, since when."""

from __future__ import annotations

from aiohttp import web

from controlplane.api.keys import POOL
from controlplane.api.querying import CAPPED_LIST, params, scoped_items
from controlplane.api.resource import (
    bool_filter,
    int_filter,
    json_response,
    path_id,
    principal_of,
)
from controlplane.api.resources.extensions import EXTENSIONS
from controlplane.api.resources.tenants import TENANTS
from controlplane.api.routes import RouteTable
from controlplane.provisioning.preview import render_tenant

COLUMNS = ("r.account_code, e.id AS extension_id, e.tenant_id, e.number, r.node_id, r.uri,"
           " r.user_agent, r.via_address, r.status, r.expires_at, r.registered_at")
SCOPED = (f"SELECT {COLUMNS} FROM registrations r"
          " JOIN extensions e ON e.account_code = r.account_code"
          " JOIN tenants t ON t.id = e.tenant_id JOIN dealers d ON d.id = t.dealer_id"
          " WHERE d.path @> ARRAY[$1]::bigint[]")
FILTERS = (
    int_filter("tenant_id", "e.tenant_id = ${}", "registrations of this tenant"),
    int_filter("dealer_id", "d.path @> ARRAY[${}]::bigint[]", "in this dealer's subtree"),
    int_filter("node_id", "r.node_id = ${}", "on this node"),
    bool_filter("active", "e.active = ${}", "extension active or not"),
)
LIMIT = 1000


async def extension_registrations(request: web.Request) -> web.Response:
    p, key = principal_of(request), path_id(request)
    async with request.app[POOL].acquire() as conn:
        ext = await EXTENSIONS.require(conn, p, key)
        rows = await conn.fetch(f"{SCOPED} AND r.account_code = $2 ORDER BY r.registered_at",
                                p.scope_id, ext["account_code"])
    return json_response({"items": [dict(r) for r in rows]})


async def list_registrations(request: web.Request) -> web.Response:
    return await scoped_items(request, SCOPED, FILTERS, "e.id", LIMIT)


async def rendered_tenant(request: web.Request) -> web.Response:
    p, key = principal_of(request), path_id(request)
    async with request.app[POOL].acquire() as conn:
        await TENANTS.require(conn, p, key)
        text = await render_tenant(conn, key)
    return web.Response(text=text or "", content_type="text/plain")


def register(routes: RouteTable) -> None:
    item = {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object"}}}}
    routes.add("GET", "/api/v1/extensions/{id}/registrations", extension_registrations,
               "Where the extension is registered (contacts on its node)", "extensions",
               response=item)
    routes.add("GET", "/api/v1/registrations", list_registrations,
               f"Registered extensions in the caller's subtree (at most {LIMIT})", "extensions",
               response=CAPPED_LIST, query=params(FILTERS))
    routes.add("GET", "/api/v1/tenants/{id}/rendered", rendered_tenant,
               "The tenant as its node sees it: dialplan and PJSIP objects (secrets masked)",
               "tenants", response_types=("text/plain",))
