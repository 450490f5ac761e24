"""Rates in PostgreSQL: the longest-prefix lookup and the atomic import.

The lookup asks for every prefix of the number at once (`prefix = ANY(...)`, at most 15
values) and keeps the longest: 15 probes of the unique index, as fast on a 100,000-row table
as on a 10-row one, where a `LIKE` or a scan would grow with the table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg

from controlplane.rating.classify import BRAZIL, Classification
from controlplane.rating.csv_import import RateRow
from controlplane.rating.tariff import Rate

RATE_COLUMNS = ("rate_table_id", "prefix", "description", "price_per_minute", "connection_fee",
                "first_increment", "next_increment", "free_seconds", "call_class")
SELECT_RATES = ("SELECT id, prefix, description, price_per_minute, connection_fee, first_increment,"
           " next_increment, free_seconds, call_class FROM rates")
FIND_SQL = (f"{SELECT_RATES} WHERE rate_table_id = $1 AND prefix = ANY ($2::text[])"
            " AND (call_class IS NULL OR call_class = $3)"
            " ORDER BY length(prefix) DESC, call_class NULLS LAST LIMIT 1")
# Writing 200,000 rows takes longer than the pool's per-statement default.
BULK_TIMEOUT = 120.0

Finder = Callable[[str], Awaitable[Rate | None]]


async def rate_of(c: Classification, find: Finder) -> Rate | None:
    """The rate a classified call is billed at, `find` giving the longest-prefix match of a
    number (None: the caller pays nothing, or no rate matches). A short service code is
    billed by a rate of exactly its `rated_as` prefix, else by the country's own: its +55
    and code would otherwise take an area code's rate (156: 5515)."""
    if c.rated_as is None:
        return None
    rate = await find(c.rated_as)
    if c.exact_rate and (rate is None or rate.prefix != c.rated_as.lstrip("+")):
        rate = await find(f"+{BRAZIL}")
    return rate


@dataclass(frozen=True)
class ImportCounts:
    inserted: int
    updated: int
    deleted: int
    total: int


def prefixes_of(e164: str) -> list[str]:
    """Every leading part of the number's digits, longest first: '+5511' -> 5511, 551, 55, 5."""
    digits = e164.removeprefix("+")
    if not digits.isascii() or not digits.isdigit():
        raise ValueError(f"not an E.164 number: {e164!r}")
    return [digits[:n] for n in range(len(digits), 0, -1)]


def rate_from_row(row: asyncpg.Record) -> Rate:
    return Rate(prefix=row["prefix"], price_per_minute=row["price_per_minute"],
                connection_fee=row["connection_fee"], first_increment=row["first_increment"],
                next_increment=row["next_increment"], free_seconds=row["free_seconds"],
                description=row["description"], call_class=row["call_class"], id=row["id"])


async def find_rate(conn: asyncpg.Connection, rate_table_id: int, e164: str,
                    call_class: str | None = None) -> Rate | None:
    """The rate of the longest prefix of `e164` in the table.

    Rates restricted to a class apply only to calls of that class (none when `call_class`
    is None); at equal length a rate of the call's class wins over an unrestricted one.
    """
    row = await conn.fetchrow(FIND_SQL, rate_table_id, prefixes_of(e164), call_class)
    return None if row is None else rate_from_row(row)


async def replace_rates(conn: asyncpg.Connection, rate_table_id: int,
                        rows: Sequence[RateRow]) -> ImportCounts:
    """The table's rates become exactly `rows`. Run inside the caller's transaction."""
    status = await conn.execute("DELETE FROM rates WHERE rate_table_id = $1", rate_table_id,
                                timeout=BULK_TIMEOUT)
    deleted = int(status.split()[-1])
    await conn.copy_records_to_table("rates", records=[r.record(rate_table_id) for r in rows],
                                     columns=RATE_COLUMNS, timeout=BULK_TIMEOUT)
    return ImportCounts(inserted=len(rows), updated=0, deleted=deleted, total=len(rows))


async def merge_rates(conn: asyncpg.Connection, rate_table_id: int,
                      rows: Sequence[RateRow]) -> ImportCounts:
    """Add `rows` to the table, replacing the rates of the same prefix and class; the others
    stay. Run inside the caller's transaction."""
    cols = ", ".join(RATE_COLUMNS)
    await conn.execute(f"CREATE TEMP TABLE rates_incoming ON COMMIT DROP AS SELECT {cols}"
                       " FROM rates WITH NO DATA")
    await conn.copy_records_to_table("rates_incoming",
                                     records=[r.record(rate_table_id) for r in rows],
                                     columns=RATE_COLUMNS, timeout=BULK_TIMEOUT)
    changes = ", ".join(f"{c} = EXCLUDED.{c}" for c in RATE_COLUMNS[2:])
    outcome = await conn.fetchrow(
        f"WITH up AS (INSERT INTO rates ({cols}) SELECT {cols} FROM rates_incoming"
        f" ON CONFLICT ON CONSTRAINT rates_prefix_key DO UPDATE SET {changes}"
        "  RETURNING (xmax = 0) AS fresh)"
        " SELECT count(*) FILTER (WHERE fresh) AS inserted,"
        "        count(*) FILTER (WHERE NOT fresh) AS updated FROM up", timeout=BULK_TIMEOUT)
    await conn.execute("DROP TABLE rates_incoming")
    total = await conn.fetchval("SELECT count(*) FROM rates WHERE rate_table_id = $1",
                                rate_table_id)
    return ImportCounts(inserted=outcome["inserted"], updated=outcome["updated"], deleted=0,
                        total=int(total))
