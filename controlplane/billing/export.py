"""CDRs as billing systems receive them: the columns, their JSON and CSV forms, and the
periodic export files.

Every stored CDR is in exactly one export file. Once a period (a UTC day or month) has
closed, `cdrs-<label>.csv` gets its CDRs stored so far; its CDRs stored later (a call in
progress at the close, a node's CDRs imported after an outage of its agent, the database or
AMI) go into the period's next supplement, `cdrs-<label>.supplement-<n>.csv`. Periods that
closed while `serve` was down, however many, get their files when it returns.

Each file is recorded (table cdr_exports, migration 0015) before it is written: its period
and the interval of storing transactions (`cdrs.stored_xid`) it holds. What it holds is then
fixed, so a file a crash kept from being written is written later, the same.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import os
import re
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
          "hangup_cause", "refusal", "sip_code")
SELECT = ("c.id, c.node_id, c.call_id, c.direction, c.started_at, c.answered_at, c.ended_at,"
          " c.caller, c.callee, c.call_class, c.tenant_id, c.external_ref, c.extension_id,"
          " c.dealer_path[cardinality(c.dealer_path)] AS dealer_id, c.dealer_path,"
          " c.carrier_id, c.duration, c.talk_seconds, c.billed_seconds, c.rate_prefix,"
          " c.price_per_minute, c.price, c.disposition, c.hangup_cause, c.refusal, c.sip_code")


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


# A text cell a spreadsheet would evaluate: "=", "@", a tab or a carriage return first, or
# "+" or "-" not followed by a plain number ("+5511..." and "-1.5" stay as they are). Caller
# numbers come from the network, so such a cell is written with a leading apostrophe; the
# JSON export and the API give every value as stored.
FORMULA = re.compile(r"[=@\t\r]|[+-](?![0-9]*(\.[0-9]+)?$)")


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str) and FORMULA.match(value):
        return "'" + value
    return value


def csv_line(row: asyncpg.Record) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerow([_cell(_plain(row[name])) for name in FIELDS])
    return buf.getvalue().encode()


def period_of(day: date, period: str) -> tuple[datetime, datetime, str]:
    """(start, end, label) of the day or month holding `day`, in UTC."""
    if period == "daily":
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        return start, start + timedelta(days=1), start.strftime("%Y-%m-%d")
    start = datetime(day.year, day.month, 1, tzinfo=UTC)
    nxt = datetime(day.year + (day.month == 12), day.month % 12 + 1, 1, tzinfo=UTC)
    return start, nxt, start.strftime("%Y-%m")


def periods(start: datetime, end: datetime, period: str) -> list[tuple[datetime, datetime, str]]:
    """The periods covering [start, end), oldest first, the first and last cut to it."""
    out = []
    while start < end:
        _, period_end, label = period_of(start.astimezone(UTC).date(), period)
        out.append((start, min(period_end, end), label))
        start = period_end
    return out


def file_name(label: str, number: int) -> str:
    """The period's file, or its numbered supplement: both name the period first."""
    return f"cdrs-{label}.csv" if number == 0 else f"cdrs-{label}.supplement-{number}.csv"


# Where the export can look: every transaction whose id is below the oldest one still
# running has ended, so every CDR stored with a lower id (cdrs.stored_xid, migration 0015)
# is committed, or gone; one being stored now gets a higher id and a later file. Transaction
# ids are the database's own: no clock, no view of other sessions needed.
HORIZON_SQL = ("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xid,"
               " now() AS now")
STORED = "coalesce(c.stored_xid, 0)"  # CDRs stored before migration 0015: the oldest
# CDRs stored in [$1, $2) (transaction ids) that started before $3 (where the files so far
# end), by the file of the period they belong to; NULL: they started before the first file's.
LATE_SQL = f"""
SELECT e.label, min(c.started_at) AS earliest
  FROM cdrs c
  LEFT JOIN LATERAL (SELECT x.label FROM cdr_exports x
                      WHERE x.number = 0 AND x.period_start <= c.started_at
                      ORDER BY x.period_start DESC LIMIT 1) AS e ON true
 WHERE {STORED} >= $1 AND {STORED} < $2 AND c.started_at < $3
 GROUP BY e.label
"""
SUPPLEMENTS_SQL = """
SELECT x.label, x.period_start, x.period_end,
       (SELECT max(y.number) FROM cdr_exports y WHERE y.label = x.label) + 1 AS number
  FROM cdr_exports x
 WHERE x.number = 0 AND x.label = ANY($1::text[])
"""
RECORD_SQL = """
INSERT INTO cdr_exports (label, number, period_start, period_end, stored_from, stored_before)
VALUES ($1, $2, $3, $4, $5, $6)
"""
LOOKED_SQL = """
INSERT INTO cdr_export_horizon (stored_before) VALUES ($1)
ON CONFLICT (only_row) DO UPDATE SET stored_before = excluded.stored_before
"""
NEXT_FILE_SQL = """
SELECT label, number, period_start, period_end, stored_from, stored_before
  FROM cdr_exports WHERE written_at IS NULL
 ORDER BY period_start, number LIMIT 1 FOR UPDATE SKIP LOCKED
"""
FILE_SQL = (f"SELECT {SELECT} FROM cdrs c WHERE c.started_at >= $1 AND c.started_at < $2"
            f" AND {STORED} >= coalesce($3::bigint, 0) AND {STORED} < $4 ORDER BY c.id")
# any constant: the same for every process exporting into this database
RECORD_LOCK_KEY = 7_140_015


async def export_closed_periods(pool: asyncpg.Pool, folder: Path, period: str) -> list[Path]:
    """Record the files now due (the periods closed since the last export, the supplements
    of those whose CDRs were stored since) and write every file recorded and not written
    yet, into `folder`. Returns the files written."""
    async with pool.acquire() as conn:
        # in a statement of its own, before those reading the CDRs
        horizon = await conn.fetchrow(HORIZON_SQL)
        async with conn.transaction():
            # one serve records at a time; another one finds nothing left to record
            if await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RECORD_LOCK_KEY):
                await _record(conn, period, horizon["xid"], horizon["now"])
        return await _write_recorded(conn, folder)


async def _record(conn: asyncpg.Connection, period: str, horizon: int, now: datetime) -> None:
    """Record the files due: a supplement for each period with a file whose CDRs were
    stored since the last export, and a file for each period closed by `now` since then (or
    older than the first file, when a CDR that old was stored). Then the export has looked
    up to `horizon` (a transaction id: see HORIZON_SQL)."""
    looked = await conn.fetchval("SELECT stored_before FROM cdr_export_horizon")
    first, end = await conn.fetchrow("SELECT min(period_start), max(period_end)"
                                     " FROM cdr_exports WHERE number = 0")
    closed_end = period_of(now.astimezone(UTC).date(), period)[0]
    files: list[tuple[str, int, datetime, datetime, int | None, int]] = []
    earliest = None
    if end is None:
        earliest = await conn.fetchval(f"SELECT min(started_at) FROM cdrs c"
                                       f" WHERE {STORED} < $1", horizon)
        end = first = closed_end
    elif looked is None or looked < horizon:
        late = {r["label"]: r["earliest"]
                for r in await conn.fetch(LATE_SQL, looked or 0, horizon, end)}
        earliest = late.pop(None, None)
        for r in await conn.fetch(SUPPLEMENTS_SQL, list(late)):
            files.append((r["label"], r["number"], r["period_start"], r["period_end"],
                          looked or 0, horizon))
    if earliest is not None:
        start = period_of(earliest.astimezone(UTC).date(), period)[0]
        files += [(label, 0, s, e, None, horizon) for s, e, label in periods(start, first,
                                                                              period)]
    files += [(label, 0, s, e, None, horizon) for s, e, label in periods(end, closed_end,
                                                                          period)]
    await conn.executemany(RECORD_SQL, files)
    await conn.execute(LOOKED_SQL, max(horizon, looked or 0))


async def _write_recorded(conn: asyncpg.Connection, folder: Path) -> list[Path]:
    """Write the files recorded and not written yet, oldest first, each marked written in
    the transaction that wrote it. A file already there was written before a crash kept it
    from being marked: it is kept. Returns the files written."""
    written = []
    while True:
        async with conn.transaction():
            due = await conn.fetchrow(NEXT_FILE_SQL)
            if due is None:
                return written
            target = folder / file_name(due["label"], due["number"])
            if not await asyncio.to_thread(target.exists):
                count = await _write_file(conn, folder, target, due)
                log.info("CDR export %s written (%d CDRs)", target, count)
                written.append(target)
            await conn.execute("UPDATE cdr_exports SET written_at = now()"
                               " WHERE label = $1 AND number = $2", due["label"], due["number"])


async def _write_file(conn: asyncpg.Connection, folder: Path, target: Path,
                      due: asyncpg.Record) -> int:
    """Write `target` with the CDRs `due` holds; returns how many. Written to a temporary
    name and renamed, so a reader never sees half a file."""
    await asyncio.to_thread(folder.mkdir, mode=FOLDER_MODE, parents=True, exist_ok=True)
    partial = folder / f".{target.name}.partial"
    count = 0
    fh = await asyncio.to_thread(_create, partial)
    try:
        await asyncio.to_thread(fh.write, csv_header())
        cursor = await conn.cursor(FILE_SQL, due["period_start"], due["period_end"],
                                   due["stored_from"], due["stored_before"])
        while rows := await cursor.fetch(CHUNK):
            count += len(rows)
            await asyncio.to_thread(fh.write, b"".join(csv_line(r) for r in rows))
        await asyncio.to_thread(fh.flush)
        await asyncio.to_thread(os.fsync, fh.fileno())
    finally:
        await asyncio.to_thread(fh.close)
    await asyncio.to_thread(os.replace, partial, target)
    await asyncio.to_thread(_sync_folder, folder)
    return count


# The files hold callers' numbers: readable by the owner and its group (a billing system's
# account in it), not by every user of the machine.
FILE_MODE, FOLDER_MODE = 0o640, 0o750


def _create(path: Path) -> Any:
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "wb")


def _sync_folder(folder: Path) -> None:
    """Make the rename durable before the file is marked written."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
