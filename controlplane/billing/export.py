"""CDRs as billing systems receive them: the columns, their JSON and CSV forms, and the
periodic export files (one per day or month, written once the period has closed)."""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import os
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

log = logging.getLogger(__name__)
CHUNK = 5000

FIELDS = ("id", "node_id", "call_id", "direction", "started_at", "answered_at", "ended_at",
          "caller", "callee", "call_class", "tenant_id", "external_ref", "extension_id",
          "dealer_id", "dealer_path", "carrier_id", "duration", "talk_seconds",
          "billed_seconds", "rate_prefix", "price_per_minute", "price", "disposition",
          "refusal", "sip_code")
SELECT = ("c.id, c.node_id, c.call_id, c.direction, c.started_at, c.answered_at, c.ended_at,"
          " c.caller, c.callee, c.call_class, c.tenant_id, c.external_ref, c.extension_id,"
          " c.dealer_path[cardinality(c.dealer_path)] AS dealer_id, c.dealer_path,"
          " c.carrier_id, c.duration, c.talk_seconds, c.billed_seconds, c.rate_prefix,"
          " c.price_per_minute, c.price, c.disposition, c.refusal, c.sip_code")


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, list):
        return "/".join(str(v) for v in value)
    if value is None:
        return None
    if isinstance(value, (int, str, float, bool)):
        return value
    return str(value)


def as_json(row: asyncpg.Record) -> dict[str, Any]:
    out = {name: _plain(row[name]) for name in FIELDS}
    out["dealer_path"] = list(row["dealer_path"])
    return out


def csv_header() -> bytes:
    return (",".join(FIELDS) + "\r\n").encode()


def csv_line(row: asyncpg.Record) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerow(["" if (v := _plain(row[name])) is None else v
                              for name in FIELDS])
    return buf.getvalue().encode()


def period_of(day: date, period: str) -> tuple[datetime, datetime, str]:
    """(start, end, label) of the day or month holding `day`, in UTC."""
    if period == "daily":
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        return start, start + timedelta(days=1), start.strftime("%Y-%m-%d")
    start = datetime(day.year, day.month, 1, tzinfo=UTC)
    nxt = datetime(day.year + (day.month == 12), day.month % 12 + 1, 1, tzinfo=UTC)
    return start, nxt, start.strftime("%Y-%m")


def closed_periods(now: datetime, period: str, back: int) -> list[tuple[datetime, datetime, str]]:
    """The `back` most recent periods that have ended, oldest first."""
    out = []
    start, _, _ = period_of(now.date(), period)
    for _ in range(back):
        start, end, label = period_of((start - timedelta(days=1)).date(), period)
        out.append((start, end, label))
    return list(reversed(out))


async def write_period(pool: asyncpg.Pool, folder: Path, start: datetime, end: datetime,
                       label: str) -> Path | None:
    """Write cdrs-<label>.csv with every CDR of the period, once: an existing file is kept.
    Written to a temporary name and renamed, so a reader never sees half a file."""
    target = folder / f"cdrs-{label}.csv"
    if await asyncio.to_thread(target.exists):
        return None
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    partial = folder / f".cdrs-{label}.csv.partial"
    fh = await asyncio.to_thread(partial.open, "wb")
    try:
        await asyncio.to_thread(fh.write, csv_header())
        async with pool.acquire() as conn, conn.transaction():
            cursor = await conn.cursor(f"SELECT {SELECT} FROM cdrs c WHERE c.started_at >= $1"
                                       " AND c.started_at < $2 ORDER BY c.id", start, end)
            while rows := await cursor.fetch(CHUNK):
                await asyncio.to_thread(fh.write, b"".join(csv_line(r) for r in rows))
        await asyncio.to_thread(fh.flush)
        await asyncio.to_thread(os.fsync, fh.fileno())
    finally:
        await asyncio.to_thread(fh.close)
    await asyncio.to_thread(os.replace, partial, target)
    log.info("CDR export %s written", target)
    return target


async def export_closed_periods(pool: asyncpg.Pool, folder: Path, period: str,
                                back: int = 3) -> list[Path]:
    """Write the files of recently closed periods that are missing (e.g. after downtime)."""
    written = []
    for start, end, label in closed_periods(datetime.now(UTC), period, back):
        path = await write_period(pool, folder, start, end, label)
        if path is not None:
            written.append(path)
    return written
