"""Dealers: the distributor > sub-distributor > reseller tree, white-label fields, caps,
balance, API credentials, logo and impersonation ("access the reseller")."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from decimal import Decimal
from typing import Any

import asyncpg
from aiohttp import web

from controlplane.api import fields as F
from controlplane.api.keys import POOL, SETTINGS
from controlplane.api.logo import LOGO_TYPES, check_logo, read_logo
from controlplane.api.oauth import issue_impersonation
from controlplane.api.problems import ApiError, conflict, forbidden, invalid, not_found
from controlplane.api.resource import (
    Resource,
    bool_filter,
    int_filter,
    json_response,
    path_id,
    principal_of,
    read_json,
    register_crud,
    require_operator,
    subtree_filter,
    text_filter,
    validate,
)
from controlplane.api.routes import RouteTable
from controlplane.model.principal import Principal
from controlplane.secrets import digest, hash_password, new_token
from controlplane.store import audit, credentials

CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # as new_token makes them

LEVELS = ("distributor", "sub_distributor", "reseller")
# What a dealer may change on its own record; caps, billing and node come from above.
SELF_EDITABLE = frozenset({"name", "password", "brand_name", "portal_domain", "portal_url"})

DEALER_FIELDS = {
    "parent_id": F.reference("parent dealer; defaults to the caller"),
    "level": F.choice(LEVELS, "distributor, sub_distributor or reseller", required=True),
    "name": F.text(100, required=True),
    "login": F.pattern(F.LOGIN.pattern, "3 to 64 letters, digits or . _ @ + -", required=True),
    "password": F.password("portal and API password", required=True),
    "active": F.boolean(),
    "brand_name": F.text(100, nullable=True, description="white-label brand shown to tenants"),
    "portal_domain": F.domain("white-label portal domain", nullable=True),
    "portal_url": F.url("white-label portal URL", nullable=True),
    "registration_address": F.host("IP or FQDN the tenants' phones register to; an IP address"
                                   " is put on the node and set by the operator only",
                                   nullable=True),
    "node_id": F.reference("SIP server (Asterisk node); set by the operator only", nullable=True),
    "max_tenants": F.integer(nullable=True, description="cap on tenants in the subtree"),
    "max_extensions": F.integer(nullable=True, description="cap on extensions in the subtree"),
    "max_calls": F.integer(nullable=True, description="cap on simultaneous calls"),
    "billing_mode": F.choice(("prepaid", "postpaid")),
    "credit_limit": F.money(Decimal(0),
                            description="postpaid: how far the balance may go negative"),
}

COLUMNS = ("id, parent_id, path, level::text AS level, name, login, active, brand_name,"
           " logo_mime, portal_domain, portal_url, registration_address, node_id, max_tenants,"
           " max_extensions, max_calls, tenant_count, extension_count,"
           " billing_mode::text AS billing_mode, balance::text AS balance,"
           " credit_limit::text AS credit_limit, created_at, updated_at")


def _check_node_fields(p: Principal, data: dict[str, Any]) -> None:
    """The node a dealer's tenants live on, and an IP address as registration address (it
    is added to the node's network interface and bound by a SIP transport there), are the
    operator's to pick, who runs the nodes and their networks; and only a unicast address a
    transport can bind. A host name binds nothing."""
    if "node_id" in data:
        require_operator(p, "only the platform operator assigns SIP server nodes")
    raw = data.get("registration_address")
    if raw is None:
        return
    try:
        ip = ipaddress.ip_address(raw)
    except ValueError:
        return
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved or ip.is_link_local:
        raise invalid([("/registration_address",
                        "must be a unicast address a SIP server can bind (not 0.0.0.0, "
                        "multicast, broadcast, reserved or link-local)")])
    require_operator(p, "only the platform operator assigns IP addresses on SIP server nodes;"
                        " a host name may be set here")


class Dealers(Resource):
    name = "dealers"
    entity = "dealer"
    table = "dealers"
    alias = "d"
    tag = "dealers"
    select_sql = (f"SELECT {', '.join('d.' + c.strip() for c in COLUMNS.split(','))},"
                  " CASE WHEN d.logo_mime IS NOT NULL"
                  "  THEN '/api/v1/dealers/' || d.id || '/logo' END AS logo_url,"
                  " d.path AS owner_path FROM dealers d WHERE d.path @> ARRAY[$1]::bigint[]")
    create_schema = F.Schema("dealer_create", DEALER_FIELDS)
    update_schema = F.Schema("dealer_update", DEALER_FIELDS).without("parent_id", "level")
    filters = (
        int_filter("parent_id", "d.parent_id = ${}", "direct children of this dealer"),
        text_filter("level", "d.level::text = ${}", "dealer level",
                    choices=("operator",) + LEVELS),
        bool_filter("active", "d.active = ${}", "active or not"),
        text_filter("login", "d.login = ${}", "exact login"),
        subtree_filter("d.path"),
    )
    columns = frozenset(DEALER_FIELDS) - {"password"} | {"password_hash"}

    async def before_create(self, conn: asyncpg.Connection, p: Principal,
                            data: dict[str, Any]) -> dict[str, Any]:
        parent_id = data.setdefault("parent_id", p.scope_id)
        if await self.get(conn, p, parent_id) is None:
            raise invalid([("/parent_id", "is not a dealer you manage")])
        _check_node_fields(p, data)
        data["password_hash"] = await hash_password(data.pop("password"))
        return data

    async def before_update(self, conn: asyncpg.Connection, p: Principal,
                            current: asyncpg.Record, data: dict[str, Any]) -> dict[str, Any]:
        if current["id"] == p.scope_id:
            refused = sorted(set(data) - SELF_EDITABLE)
            if refused:
                raise forbidden("a dealer cannot change its own " + ", ".join(refused)
                                + "; its parent does")
        _check_node_fields(p, data)
        if "password" in data:
            data["password_hash"] = await hash_password(data.pop("password"))
            await credentials.revoke_dealer_tokens(conn, current["id"])
        if data.get("active") is False and current["level"] == "operator":
            raise conflict("the operator account cannot be deactivated", "/active")
        return data

    async def before_delete(self, conn: asyncpg.Connection, p: Principal,
                            current: asyncpg.Record) -> None:
        if current["id"] == p.scope_id:
            raise forbidden("a dealer cannot delete itself")
        used = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM dealers WHERE parent_id = $1) AS children,"
            " (SELECT count(*) FROM tenants WHERE dealer_id = $1) AS tenants,"
            " (SELECT count(*) FROM plans WHERE dealer_id = $1) AS plans,"
            " (SELECT count(*) FROM number_ranges WHERE dealer_id = $1) AS ranges",
            current["id"])
        if any(used.values()):
            raise conflict(f"the dealer still has {used['children']} sub-dealers, "
                           f"{used['tenants']} tenants, {used['plans']} plans and "
                           f"{used['ranges']} number ranges; deactivate it (active=false) "
                           "instead")

    async def require_descendant(self, conn: asyncpg.Connection, p: Principal,
                                 key: int, *, lock: bool = False) -> asyncpg.Record:
        """A dealer strictly below the caller (what a parent may manage)."""
        row = await self.require(conn, p, key, lock=lock)
        if row["id"] == p.scope_id:
            raise forbidden("this action is taken by a parent dealer, not by the dealer itself")
        return row


DEALERS = Dealers()

API_CLIENT_SCHEMA = F.Schema("api_client_create", {
    "name": F.text(100, required=True),
    "email": F.pattern(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+", "an e-mail address",
                       max_len=254),
    "allowed_cidrs": F.cidr_list("source networks allowed to use these credentials",
                                 required=True),
})
CREDIT_SCHEMA = F.Schema("dealer_credit", {
    "amount": F.money(required=True, description="added to the balance (negative debits)"),
    "description": F.text(200, min_len=0),
})


async def create_api_client(request: web.Request) -> web.Response:
    p, key = principal_of(request), path_id(request)
    data = validate(API_CLIENT_SCHEMA, await read_json(request))
    secret = new_token(30)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        dealer = await DEALERS.require(conn, p, key)
        row = await credentials.create_client(
            conn, client_id=new_token(12), secret_hash=digest(secret).hex(), dealer_id=key,
            name=data["name"], email=data.get("email", ""), allowed_cidrs=data["allowed_cidrs"])
        out = dict(row)
        await audit.record(conn, p, "create", "api_client", out["client_id"],
                           dealer["owner_path"], None, out)
    out["client_secret"] = secret  # shown once, never stored in clear
    return json_response(out, 201)


async def list_api_clients(request: web.Request) -> web.Response:
    p, key = principal_of(request), path_id(request)
    async with request.app[POOL].acquire() as conn:
        await DEALERS.require(conn, p, key)
        return json_response({"items": await credentials.list_clients(conn, key)})


async def revoke_api_client(request: web.Request) -> web.Response:
    p, key = principal_of(request), path_id(request)
    client_id = request.match_info["client_id"]
    if not CLIENT_ID.fullmatch(client_id):  # one the platform never issues: none to revoke
        raise not_found("API client")
    async with request.app[POOL].acquire() as conn, conn.transaction():
        dealer = await DEALERS.require(conn, p, key)
        row = await credentials.revoke_client(conn, key, client_id)
        if row is None:
            raise not_found("API client")
        await audit.record(conn, p, "revoke", "api_client", client_id, dealer["owner_path"],
                           None, {"client_id": client_id})
    return web.Response(status=204)


async def impersonate(request: web.Request) -> web.Response:
    p, key = principal_of(request), path_id(request)
    if p.impersonating:
        raise forbidden("an impersonation token cannot start another impersonation")
    async with request.app[POOL].acquire() as conn, conn.transaction():
        dealer = await DEALERS.require_descendant(conn, p, key)
        if not dealer["active"]:
            raise conflict("the dealer is deactivated")
        body = await issue_impersonation(conn, request.app[SETTINGS], p, key)
        await audit.record(conn, p, "impersonate", "dealer", key, dealer["owner_path"],
                           None, {"acting_as": key})
    return json_response(body, 201)


async def add_credit(request: web.Request) -> web.Response:
    p, key = principal_of(request), path_id(request)
    data = validate(CREDIT_SCHEMA, await read_json(request))
    async with request.app[POOL].acquire() as conn, conn.transaction():
        before = await DEALERS.require_descendant(conn, p, key, lock=True)
        await conn.execute("UPDATE dealers SET balance = balance + $2 WHERE id = $1",
                           key, data["amount"])
        after = await DEALERS.require(conn, p, key)
        await audit.record(conn, p, "credit", "dealer", key, after["owner_path"],
                           {"balance": before["balance"]},
                           {"balance": after["balance"], "amount": data["amount"],
                            "description": data.get("description", "")})
    return json_response(DEALERS.present(after))


async def put_logo(request: web.Request) -> web.Response:
    p, key = principal_of(request), path_id(request)
    if request.content_type not in LOGO_TYPES:
        raise ApiError(415, "Unsupported media type",
                       "send the logo as image/png, image/jpeg or image/svg+xml",
                       kind="media-type")
    data = await read_logo(request)
    mime = check_logo(data, request.content_type)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        row = await DEALERS.require(conn, p, key, lock=True)
        await conn.execute("UPDATE dealers SET logo = $2, logo_mime = $3 WHERE id = $1",
                           key, data, mime)
        await audit.record(conn, p, "update", "dealer_logo", key, row["owner_path"], None,
                           {"logo_mime": mime, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
    return web.Response(status=204)


async def get_logo(request: web.Request) -> web.Response:
    p, key = principal_of(request), path_id(request)
    async with request.app[POOL].acquire() as conn:
        await DEALERS.require(conn, p, key)
        row = await conn.fetchrow("SELECT logo, logo_mime FROM dealers WHERE id = $1", key)
    if row["logo"] is None:
        raise not_found("logo")
    return web.Response(body=row["logo"], content_type=row["logo_mime"], headers={
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
        "X-Content-Type-Options": "nosniff"})


def register(routes: RouteTable) -> None:
    register_crud(routes, DEALERS)
    base = "/api/v1/dealers/{id}"
    client = {"type": "object", "properties": {
        "client_id": {"type": "string"}, "client_secret": {"type": "string"},
        "name": {"type": "string"}, "email": {"type": "string"},
        "allowed_cidrs": {"type": "array", "items": {"type": "string"}}}}
    routes.add("POST", base + "/api-clients", create_api_client,
               "Create API credentials (the secret is shown once)", "dealers",
               body=API_CLIENT_SCHEMA, response=client, status=201)
    routes.add("GET", base + "/api-clients", list_api_clients, "List API credentials",
               "dealers", response={"type": "object"})
    routes.add("DELETE", base + "/api-clients/{client_id}", revoke_api_client,
               "Revoke API credentials and every token issued with them", "dealers", status=204)
    routes.add("POST", base + "/impersonate", impersonate,
               "Act as a descendant dealer (access the reseller)", "dealers", status=201,
               response={"type": "object"})
    routes.add("POST", base + "/credit", add_credit, "Add credit to (or debit) the balance",
               "dealers", body=CREDIT_SCHEMA, response={"$ref": "#/components/schemas/dealer"})
    routes.add("PUT", base + "/logo", put_logo, "Upload the white-label logo", "dealers",
               raw_body=LOGO_TYPES, status=204)
    routes.add("GET", base + "/logo", get_logo, "Download the white-label logo", "dealers",
               response_types=LOGO_TYPES)
