"""Rate tables: prices by E.164 prefix, imported from CSV, attached to calling plans.

Scoped like plans: a dealer's rate tables are offered to its whole subtree, read-only below
it (a reseller can read and quote its distributor's table, and price its own plans with it,
but not change it). The quote route is the operator's view of what rating will do with a
number: its class, the rate that matches, and the price of a call of a given length.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

from aiohttp import web

from controlplane.api import fields as F
from controlplane.api.fields import FieldError, is_ascii_digits
from controlplane.api.keys import POOL
from controlplane.api.problems import ApiError, invalid
from controlplane.api.resource import (
    MAX_PAGE,
    json_response,
    path_id,
    principal_of,
    register_crud,
    subtree_filter,
)
from controlplane.api.resources.offered import OfferedResource, offered_select
from controlplane.api.routes import QueryParam, RouteTable
from controlplane.rating import csv_import, store, tariff
from controlplane.rating.classify import (
    AREA_CODES,
    BRAZIL,
    COUNTRY_CODES,
    FREE_CLASSES,
    PERMISSION_FLAGS,
    Classification,
    classify,
)
from controlplane.store import audit

TAG = "rating"
MAX_QUOTE_SECONDS = 86_400
RATED_CLASSES = list(csv_import.RATED_CLASSES)

RATE_TABLE_FIELDS = {
    "dealer_id": F.reference("owning dealer; defaults to the caller"),
    "name": F.text(100, required=True),
    "currency": F.pattern(r"^[A-Z]{3}$", "an ISO 4217 code such as BRL", max_len=3,
                          description="currency of every price in the table (default BRL);"
                                      " cannot change"),
    "description": F.text(300, min_len=0),
}


class RateTables(OfferedResource):
    name = "rate-tables"
    entity = "rate_table"
    table = "rate_tables"
    alias = "rt"
    tag = TAG
    label = "rate table"
    select_sql = offered_select("rate_tables", "rt")
    create_schema = F.Schema("rate_table_create", RATE_TABLE_FIELDS)
    update_schema = F.Schema("rate_table_update", RATE_TABLE_FIELDS).without("dealer_id",
                                                                            "currency")
    filters = (subtree_filter("d.path"),)
    columns = frozenset(RATE_TABLE_FIELDS)
    in_use_sql = "SELECT 1 FROM plans WHERE rate_table_id = $1 LIMIT 1"
    in_use = "calling plans still use this rate table"


RATE_TABLES = RateTables()


# -- query parameters ----------------------------------------------------------------------


def _query(request: web.Request, parsers: dict[str, Callable[[str], Any]],
           required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Parse the query string: every parameter known and valid, or one 422 naming them all."""
    out: dict[str, Any] = {}
    errors: list[tuple[str, str]] = []
    for key, raw in request.query.items():
        try:
            if key not in parsers:
                raise FieldError("is not a known query parameter")
            out[key] = parsers[key](raw)
        except FieldError as exc:
            errors.append((f"/query/{key[:50]}", str(exc)))
    errors += [(f"/query/{k}", "is required") for k in required if k not in request.query]
    if errors:
        raise invalid(errors)
    return out


def _int_param(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        if not is_ascii_digits(raw) or len(raw) > 18 or not low <= int(raw) <= high:
            raise FieldError(f"must be an integer from {low} to {high}")
        return int(raw)

    return parse


def _choice(values: tuple[str, ...] | list[str]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in values:
            raise FieldError("must be one of: " + ", ".join(values))
        return raw

    return parse


def _digits(low: int, high: int, what: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if not is_ascii_digits(raw) or not low <= len(raw) <= high:
            raise FieldError(f"must be {what}")
        return raw

    return parse


def _dialled(raw: str) -> str:
    if not 1 <= len(raw) <= 40 or not raw.isascii() or not raw.isprintable():
        raise FieldError("must be the number as dialled: 1 to 40 printable ASCII characters")
    return raw


def _country(raw: str) -> str:
    if raw not in COUNTRY_CODES:
        raise FieldError("must be a country code in service, such as 55")
    return raw


# -- import --------------------------------------------------------------------------------

CSV_TYPES = ("text/csv", "text/plain")


async def _read_csv(request: web.Request) -> bytes:
    """The body, refused as soon as it passes the size limit (never held whole if too big)."""
    if request.content_type not in CSV_TYPES:
        raise ApiError(415, "Unsupported media type", "send the rates as text/csv (UTF-8)",
                       kind="media-type")
    if (request.charset or "utf-8").lower() not in ("utf-8", "utf8"):
        raise ApiError(415, "Unsupported media type", "send the CSV file as UTF-8",
                       kind="media-type")
    too_large = ApiError(413, "Payload too large",
                         f"a rate file holds at most {csv_import.MAX_BYTES // 2**20} MB",
                         kind="too-large")
    if (request.content_length or 0) > csv_import.MAX_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > csv_import.MAX_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_csv(data: bytes) -> list[csv_import.RateRow]:
    """Parse off the event loop (a full file is 200,000 rows); refusals as problems."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(None, csv_import.parse_rates, data)
    except csv_import.CsvTooLarge as exc:
        raise ApiError(413, "Payload too large", str(exc), kind="too-large") from exc
    except csv_import.CsvRejected as exc:
        shown = len(exc.errors)
        more = f" (the first {shown} are listed)" if shown < exc.total else ""
        raise ApiError(422, "Invalid request",
                       f"the file has {exc.total} error{'s' if exc.total > 1 else ''}{more};"
                       " nothing was imported",
                       kind="validation",
                       errors=[{"pointer": f"#{p}", "detail": d} for p, d in exc.errors]
                       ) from exc


async def import_rates(request: web.Request) -> web.Response:
    p, key = principal_of(request), path_id(request)
    query = _query(request, {"mode": _choice(("replace", "merge"))})
    mode = query.get("mode", "replace")
    async with request.app[POOL].acquire() as conn:
        RATE_TABLES.own(p, await RATE_TABLES.require(conn, p, key))
    data = await _read_csv(request)
    rows = await _parse_csv(data)
    write = store.replace_rates if mode == "replace" else store.merge_rates
    async with request.app[POOL].acquire() as conn, conn.transaction():
        current = await RATE_TABLES.require(conn, p, key, lock=True)
        RATE_TABLES.own(p, current)
        counts = await write(conn, key, rows)
        await conn.execute("UPDATE rate_tables SET rate_count = $2, imported_at = now()"
                           " WHERE id = $1", key, counts.total)
        result = {"mode": mode, "rows": len(rows), "inserted": counts.inserted,
                  "updated": counts.updated, "deleted": counts.deleted,
                  "rate_count": counts.total}
        await audit.record(conn, p, "import", RATE_TABLES.entity, key, current["owner_path"],
                           {"rate_count": current["rate_count"]},
                           {**result, "sha256": hashlib.sha256(data).hexdigest()})
    return json_response(result)


# -- reading rates -------------------------------------------------------------------------

RATE_SQL = ("SELECT id, prefix, description, price_per_minute::text AS price_per_minute,"
            " connection_fee::text AS connection_fee, first_increment, next_increment,"
            " free_seconds, call_class FROM rates")


async def list_rates(request: web.Request) -> web.Response:
    """A page of the table's rates, by id; `prefix` keeps those starting with these digits."""
    p, key = principal_of(request), path_id(request)
    query = _query(request, {
        "prefix": _digits(1, 15, "1 to 15 digits"), "call_class": _choice(RATED_CLASSES),
        "limit": _int_param(1, MAX_PAGE), "after": _int_param(0, 2**63 - 1)})
    limit = query.get("limit", 50)
    args: list[Any] = [key, query.get("after", 0), limit + 1]
    where = ""
    if "prefix" in query:
        # digits sort before ':' in byte order: the range is every prefix starting so
        args.append(query["prefix"])
        where += f" AND prefix >= ${len(args)} AND prefix < ${len(args)} || ':'"
    if "call_class" in query:
        args.append(query["call_class"])
        where += f" AND call_class = ${len(args)}"
    async with request.app[POOL].acquire() as conn:
        await RATE_TABLES.require(conn, p, key)
        rows = await conn.fetch(f"{RATE_SQL} WHERE rate_table_id = $1 AND id > $2{where}"
                                " ORDER BY id LIMIT $3", *args)
    items = [dict(r) for r in rows[:limit]]
    next_after = items[-1]["id"] if len(rows) > limit else None
    return json_response({"items": items, "next_after": next_after})


# -- quote ---------------------------------------------------------------------------------


def rate_json(rate: tariff.Rate) -> dict[str, Any]:
    return {"id": rate.id, "prefix": rate.prefix, "description": rate.description,
            "price_per_minute": str(rate.price_per_minute),
            "connection_fee": str(rate.connection_fee),
            "first_increment": rate.first_increment, "next_increment": rate.next_increment,
            "free_seconds": rate.free_seconds, "call_class": rate.call_class}


def _classify(query: dict[str, Any]) -> Classification:
    country = query.get("country", BRAZIL)
    if country == BRAZIL and "caller_area" not in query:
        raise invalid([("/query/caller_area", "is required for callers in Brazil")])
    return classify(query["number"], query.get("caller_area", ""), country)


def _priced(c: Classification, rate: tariff.Rate | None, seconds: int) -> dict[str, Any]:
    if c.call_class in FREE_CLASSES:
        return {"billable_seconds": 0, "price": "0.0000"}
    if rate is None:
        return {"billable_seconds": None, "price": None}
    return {"billable_seconds": tariff.billable_seconds(seconds, rate),
            "price": str(tariff.price(seconds, rate)),
            "first_interval_cost": str(tariff.interval_cost(rate, first=True)),
            "next_interval_cost": str(tariff.interval_cost(rate, first=False))}


async def quote(request: web.Request) -> web.Response:
    """How a number would be classified, matched and priced with this table."""
    p, key = principal_of(request), path_id(request)
    query = _query(request, {
        "number": _dialled, "caller_area": F.area_code, "country": _country,
        "seconds": _int_param(0, MAX_QUOTE_SECONDS)}, required=("number",))
    c = _classify(query)
    seconds = query.get("seconds", 60)
    rate = None
    async with request.app[POOL].acquire() as conn:
        table = await RATE_TABLES.require(conn, p, key)
        rate = await store.rate_of(
            c, lambda number: store.find_rate(conn, key, number, str(c.call_class)))
    return json_response({
        "classification": c.as_dict(), "permission": PERMISSION_FLAGS.get(c.call_class),
        "rate": None if rate is None else rate_json(rate), "seconds": seconds,
        "currency": table["currency"], **_priced(c, rate, seconds)})


# -- routes --------------------------------------------------------------------------------

_PAGE = (QueryParam("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE,
                              "default": 50}, "page size"),
         QueryParam("after", {"type": "integer", "minimum": 0},
                    "the next_after value of the previous page"))
_RATE = {"type": "object", "properties": {
    "id": {"type": "integer"}, "prefix": {"type": "string"}, "description": {"type": "string"},
    "price_per_minute": {"type": "string"}, "connection_fee": {"type": "string"},
    "first_increment": {"type": "integer"}, "next_increment": {"type": "integer"},
    "free_seconds": {"type": "integer"}, "call_class": {"type": ["string", "null"]}}}
_COUNTS = {"type": "object", "properties": {
    k: {"type": "integer"} for k in ("rows", "inserted", "updated", "deleted", "rate_count")}
    | {"mode": {"type": "string", "enum": ["replace", "merge"]}}}
_QUOTE = {"type": "object", "properties": {
    "classification": {"type": "object"}, "permission": {"type": ["string", "null"]},
    "rate": {"oneOf": [_RATE, {"type": "null"}]}, "seconds": {"type": "integer"},
    "billable_seconds": {"type": ["integer", "null"]}, "price": {"type": ["string", "null"]},
    "first_interval_cost": {"type": "string"}, "next_interval_cost": {"type": "string"},
    "currency": {"type": "string"}}}
IMPORT_HELP = ("CSV with the header prefix, description, price_per_minute, connection_fee,"
               " first_increment, next_increment, free_seconds (optionally call_class),"
               " delimited by ';', ',' or a tab (or as a first line `sep=;` names),"
               " decimals with a point or a comma (quoted when ',' delimits), UTF-8. Every row"
               f" is checked first: any error rejects the whole file (each is listed as"
               f" /line/<n>/<column>). At most {csv_import.MAX_BYTES // 2**20} MB and"
               f" {csv_import.MAX_ROWS} rates. mode=replace (default) makes the file the whole"
               " table; mode=merge adds its rates and replaces those of the same prefix.")


def register(routes: RouteTable) -> None:
    register_crud(routes, RATE_TABLES)
    base = "/api/v1/rate-tables/{id}"
    routes.add("POST", base + "/import", import_rates, "Import rates from a CSV file", TAG,
               raw_body=CSV_TYPES, body_schema={"type": "string"}, response=_COUNTS,
               description=IMPORT_HELP,
               query=(QueryParam("mode", {"type": "string", "enum": ["replace", "merge"],
                                          "default": "replace"},
                                 "replace the table's rates, or merge into them"),))
    routes.add("GET", base + "/rates", list_rates, "List a rate table's rates", TAG,
               response={"type": "object", "properties": {
                   "items": {"type": "array", "items": _RATE},
                   "next_after": {"type": ["integer", "null"]}}},
               query=_PAGE + (
                   QueryParam("prefix", {"type": "string", "pattern": "^[0-9]{1,15}$"},
                              "only prefixes starting with these digits"),
                   QueryParam("call_class", {"type": "string", "enum": RATED_CLASSES},
                              "only rates restricted to this class")))
    routes.add("GET", base + "/quote", quote, "Classify, match and price a number", TAG,
               response=_QUOTE,
               query=(QueryParam("number", {"type": "string", "maxLength": 40},
                                 "the number as dialled (required)"),
                      QueryParam("caller_area", {"type": "string", "enum": sorted(AREA_CODES)},
                                 "the caller's area code (DDD); required in Brazil"),
                      QueryParam("country", {"type": "string", "default": BRAZIL},
                                 "the caller's country code"),
                      QueryParam("seconds", {"type": "integer", "minimum": 0,
                                             "maximum": MAX_QUOTE_SECONDS, "default": 60},
                                 "call duration to price")))
