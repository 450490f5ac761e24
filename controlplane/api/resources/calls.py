"""Calls in progress, as admission recorded them: per extension, tenant and dealer, with the
time granted and the credit held; and hanging one up."""

from __future__ import annotations

import json
import uuid

from aiohttp import web

from controlplane.api.keys import POOL
from controlplane.api.problems import conflict, not_found
from controlplane.api.querying import CAPPED_LIST, call_filters, params, scoped_items
from controlplane.api.resource import json_response, principal_of
from controlplane.api.routes import RouteTable
from controlplane.store import audit

COLUMNS = ("c.id, c.node_id, c.direction, c.extension_id, c.tenant_id,"
           " c.dealer_path[cardinality(c.dealer_path)] AS dealer_id, c.caller, c.callee,"
           " c.call_class, c.carrier_id, c.started_at, c.answered_at,"
           " CASE WHEN c.answered_at IS NULL THEN 'ringing' ELSE 'answered' END AS state,"
           " c.granted_seconds, c.granted_until, c.reserved::text AS reserved, c.exhausted,"
           " c.lease_until")
SCOPED = f"SELECT {COLUMNS} FROM calls c WHERE c.dealer_path @> ARRAY[$1]::bigint[]"
FILTERS = call_filters("c")
LIMIT = 5000
HANGUP_CHANNEL = "pbx_calls"


def call_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["call_id"])
    except ValueError as exc:
        raise not_found("call") from exc


async def list_calls(request: web.Request) -> web.Response:
    return await scoped_items(request, SCOPED, FILTERS, "c.started_at", LIMIT)


async def get_call(request: web.Request) -> web.Response:
    p = principal_of(request)
    async with request.app[POOL].acquire() as conn:
        row = await conn.fetchrow(f"{SCOPED} AND c.id = $2", p.scope_id, call_id(request))
    if row is None:
        raise not_found("call")
    return json_response(dict(row))


async def hang_up(request: web.Request) -> web.Response:
    """The node's agent hangs the call up; its CDR then settles it as usual."""
    p = principal_of(request)
    key = call_id(request)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        # kept with the call (migration 0020): an agent away now hangs it up when back
        row = await conn.fetchrow(
            "UPDATE calls c SET hangup_requested_at = coalesce(c.hangup_requested_at, now())"
            " WHERE c.id = $2 AND c.dealer_path @> ARRAY[$1]::bigint[]"
            " RETURNING c.node_id, c.channel, c.channel_name, c.dealer_path", p.scope_id, key)
        if row is None:
            raise not_found("call")
        if not row["channel_name"]:
            raise conflict("the call's channel on its node is not known: it cannot be hung up")
        await conn.execute("SELECT pg_notify($1, $2)", HANGUP_CHANNEL, json.dumps(
            {"node_id": row["node_id"], "channel_name": row["channel_name"],
             "channel": row["channel"], "call_id": str(key)}))
        await audit.record(conn, p, "hangup", "call", str(key), list(row["dealer_path"]),
                           None, {"call_id": str(key)})
    return json_response({"id": str(key), "status": "hangup requested"}, 202)


def register(routes: RouteTable) -> None:
    routes.add("GET", "/api/v1/calls", list_calls,
               f"Calls in progress in the caller's subtree (at most {LIMIT})", "calls",
               response=CAPPED_LIST, query=params(FILTERS))
    routes.add("GET", "/api/v1/calls/{call_id}", get_call, "One call in progress", "calls",
               response={"type": "object"})
    routes.add("DELETE", "/api/v1/calls/{call_id}", hang_up, "Hang up a call in progress",
               "calls", response={"type": "object"}, status=202)
