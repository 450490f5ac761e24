"""Call detail records: one per call, imported from the nodes; listed page by page or
exported as CSV for billing systems, filtered by period, dealer, tenant and extension."""

from __future__ import annotations

from aiohttp import web

from controlplane.api.fields import is_ascii_digits
from controlplane.api.keys import POOL
from controlplane.api.problems import invalid
from controlplane.api.querying import call_filters, conditions, params
from controlplane.api.resource import (
    DEFAULT_PAGE,
    MAX_PAGE,
    json_response,
    principal_of,
)
from controlplane.api.resources.audit import time_filter
from controlplane.api.routes import QueryParam, RouteTable
from controlplane.billing import export

SCOPED = (f"SELECT {export.SELECT} FROM cdrs c WHERE (c.dealer_path @> ARRAY[$1]::bigint[]"
          " OR (cardinality(c.dealer_path) = 0"
          "     AND $1 = (SELECT id FROM dealers WHERE parent_id IS NULL)))")
FILTERS = (
    time_filter("since", "c.started_at >= ${}", "calls started at or after"),
    time_filter("until", "c.started_at < ${}", "calls started before"),
    *call_filters("c"),
)


def _paging(query: dict[str, str]) -> tuple[int, int]:
    """(limit, after) taken out of `query`."""
    errors = []
    limit, after = DEFAULT_PAGE, 0
    raw = query.pop("limit", None)
    if raw is not None:
        if not is_ascii_digits(raw) or not 1 <= int(raw) <= MAX_PAGE:
            errors.append(("/query/limit", f"must be an integer from 1 to {MAX_PAGE}"))
        else:
            limit = int(raw)
    raw = query.pop("after", None)
    if raw is not None:
        if not is_ascii_digits(raw) or len(raw) > 18:
            errors.append(("/query/after", "must be the next_after value of the previous page"))
        else:
            after = int(raw)
    if errors:
        raise invalid(errors)
    return limit, after


async def list_cdrs(request: web.Request) -> web.Response:
    p = principal_of(request)
    query = dict(request.query)
    limit, after = _paging(query)
    args: list[object] = [p.scope_id]
    where = conditions(query, FILTERS, args)
    args += [after, limit + 1]
    sql = (SCOPED + "".join(f" AND {w}" for w in where)
           + f" AND c.id > ${len(args) - 1} ORDER BY c.id LIMIT ${len(args)}")
    async with request.app[POOL].acquire() as conn:
        rows = await conn.fetch(sql, *args)
    items = [export.as_json(r) for r in rows[:limit]]
    more = len(rows) > limit
    return json_response({"items": items, "next_after": items[-1]["id"] if more else None})


async def export_cdrs(request: web.Request) -> web.StreamResponse:
    p = principal_of(request)
    args: list[object] = [p.scope_id]
    missing = [(f"/query/{name}", "is required for an export") for name in ("since", "until")
               if name not in request.query]
    if missing:
        raise invalid(missing)
    where = conditions(request.query, FILTERS, args)
    sql = SCOPED + "".join(f" AND {w}" for w in where) + " ORDER BY c.id"
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": 'attachment; filename="cdrs.csv"'})
    await response.prepare(request)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        await response.write(export.csv_header())
        async for row in conn.cursor(sql, *args, prefetch=1000):
            await response.write(export.csv_line(row))
    await response.write_eof()
    return response


def register(routes: RouteTable) -> None:
    page = {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "object"}},
        "next_after": {"type": ["integer", "null"]}}}
    paging = (
        QueryParam("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE,
                             "default": DEFAULT_PAGE}, "page size"),
        QueryParam("after", {"type": "integer", "minimum": 0},
                   "the next_after value of the previous page"),
    )
    routes.add("GET", "/api/v1/cdrs", list_cdrs, "List call detail records", "cdrs",
               response=page, query=paging + params(FILTERS))
    routes.add("GET", "/api/v1/cdrs/export", export_cdrs,
               "Export call detail records as CSV (since and until are required)", "cdrs",
               query=params(FILTERS), response_types=("text/csv",))
