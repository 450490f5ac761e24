"""The life of an API object: scoped read, validated write, audit in the same transaction.

A `Resource` states its SQL and rules; `register_crud` gives it the five standard routes.
Every read is filtered by the caller's subtree, so an object outside it answers 404.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web

from controlplane.api.fields import FieldError, Schema, ValidationFailed, is_ascii_digits
from controlplane.api.keys import POOL, PRINCIPAL
from controlplane.api.problems import ApiError, forbidden, from_validation, invalid, not_found
from controlplane.api.routes import QueryParam, RouteTable
from controlplane.model.principal import Principal
from controlplane.store import audit
from controlplane.store.sql import insert, json_default, update

MAX_PAGE = 500
DEFAULT_PAGE = 50


@dataclass(frozen=True)
class Filter:
    """A list filter: query parameter -> SQL condition on one parameter (`{}` is its number)."""

    name: str
    condition: str
    parse: Callable[[str], Any]
    schema: dict[str, Any]
    description: str = ""


def page_limit(raw: str) -> int | None:
    """A page size asked for, or None when it is not one from 1 to MAX_PAGE (its length is
    checked first: Python refuses to read an integer of thousands of digits)."""
    if not is_ascii_digits(raw) or len(raw) > len(str(MAX_PAGE)) or not 1 <= int(raw) <= MAX_PAGE:
        return None
    return int(raw)


def take_paging(query: dict[str, str]) -> tuple[int, int, list[tuple[str, str]]]:
    """(limit, after) taken out of `query`, and the errors (pointer, detail) of bad ones."""
    errors = []
    limit, after = DEFAULT_PAGE, 0
    raw = query.pop("limit", None)
    if raw is not None:
        limit = page_limit(raw)
        if limit is None:
            errors.append(("/query/limit", f"must be an integer from 1 to {MAX_PAGE}"))
            limit = DEFAULT_PAGE
    raw = query.pop("after", None)
    if raw is not None:
        if not is_ascii_digits(raw) or len(raw) > 18:
            errors.append(("/query/after", "must be the next_after value of the previous page"))
        else:
            after = int(raw)
    return limit, after, errors


def parse_filters(query: Mapping[str, str], known: Mapping[str, Filter],
                  args: list[Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """SQL conditions for the filters `query` names, their values appended to `args`, and
    the errors (pointer, detail) of unknown parameters and bad values. A period whose
    `since` is not before its `until` is an error: an empty answer would read as "nothing
    happened then"."""
    where: list[str] = []
    errors: list[tuple[str, str]] = []
    parsed: dict[str, Any] = {}
    for name, raw in query.items():
        try:
            if name not in known:
                raise FieldError("is not a known query parameter")
            parsed[name] = known[name].parse(raw)
            args.append(parsed[name])
            where.append(known[name].condition.format(len(args)))
        except FieldError as exc:
            errors.append((f"/query/{name[:50]}", str(exc)))
    if not errors and "since" in parsed and "until" in parsed \
            and parsed["since"] >= parsed["until"]:
        errors = [("/query/since", "must be before until"),
                  ("/query/until", "must be after since")]
    return where, errors


def int_filter(name: str, condition: str, description: str) -> Filter:
    def parse(raw: str) -> int:
        if not is_ascii_digits(raw) or len(raw) > 18:
            raise FieldError("must be a positive integer")
        return int(raw)

    return Filter(name, condition, parse, {"type": "integer", "minimum": 1}, description)


def bool_filter(name: str, condition: str, description: str) -> Filter:
    def parse(raw: str) -> bool:
        if raw not in ("true", "false"):
            raise FieldError("must be true or false")
        return raw == "true"

    return Filter(name, condition, parse, {"type": "boolean"}, description)


def text_filter(name: str, condition: str, description: str,
                choices: tuple[str, ...] | None = None, max_len: int = 100) -> Filter:
    def parse(raw: str) -> str:
        if choices is not None and raw not in choices:
            raise FieldError("must be one of: " + ", ".join(choices))
        if len(raw) > max_len or any(ord(c) < 32 for c in raw):
            raise FieldError(f"must be at most {max_len} printable characters")
        return raw

    schema: dict[str, Any] = {"type": "string", "maxLength": max_len}
    if choices:
        schema["enum"] = list(choices)
    return Filter(name, condition, parse, schema, description)


def subtree_filter(owner_path: str) -> Filter:
    return int_filter("dealer_id", f"{owner_path} @> ARRAY[${{}}]::bigint[]",
                      "only objects in this dealer's subtree")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class RawJson(str):
    """A JSON document already encoded (by PostgreSQL)."""


def json_response(data: Any, status: int = 200) -> web.Response:
    text = data if isinstance(data, RawJson) else json.dumps(data, default=json_default)
    return web.Response(text=text, status=status, content_type="application/json")


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def path_id(request: web.Request, name: str = "id") -> int:
    raw = request.match_info[name]
    if not is_ascii_digits(raw) or len(raw) > 18:
        raise not_found()
    return int(raw)


async def read_json(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise ApiError(415, "Unsupported media type", "send the body as application/json",
                       kind="media-type")
    try:
        return json.loads(await request.read())
    except RecursionError as exc:
        raise ApiError(400, "Malformed JSON", "the body is nested too deeply",
                       kind="malformed") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "Malformed JSON", f"the body is not valid JSON ({exc})",
                       kind="malformed") from exc


def require_operator(p: Principal, detail: str) -> None:
    """403 with `detail` unless the caller is the platform operator itself (impersonating
    no one): what belongs to the platform's infrastructure."""
    if not p.is_operator:
        raise forbidden(detail)


async def managed_owner(conn: asyncpg.Connection, p: Principal, data: dict[str, Any],
                        field: str = "dealer_id") -> int:
    """The owning dealer named in `data` (the caller's own by default), if the caller manages it."""
    owner = data.setdefault(field, p.scope_id)
    if not await conn.fetchval("SELECT 1 FROM dealers WHERE id = $1 AND"
                               " path @> ARRAY[$2]::bigint[]", owner, p.scope_id):
        raise invalid([(f"/{field}", "is not a dealer you manage")])
    return int(owner)


def validate(schema: Schema, body: Any, *, partial: bool = False) -> dict[str, Any]:
    try:
        return schema.validate(body, partial=partial)
    except ValidationFailed as exc:
        raise from_validation(exc) from exc


class Resource:
    """One kind of API object. Subclasses set the class attributes and override the hooks."""

    name: str = ""             # URL segment, e.g. "tenants"
    entity: str = ""           # audit entity, e.g. "tenant"
    table: str = ""
    alias: str = ""            # alias of `table` in select_sql
    select_sql: str = ""       # SELECT ... WHERE <scope condition on $1>; must expose owner_path
    create_schema: Schema | None = None
    update_schema: Schema | None = None
    filters: Sequence[Filter] = ()
    columns: frozenset[str] = frozenset()   # columns a write may set
    hidden: frozenset[str] = frozenset()    # columns never returned
    response_schema: dict[str, Any] = {}
    tag: str = ""
    deletable: bool = True
    # create() makes all its writes in one statement (atomic by itself): it then runs outside
    # a transaction, which saves the BEGIN and COMMIT round trips and holds the rows the
    # statement locks only while it runs
    atomic_create: bool = False
    _exposed: list[str] | None = None

    # -- reading -------------------------------------------------------------------------
    async def get(self, conn: asyncpg.Connection, p: Principal, key: int, *,
                  lock: bool = False) -> asyncpg.Record | None:
        sql = f"{self.select_sql} AND {self.alias}.id = $2"
        if lock:
            sql += f" FOR UPDATE OF {self.alias}"
        return await conn.fetchrow(sql, p.scope_id, key)

    async def require(self, conn: asyncpg.Connection, p: Principal, key: int, *,
                      lock: bool = False) -> asyncpg.Record:
        row = await self.get(conn, p, key, lock=lock)
        if row is None:
            raise not_found(self.entity)
        return row

    async def list(self, conn: asyncpg.Connection, p: Principal,
                   query: dict[str, str]) -> RawJson:
        args: list[Any] = [p.scope_id]
        query = dict(query)
        limit, after, errors = take_paging(query)
        where, bad = parse_filters(query, {f.name: f for f in self.filters}, args)
        errors += bad
        if errors:
            raise invalid(errors)
        args += [after, limit]
        conditions = "".join(f" AND {w}" for w in where)
        n = len(args)
        exposed = ", ".join(f"q.{quote_ident(c)}" for c in await self.exposed_columns(conn))
        # PostgreSQL builds the page's JSON: decoding rows into Python only to encode them
        # again cost most of a list request. json_agg over a row of exactly the exposed
        # columns costs a fraction of building jsonb objects and deleting the hidden keys.
        # One row more than the page tells whether another page follows.
        sql = (f"WITH q AS ({self.select_sql}{conditions} AND {self.alias}.id > ${n - 1}"
               f" ORDER BY {self.alias}.id LIMIT ${n} + 1)"
               f" SELECT coalesce(json_agg(page ORDER BY page.id), '[]')::text AS items,"
               f" max(page.id) AS last, (SELECT count(*) FROM q) > ${n} AS more"
               f" FROM (SELECT {exposed} FROM q ORDER BY q.id LIMIT ${n}) page")
        row = await conn.fetchrow(sql, *args)
        return RawJson(f'{{"items": {row["items"]}, '
                       f'"next_after": {row["last"] if row["more"] else "null"}}}')

    async def exposed_columns(self, conn: asyncpg.Connection) -> list[str]:
        """The columns of `select_sql` a reader sees (hidden ones and owner_path left out),
        in their order, as PostgreSQL describes the statement; worked out once."""
        if self._exposed is None:
            stmt = await conn.prepare(f"SELECT * FROM ({self.select_sql}) q LIMIT 0")
            names = [a.name for a in stmt.get_attributes()]
            self._exposed = [c for c in names if c not in self.hidden and c != "owner_path"]
        return self._exposed

    def present(self, row: asyncpg.Record) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k not in self.hidden and k != "owner_path"}

    # -- hooks ---------------------------------------------------------------------------
    async def before_create(self, conn: asyncpg.Connection, p: Principal,
                            data: dict[str, Any]) -> dict[str, Any]:
        return data

    async def before_update(self, conn: asyncpg.Connection, p: Principal,
                            current: asyncpg.Record, data: dict[str, Any]) -> dict[str, Any]:
        return data

    async def before_delete(self, conn: asyncpg.Connection, p: Principal,
                            current: asyncpg.Record) -> None:
        return None

    async def after_write(self, conn: asyncpg.Connection, p: Principal, key: int) -> None:
        """Runs inside the write's transaction (e.g. to tell the nodes a tenant changed)."""
        return None

    # -- writing -------------------------------------------------------------------------
    async def create(self, conn: asyncpg.Connection, p: Principal,
                     data: dict[str, Any]) -> dict[str, Any]:
        data = await self.before_create(conn, p, data)
        sql, args = insert(self.table, data, self.columns, returning="id")
        key = await conn.fetchval(sql, *args)
        row = await self.require(conn, p, key)
        after = self.present(row)
        await audit.record(conn, p, "create", self.entity, key, row["owner_path"], None, after)
        await self.after_write(conn, p, key)
        return after

    async def update(self, conn: asyncpg.Connection, p: Principal, key: int,
                     data: dict[str, Any]) -> dict[str, Any]:
        current = await self.require(conn, p, key, lock=True)
        data = await self.before_update(conn, p, current, data)
        sql, args = update(self.table, key, data, self.columns, returning="id")
        await conn.execute(sql, *args)
        row = await self.require(conn, p, key)
        before, after = self.present(current), self.present(row)
        await audit.record(conn, p, "update", self.entity, key, row["owner_path"], before, after)
        await self.after_write(conn, p, key)
        return after

    async def delete(self, conn: asyncpg.Connection, p: Principal, key: int) -> None:
        current = await self.require(conn, p, key, lock=True)
        await self.before_delete(conn, p, current)
        await conn.execute(f"DELETE FROM {self.table} WHERE id = $1", key)
        await audit.record(conn, p, "delete", self.entity, key, current["owner_path"],
                           self.present(current), None)
        await self.after_write(conn, p, key)


def register_crud(routes: RouteTable, res: Resource) -> None:
    """GET list, POST create, GET one, PATCH update, DELETE for `res`."""
    base = f"/api/v1/{res.name}"
    item = {"$ref": f"#/components/schemas/{res.entity}"}
    page = {"type": "object", "properties": {"items": {"type": "array", "items": item},
                                             "next_after": {"type": ["integer", "null"]}}}

    async def list_items(request: web.Request) -> web.Response:
        async with request.app[POOL].acquire() as conn:
            return json_response(await res.list(conn, principal_of(request), dict(request.query)))

    async def get_item(request: web.Request) -> web.Response:
        async with request.app[POOL].acquire() as conn:
            row = await res.require(conn, principal_of(request), path_id(request))
            return json_response(res.present(row))

    async def create_item(request: web.Request) -> web.Response:
        assert res.create_schema is not None
        data = validate(res.create_schema, await read_json(request))
        async with request.app[POOL].acquire() as conn:
            if res.atomic_create:
                return json_response(await res.create(conn, principal_of(request), data), 201)
            async with conn.transaction():
                return json_response(await res.create(conn, principal_of(request), data), 201)

    async def update_item(request: web.Request) -> web.Response:
        assert res.update_schema is not None
        key = path_id(request)
        data = validate(res.update_schema, await read_json(request), partial=True)
        async with request.app[POOL].acquire() as conn, conn.transaction():
            return json_response(await res.update(conn, principal_of(request), key, data))

    async def delete_item(request: web.Request) -> web.Response:
        key = path_id(request)
        async with request.app[POOL].acquire() as conn, conn.transaction():
            await res.delete(conn, principal_of(request), key)
        return web.Response(status=204)

    page_params = (
        QueryParam("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE,
                             "default": DEFAULT_PAGE}, "page size"),
        QueryParam("after", {"type": "integer", "minimum": 0},
                   "the next_after value of the previous page"),
    )
    filters = tuple(QueryParam(f.name, f.schema, f.description) for f in res.filters)
    routes.add("GET", base, list_items, f"List {res.name}", res.tag, response=page,
               query=page_params + filters)
    if res.create_schema is not None:
        routes.add("POST", base, create_item, f"Create a {res.entity}", res.tag,
                   body=res.create_schema, response=item, status=201)
    routes.add("GET", base + "/{id}", get_item, f"Read a {res.entity}", res.tag, response=item)
    if res.update_schema is not None:
        routes.add("PATCH", base + "/{id}", update_item, f"Change a {res.entity}", res.tag,
                   body=res.update_schema, partial=True, response=item)
    if res.deletable:
        routes.add("DELETE", base + "/{id}", delete_item, f"Delete a {res.entity}", res.tag,
                   status=204)
