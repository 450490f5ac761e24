"""Rate tables held in memory by the agent that decides calls.

Every outbound call needs the longest prefix of its number in its plan's rate table; asked
of PostgreSQL, that is a round trip per call. A table is read once instead and kept under
the version it was read at (`rate_tables.rates_version`, moved by every change to its
rates: migration 0008). The caller's party carries the version its plan's table has, and
the admission checks that a kept party still reads the same (migration 0010), so a copy is
used only while it is exactly the table's version: a rate import is seen by the very next
call. A table missing, older than asked, or still being read is looked up in
PostgreSQL meanwhile, and read in the background; one larger than the cache's whole budget
is always looked up there.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import asyncpg

from controlplane.rating import store
from controlplane.rating.tariff import Rate

log = logging.getLogger(__name__)

# Rates kept in all; a rate costs about 0.5 KiB here.
MAX_RATES = 500_000
LOAD_SQL = f"{store.SELECT_RATES} WHERE rate_table_id = $1"


@dataclass
class Table:
    version: int
    # prefix -> the rate for any class (None: no such rate), and rates restricted to a class
    rates: dict[str, tuple[Rate | None, dict[str, Rate]]] = field(default_factory=dict)
    size: int = 0

    def add(self, rate: Rate) -> None:
        plain, by_class = self.rates.get(rate.prefix, (None, {}))
        if rate.call_class is None:
            plain = rate
        else:
            by_class = {**by_class, rate.call_class: rate}
        self.rates[rate.prefix] = (plain, by_class)
        self.size += 1

    def find(self, e164: str, call_class: str | None) -> Rate | None:
        """As store.FIND_SQL: the longest prefix; at equal length, the call's class first."""
        for prefix in store.prefixes_of(e164):
            found = self.rates.get(prefix)
            if found is None:
                continue
            plain, by_class = found
            rate = by_class.get(call_class) if call_class is not None else None
            if rate is not None:
                return rate
            if plain is not None:
                return plain
        return None


class RateCache:
    def __init__(self, pool: asyncpg.Pool, *, max_rates: int = MAX_RATES) -> None:
        self.pool, self.max_rates = pool, max_rates
        self._tables: OrderedDict[int, Table] = OrderedDict()
        self._loading: dict[int, asyncio.Task[None]] = {}
        self.hits = self.misses = 0

    async def find(self, conn: asyncpg.Connection, table_id: int, version: int | None,
                   e164: str, call_class: str | None) -> Rate | None:
        table = self._tables.get(table_id)
        if table is not None and version is not None and table.version == version:
            self._tables.move_to_end(table_id)
            self.hits += 1
            return table.find(e164, call_class)
        self.misses += 1
        if version is not None:
            self._load_later(table_id, version)
        return await store.find_rate(conn, table_id, e164, call_class)

    def _load_later(self, table_id: int, version: int) -> None:
        if table_id in self._loading:
            return
        task = asyncio.create_task(self._load(table_id, version))
        self._loading[table_id] = task
        task.add_done_callback(lambda _: self._loading.pop(table_id, None))

    async def _load(self, table_id: int, version: int) -> None:
        try:
            async with self.pool.acquire() as conn, \
                    conn.transaction(isolation="repeatable_read", readonly=True):
                # one snapshot: the rates are exactly those of the version read with them
                head = await conn.fetchrow("SELECT rates_version, rate_count FROM rate_tables"
                                           " WHERE id = $1", table_id)
                if head is None or head["rate_count"] > self.max_rates:
                    self._tables.pop(table_id, None)
                    return
                table = Table(head["rates_version"])
                for row in await conn.fetch(LOAD_SQL, table_id):
                    table.add(store.rate_from_row(row))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("rate table %s not cached (%r): looked up in the database meanwhile",
                        table_id, exc)
            return
        except Exception:
            # nobody awaits this task: unlogged here, the error would go unseen
            log.exception("rate table %s not cached: looked up in the database meanwhile",
                          table_id)
            return
        self._tables[table_id] = table
        self._tables.move_to_end(table_id)
        while sum(t.size for t in self._tables.values()) > self.max_rates and \
                len(self._tables) > 1:
            self._tables.popitem(last=False)
        log.info("rate table %s cached at version %s (%d rates)", table_id, table.version,
                 table.size)
