"""Extensions ("ramais"): SIP accounts of a tenant with their limits and permissions."""

from __future__ import annotations

import secrets
from decimal import Decimal
from typing import Any

import asyncpg
from aiohttp import web

from controlplane.api import fields as F
from controlplane.api.keys import POOL
from controlplane.api.problems import conflict, invalid, not_found
from controlplane.api.resource import (
    Resource,
    bool_filter,
    int_filter,
    json_response,
    path_id,
    principal_of,
    read_json,
    register_crud,
    subtree_filter,
    text_filter,
    validate,
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


# What an extension shows (plus owner_path), read from `e` joined to its tenant and dealer.
COLUMNS = ("e.id, e.tenant_id, e.number, e.name, e.account_code, e.sip_password, e.active,"
           " e.max_calls, e.callerid_enabled, e.callerid_number, e.billing_type,"
           " e.credit_limit::text AS credit_limit, e.plan_id, e.intl_plan_id, e.invoice_day,"
           " e.allow_local, e.allow_national, e.allow_international, e.allow_vc1, e.allow_vc2,"
           " e.allow_vc3, e.created_at, e.updated_at, t.dealer_id, d.path AS owner_path")
JOINS = " JOIN tenants t ON t.id = e.tenant_id JOIN dealers d ON d.id = t.dealer_id"


def _audited_insert(insert: str, audit_from: int) -> str:
    """One statement: `insert` (an INSERT INTO extensions ... RETURNING *), the audit entry
    of every row it made (the row as the API shows it, no password) and those rows back.

    One statement instead of four round trips (insert, read back, audit, commit) keeps the
    counter rows the insert locks (see migration 0004) locked for as short as possible.
    Parameters from `audit_from` on: actor, acting as, client id, source address."""
    a = audit_from
    return (f"WITH e AS ({insert} RETURNING *),"
            f" made AS (SELECT {COLUMNS} FROM e{JOINS}),"
            " logged AS (INSERT INTO audit_log (actor_id, acting_as_id, client_id, source_ip,"
            "   action, entity, entity_id, scope_path, after)"
            f"  SELECT ${a}, ${a + 1}, ${a + 2}, ${a + 3}::inet, 'create', 'extension',"
            "   m.id::text, m.owner_path, to_jsonb(m) - 'sip_password' - 'owner_path'"
            "  FROM made m)"
            " SELECT * FROM made ORDER BY id")


def _audit_args(p: Principal) -> list[Any]:
    return [p.actor_id, p.acting_as_id, p.client_id, p.source_ip or None]


class Extensions(Resource):
    name = "extensions"
    entity = "extension"
    table = "extensions"
    alias = "e"
    tag = "extensions"
    select_sql = (f"SELECT {COLUMNS} FROM extensions e{JOINS}"
                  " WHERE d.path @> ARRAY[$1]::bigint[]")
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
        # the tenant's state, and whether a first random account code is free, at once
        code = data.get("account_code") or f"{secrets.randbelow(900000) + 100000}"
        row = await conn.fetchrow(
            "SELECT t.status::text AS status, NOT EXISTS (SELECT 1 FROM extensions"
            "   WHERE account_code = $3) AS code_free"
            " FROM tenants t JOIN dealers d ON d.id = t.dealer_id"
            " WHERE t.id = $1 AND d.path @> ARRAY[$2]::bigint[]",
            data["tenant_id"], p.scope_id, code)
        if row is None:
            raise invalid([("/tenant_id", "is not a tenant you manage")])
        if row["status"] == "cancelled":
            raise conflict("the tenant is cancelled", "/tenant_id")
        await self._check_plans(conn, data["tenant_id"], data)
        data.setdefault("sip_password", new_sip_password())
        if "account_code" not in data:
            data["account_code"] = code if row["code_free"] else await _free_account_code(conn)
        return data

    async def before_update(self, conn: asyncpg.Connection, p: Principal,
                            current: asyncpg.Record, data: dict[str, Any]) -> dict[str, Any]:
        await self._check_plans(conn, current["tenant_id"], data)
        return data

    # create() writes with one statement, so it runs without a transaction around it (and
    # calls no after_write hook: Extensions has none)
    atomic_create = True

    async def create(self, conn: asyncpg.Connection, p: Principal,
                     data: dict[str, Any]) -> dict[str, Any]:
        data = await self.before_create(conn, p, data)
        cols = [c for c in data if c in self.columns]
        values = ", ".join(f"${i}" for i in range(1, len(cols) + 1))
        sql = _audited_insert(f"INSERT INTO extensions ({', '.join(cols)}) VALUES ({values})",
                              len(cols) + 1)
        row = await conn.fetchrow(sql, *(data[c] for c in cols), *_audit_args(p))
        return self.present(row)


async def _free_account_codes(conn: asyncpg.Connection, count: int) -> list[str]:
    """`count` account codes no extension holds: the first free ones from a random start.

    A run of nearby codes rather than `count` random ones: two bulk creates at the same
    time then meet only when their runs overlap (rare), where random codes would almost
    surely share one at 1,000 each (the later insert would wait for the earlier one to
    commit, then fail on the unique index and start over)."""
    span = 2 * count + 16
    for _ in range(12):
        span = min(span, 900000)
        lo = 100000 + secrets.randbelow(900000 - span + 1)
        hi = lo + span - 1
        taken = {r["account_code"] for r in await conn.fetch(
            "SELECT account_code FROM extensions WHERE account_code BETWEEN $1 AND $2",
            str(lo), str(hi))}
        free = [str(c) for c in range(lo, hi + 1) if str(c) not in taken]
        if len(free) >= count:
            return free[:count]
        span *= 2
    raise conflict("not enough free account codes found", "/count")


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


MAX_BULK = 1000
BULK_COMMON = {k: f for k, f in EXTENSION_FIELDS.items()
               if k not in ("tenant_id", "number", "account_code", "sip_password")}
BULK_SCHEMA = F.Schema("extension_bulk_create", {
    "first_number": F.pattern(r"^[0-9]{2,8}$", "2 to 8 digits", max_len=8, required=True,
                              description="number of the first extension; the others follow"
                                          " it, with as many digits (leading zeros kept)"),
    "count": F.integer(1, MAX_BULK, required=True,
                       description=f"how many extensions to create (at most {MAX_BULK})"),
    **BULK_COMMON,
})
BULK_RESPONSE = {"type": "object", "properties": {
    "tenant_id": {"type": "integer"},
    "count": {"type": "integer"},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "id": {"type": "integer"}, "number": {"type": "string"},
        "account_code": {"type": "string"}}}}}}


def bulk_numbers(first: str, count: int) -> list[str]:
    """first, first + 1, ... with the width of `first`; refused when they would not fit."""
    width, start = len(first), int(first)
    if len(str(start + count - 1)) > width:
        raise invalid([("/count", f"{count} numbers from {first} do not fit in {width} digits")])
    return [str(start + i).zfill(width) for i in range(count)]


async def bulk_create(request: web.Request) -> web.Response:
    """Many extensions of one tenant in one transaction: all of them or none."""
    p, tenant_id = principal_of(request), path_id(request)
    data = validate(BULK_SCHEMA, await read_json(request))
    numbers = bulk_numbers(data.pop("first_number"), data.pop("count"))
    cols = [c for c in data if c in BULK_COMMON]
    insert = (f"INSERT INTO extensions (tenant_id, number, account_code, sip_password"
              f"{''.join(', ' + c for c in cols)})"
              f" SELECT $1, x.number, x.code, x.password"
              f"{''.join(f', ${i}' for i in range(5, 5 + len(cols)))}"
              " FROM unnest($2::text[], $3::text[], $4::text[]) AS x(number, code, password)")
    sql = _audited_insert(insert, 5 + len(cols))
    async with request.app[POOL].acquire() as conn, conn.transaction():
        status = await conn.fetchval(
            "SELECT t.status::text FROM tenants t JOIN dealers d ON d.id = t.dealer_id"
            " WHERE t.id = $1 AND d.path @> ARRAY[$2]::bigint[]", tenant_id, p.scope_id)
        if status is None:
            raise not_found("tenant")
        if status == "cancelled":
            raise conflict("the tenant is cancelled")
        await EXTENSIONS._check_plans(conn, tenant_id, data)
        taken = await conn.fetch("SELECT number FROM extensions WHERE tenant_id = $1"
                                 " AND number = ANY ($2::text[]) ORDER BY number LIMIT 20",
                                 tenant_id, numbers)
        if taken:
            raise conflict("numbers already used in this tenant: "
                           + ", ".join(r["number"] for r in taken), "/first_number")
        for attempt in range(3):
            codes = await _free_account_codes(conn, len(numbers))
            passwords = [new_sip_password() for _ in numbers]
            try:
                async with conn.transaction():
                    rows = await conn.fetch(sql, tenant_id, numbers, codes, passwords,
                                            *(data[c] for c in cols), *_audit_args(p))
                break
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "extensions_tenant_id_number_key":
                    raise conflict("a number was taken meanwhile by another create; "
                                   "nothing was created", "/first_number") from exc
                if exc.constraint_name != "extensions_account_code_key" or attempt == 2:
                    raise
    return json_response({"tenant_id": tenant_id, "count": len(rows), "items": [
        {"id": r["id"], "number": r["number"], "account_code": r["account_code"]}
        for r in rows]}, 201)


def register(routes: RouteTable) -> None:
    register_crud(routes, EXTENSIONS)
    secret = {"type": "object", "properties": {"id": {"type": "integer"},
                                               "account_code": {"type": "string"},
                                               "sip_password": {"type": "string"}}}
    routes.add("POST", "/api/v1/extensions/{id}/reveal-password", reveal_password,
               "Show the SIP password (audited)", "extensions", response=secret)
    routes.add("POST", "/api/v1/extensions/{id}/rotate-password", rotate_password,
               "Replace the SIP password with a new strong one", "extensions", response=secret)
    routes.add("POST", "/api/v1/tenants/{id}/extensions/bulk", bulk_create,
               "Create many extensions of a tenant at once", "extensions", body=BULK_SCHEMA,
               response=BULK_RESPONSE, status=201,
               description=f"Creates `count` (at most {MAX_BULK}) extensions numbered from "
                           "`first_number` on, with the same other fields, in one transaction:"
                           " all of them or none (409 when a number is taken or a cap would be"
                           " exceeded). Each gets its own account code and strong SIP password"
                           " (read it with reveal-password), and its own audit entry.")
