"""Call detail records: one per call, imported from the nodes; listed page by page or
exported as CSV or JSON for billing systems, filtered by period, dealer, tenant and
extension."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from aiohttp import web

from controlplane.api.keys import POOL, SETTINGS
from controlplane.api.problems import ApiError, invalid
from controlplane.api.querying import call_filters, conditions, params
from controlplane.api.resource import (
    DEFAULT_PAGE,
    MAX_PAGE,
    json_response,
    principal_of,
    take_paging,
)
from controlplane.api.resources.audit import time_filter
from controlplane.api.routes import QueryParam, RouteTable
from controlplane.billing import export

log = logging.getLogger(__name__)
SCOPED = (f"SELECT {export.SELECT} FROM cdrs c WHERE (c.dealer_path @> ARRAY[$1]::bigint[]"
          " OR (cardinality(c.dealer_path) = 0"
          "     AND $1 = (SELECT id FROM dealers WHERE parent_id IS NULL)))")
FILTERS = (
    time_filter("since", "c.started_at >= ${}", "calls started at or after"),
    time_filter("until", "c.started_at < ${}", "calls started before"),
    *call_filters("c"),
)
EXPORT_CHUNK = 1000
CDR_LIST_LOCK_KEY = 7_140_019  # held shared by every statement storing CDRs (migration 0019)
LIST_LOCK_WAIT_MS = 3000  # then 503: a transaction storing CDRs has not ended
LAST_ID_SQL = "SELECT last_value FROM cdrs_id_seq"  # the last id handed out (cache 1)
# An export holds a database connection for as long as its client takes to read it: at most
# a quarter of the pool goes to exports (others answer 503 with Retry-After), and a client
# that takes no chunk for this long is cut off.
EXPORT_WRITE_TIMEOUT = 30.0
EXPORT_RETRY_AFTER = "10"


class ExportSlots:
    """How many exports may run at once in this process."""

    def __init__(self) -> None:
        self.running = 0

    def limit(self, request: web.Request) -> int:
        return max(1, request.app[SETTINGS].db_pool_max // 4)


SLOTS = ExportSlots()


@dataclass(frozen=True)
class ExportFormat:
    content_type: str
    filename: str
    head: bytes
    separator: bytes
    tail: bytes
    item: Callable[[asyncpg.Record], bytes]


def _json_item(row: asyncpg.Record) -> bytes:
    return json.dumps(export.as_json(row), separators=(",", ":")).encode()


FORMATS = {
    "csv": ExportFormat("text/csv; charset=utf-8", "cdrs.csv", export.csv_header(), b"", b"",
                        export.csv_line),
    # the list's shape ({"items": [...]}), in one document
    "json": ExportFormat("application/json", "cdrs.json", b'{"items":[', b",", b"]}\n",
                         _json_item),
}


def _paging(query: dict[str, str]) -> tuple[int, int]:
    """(limit, after) taken out of `query`."""
    limit, after, errors = take_paging(query)
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
           + f" AND c.id > ${len(args) - 1} AND c.id <= ${len(args) + 1}"
           f" ORDER BY c.id LIMIT ${len(args)}")
    async with request.app[POOL].acquire() as conn:
        async with conn.transaction():
            # Once this is granted, every CDR id handed out so far is committed or rolled
            # back (migration 0019): the page stops at the last of them, so no CDR can
            # appear below its last id later. Held for a moment, not for the page's query.
            await conn.execute(f"SET LOCAL lock_timeout = '{LIST_LOCK_WAIT_MS}ms'")
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CDR_LIST_LOCK_KEY)
            final = await conn.fetchval(LAST_ID_SQL)
            # a transaction id, so that this commit flushes the WAL: CDRs stored without
            # waiting for the disk are durable before a page shows them (a crash cannot take
            # back a CDR, or an id, a client has seen)
            await conn.execute("SELECT pg_current_xact_id()")
        rows = await conn.fetch(sql, *args, final)
    items = [export.as_json(r) for r in rows[:limit]]
    more = len(rows) > limit
    return json_response({"items": items, "next_after": items[-1]["id"] if more else None})


async def export_cdrs(request: web.Request) -> web.StreamResponse:
    p = principal_of(request)
    args: list[object] = [p.scope_id]
    query = dict(request.query)
    wanted = query.pop("format", "csv")
    errors = [(f"/query/{name}", "is required for an export") for name in ("since", "until")
              if name not in query]
    if wanted not in FORMATS:
        errors.append(("/query/format", f"must be one of {', '.join(FORMATS)}"))
    if errors:
        raise invalid(errors)
    form = FORMATS[wanted]
    where = conditions(query, FILTERS, args)
    sql = SCOPED + "".join(f" AND {w}" for w in where) + " ORDER BY c.id"
    if SLOTS.running >= SLOTS.limit(request):
        raise ApiError(503, "Service unavailable",
                       f"{SLOTS.running} CDR exports are running, as many as this service"
                       " runs at once; retry later", kind="exports-busy",
                       headers={"Retry-After": EXPORT_RETRY_AFTER})
    SLOTS.running += 1
    try:
        return await _export(request, form, sql, args)
    finally:
        SLOTS.running -= 1


async def _export(request: web.Request, form: ExportFormat, sql: str,
                  args: list[object]) -> web.StreamResponse:
    async with request.app[POOL].acquire() as conn, conn.transaction():
        # the first rows before the status: a query that fails answers with an error
        cursor = await conn.cursor(sql, *args)
        # CDRs are stored without waiting for the disk: a commit that does wait, after the
        # cursor's snapshot, makes every CDR it sees durable before a client gets one
        async with request.app[POOL].acquire() as other, other.transaction():
            await other.execute("SELECT pg_current_xact_id()")
        rows = await cursor.fetch(EXPORT_CHUNK)
        response = web.StreamResponse(headers={
            "Content-Type": form.content_type,
            "Content-Disposition": f'attachment; filename="{form.filename}"'})
        await response.prepare(request)
        sent = 0
        try:
            await _write(response, form.head)
            while rows:
                await _write(response, (form.separator if sent else b"")
                             + form.separator.join(map(form.item, rows)))
                sent += len(rows)
                rows = await cursor.fetch(EXPORT_CHUNK)
            await _write(response, form.tail)
        except ConnectionError:
            raise  # the client left
        except ClientStalled:
            log.warning("CDR export cut off after %d CDRs: the client read nothing for %.0f s",
                        sent, EXPORT_WRITE_TIMEOUT)
            if request.transport is not None:
                request.transport.abort()  # what it has not read is dropped, not waited on
            return response
        except Exception:
            log.exception("CDR export broken off after %d CDRs", sent)
            # The success status is sent: only a cut connection, with no end of the body,
            # tells the client the export is incomplete.
            if request.transport is not None:
                request.transport.close()
            return response
    try:
        async with asyncio.timeout(EXPORT_WRITE_TIMEOUT):
            await response.write_eof()
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
    return response


class ClientStalled(Exception):
    pass


async def _write(response: web.StreamResponse, data: bytes) -> None:
    try:
        async with asyncio.timeout(EXPORT_WRITE_TIMEOUT):
            await response.write(data)
    except TimeoutError as exc:
        raise ClientStalled from exc


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
    form = QueryParam("format", {"type": "string", "enum": list(FORMATS), "default": "csv"},
                      'csv, or json: {"items": [...]} as the list answers')
    routes.add("GET", "/api/v1/cdrs/export", export_cdrs,
               "Export call detail records as CSV or JSON (since and until are required)",
               "cdrs", query=(*params(FILTERS), form),
               response_types=("text/csv", "application/json"))
