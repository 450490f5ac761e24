"""Authorization matrix: every protected route, called by every kind of dealer, on objects
inside and outside its subtree.

One tree is built for the whole module:

    operator
    └── D1 (distributor)
        ├── S1 (sub-distributor)
        │   ├── R1 (reseller)
        │   └── R2 (reseller, R1's sibling)
        └── R3 (reseller directly under the distributor)

Every dealer (the operator too) owns a tenant with an extension (and its phone's
registration), a rate table with a few rates, a calling plan (priced by that table and used
by that extension), a number range with a DID ringing that extension, a logo, and the audit
entries of those objects; the operator also owns a node. Routes that destroy their object
get a new one for each call.

The rules checked:

* a dealer whose subtree holds an object (the owner itself or any dealer above it) gets the
  route's success status, or the business refusal the route documents (403 for a dealer
  changing its own caps, 409 for deleting an object still in use) - never 404;
* a dealer outside (a sibling, a cousin, a dealer below the owner) gets exactly the answer a
  nonexistent id gets (404 on a path id, 422 on a body reference; a list filtered on the
  owner shows nothing but the caller's own objects): never 403 (an impersonation token
  asking to impersonate aside: refused before any lookup), never 2xx, and nothing in the
  database changes;
* plans and rate tables are the deliberate exceptions: a dealer's plans and rate tables
  are offered, read-only, to its whole subtree (read, list and quote: yes; change, import
  and delete: 403);
* nodes are reached by the (non-impersonating) operator only; everyone else gets 403;
* an impersonation token acts exactly as the impersonated dealer, cannot impersonate again,
  and the audit log names both the real dealer and the impersonated one.

The matrix iterates the application's route table, so a new route fails the suite until it
is given its expected answers here.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from controlplane import bootstrap
from controlplane.api.app import build_app, build_routes
from controlplane.api.routes import Operation
from controlplane.settings import Settings
from tests.api_helper import Api, Reply
from tests.conftest import TABLES

PUBLIC_PREFIXES = ("/healthz", "/readyz", "/oauth/", "/api/openapi.json", "/api/documentation")
MISSING = 10**12  # an id no object has
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 17
PASSWORD = "correct-horse-battery"
RATES_CSV = ("prefix;description;price_per_minute;connection_fee;first_increment;"
             "next_increment;free_seconds\n"
             "55;Brasil;0,20;0;30;6;3\n"
             "5511;São Paulo;0,05;0;30;6;3\n").encode()
QUOTE = {"number": "32345678", "caller_area": "11", "seconds": "60"}  # a local call in 11
CHILD_LEVEL = {"operator": "distributor", "distributor": "sub_distributor",
               "sub_distributor": "reseller", "reseller": "reseller"}

_seq = itertools.count(1)


def protected_operations() -> list[Operation]:
    return [op for op in build_routes().operations
            if not op.path.startswith(PUBLIC_PREFIXES)]


def op_id(op: Operation) -> str:
    return f"{op.method} {op.path}"


# -- the tree ----------------------------------------------------------------------------


@dataclass
class Holdings:
    """What one dealer owns in the tree (all ids)."""

    dealer: int
    level: str
    tenant: int = MISSING
    extension: int = MISSING
    plan: int = MISSING
    rate_table: int = MISSING
    range: int = MISSING
    did: int = MISSING
    audit: int = MISSING
    call: str = ""  # a call in progress of its extension (as admission records one)
    cdr: int = MISSING
    account_code: str = ""
    numbers: Any = None  # iterator of free local numbers of the range


@dataclass
class Who:
    """A caller: its token, the dealer whose subtree it reaches, the dealer it really is."""

    name: str
    api: Api
    scope: int
    actor: int
    impersonating: bool = False


@dataclass
class World:
    op: Api
    pool: asyncpg.Pool
    who: dict[str, Who]
    owns: dict[str, Holdings]
    paths: dict[int, tuple[int, ...]]
    node: int
    names: dict[int, str] = field(default_factory=dict)

    def relation(self, who: Who, owner: int) -> str:
        """self, above (owner is in the caller's subtree), below, or apart."""
        if who.scope == owner:
            return "self"
        if who.scope in self.paths[owner]:
            return "above"
        if owner in self.paths[who.scope]:
            return "below"
        return "apart"


async def _fill(op: Api, h: Holdings, slot: int, node: int) -> None:
    """Give dealer `h.dealer` a rate table with rates, a plan it prices, a tenant with an
    extension on that plan, a range with a DID."""
    h.rate_table = op.ok(await op.post("/api/v1/rate-tables", {
        "dealer_id": h.dealer, "name": f"Rates {slot}"}), 201)["id"]
    op.ok(await op.call("POST", f"/api/v1/rate-tables/{h.rate_table}/import", raw=RATES_CSV,
                        content_type="text/csv"))
    h.plan = op.ok(await op.post("/api/v1/plans", {
        "dealer_id": h.dealer, "name": f"Plan {slot}", "rate_table_id": h.rate_table}),
        201)["id"]
    h.tenant = (await op.tenant(h.dealer))["id"]
    extension = await op.extension(h.tenant, plan_id=h.plan)
    h.extension, h.account_code = extension["id"], extension["account_code"]
    first = 100000 * (slot + 1)
    h.range = op.ok(await op.post("/api/v1/number-ranges", {
        "dealer_id": h.dealer, "name": f"Range {slot}", "country_code": "55",
        "area_code": "11", "first_number": first, "last_number": first + 49999}), 201)["id"]
    h.numbers = itertools.count(first)
    h.did = op.ok(await op.post("/api/v1/dids", {
        "range_id": h.range, "local_number": next(h.numbers),
        "extension_id": h.extension}), 201)["id"]
    op.ok(await op.call("PUT", f"/api/v1/dealers/{h.dealer}/logo", raw=PNG,
                        content_type="image/png"), 204)
    async with op.pool.acquire() as conn:
        h.audit = await conn.fetchval(
            "SELECT id FROM audit_log WHERE entity = 'tenant' AND entity_id = $1"
            " AND action = 'create'", str(h.tenant))
        # what a node agent would report: the extension's phone is registered
        await conn.execute(
            "INSERT INTO registrations (node_id, account_code, uri, user_agent)"
            " VALUES ($1, $2, $3, 'matrix-phone')", node, h.account_code,
            f"sip:{h.account_code}@192.0.2.{slot + 1}:5060")
        # what admission and the CDR import would record: a call in progress, a CDR
        path = await conn.fetchval("SELECT path FROM dealers WHERE id = $1", h.dealer)
        h.call = str(uuid.uuid4())
        await conn.execute(
            "INSERT INTO calls (id, node_id, channel, channel_name, direction, extension_id,"
            " tenant_id, dealer_path, caller, callee, call_class, lease_until) VALUES ($1, $2,"
            " $3, 'PJSIP/' || $3, 'internal', $4, $5, $6, '1000', '1001', 'internal',"
            " now() + interval '1 day')",
            uuid.UUID(h.call), node, f"matrix-{slot}", h.extension, h.tenant, path)
        h.cdr = await conn.fetchval(
            "INSERT INTO cdrs (node_id, uniqueid, tenant_id, extension_id, dealer_path,"
            " started_at, ended_at, disposition) VALUES ($1, $2, $3, $4, $5,"
            " '2026-01-02T10:00:00Z', '2026-01-02T10:01:00Z', 'ANSWERED') RETURNING id",
            node, f"matrix-{slot}", h.tenant, h.extension, path)


async def impersonate(api: Api, target: int) -> Api:
    body = api.ok(await api.post(f"/api/v1/dealers/{target}/impersonate"), 201)
    return Api(api.client, api.pool, token=body["access_token"], dealer_id=target)


@pytest.fixture(scope="module")
async def world(pool: asyncpg.Pool, settings: Settings) -> AsyncIterator[World]:
    """The tree, built once for the module (this module never asks for the per-test `db`)."""
    async with pool.acquire() as conn:
        await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
        creds = await bootstrap.ensure_operator(conn)
    server = TestServer(build_app(settings, pool), host="127.0.0.1")
    async with TestClient(server) as client:
        op = Api(client, pool)
        await op.login(creds["login"], creds["password"], creds["client_id"],
                       creds["client_secret"])
        node = op.ok(await op.post("/api/v1/nodes", {
            "name": "node-1", "sip_address": "198.51.100.10", "ami_host": "10.0.0.10",
            "ami_username": "admin", "ami_secret": "ami-secret-123456",
            "ari_url": "http://10.0.0.10:8088", "ari_username": "ari",
            "ari_password": "ari-password-123456"}), 201)["id"]
        records = {"op": op.ok(await op.get(f"/api/v1/dealers/{op.dealer_id}"))}
        for name, level, parent in (("D1", "distributor", "op"),
                                    ("S1", "sub_distributor", "D1"),
                                    ("R1", "reseller", "S1"), ("R2", "reseller", "S1"),
                                    ("R3", "reseller", "D1")):
            records[name] = await op.dealer(level, records[parent]["id"])
        paths = {r["id"]: tuple(r["path"]) for r in records.values()}
        owns = {name: Holdings(r["id"], r["level"]) for name, r in records.items()}
        for slot, h in enumerate(owns.values()):
            await _fill(op, h, slot, node)
        who = {"op": Who("op", op, op.dealer_id, op.dealer_id)}
        for name in ("D1", "S1", "R1", "R2", "R3"):
            api = await op.as_dealer(records[name])
            who[name] = Who(name, api, api.dealer_id, api.dealer_id)
        r1 = owns["R1"].dealer
        who["op>R1"] = Who("op>R1", await impersonate(op, r1), r1, op.dealer_id, True)
        who["D1>R1"] = Who("D1>R1", await impersonate(who["D1"].api, r1), r1,
                           who["D1"].actor, True)
        yield World(op, pool, who, owns, paths, node,
                    names={r["id"]: n for n, r in records.items()})


# -- observing the database ----------------------------------------------------------------

SNAPSHOT_SQL = " UNION ALL ".join(
    f"SELECT '{t}' AS t, count(*) AS n, md5(string_agg(x::text, '|' ORDER BY x::text)) AS h"
    f" FROM {t} x" for t in TABLES)


async def snapshot(pool: asyncpg.Pool) -> dict[str, tuple[int, str | None]]:
    async with pool.acquire() as conn:
        return {r["t"]: (r["n"], r["h"]) for r in await conn.fetch(SNAPSHOT_SQL)}


async def last_audit_id(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as conn:
        return int(await conn.fetchval("SELECT COALESCE(max(id), 0) FROM audit_log"))


async def audit_since(pool: asyncpg.Pool, after: int) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await conn.fetch("SELECT actor_id, acting_as_id, action, entity FROM audit_log"
                                " WHERE id > $1 ORDER BY id", after)


def changed(before: dict, after: dict) -> list[str]:
    return [t for t in TABLES if before[t] != after[t]]


# -- the expected answers of every route ---------------------------------------------------


@dataclass
class Ctx:
    """What a case needs to build a call on one owner's objects."""

    world: World
    h: Holdings  # the owner's holdings, or all-MISSING ones for the "no such object" call
    n: int = field(default_factory=lambda: next(_seq))


Body = Callable[[Ctx], Any]
Status = int | Callable[[Holdings], int]


@dataclass(frozen=True)
class Case:
    """The expected answers of one route on one owner's object.

    target: "list" (GET on a collection, filtered to the owner), "create" (POST on a
    collection, the body naming the owner's object) or the kind of object `{id}` names.
    inside: status for the owner and every dealer above it; own: for the target dealer
    itself when it differs; below: for dealers below the owner when they may see it.
    fresh: the route destroys its object, so each call gets a new one of this kind.
    """

    target: str
    inside: Status = 200
    own: int | None = None
    below: int | None = None
    fresh: str | None = None
    body: Body | None = None
    query: Callable[[Ctx], dict[str, str]] | None = None
    raw: tuple[bytes, str] | None = None
    label: str = ""
    bug: str = ""  # a known product bug answers 500 here instead: the named test shows it
    operator_only: bool = False  # 403 for every caller but the operator itself


def _dealer_body(c: Ctx) -> dict[str, Any]:
    return {"parent_id": c.h.dealer, "level": CHILD_LEVEL[c.h.level], "name": f"Child {c.n}",
            "login": f"child-{c.n}", "password": PASSWORD}


def _range_body(c: Ctx) -> dict[str, Any]:
    first = 10_000_000 + 100 * c.n
    return {"dealer_id": c.h.dealer, "name": f"Range x{c.n}", "country_code": "55",
            "area_code": "21", "first_number": first, "last_number": first + 9}


def _did_body(c: Ctx) -> dict[str, Any]:
    number = next(c.h.numbers) if c.h.numbers is not None else 1
    return {"range_id": c.h.range, "local_number": number}


def _subtree_query(c: Ctx) -> dict[str, str]:
    return {"dealer_id": str(c.h.dealer), "limit": "500"}


def _dealer_create_status(h: Holdings) -> int:
    # a reseller has no level below it: the level rule refuses the child
    return 422 if h.level == "reseller" else 201


def _offered_crud(resource: str, target: str, in_use: str) -> dict[str, list[Case]]:
    """The five routes of an object a dealer offers to its whole subtree: read by the
    dealers below the owner, changed and deleted by the owner's side only."""
    base, item = f"/api/v1/{resource}", f"/api/v1/{resource}/{{id}}"
    return {
        f"GET {base}": [Case("list", query=_subtree_query, below=200)],
        f"POST {base}": [Case("create", 201, body=lambda c: {
            "dealer_id": c.h.dealer, "name": f"{target} {c.n}"})],
        f"GET {item}": [Case(target, below=200)],
        f"PATCH {item}": [Case(target, below=403, body=lambda c: {"description": f"d {c.n}"})],
        f"DELETE {item}": [
            Case(target, 409, below=403, label=in_use),
            Case(target, 204, below=403, fresh=target,
                 label=f"an unused {target.replace('_', ' ')}")],
    }


LIST = Case("list", query=_subtree_query)
CASES: dict[str, list[Case]] = {
    # dealers
    "GET /api/v1/dealers": [LIST],
    "POST /api/v1/dealers": [Case("create", _dealer_create_status, body=_dealer_body)],
    "GET /api/v1/dealers/{id}": [Case("dealer")],
    "PATCH /api/v1/dealers/{id}": [
        Case("dealer", body=lambda c: {"brand_name": f"Brand {c.n}"})],
    "DELETE /api/v1/dealers/{id}": [
        Case("dealer", 409, own=403, label="a dealer with tenants")],
    "POST /api/v1/dealers/{id}/api-clients": [
        Case("dealer", 201, body=lambda c: {"name": f"Client {c.n}",
                                            "allowed_cidrs": ["192.0.2.0/24"]})],
    "GET /api/v1/dealers/{id}/api-clients": [Case("dealer")],
    "DELETE /api/v1/dealers/{id}/api-clients/{client_id}": [
        Case("dealer", 204, fresh="client")],
    "POST /api/v1/dealers/{id}/impersonate": [Case("dealer", 201, own=403)],
    "POST /api/v1/dealers/{id}/credit": [
        Case("dealer", 200, own=403, body=lambda c: {"amount": "1.25"})],
    "PUT /api/v1/dealers/{id}/logo": [Case("dealer", 204, raw=(PNG, "image/png"))],
    "GET /api/v1/dealers/{id}/logo": [Case("dealer")],
    # tenants
    "GET /api/v1/tenants": [LIST],
    "POST /api/v1/tenants": [
        Case("create", 201, body=lambda c: {"dealer_id": c.h.dealer, "name": f"T {c.n}"})],
    "GET /api/v1/tenants/{id}": [Case("tenant")],
    "PATCH /api/v1/tenants/{id}": [Case("tenant", body=lambda c: {"notes": f"note {c.n}"})],
    "DELETE /api/v1/tenants/{id}": [
        Case("tenant", 409, label="an active tenant"),
        Case("tenant", 204, fresh="cancelled_tenant", label="a cancelled tenant")],
    "POST /api/v1/tenants/{id}/cancel": [Case("tenant", fresh="tenant")],
    "GET /api/v1/tenants/{id}/rendered": [Case("tenant")],
    # extensions
    "GET /api/v1/extensions": [LIST],
    "POST /api/v1/extensions": [
        Case("create", 201, body=lambda c: {"tenant_id": c.h.tenant, "number": f"5{c.n:06d}"})],
    "GET /api/v1/extensions/{id}": [Case("extension")],
    "PATCH /api/v1/extensions/{id}": [
        Case("extension", body=lambda c: {"name": f"Desk {c.n}"})],
    "DELETE /api/v1/extensions/{id}": [Case("extension", 204, fresh="extension")],
    "POST /api/v1/extensions/{id}/reveal-password": [Case("extension")],
    "POST /api/v1/extensions/{id}/rotate-password": [Case("extension")],
    "POST /api/v1/tenants/{id}/extensions/bulk": [
        Case("tenant", 201, body=lambda c: {"first_number": f"7{c.n:05d}0", "count": 3})],
    # registrations (reported by the node agents)
    "GET /api/v1/extensions/{id}/registrations": [Case("extension")],
    "GET /api/v1/registrations": [
        Case("list", query=lambda c: {"dealer_id": str(c.h.dealer)})],
    # plans and rate tables: offered read-only to the owner's whole subtree
    **_offered_crud("plans", "plan", in_use="a plan in use"),
    **_offered_crud("rate-tables", "rate_table", in_use="a rate table pricing a plan"),
    "POST /api/v1/rate-tables/{id}/import": [
        Case("rate_table", below=403, raw=(RATES_CSV, "text/csv"))],
    "GET /api/v1/rate-tables/{id}/rates": [Case("rate_table", below=200)],
    "GET /api/v1/rate-tables/{id}/quote": [
        Case("rate_table", below=200, query=lambda c: QUOTE)],
    # numbering
    "GET /api/v1/number-ranges": [LIST],
    "POST /api/v1/number-ranges": [Case("create", 201, body=_range_body, operator_only=True)],
    "GET /api/v1/number-ranges/{id}": [Case("range")],
    "PATCH /api/v1/number-ranges/{id}": [
        Case("range", body=lambda c: {"name": f"Range r{c.n}"}),
        Case("range", body=lambda c: {"name": f"Range r{c.n}", "area_code": "11"},
             operator_only=True, label="its numbers")],
    "DELETE /api/v1/number-ranges/{id}": [
        Case("range", 409, label="a range with DIDs", operator_only=True,
             bug="test_deleting_a_number_range_that_has_dids_answers_409"),
        Case("range", 204, fresh="range", label="an empty range", operator_only=True)],
    "GET /api/v1/number-ranges/{id}/numbers": [
        Case("range", query=lambda c: {"status": "in_use"})],
    "GET /api/v1/dids": [LIST],
    "POST /api/v1/dids": [Case("create", 201, body=_did_body)],
    "GET /api/v1/dids/{id}": [Case("did")],
    "PATCH /api/v1/dids/{id}": [Case("did", body=lambda c: {"monthly_value": "2.50"})],
    "DELETE /api/v1/dids/{id}": [Case("did", 204, fresh="did")],
    # audit
    "GET /api/v1/audit": [
        Case("list", query=lambda c: {"entity": "tenant", "entity_id": str(c.h.tenant)})],
    "GET /api/v1/audit/{id}": [Case("audit")],
    # credit accounts
    "GET /api/v1/extensions/{id}/credit": [Case("extension")],
    "POST /api/v1/extensions/{id}/credit": [
        Case("extension", body=lambda c: {"amount": "1.50", "description": f"top-up {c.n}"})],
    "GET /api/v1/tenants/{id}/credit": [Case("tenant")],
    "POST /api/v1/tenants/{id}/credit": [
        Case("tenant", body=lambda c: {"amount": "2.00", "description": f"top-up {c.n}"})],
    # calls in progress and CDRs
    "GET /api/v1/calls": [Case("list", query=lambda c: {"dealer_id": str(c.h.dealer)})],
    "GET /api/v1/calls/{call_id}": [Case("call")],
    "DELETE /api/v1/calls/{call_id}": [Case("call", 202)],
    "GET /api/v1/cdrs": [LIST],
    "GET /api/v1/cdrs/export": [Case("list", query=lambda c: {
        "dealer_id": str(c.h.dealer), "since": "2026-01-01T00:00:00Z",
        "until": "2026-02-01T00:00:00Z"}, label="CSV export")],
}
# Nodes belong to no dealer: test_only_the_operator_reaches_node_routes covers them.
NODE_ROUTES = {op_id(op) for op in protected_operations()
               if op.path.startswith(("/api/v1/nodes", "/api/v1/carriers"))}


async def fresh(world: World, kind: str, h: Holdings) -> int | str:
    """A new object of `kind` owned by `h`, made by the operator."""
    op, n = world.op, next(_seq)
    if kind == "client":
        return op.ok(await op.post(f"/api/v1/dealers/{h.dealer}/api-clients", {
            "name": f"Spare {n}", "allowed_cidrs": ["192.0.2.0/24"]}), 201)["client_id"]
    if kind in ("tenant", "cancelled_tenant"):
        key = (await op.tenant(h.dealer))["id"]
        if kind == "cancelled_tenant":
            op.ok(await op.post(f"/api/v1/tenants/{key}/cancel"))
        return key
    if kind == "extension":
        return (await op.extension(h.tenant, f"6{n:06d}"))["id"]
    if kind == "plan":
        return op.ok(await op.post("/api/v1/plans", {"dealer_id": h.dealer,
                                                     "name": f"Spare {n}"}), 201)["id"]
    if kind == "rate_table":
        return op.ok(await op.post("/api/v1/rate-tables", {"dealer_id": h.dealer,
                                                           "name": f"Spare {n}"}), 201)["id"]
    if kind == "range":
        return op.ok(await op.post("/api/v1/number-ranges", _range_body(Ctx(world, h))),
                     201)["id"]
    if kind == "did":
        return op.ok(await op.post("/api/v1/dids", _did_body(Ctx(world, h))), 201)["id"]
    raise AssertionError(kind)


@dataclass
class Call:
    method: str
    path: str
    body: Any = None
    raw: tuple[bytes, str] | None = None

    async def send(self, api: Api) -> Reply:
        if self.raw is not None:
            return await api.call(self.method, self.path, raw=self.raw[0],
                                  content_type=self.raw[1])
        return await api.call(self.method, self.path, self.body)

    def __str__(self) -> str:
        return f"{self.method} {self.path}" + (f" {self.body}" if self.body is not None else "")


async def build_call(world: World, op: Operation, case: Case, h: Holdings) -> Call:
    ctx = Ctx(world, h)
    path = op.path
    if "{id}" in path:
        key: int | str = getattr(h, case.target)
        client_id = ""
        if case.fresh == "client":
            client_id = str(await fresh(world, "client", world_holdings(world, h)))
        elif case.fresh is not None:
            key = await fresh(world, case.fresh, h) if h.dealer != MISSING else MISSING
        path = path.replace("{id}", str(key)).replace("{client_id}", client_id)
    if "{call_id}" in path:
        path = path.replace("{call_id}", h.call or str(uuid.uuid4()))
    if case.query is not None:
        path += "?" + urlencode(case.query(ctx))
    body = case.body(ctx) if case.body is not None else None
    return Call(op.method, path, body, case.raw)


def world_holdings(world: World, h: Holdings) -> Holdings:
    """The holdings a fresh API client is made for (the real owner for a MISSING call)."""
    return h if h.dealer != MISSING else world.owns["R1"]


def missing_like(h: Holdings) -> Holdings:
    return Holdings(MISSING, h.level, numbers=itertools.count(1))


def expected_inside(case: Case, rel: str, who: Who, op: Operation, h: Holdings) -> int:
    if op.path.endswith("/impersonate") and who.impersonating:
        return 403  # an impersonation token never starts another one
    if case.operator_only and who.name != "op":
        return 403
    if rel == "self" and case.own is not None:
        return case.own
    if rel == "below":
        assert case.below is not None
        return case.below
    return case.inside(h) if callable(case.inside) else case.inside


def is_problem(reply: Reply) -> bool:
    return (reply.headers.get("Content-Type", "").startswith("application/problem+json")
            and isinstance(reply.body, dict) and reply.body.get("status") == reply.status)


async def check_reachable(world: World, who: Who, owner: str) -> list[str]:
    """Every route on `owner`'s objects, called by `who` (inside the owner's subtree, or
    below it where plans and rate tables are offered): the documented answers, never 404."""
    h = world.owns[owner]
    rel = world.relation(who, h.dealer)
    problems: list[str] = []
    for op in protected_operations():
        key = op_id(op)
        if key in NODE_ROUTES:
            continue
        for case in CASES.get(key, []):
            if rel == "below" and case.below is None:
                continue
            want = expected_inside(case, rel, who, op, h)
            call = await build_call(world, op, case, h)
            before, mark = await snapshot(world.pool), await last_audit_id(world.pool)
            reply = await call.send(who.api)
            after = await snapshot(world.pool)
            where = f"{who.name} on {owner}'s {case.target} ({case.label or rel}): {call}"
            if reply.status != want:
                problems.append(f"{where}: expected {want}, got {reply!r}")
                continue
            if case.target == "list" and not listed(reply):
                problems.append(f"{where}: the page is empty")
            if reply.status >= 400:
                if not is_problem(reply):
                    problems.append(f"{where}: not a problem+json body: {reply!r}")
                if changed(before, after):
                    problems.append(f"{where}: refused but changed {changed(before, after)}")
            elif op.method == "GET":
                if changed(before, after):
                    problems.append(f"{where}: a read changed {changed(before, after)}")
            else:
                entries = await audit_since(world.pool, mark)
                if not entries:
                    problems.append(f"{where}: a write left no audit entry")
                for e in entries:
                    if (e["actor_id"], e["acting_as_id"]) != (
                            who.actor, who.scope if who.impersonating else None):
                        problems.append(f"{where}: audit entry {dict(e)} names the wrong "
                                        f"actor (expected {who.actor} acting as "
                                        f"{who.scope if who.impersonating else None})")
    return problems


_ghosts: dict[tuple[str, str, int, str], Reply] = {}


async def ghost_reply(world: World, who: Who, op: Operation, case: Case, h: Holdings) -> Reply:
    """What `who` gets for the same call on an object that does not exist."""
    key = (who.name, op_id(op), id(case), h.level)
    if key not in _ghosts:
        _ghosts[key] = await (await build_call(world, op, case, missing_like(h))).send(who.api)
    return _ghosts[key]


async def check_unreachable(world: World, who: Who, owner: str) -> list[str]:
    """Every route on `owner`'s objects, called by `who` outside the owner's subtree: the
    same answer as for an object that does not exist, and nothing changes."""
    h = world.owns[owner]
    rel = world.relation(who, h.dealer)
    problems: list[str] = []
    for op in protected_operations():
        key = op_id(op)
        if key in NODE_ROUTES:
            continue
        for case in CASES.get(key, []):
            if rel == "below" and case.below is not None:
                continue  # offered downwards: the reachable test covers them
            call = await build_call(world, op, case, h)
            before = await snapshot(world.pool)
            reply = await call.send(who.api)
            after = await snapshot(world.pool)
            ghost = await ghost_reply(world, who, op, case, h)
            where = f"{who.name} on {owner}'s {case.target} ({case.label or rel}): {call}"
            if changed(before, after):
                problems.append(f"{where}: changed {changed(before, after)}: {reply!r}")
            if case.target == "list":
                # a filter naming a dealer above the caller narrows to the caller's own
                # part of that subtree; one naming a dealer apart finds nothing
                mine = await expected_ids(world.pool, list_resource(op.path), who.scope)
                ids = set(listed(reply)) if reply.status == 200 else None
                if ids is None or not ids <= mine or (rel == "apart" and ids):
                    problems.append(f"{where}: expected a page of the caller's own objects "
                                    f"only, got {reply!r}")
                continue
            if op.path.endswith("/impersonate") and who.impersonating:
                want_status = 403  # refused before the target is even looked up
            else:
                want_status = 422 if case.target == "create" else 404
            if reply.status != want_status or not is_problem(reply):
                problems.append(f"{where}: expected {want_status}, got {reply!r}")
            elif (ghost.status, ghost.body) != (reply.status, reply.body):
                problems.append(f"{where}: answers {reply!r} but a missing object "
                                f"answers {ghost!r}: the object's existence leaks")
    return problems


# -- the matrix ------------------------------------------------------------------------------


@pytest.mark.parametrize("op", protected_operations(), ids=op_id)
def test_every_protected_route_is_in_the_matrix(op: Operation) -> None:
    assert op_id(op) in CASES or op_id(op) in NODE_ROUTES, (
        f"{op_id(op)} has no expected answers in the authorization matrix: add it to CASES")
    assert not op.public


def test_the_matrix_names_no_route_that_does_not_exist() -> None:
    assert set(CASES) | NODE_ROUTES == {op_id(op) for op in protected_operations()}


REACHABLE = [
    ("op", "R1"), ("D1", "R1"), ("S1", "R1"), ("R1", "R1"), ("op>R1", "R1"), ("D1>R1", "R1"),
    ("D1", "R3"), ("S1", "S1"), ("D1", "D1"), ("op", "op"),
    # plans and rate tables only: offered by the owner to the dealers below it
    ("R1", "S1"), ("R1", "D1"), ("R1", "op"), ("S1", "D1"), ("op>R1", "S1"),
]


@pytest.mark.parametrize(("caller", "owner"), REACHABLE,
                         ids=[f"{c}-on-{o}" for c, o in REACHABLE])
async def test_dealers_whose_subtree_holds_the_object_reach_every_route(
        world: World, caller: str, owner: str) -> None:
    problems = await check_reachable(world, world.who[caller], owner)
    assert not problems, "\n".join(problems)


UNREACHABLE = [  # R2 on R1 and R1 on S1 have tests of their own below
    ("R1", "D1", "grandparent"), ("S1", "D1", "parent"), ("D1", "op", "operator"),
    ("S1", "R3", "uncle's child"), ("R3", "R1", "cousin"),
    ("op>R1", "R2", "impersonated sibling"), ("D1>R1", "S1", "impersonated parent"),
    ("D1>R1", "R3", "impersonated cousin"),
]


@pytest.mark.parametrize(("caller", "owner", "relation"), UNREACHABLE,
                         ids=[f"{c}-on-{o}-{r.replace(' ', '_')}" for c, o, r in UNREACHABLE])
async def test_dealers_outside_the_subtree_get_404_on_every_route_and_change_nothing(
        world: World, caller: str, owner: str, relation: str) -> None:
    problems = await check_unreachable(world, world.who[caller], owner)
    assert not problems, "\n".join(problems)


async def test_sibling_reseller_gets_404_on_every_route_of_another_reseller(
        world: World) -> None:
    """The headline case, on its own: R2 and R1 share a parent and nothing else."""
    assert world.relation(world.who["R2"], world.owns["R1"].dealer) == "apart"
    problems = await check_unreachable(world, world.who["R2"], "R1")
    assert not problems, "\n".join(problems)


async def test_reseller_gets_404_on_every_route_of_its_parent(world: World) -> None:
    problems = await check_unreachable(world, world.who["R1"], "S1")
    assert not problems, "\n".join(problems)


# -- lists ------------------------------------------------------------------------------------

LISTED = ("dealers", "tenants", "extensions", "plans", "rate-tables", "number-ranges", "dids",
          "audit", "registrations", "calls", "cdrs")
OFFERED = ("plans", "rate-tables")  # listed with what the caller's ancestors offer
LISTERS = ("op", "D1", "S1", "R1", "R2", "R3", "op>R1", "D1>R1")


def item_id(item: dict[str, Any]) -> int:
    """The id of a listed object (a registration is listed by its extension)."""
    return item["id"] if "id" in item else item["extension_id"]


def listed(reply: Reply) -> list[Any]:
    """The ids a list answered: JSON items, or the first column of a CSV export."""
    if isinstance(reply.body, dict):
        return [item_id(item) for item in reply.body["items"]]
    text = reply.body.decode() if isinstance(reply.body, bytes) else str(reply.body)
    lines = text.splitlines()[1:]
    return [int(line.split(",", 1)[0]) for line in lines if line]


def list_resource(path: str) -> str:
    return "cdrs" if path.endswith("/cdrs/export") else path.rsplit("/", 1)[-1]


async def page_through(api: Api, path: str) -> list[dict[str, Any]]:
    if path.endswith(("/registrations", "/calls")):  # one page, no paging parameters
        return api.ok(await api.get(path))["items"]
    items: list[dict[str, Any]] = []
    after = None
    while True:
        query = "?limit=500" + (f"&after={after}" if after is not None else "")
        page = api.ok(await api.get(path + query))
        items += page["items"]
        after = page["next_after"]
        if after is None:
            return items


async def expected_ids(pool: asyncpg.Pool, resource: str, scope: int) -> set[int]:
    """What `scope`'s lists must hold, worked out from parent_id alone (not from the
    materialised paths the API filters on)."""
    async with pool.acquire() as conn:
        parent = {r["id"]: r["parent_id"] for r in await conn.fetch(
            "SELECT id, parent_id FROM dealers")}

        def chain(d: int | None) -> list[int]:
            out = []
            while d is not None:
                out.append(d)
                d = parent[d]
            return out

        subtree = {d for d in parent if scope in chain(d)}
        if resource == "dealers":
            return subtree
        if resource in OFFERED:
            rows = await conn.fetch(f"SELECT id, dealer_id FROM {resource.replace('-', '_')}")
            offered = subtree | set(chain(scope))
            return {r["id"] for r in rows if r["dealer_id"] in offered}
        sql = {
            "tenants": "SELECT id, dealer_id AS owner FROM tenants",
            "extensions": "SELECT e.id, t.dealer_id AS owner FROM extensions e"
                          " JOIN tenants t ON t.id = e.tenant_id",
            "number-ranges": "SELECT id, dealer_id AS owner FROM number_ranges",
            "dids": "SELECT x.id, r.dealer_id AS owner FROM dids x"
                    " JOIN number_ranges r ON r.id = x.range_id",
            "audit": "SELECT id, scope_path[cardinality(scope_path)] AS owner FROM audit_log",
            "calls": "SELECT id::text AS id, dealer_path[cardinality(dealer_path)] AS owner"
                     " FROM calls",
            "cdrs": "SELECT id, dealer_path[cardinality(dealer_path)] AS owner FROM cdrs",
            "registrations": "SELECT e.id, t.dealer_id AS owner FROM registrations r"
                             " JOIN extensions e ON e.account_code = r.account_code"
                             " JOIN tenants t ON t.id = e.tenant_id",
        }[resource]
        return {r["id"] for r in await conn.fetch(sql) if r["owner"] in subtree}


@pytest.mark.parametrize("caller", LISTERS)
@pytest.mark.parametrize("resource", LISTED)
async def test_list_holds_exactly_the_callers_subtree(
        world: World, resource: str, caller: str) -> None:
    """Each list holds the caller's subtree's objects, all of them and nothing else (plans
    and rate tables add those its ancestors offer); an impersonation token lists as the
    impersonated."""
    who = world.who[caller]
    items = await page_through(who.api, f"/api/v1/{resource}")
    ids = [item_id(item) for item in items]
    assert len(ids) == len(set(ids)), f"duplicates in {resource}: {ids}"
    want = await expected_ids(world.pool, resource, who.scope)
    assert set(ids) == want, (
        f"{caller} lists {resource} it should not see: {sorted(set(ids) - want)}; "
        f"misses: {sorted(want - set(ids))}")


async def test_reseller_lists_only_its_own_tenants(world: World) -> None:
    r1 = world.owns["R1"]
    tenants = await page_through(world.who["R1"].api, "/api/v1/tenants")
    assert tenants, "the reseller's own tenant is missing"
    assert {t["dealer_id"] for t in tenants} == {r1.dealer}
    assert r1.tenant in {t["id"] for t in tenants}
    others = {h.tenant for name, h in world.owns.items() if name != "R1"}
    assert not others & {t["id"] for t in tenants}


OFFERED_KIND = {"plans": "plan", "rate-tables": "rate_table"}  # resource -> Holdings field


@pytest.mark.parametrize("resource", OFFERED)
async def test_reseller_sees_what_its_ancestors_offer_but_not_its_siblings(
        world: World, resource: str) -> None:
    items = await page_through(world.who["R1"].api, f"/api/v1/{resource}")
    owners = {p["dealer_id"] for p in items}
    chain = {world.owns[n].dealer for n in ("op", "D1", "S1", "R1")}
    assert chain <= owners <= chain
    assert getattr(world.owns["R2"], OFFERED_KIND[resource]) not in {p["id"] for p in items}


# -- plans and rate tables offered downwards are read-only ------------------------------------


READERS = [("R1", "S1"), ("R1", "D1"), ("R1", "op"), ("R3", "D1"), ("S1", "D1"),
           ("S1", "op"), ("op>R1", "S1"), ("D1>R1", "D1")]


@pytest.mark.parametrize("resource", OFFERED)
@pytest.mark.parametrize(("caller", "ancestor"), READERS,
                         ids=[f"{c}-on-{a}" for c, a in READERS])
async def test_dealer_cannot_change_what_an_ancestor_offers(
        world: World, caller: str, ancestor: str, resource: str) -> None:
    who = world.who[caller]
    assert world.relation(who, world.owns[ancestor].dealer) == "below"
    key = getattr(world.owns[ancestor], OFFERED_KIND[resource])
    path = f"/api/v1/{resource}/{key}"
    before = await snapshot(world.pool)
    assert who.api.ok(await who.api.get(path))["id"] == key
    refused = [await who.api.patch(path, {"name": "Mine now"}), await who.api.delete(path)]
    if resource == "rate-tables":
        refused.append(await who.api.call("POST", f"{path}/import", raw=RATES_CSV,
                                          content_type="text/csv"))
    assert [r.status for r in refused] == [403] * len(refused), refused
    assert all(is_problem(r) for r in refused)
    assert changed(before, await snapshot(world.pool)) == []


# -- nodes --------------------------------------------------------------------------------------

NODE_BODY = {"name": "node-x", "sip_address": "198.51.100.20", "ami_host": "10.0.0.20",
             "ami_username": "admin", "ami_secret": "ami-secret-123456",
             "ari_url": "http://10.0.0.20:8088", "ari_username": "ari",
             "ari_password": "ari-password-123456"}


async def node_call(world: World, op: Operation) -> Call:
    n = next(_seq)
    if op.path.startswith("/api/v1/carriers"):
        return await carrier_call(world, op, n)
    key: int = world.node
    if op.method == "DELETE":
        key = world.op.ok(await world.op.post("/api/v1/nodes", {
            **NODE_BODY, "name": f"spare-{n}"}), 201)["id"]
    path = op.path.replace("{id}", str(key))
    body = {"POST": {**NODE_BODY, "name": f"node-{n}"},
            "PATCH": {"status": "maintenance"}}.get(op.method)
    return Call(op.method, path, body)


async def carrier_call(world: World, op: Operation, n: int) -> Call:
    """Carriers are infrastructure of a node: a new one for every call on one."""
    body = {"node_id": world.node, "name": f"carrier-{n}", "host": "198.51.100.30"}
    key = world.op.ok(await world.op.post("/api/v1/carriers", body), 201)["id"]
    path = op.path.replace("{id}", str(key))
    return Call(op.method, path, {"POST": {**body, "name": f"carrier-{n}b"},
                                  "PATCH": {"priority": 5}}.get(op.method))


NODE_OPS = [op for op in protected_operations() if op_id(op) in NODE_ROUTES]


@pytest.mark.parametrize("op", NODE_OPS, ids=op_id)
async def test_only_the_operator_reaches_node_routes(world: World, op: Operation) -> None:
    call = await node_call(world, op)
    reply = await call.send(world.op)
    assert 200 <= reply.status < 300, reply
    for name in ("D1", "S1", "R1", "R2", "R3", "op>R1", "D1>R1"):
        call = await node_call(world, op)
        before = await snapshot(world.pool)
        reply = await call.send(world.who[name].api)
        assert reply.status == 403 and is_problem(reply), (name, str(call), reply)
        assert changed(before, await snapshot(world.pool)) == [], (name, str(call))


# -- business refusals that are not about visibility ------------------------------------------


async def test_dealer_cannot_change_its_own_caps_but_its_parent_can(world: World) -> None:
    r1, s1 = world.who["R1"].api, world.who["S1"].api
    key = world.owns["R1"].dealer
    before = await snapshot(world.pool)
    for body in ({"max_calls": 5}, {"max_tenants": 1000}, {"active": False},
                 {"billing_mode": "postpaid"}, {"credit_limit": "100"}):
        reply = await r1.patch(f"/api/v1/dealers/{key}", body)
        assert reply.status == 403 and is_problem(reply), (body, reply)
    assert changed(before, await snapshot(world.pool)) == []
    assert s1.ok(await s1.patch(f"/api/v1/dealers/{key}", {"max_calls": 50}))["max_calls"] == 50
    assert s1.ok(await s1.patch(f"/api/v1/dealers/{key}", {"max_calls": None}))["max_calls"] \
        is None


async def test_only_the_operator_assigns_a_node_to_a_dealer(world: World) -> None:
    key = world.owns["R1"].dealer
    before = await snapshot(world.pool)
    for name in ("D1", "S1"):
        reply = await world.who[name].api.patch(f"/api/v1/dealers/{key}",
                                                {"node_id": world.node})
        assert reply.status == 403 and is_problem(reply), (name, reply)
    assert changed(before, await snapshot(world.pool)) == []
    op = world.op
    assert op.ok(await op.patch(f"/api/v1/dealers/{key}",
                                {"node_id": world.node}))["node_id"] == world.node
    assert op.ok(await op.patch(f"/api/v1/dealers/{key}", {"node_id": None}))["node_id"] is None


# -- impersonation --------------------------------------------------------------------------------


@pytest.mark.parametrize("caller", ["op", "D1"])
async def test_operator_and_distributor_impersonate_the_reseller(
        world: World, caller: str) -> None:
    who, r1 = world.who[caller], world.owns["R1"]
    reply = await who.api.post(f"/api/v1/dealers/{r1.dealer}/impersonate")
    body = who.api.ok(reply, 201)
    assert body["acting_as"] == r1.dealer and body["token_type"] == "Bearer"
    assert "refresh_token" not in body
    token = Api(who.api.client, who.api.pool, token=body["access_token"])
    dealers = await page_through(token, "/api/v1/dealers")
    assert [d["id"] for d in dealers] == [r1.dealer]
    tenants = await page_through(token, "/api/v1/tenants")
    assert {t["id"] for t in tenants} == await expected_ids(world.pool, "tenants", r1.dealer)
    r2 = world.owns["R2"]
    for path in (f"/api/v1/dealers/{r2.dealer}", f"/api/v1/tenants/{r2.tenant}",
                 f"/api/v1/extensions/{r2.extension}", f"/api/v1/dids/{r2.did}"):
        reply = await token.get(path)
        assert reply.status == 404 and is_problem(reply), (path, reply)


async def test_impersonation_token_cannot_impersonate_again(world: World) -> None:
    """Even where its impersonated dealer could: the operator acting as S1 may not go on to
    impersonate R1."""
    as_s1 = await impersonate(world.op, world.owns["S1"].dealer)
    before = await snapshot(world.pool)
    for target in ("R1", "R2", "S1"):
        reply = await as_s1.post(f"/api/v1/dealers/{world.owns[target].dealer}/impersonate")
        assert reply.status == 403 and is_problem(reply), (target, reply)
    for name in ("op>R1", "D1>R1"):
        api = world.who[name].api
        reply = await api.post(f"/api/v1/dealers/{world.owns['R1'].dealer}/impersonate")
        assert reply.status == 403 and is_problem(reply), (name, reply)
    assert changed(before, await snapshot(world.pool)) == []


async def test_reseller_cannot_impersonate_its_parent_nor_itself(world: World) -> None:
    r1 = world.who["R1"].api
    before = await snapshot(world.pool)
    parent = await r1.post(f"/api/v1/dealers/{world.owns['S1'].dealer}/impersonate")
    sibling = await r1.post(f"/api/v1/dealers/{world.owns['R2'].dealer}/impersonate")
    itself = await r1.post(f"/api/v1/dealers/{world.owns['R1'].dealer}/impersonate")
    assert (parent.status, sibling.status, itself.status) == (404, 404, 403), (
        parent, sibling, itself)
    assert changed(before, await snapshot(world.pool)) == []


async def test_audit_entries_written_while_impersonating_name_both_dealers(
        world: World) -> None:
    op, d1, r1 = world.who["op"], world.who["D1"], world.owns["R1"]
    tenant = world.who["op>R1"].api.ok(await world.who["op>R1"].api.post(
        "/api/v1/tenants", {"name": "Made as R1"}), 201)
    assert tenant["dealer_id"] == r1.dealer
    world.who["D1>R1"].api.ok(await world.who["D1>R1"].api.patch(
        f"/api/v1/tenants/{tenant['id']}", {"notes": "changed as R1"}))

    for reader in ("op", "D1", "S1", "R1"):
        api = world.who[reader].api
        page = api.ok(await api.get(f"/api/v1/audit?entity=tenant&entity_id={tenant['id']}"))
        got = [(e["action"], e["actor_id"], e["acting_as_id"]) for e in page["items"]]
        assert got == [("create", op.actor, r1.dealer), ("update", d1.actor, r1.dealer)], (
            reader, got)
        # which API client an actor above the reader used, and from where, stays its own
        seen = [(e["client_id"] is not None, e["source_ip"] is not None) for e in page["items"]]
        assert seen == [(reader == "op",) * 2, (reader in ("op", "D1"),) * 2], (reader, seen)
        by_filter = api.ok(await api.get(
            f"/api/v1/audit?acting_as_id={r1.dealer}&actor_id={d1.actor}&entity=tenant"
            f"&entity_id={tenant['id']}"))
        assert [e["action"] for e in by_filter["items"]] == ["update"], reader
    for outsider in ("R2", "R3"):
        api = world.who[outsider].api
        page = api.ok(await api.get(f"/api/v1/audit?entity=tenant&entity_id={tenant['id']}"))
        assert page["items"] == [], outsider

    # the impersonation itself is recorded by the real dealer, acting as nobody
    page = op.api.ok(await op.api.get(
        f"/api/v1/audit?action=impersonate&entity_id={r1.dealer}&actor_id={d1.actor}"))
    assert page["items"], "the impersonation was not audited"
    assert all(e["acting_as_id"] is None for e in page["items"])



# -- product bugs met on the way -------------------------------------------------------------


async def test_deleting_a_number_range_that_has_dids_answers_409(world: World) -> None:
    r1 = world.owns["R1"]
    before = await snapshot(world.pool)
    reply = await world.op.delete(f"/api/v1/number-ranges/{r1.range}")
    assert reply.status == 409 and is_problem(reply), reply
    assert changed(before, await snapshot(world.pool)) == []


@pytest.mark.parametrize("owned", ["plan", "rate table", "number range"])
async def test_deleting_a_dealer_that_still_owns_a_plan_or_range_answers_409(
        world: World, owned: str) -> None:
    op, s1 = world.op, world.who["S1"].api
    dealer = await op.dealer("reseller", world.owns["S1"].dealer)
    if owned in ("plan", "rate table"):
        path = "/api/v1/plans" if owned == "plan" else "/api/v1/rate-tables"
        op.ok(await op.post(path, {"dealer_id": dealer["id"], "name": "Kept"}), 201)
    else:
        op.ok(await op.post("/api/v1/number-ranges", _range_body(
            Ctx(world, Holdings(dealer["id"], "reseller")))), 201)
    before = await snapshot(world.pool)
    reply = await s1.delete(f"/api/v1/dealers/{dealer['id']}")
    assert reply.status == 409 and is_problem(reply), reply
    assert changed(before, await snapshot(world.pool)) == []
