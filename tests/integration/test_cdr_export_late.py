"""The periodic CDR export files hold every stored CDR exactly once: CDRs stored after their
period's file was written go into numbered supplements, CDRs being stored while the export
looks are not skipped, and every period closed while `serve` was away gets its file."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from controlplane.billing import export
from tests.api_helper import Api
from tests.integration.test_cdr_export import create_node


@pytest.fixture
async def node(api: Api, db: asyncpg.Pool) -> AsyncIterator[int]:
    """A node for the CDRs, and no export recorded before or after the test."""
    async with db.acquire() as conn:
        await conn.execute("TRUNCATE cdr_exports, cdr_export_horizon")
    yield (await create_node(api))["id"]
    async with db.acquire() as conn:
        await conn.execute("TRUNCATE cdr_exports, cdr_export_horizon")


async def store(conn: asyncpg.Connection, node: int, uniqueid: str, started: str) -> int:
    start = datetime.fromisoformat(started)
    return await conn.fetchval(
        "INSERT INTO cdrs (node_id, uniqueid, caller, callee, started_at, ended_at,"
        " disposition) VALUES ($1, $2, '2001', '2002', $3, $3, 'ANSWERED') RETURNING id",
        node, uniqueid, start)


def ids_in(path: Path) -> list[int]:
    return [int(r["id"]) for r in csv.DictReader(io.StringIO(path.read_text()))]


async def run(db: asyncpg.Pool, folder: Path, period: str = "monthly") -> list[str]:
    return [p.name for p in await export.export_closed_periods(db, folder, period)]


async def months_closed_since(db: asyncpg.Pool, first: str) -> list[str]:
    """Labels of the months from `first` to the last one closed, by the database's clock."""
    now = await db.fetchval("SELECT now()")
    start = datetime.fromisoformat(f"{first}-01T00:00:00+00:00")
    end = export.period_of(now.date(), "monthly")[0]
    return [label for _, _, label in export.periods(start, end, "monthly")]


async def test_a_cdr_stored_after_its_period_file_goes_into_one_supplement(
        db: asyncpg.Pool, node: int, tmp_path: Path):
    async with db.acquire() as conn:
        on_time = await store(conn, node, "u1", "2026-04-10T12:00:00+00:00")
    months = await months_closed_since(db, "2026-04")
    assert await run(db, tmp_path) == [f"cdrs-{m}.csv" for m in months]
    assert ids_in(tmp_path / "cdrs-2026-04.csv") == [on_time]

    async with db.acquire() as conn:  # imported after the file was written
        late = await store(conn, node, "u2", "2026-04-30T23:59:59+00:00")
    assert await run(db, tmp_path) == ["cdrs-2026-04.supplement-1.csv"]
    assert ids_in(tmp_path / "cdrs-2026-04.supplement-1.csv") == [late]
    assert await run(db, tmp_path) == []  # nothing new: nothing written

    async with db.acquire() as conn:
        later = await store(conn, node, "u3", "2026-04-01T00:00:00+00:00")
        june = await store(conn, node, "u4", "2026-06-15T00:00:00+00:00")
    assert await run(db, tmp_path) == ["cdrs-2026-04.supplement-2.csv",
                                       "cdrs-2026-06.supplement-1.csv"]
    assert ids_in(tmp_path / "cdrs-2026-04.supplement-2.csv") == [later]
    assert ids_in(tmp_path / "cdrs-2026-06.supplement-1.csv") == [june]
    assert ids_in(tmp_path / "cdrs-2026-04.csv") == [on_time]  # files are never rewritten

    everywhere = Counter(i for f in tmp_path.glob("cdrs-*.csv") for i in ids_in(f))
    assert everywhere == Counter([on_time, late, later, june])


async def test_a_cdr_committed_while_the_export_looks_is_in_a_later_file(
        db: asyncpg.Pool, node: int, tmp_path: Path, settings):
    """A CDR is committed after the export looked, by a transaction that had stored it
    before: the export stays below every transaction still running, so it finds the CDR the
    next time, in a supplement."""
    importer = await asyncpg.connect(settings.dsn)
    try:
        async with db.acquire() as conn:
            first = await store(conn, node, "u1", "2026-04-10T12:00:00+00:00")
        slow = importer.transaction()
        await slow.start()
        pending = await store(importer, node, "u2", "2026-04-11T12:00:00+00:00")
        written = await run(db, tmp_path)
        assert "cdrs-2026-04.csv" in written
        assert ids_in(tmp_path / "cdrs-2026-04.csv") == [first]
        await slow.commit()
    finally:
        await importer.close()
    assert await run(db, tmp_path) == ["cdrs-2026-04.supplement-1.csv"]
    assert ids_in(tmp_path / "cdrs-2026-04.supplement-1.csv") == [pending]


async def test_a_transaction_that_stores_nothing_holds_no_file_back(
        db: asyncpg.Pool, node: int, tmp_path: Path, settings):
    """Only transactions that write can hold a CDR back: a session reading for a long time
    (a report, a reconcile) leaves the export free."""
    reader = await asyncpg.connect(settings.dsn)
    try:
        long_read = reader.transaction()
        await long_read.start()
        await reader.fetchval("SELECT count(*) FROM cdrs")
        async with db.acquire() as conn:
            cdr = await store(conn, node, "u1", "2026-04-10T12:00:00+00:00")
        assert "cdrs-2026-04.csv" in await run(db, tmp_path)
        assert ids_in(tmp_path / "cdrs-2026-04.csv") == [cdr]
        await long_read.rollback()
    finally:
        await reader.close()


async def test_every_period_closed_while_serve_was_away_gets_its_file(
        db: asyncpg.Pool, node: int, tmp_path: Path):
    now = await db.fetchval("SELECT now()")
    twelve_days_ago = (now - timedelta(days=12)).replace(hour=12, minute=0, second=0)
    async with db.acquire() as conn:
        cdr = await store(conn, node, "u1", twelve_days_ago.isoformat())
    written = await run(db, tmp_path, "daily")
    days = [(twelve_days_ago + timedelta(days=n)).strftime("%Y-%m-%d") for n in range(12)]
    assert written == [f"cdrs-{d}.csv" for d in days]
    assert ids_in(tmp_path / f"cdrs-{days[0]}.csv") == [cdr]
    assert all(ids_in(tmp_path / f"cdrs-{d}.csv") == [] for d in days[1:])


async def test_a_cdr_older_than_the_first_file_gets_its_period_file(
        db: asyncpg.Pool, node: int, tmp_path: Path):
    async with db.acquire() as conn:
        await store(conn, node, "u1", "2026-04-10T12:00:00+00:00")
    await run(db, tmp_path)
    async with db.acquire() as conn:  # a node's file imported long after an outage
        old = await store(conn, node, "u2", "2026-02-03T08:00:00+00:00")
    assert await run(db, tmp_path) == ["cdrs-2026-02.csv", "cdrs-2026-03.csv"]
    assert ids_in(tmp_path / "cdrs-2026-02.csv") == [old]
    assert ids_in(tmp_path / "cdrs-2026-03.csv") == []


async def test_a_file_that_could_not_be_written_is_written_the_same_later(
        db: asyncpg.Pool, node: int, tmp_path: Path):
    async with db.acquire() as conn:
        cdr = await store(conn, node, "u1", "2026-04-10T12:00:00+00:00")
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    with pytest.raises(OSError):
        await run(db, blocked)
    async with db.acquire() as conn:  # stored after the files were recorded
        late = await store(conn, node, "u2", "2026-04-12T12:00:00+00:00")
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "cdrs-2026-05.csv").write_text("kept\n")  # written before a crash
    written = await run(db, folder)
    assert written[:2] == ["cdrs-2026-04.csv", "cdrs-2026-04.supplement-1.csv"]
    assert "cdrs-2026-05.csv" not in written
    assert (folder / "cdrs-2026-05.csv").read_text() == "kept\n"
    assert ids_in(folder / "cdrs-2026-04.csv") == [cdr]
    assert ids_in(folder / "cdrs-2026-04.supplement-1.csv") == [late]
    assert await run(db, folder) == []


def test_periods_cover_an_interval_in_days_or_months():
    start = datetime(2026, 1, 30, tzinfo=UTC)
    end = datetime(2026, 3, 1, tzinfo=UTC)
    assert [p[2] for p in export.periods(start, end, "monthly")] == ["2026-01", "2026-02"]
    assert export.periods(start, end, "monthly")[0][:2] == (start, datetime(2026, 2, 1,
                                                                             tzinfo=UTC))
    assert [p[2] for p in export.periods(start, start + timedelta(days=2), "daily")] == [
        "2026-01-30", "2026-01-31"]
    assert export.file_name("2026-01", 0) == "cdrs-2026-01.csv"
    assert export.file_name("2026-01", 2) == "cdrs-2026-01.supplement-2.csv"
