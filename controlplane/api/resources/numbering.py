"""Number ranges from carriers and the DIDs taken from them, assigned to extensions."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg
from aiohttp import web

from controlplane.api import fields as F
from controlplane.api.fields import FieldError, is_ascii_digits
from controlplane.api.keys import POOL
from controlplane.api.problems import conflict, invalid
from controlplane.api.resource import (
    MAX_PAGE,
    Resource,
    int_filter,
    json_response,
    managed_owner,
    page_limit,
    path_id,
    principal_of,
    register_crud,
    require_operator,
    subtree_filter,
    text_filter,
)
from controlplane.api.routes import QueryParam, RouteTable
from controlplane.model.principal import Principal

LOCAL_NUMBER_MAX = 10**12

RANGE_FIELDS = {
    "dealer_id": F.reference("dealer whose subtree may use the range; defaults to the caller"),
    "name": F.text(100, required=True),
    "country_code": F.pattern(r"^[1-9][0-9]{0,2}$", "1 to 3 digits (DDI)", max_len=3,
                              required=True),
    "area_code": F.pattern(r"^[0-9]{1,5}$", "1 to 5 digits (DDD)", max_len=5, required=True),
    "first_number": F.integer(0, LOCAL_NUMBER_MAX, required=True),
    "last_number": F.integer(0, LOCAL_NUMBER_MAX, required=True),
}


class NumberRanges(Resource):
    name = "number-ranges"
    entity = "number_range"
    table = "number_ranges"
    alias = "r"
    tag = "numbering"
    select_sql = ("SELECT r.*, (SELECT count(*) FROM dids x WHERE x.range_id = r.id) AS in_use,"
                  " r.last_number - r.first_number + 1 AS size, d.path AS owner_path"
                  " FROM number_ranges r JOIN dealers d ON d.id = r.dealer_id"
                  " WHERE d.path @> ARRAY[$1]::bigint[]")
    create_schema = F.Schema("number_range_create", RANGE_FIELDS)
    update_schema = F.Schema("number_range_update", RANGE_FIELDS).without("dealer_id")
    filters = (subtree_filter("d.path"),)
    columns = frozenset(RANGE_FIELDS)

    async def before_create(self, conn: asyncpg.Connection, p: Principal,
                            data: dict[str, Any]) -> dict[str, Any]:
        await managed_owner(conn, p, data)
        _operator_only(p, "creates number ranges")
        await _no_overlap(conn, data, None)
        return data

    async def before_update(self, conn: asyncpg.Connection, p: Principal,
                            current: asyncpg.Record, data: dict[str, Any]) -> dict[str, Any]:
        if set(data) & NUMBERING:
            _operator_only(p, "changes the numbers of a range")
            await _no_overlap(conn, {**dict(current), **data}, current["id"])
        return data

    async def before_delete(self, conn: asyncpg.Connection, p: Principal,
                            current: asyncpg.Record) -> None:
        _operator_only(p, "removes number ranges")


# A range's numbers are the operator's (its carriers assign them to it): it creates a range
# for a dealer whose subtree then takes DIDs from it. Were any dealer to create ranges, one
# could claim another subtree's numbers and receive their inbound calls.
NUMBERING = frozenset({"country_code", "area_code", "first_number", "last_number"})


def _operator_only(p: Principal, what: str) -> None:
    require_operator(p, f"only the platform operator {what}; it allots them to dealers")


def numbers_meet(prefix: str, first: int, last: int,
                 other_prefix: str, other_first: int, other_last: int) -> bool:
    """Whether two ranges hold a number in common. A range's numbers are its prefix (country
    and area code) followed by each local number in decimal, without leading zeros, so two
    ranges with different splits can hold the same numbers: 55 11 31000000 is 55 113 1000000."""
    if not other_prefix.startswith(prefix):
        if not prefix.startswith(other_prefix):
            return False
        prefix, first, last, other_prefix, other_first, other_last = (
            other_prefix, other_first, other_last, prefix, first, last)
    extra = other_prefix[len(prefix):]
    if not extra:
        return first <= other_last and other_first <= last
    if extra.startswith("0"):  # a local number never starts with 0 (but 0 itself)
        return False
    # the longer prefix's number m is the shorter one's int(extra) * 10**len(str(m)) + m
    for digits in range(1, len(str(other_last)) + 1):
        low = max(other_first, 0 if digits == 1 else 10 ** (digits - 1))
        high = min(other_last, 10 ** digits - 1)
        shift = int(extra) * 10 ** digits
        if max(low, first - shift) <= min(high, last - shift):
            return True
    return False


async def _no_overlap(conn: asyncpg.Connection, data: dict[str, Any], own: int | None) -> None:
    """409 when the numbers overlap another range's, also one whose country and area codes
    split the same digits otherwise: two subtrees would then both hand out DIDs of the same
    numbers. Concurrent writers of ranges take turns here."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", RANGES_LOCK)
    prefix = data["country_code"] + data["area_code"]
    rows = await conn.fetch(
        "SELECT id, country_code || area_code AS prefix, first_number, last_number"
        " FROM number_ranges WHERE id IS DISTINCT FROM $2"
        " AND (starts_with($1, country_code || area_code)"
        "      OR starts_with(country_code || area_code, $1))"
        " ORDER BY id", prefix, own)
    for other in rows:
        if numbers_meet(prefix, data["first_number"], data["last_number"], other["prefix"],
                        other["first_number"], other["last_number"]):
            raise conflict(f"the numbers overlap those of number range {other['id']}",
                           "/first_number")


RANGES_LOCK = 7140021  # advisory lock: writers of number ranges
RANGES = NumberRanges()

DID_FIELDS = {
    "range_id": F.reference("range the number is taken from", required=True),
    "local_number": F.integer(0, LOCAL_NUMBER_MAX, required=True,
                              description="number inside the range (without country/area)"),
    "extension_id": F.reference("extension the DID rings", nullable=True),
    "monthly_value": F.money(Decimal(0), Decimal("9999999999.99"), places=2,
                             description="monthly fee"),
    "collect_calls": F.boolean("accept collect calls"),
}


class Dids(Resource):
    name = "dids"
    entity = "did"
    table = "dids"
    alias = "x"
    tag = "numbering"
    select_sql = ("SELECT x.id, x.range_id, x.local_number, x.e164, x.extension_id,"
                  " x.monthly_value::text AS monthly_value, x.collect_calls, x.created_at,"
                  " x.updated_at, r.dealer_id, d.path AS owner_path FROM dids x"
                  " JOIN number_ranges r ON r.id = x.range_id"
                  " JOIN dealers d ON d.id = r.dealer_id WHERE d.path @> ARRAY[$1]::bigint[]")
    create_schema = F.Schema("did_create", DID_FIELDS)
    update_schema = F.Schema("did_update", DID_FIELDS).without("range_id", "local_number")
    filters = (
        subtree_filter("d.path"),
        int_filter("range_id", "x.range_id = ${}", "DIDs of this range"),
        int_filter("extension_id", "x.extension_id = ${}", "DIDs ringing this extension"),
        text_filter("e164", "x.e164 = ${}", "exact number in E.164 (+5511...)", max_len=20),
    )
    columns = frozenset(DID_FIELDS)

    async def _check_extension(self, conn: asyncpg.Connection, p: Principal, range_id: int,
                               extension_id: int | None) -> None:
        if extension_id is None:
            return
        # The extension must be one the caller manages, under the range owner's subtree.
        ok = await conn.fetchval(
            "SELECT 1 FROM extensions e JOIN tenants t ON t.id = e.tenant_id"
            " JOIN dealers d ON d.id = t.dealer_id, number_ranges r"
            " WHERE e.id = $1 AND r.id = $2 AND d.path @> ARRAY[$3]::bigint[]"
            "   AND d.path @> ARRAY[r.dealer_id]", extension_id, range_id, p.scope_id)
        if not ok:
            raise invalid([("/extension_id", "is not an extension this range may serve")])

    async def before_create(self, conn: asyncpg.Connection, p: Principal,
                            data: dict[str, Any]) -> dict[str, Any]:
        if await RANGES.get(conn, p, data["range_id"]) is None:
            raise invalid([("/range_id", "is not a number range you manage")])
        await self._check_extension(conn, p, data["range_id"], data.get("extension_id"))
        return data

    async def before_update(self, conn: asyncpg.Connection, p: Principal,
                            current: asyncpg.Record, data: dict[str, Any]) -> dict[str, Any]:
        await self._check_extension(conn, p, current["range_id"], data.get("extension_id"))
        return data


DIDS = Dids()


async def range_numbers(request: web.Request) -> web.Response:
    """Every number of a range with its status: available or in use (and by which DID)."""
    p, key = principal_of(request), path_id(request)
    errors: list[tuple[str, str]] = []
    status = request.query.get("status", "")
    limit, after = 100, -1
    try:
        if status not in ("", "available", "in_use"):
            raise FieldError("status must be available or in_use")
        if "limit" in request.query:
            asked = page_limit(request.query["limit"])
            if asked is None:
                raise FieldError(f"limit must be an integer from 1 to {MAX_PAGE}")
            limit = asked
        if "after" in request.query:
            raw = request.query["after"]
            if not is_ascii_digits(raw) or len(raw) > 13:
                raise FieldError("after must be a local number")
            after = int(raw)
    except FieldError as exc:
        errors.append(("/query", str(exc)))
    if errors:
        raise invalid(errors)
    condition = {"": "", "available": " AND x.id IS NULL", "in_use": " AND x.id IS NOT NULL"}
    async with request.app[POOL].acquire() as conn:
        rng = await RANGES.require(conn, p, key)
        rows = await conn.fetch(
            "SELECT n AS local_number, x.id AS did_id, x.extension_id FROM"
            " generate_series(GREATEST($2::bigint, $3::bigint + 1), $4::bigint) AS n"
            " LEFT JOIN dids x ON x.range_id = $1 AND x.local_number = n"
            f" WHERE true{condition[status]} ORDER BY n LIMIT $5",
            key, rng["first_number"], after, rng["last_number"], limit + 1)
    prefix = f"+{rng['country_code']}{rng['area_code']}"
    items = [{"local_number": r["local_number"], "e164": f"{prefix}{r['local_number']}",
              "status": "in_use" if r["did_id"] else "available", "did_id": r["did_id"],
              "extension_id": r["extension_id"]} for r in rows[:limit]]
    next_after = rows[limit - 1]["local_number"] if len(rows) > limit else None
    return json_response({"items": items, "next_after": next_after})


def register(routes: RouteTable) -> None:
    register_crud(routes, RANGES)
    register_crud(routes, DIDS)
    routes.add("GET", "/api/v1/number-ranges/{id}/numbers", range_numbers,
               "Numbers of a range with their status", "numbering",
               response={"type": "object"},
               query=(QueryParam("status", {"type": "string", "enum": ["available", "in_use"]}),
                      QueryParam("limit", {"type": "integer", "minimum": 1,
                                           "maximum": MAX_PAGE}),
                      QueryParam("after", {"type": "integer", "minimum": 0})))
