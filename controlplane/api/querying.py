"""Query-string filters of the hand-written list routes (the generic ones live in
resource.py): each known parameter becomes one SQL condition on one bound parameter."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web

from controlplane.api.keys import POOL
from controlplane.api.problems import invalid
from controlplane.api.resource import (
    Filter,
    int_filter,
    json_response,
    parse_filters,
    principal_of,
    text_filter,
)
from controlplane.api.routes import QueryParam


def conditions(query: Mapping[str, str], filters: Iterable[Filter], args: list[Any],
               extra: Mapping[str, Filter] | None = None) -> list[str]:
    """SQL conditions for `query`, appending their values to `args`. Unknown parameters and
    bad values answer 422 naming each one. `extra` filters are parsed and bound too."""
    known = {f.name: f for f in filters}
    known.update(extra or {})
    where, errors = parse_filters(query, known, args)
    if errors:
        raise invalid(errors)
    return where


def params(filters: Iterable[Filter]) -> tuple[QueryParam, ...]:
    return tuple(QueryParam(f.name, f.schema, f.description) for f in filters)


def call_filters(alias: str) -> tuple[Filter, ...]:
    """The filters of calls in progress and of CDRs (both carry a dealer path)."""
    return (
        int_filter("tenant_id", f"{alias}.tenant_id = ${{}}", "calls of this tenant"),
        int_filter("extension_id", f"{alias}.extension_id = ${{}}", "calls of this extension"),
        int_filter("dealer_id", f"{alias}.dealer_path @> ARRAY[${{}}]::bigint[]",
                   "in this dealer's subtree"),
        int_filter("node_id", f"{alias}.node_id = ${{}}", "on this node"),
        text_filter("direction", f"{alias}.direction = ${{}}", "internal, outbound or inbound",
                    choices=("internal", "outbound", "inbound")),
    )


# what scoped_items answers
CAPPED_LIST = {"type": "object", "properties": {
    "items": {"type": "array", "items": {"type": "object"}},
    "truncated": {"type": "boolean", "description": "more matched than the list holds: filter"}}}


async def scoped_items(request: web.Request, scoped_sql: str, filters: Iterable[Filter],
                       order_by: str, limit: int) -> web.Response:
    """Every row of `scoped_sql` (whose $1 is the caller's scope) the query's filters keep,
    at most `limit`, as {"items": [...], "truncated": whether more rows matched}."""
    args: list[Any] = [principal_of(request).scope_id]
    where = conditions(request.query, filters, args)
    sql = (scoped_sql + "".join(f" AND {w}" for w in where)
           + f" ORDER BY {order_by} LIMIT {limit + 1}")
    async with request.app[POOL].acquire() as conn:
        rows = await conn.fetch(sql, *args)
    return json_response({"items": [dict(r) for r in rows[:limit]],
                          "truncated": len(rows) > limit})
