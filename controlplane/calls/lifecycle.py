"""After admission: more time for calls that talk on, the end of every call (from the node's
CDR), and the release of calls whose node stopped answering for them (lapsed leases)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import asyncpg

from controlplane.calls import cdr_file, credit
from controlplane.calls.admission import rate_from_json
from controlplane.calls.cdr_file import CdrLine
from controlplane.rating import tariff
from controlplane.store import calls as store

log = logging.getLogger(__name__)
T = TypeVar("T")

# Asterisk ends a call at its granted time to within milliseconds; a few hundred more
# are the cut being late, not talk to bill.
CUT_TOLERANCE = 1.0


@dataclass(frozen=True)
class Extension:
    """A call that got more time: the node must move its end, `seconds_left` after the
    moment `at` (time.monotonic()), however late the node hears of it."""

    callee_channel: str
    seconds_left: float
    at: float
    call: str  # the call's id, which the callee channel carries (PBX_ANSWERED)

    def left_now(self) -> float:
        return self.seconds_left - (time.monotonic() - self.at)


# Calls that found no credit for more time are tried again every this many seconds until
# their end (a call of the same account may end meanwhile and give its reservation back, or
# the account be topped up).
EXHAUSTED_RETRY = 2.0


async def extend_due(pool: asyncpg.Pool, node_id: int, lead: float, lease: float,
                     move: Callable[[Extension], Awaitable[None]],
                     ahead: int = credit.AHEAD_SECONDS, exhausted_too: bool = False) -> int:
    """Reserve the next interval for every answered call of the node whose granted time
    ends within `lead` seconds, on the balance its account shares with its other calls, and
    have each one's end moved (`move`) as soon as its reservation is committed: an error
    on a later call never keeps an earlier one's new end from the node. `exhausted_too`:
    calls that found no credit before are tried again. Returns the calls extended."""
    extended = 0
    async with pool.acquire() as conn:
        calls_due = await store.due_for_more(conn, node_id, lead, exhausted_too)
    for due in calls_due:  # a connection for each, not held while the node is told
        async with pool.acquire() as conn, conn.transaction():
            call = await store.lock_call(conn, due["id"])
            if call is None or call["account_id"] is None:
                continue
            rate = rate_from_json(call["rate"])
            assert rate is not None
            account = await store.lock_account_by_id(conn, call["account_id"])
            floor = await _floor(conn, call)
            available = account["balance"] - account["reserved"] - floor
            chosen = credit.best_grant(
                credit.grant_options(rate, call["granted_seconds"], call["reserved"], ahead),
                available)
            if chosen is None:
                if not call["exhausted"]:
                    await store.mark_exhausted(conn, call["id"])
                continue
            seconds, extra = chosen
            await store.hold(conn, account["id"], extra)
            left = await store.extend(conn, call["id"], seconds, extra, lease)
        extended += 1
        await move(Extension(call["callee_channel"] or "", left, time.monotonic(),
                             str(call["id"])))
    return extended


async def _floor(conn: asyncpg.Connection, call: asyncpg.Record) -> Decimal:
    row = await conn.fetchrow(
        "SELECT CASE WHEN a.extension_id IS NULL THEN"
        "   CASE WHEN t.billing_mode = 'postpaid' THEN t.credit_limit ELSE 0 END"
        " ELSE CASE WHEN e.billing_type = 'postpaid' THEN e.credit_limit ELSE 0 END END AS lim"
        " FROM credit_accounts a JOIN tenants t ON t.id = a.tenant_id"
        " LEFT JOIN extensions e ON e.id = a.extension_id WHERE a.id = $1", call["account_id"])
    return -Decimal(row["lim"]) if row is not None else Decimal(0)


def bill(call: asyncpg.Record | dict[str, Any], talk: float) -> tuple[int, Decimal]:
    """(billed seconds, price) of a call that talked `talk` seconds, to the millisecond the
    CDR shows (`talk_seconds`): a CDR reading 6.000 s is billed as 6 s, not 6.0004 s."""
    talk = round(talk, 3)
    rate = rate_from_json(call["rate"])
    if rate is None:
        return 0, Decimal(0)
    granted = call["granted_seconds"]
    if granted is not None and granted < talk <= granted + CUT_TOLERANCE:
        talk = float(granted)
    return tariff.billable_seconds(Decimal(str(talk)), rate), tariff.price(Decimal(str(talk)),
                                                                            rate)


def _cdr_values(node_id: int, call: asyncpg.Record | None, line: CdrLine, talk: float,
                billed: int, price: Decimal) -> dict[str, Any]:
    """The CDR's columns; settle_call adds the tenant's facts (external reference, and the
    dealer chain unless the call's own is here)."""
    rate = rate_from_json(call["rate"]) if call is not None else None
    values: dict[str, Any] = {
        "node_id": node_id, "uniqueid": line.uniqueid, "sequence": line.sequence,
        "call_id": line.call_id, "started_at": line.started_at,
        "answered_at": line.answered_at, "ended_at": line.ended_at,
        "duration": Decimal(str(round(line.duration, 3))),
        "talk_seconds": Decimal(str(round(talk, 3))), "billed_seconds": billed,
        "price": price, "disposition": line.disposition, "hangup_cause": line.hangup_cause,
        "refusal": line.reason or None, "sip_code": line.sip_code,
        "caller": line.src, "callee": line.dst, "direction": line.direction or None,
        "tenant_id": line.tenant_id,
    }
    if call is not None:
        values.update(direction=call["direction"], tenant_id=call["tenant_id"],
                      extension_id=call["extension_id"], dealer_path=list(call["dealer_path"]),
                      caller=call["caller"], callee=call["callee"],
                      call_class=call["call_class"], carrier_id=call["carrier_id"])
    if rate is not None:
        values.update(rate_prefix=rate.prefix, price_per_minute=rate.price_per_minute)
    return values


# A call's grant moves only while it talks; its CDR is priced again at most this often.
SETTLE_TRIES = 5


async def finish(conn: asyncpg.Connection, node_id: int, line: CdrLine) -> bool:
    """Store one node CDR line; if it ends a call in progress, settle that call (as the
    import does, for a batch of one). Returns whether a CDR was stored (False: it already
    was)."""
    return await _settle_lines(conn, node_id, [line]) > 0


def _best_lines(lines: list[CdrLine]) -> list[CdrLine]:
    """A call ringing several devices leaves one line per device: the answered one (the
    longest talk) settles the call, so it goes first."""
    return sorted(lines, key=lambda line: (line.call_id is None, -line.talk_seconds))


# CDR lines settled per statement: the accounts and counters they touch are locked only for
# the statement's last moments. Pricing a line and encoding it take the agent's event loop
# about 0.06 ms, so a batch stays short enough not to hold up the decisions it also serves.
# A statement of 50 lines kept a PostgreSQL backend busy for 8-17 ms, and the admissions
# running beside it on a 2-core node waited for the CPU and for the accounts it had updated:
# at 500 calls/s the decisions' p99 went from 3.3-3.9 ms with batches of 5-10 to 4.6-4.9 ms
# (bench/admission.py), for no measurable saving of CPU.
SETTLE_BATCH = 10
YIELD_EVERY = 3  # lines priced between two turns of the event loop (about 0.2 ms)
PARSE_YIELD_EVERY = 25  # lines parsed between two turns (about 9 us each)


async def import_file(pool: asyncpg.Pool, node_id: int, path: Path) -> int:
    """Import what the node's CDR file gained since the last import. Returns CDRs stored.

    Lines are settled in batches, one statement each (migration 0009), then the position is
    saved. Lines settled before a crash and read again are stored once and settle nothing
    twice."""
    return (await _import(pool, node_id, path))[0]


# The node's file is read off the event loop, one read at a time (a stalled shared volume
# then holds one thread, not the decisions), and a read that takes longer fails the import.
FILE_TIMEOUT = 5.0
_file_reads = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                    thread_name_prefix="cdr-file")


class CdrFileStalled(OSError):
    pass


async def _from_file(read: Callable[..., T], *args: Any) -> T:
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.run_in_executor(_file_reads, read, *args),
                                      FILE_TIMEOUT)
    except TimeoutError:
        raise CdrFileStalled(f"the node's CDR file {args[0]} did not answer within "
                             f"{FILE_TIMEOUT:.0f} s: check the volume it is on") from None


# A node line saying "not answered" of a call the database holds answered is held this long
# at least, and settles the call only once the caller's channel has been seen gone from the
# node for GONE_FOR and the file was read to its end since (see CdrImport).
HOLD_FOR, GONE_FOR, HELD_EVERY = 5.0, 2.0, 1.0
# The import is said to fall behind when it stays this many bytes (a few hundred records)
# short of the file's end for this long; said again every BEHIND_TELL_EVERY seconds.
BEHIND_BYTES, BEHIND_FOR, BEHIND_TELL_EVERY = 64 * 1024, 10.0, 60.0
LiveChannels = Callable[[], Awaitable[set[str] | None]]


@dataclass
class HeldLine:
    line: CdrLine
    since: float
    gone_at: float | None = None


class CdrImport:
    """A node's CDR file imported as it grows, read often (`CallControlConfig.cdr_every`):
    settling a few lines at a time spreads the work instead of running it in bursts beside
    the admissions, and a look that finds the file no longer than the last import reached
    costs a `stat`, not a query.

    A line saying "not answered" of a call the database holds answered is, most often, a
    device that did not pick up a call another one answered, whose line comes later. It is
    held. The call's answered line settles the call and the held one is dropped; if none
    comes (the caller left between the callee's answer and the bridge), the held line
    settles the call, unanswered and unbilled, once `live_channels` (the node's channels'
    unique ids; None: unknown) has not listed the caller's channel for GONE_FOR seconds and
    the file was read to its end since. A held line this process loses (it restarts, or the
    node cannot be asked) leaves the call to its lease, as before."""

    def __init__(self, pool: asyncpg.Pool, node_id: int, path: Path,
                 live_channels: LiveChannels | None = None) -> None:
        self.pool, self.node_id, self.path = pool, node_id, path
        self.reached: tuple[str, int] | None = None  # (file identity, offset) imported to
        self.live_channels = live_channels
        self.held: dict[UUID, HeldLine] = {}
        self._held_looked = float("-inf")
        self.behind_since: float | None = None  # far behind the file's end since then
        self._behind_told = float("-inf")

    async def run(self) -> int:
        now = await _from_file(cdr_file.state, self.path)
        if now is None or now == self.reached:
            if now is None:
                return 0
            self.behind_since = None
            return await self._settle_held()
        held: list[CdrLine] = []
        stored, self.reached = await _import(self.pool, self.node_id, self.path, held)
        for line in held:
            if line.call_id is not None:
                self.held.setdefault(line.call_id, HeldLine(line, time.monotonic()))
        if self.reached is None or self.reached[1] < now[1]:
            self._behind(now[1] - (self.reached[1] if self.reached else 0))
            return stored  # not read to its end yet (a backlog, or a record on its way)
        self.behind_since = None
        # read to its end: under steady traffic the file seldom stays there between two
        # looks, and the held lines must not wait for a quiet moment
        return stored + await self._settle_held()

    def _behind(self, missing: int) -> None:
        """Say so, every BEHIND_TELL_EVERY seconds, while the import stays BEHIND_BYTES or
        more behind the file's end for BEHIND_FOR seconds (the database, or the import's
        process, too slow for the node's calls)."""
        clock = time.monotonic()
        if missing < BEHIND_BYTES:
            self.behind_since = None
            return
        self.behind_since = self.behind_since or clock
        if clock - self.behind_since >= BEHIND_FOR and \
                clock - self._behind_told >= BEHIND_TELL_EVERY:
            self._behind_told = clock
            log.warning("node %s: the CDR import has been %d KiB or more behind the node's "
                        "file for %.0f s: calls that ended meanwhile keep their slots and "
                        "reservations, and any whose lease lapses first is billed up to its "
                        "grant", self.node_id, missing // 1024, clock - self.behind_since)

    async def _settle_held(self) -> int:
        """With the file read to its end: settle the calls whose held line is the last word
        (see the class)."""
        clock = time.monotonic()
        if not self.held or self.live_channels is None or clock - self._held_looked < HELD_EVERY:
            return 0
        self._held_looked = clock
        async with self.pool.acquire() as conn:
            calls = await store.calls_by_id(conn, list(self.held))
        for gone in set(self.held) - set(calls):  # settled by their answered lines
            del self.held[gone]
        live = await self.live_channels()
        if live is None:
            return 0
        stored = 0
        for call_id, held in list(self.held.items()):
            if held.line.uniqueid in live or clock - held.since < HOLD_FOR:
                held.gone_at = None
            elif held.gone_at is None:
                held.gone_at = clock
            elif clock - held.gone_at >= GONE_FOR:
                async with self.pool.acquire() as conn:
                    [(outcome, new)] = await store.settle_calls(
                        conn, [_settlement(self.node_id, held.line, calls[call_id])])
                if outcome == "stale":  # its grant moved meanwhile: read it again next time
                    continue
                del self.held[call_id]
                if new:
                    stored += 1
                    log.warning("node %s: call %s settled unanswered from its node's CDR: the"
                                " callee answered but the caller left before they were"
                                " connected", self.node_id, call_id)
        return stored


async def _import(pool: asyncpg.Pool, node_id: int, path: Path,
                  held: list[CdrLine] | None = None) -> tuple[int, tuple[str, int] | None]:
    """import_file, and (file identity, offset) the import reached; `held`: see
    _settle_lines."""
    now = await _from_file(cdr_file.state, path)
    if now is None:
        return 0, None
    ident, size = now
    stored = 0
    async with pool.acquire() as conn:
        position = await store.import_position(conn, node_id)
        offset = 0
        if position and cdr_file.same_file(position["file_id"], ident):
            offset = position["offset_"]
            if offset > size:  # truncated in place: it starts again
                offset = 0
        elif position:  # a new file: what the former ones still held comes first
            stored += await _finish_replaced(conn, node_id, path, position, held)
            await store.save_position(conn, node_id, ident, 0)
        got, offset = await _import_from(conn, node_id, path, ident, offset, held)
    return stored + got, (ident, offset)


async def _finish_replaced(conn: asyncpg.Connection, node_id: int, path: Path,
                           position: asyncpg.Record, held: list[CdrLine] | None) -> int:
    """The node's CDR file was replaced (rotated, as logrotate does): the records the former
    file got after the last import are read from it, found beside the new one by its first
    line, and so are the files rotated after it (written to since the last import: a long
    outage may span several rotations), before the new file. Returns the CDRs stored."""
    offset = position["offset_"]
    since = position["updated_at"].timestamp() - ROTATION_CLOCK_MARGIN
    former, later = await _from_file(cdr_file.rotated, path, position["file_id"], since)
    if former is None and offset > 0:
        log.error("node %s: the CDR file %s was replaced, and its former file is not beside "
                  "it (removed or compressed): any records it got after byte %d were not "
                  "imported", node_id, path, offset)
    stored = 0
    for file, ident, start in ([(former, position["file_id"], offset)] if former else []) + \
            [(f, "", 0) for f in later]:
        if not ident:
            now = await _from_file(cdr_file.state, file)
            if now is None:
                continue
            ident = now[0]
        while True:
            got, reached = await _import_from(conn, node_id, file, ident, start, held)
            stored += got
            if reached == start:
                break
            start = reached
        log.info("node %s: the rotated CDR file %s read to its end", node_id, file)
    return stored


# Files rotated within this many seconds before the last import are read again too (they
# may hold records written after it on a node whose clock is a little ahead; the CDRs are
# stored once).
ROTATION_CLOCK_MARGIN = 60.0


async def _import_from(conn: asyncpg.Connection, node_id: int, path: Path, ident: str,
                       offset: int, held: list[CdrLine] | None) -> tuple[int, int]:
    """Settle the records of the file at `path` (identity `ident`) from `offset`, as many as
    one read takes, and save the position after them. Returns (CDRs stored, offset)."""
    texts, new_offset = await _from_file(cdr_file.read_from, path, offset)
    if new_offset == offset:
        return 0, offset
    # The settlements commit without waiting for their WAL to reach the disk (they
    # hold the shared counters until they commit); saving the position does wait, and
    # that flushes every settlement before it. A crash in between loses at most
    # settlements whose lines are read again, and settled once (the CDR is unique).
    lines = _best_lines(await _parse(node_id, texts))
    # A call ringing several devices left several lines: the best settles the call, the
    # others come after it has (they find it settled and store nothing more).
    seen: set[UUID] = set()
    first, later = [], []
    for line in lines:
        (later if line.call_id in seen else first).append(line)
        if line.call_id is not None:
            seen.add(line.call_id)
    stored = 0
    for group in (first, later):
        for at in range(0, len(group), SETTLE_BATCH):
            stored += await _settle_batch(conn, node_id, group[at:at + SETTLE_BATCH], held)
    await store.save_position(conn, node_id, ident, new_offset)
    return stored, new_offset


async def _parse(node_id: int, texts: list[str]) -> list[CdrLine]:
    """The node's lines, parsed a slice at a time between turns of the event loop: an import
    after a pause (the agent restarting, the database away) reads thousands of lines. One
    that cannot be read is logged and skipped (it stays in the node's file)."""
    lines = []
    for n, text in enumerate(texts, 1):
        line = cdr_file.parse_salvaged(text)
        if line is not None:
            lines.append(line)
        else:
            log.error("node %s: CDR line skipped, it cannot be read: %.300s", node_id, text)
        if n % PARSE_YIELD_EVERY == 0:
            await asyncio.sleep(0)
    return lines


async def _settle_batch(conn: asyncpg.Connection, node_id: int, lines: list[CdrLine],
                        held: list[CdrLine] | None = None) -> int:
    """_settle_lines, committed without waiting for the disk; a batch the database refuses
    for one line's values is settled a line at a time, and that line alone is skipped, so
    that one bad record never stops its node's import."""
    try:
        return await _settle_lines(conn, node_id, lines, wait_for_disk=False, held=held)
    except asyncpg.DataError as exc:
        if len(lines) == 1:
            log.error("node %s: CDR line of channel %s (sequence %s) skipped, the database "
                      "refuses its values: %s", node_id, lines[0].uniqueid, lines[0].sequence,
                      exc)
            return 0
    stored = 0
    for line in lines:
        stored += await _settle_batch(conn, node_id, [line], held)
    return stored


def _settlement(node_id: int, line: CdrLine, call: asyncpg.Record | None) -> dict[str, Any]:
    """One item of settle_calls: the line priced from its call as read (None: it has none)."""
    talk = line.talk_seconds if line.answered_at is not None else 0.0
    billed, price = bill(call, talk) if call is not None else (0, Decimal(0))
    return {"call": call["id"] if call is not None else None,
            "granted": call["granted_seconds"] if call is not None else None,
            "price": price, "cdr": _cdr_values(node_id, call, line, talk, billed, price),
            "account_code": line.account_code}


async def _settle_lines(conn: asyncpg.Connection, node_id: int, lines: list[CdrLine], *,
                        wait_for_disk: bool = True, held: list[CdrLine] | None = None) -> int:
    """Settle lines of distinct calls in one statement; those whose grant moved since their
    call was read are read and priced again. Returns the CDRs stored. `wait_for_disk`:
    commit synchronously (False: the caller makes them durable later, see _import)."""
    stored = 0
    calls = await store.calls_by_id(conn, [x.call_id for x in lines if x.call_id])
    pending = [(line, calls.get(line.call_id) if line.call_id else None) for line in lines]
    # A device that did not answer a call another one answered: its line, read before the
    # answered one, would settle the call unanswered; the answered line settles it. `held`
    # gets such lines (CdrImport settles from one if no answered line ever comes).
    if held is not None:
        held += [line for line, call in pending if call is not None
                 and line.answered_at is None and call["answered_at"] is not None]
    pending = [(line, call) for line, call in pending
               if call is None or line.answered_at is not None or call["answered_at"] is None]
    for _ in range(SETTLE_TRIES):
        items = []
        for n, (line, call) in enumerate(pending, 1):
            items.append(_settlement(node_id, line, call))
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        results = await store.settle_calls(conn, items, wait_for_disk=wait_for_disk)
        stored += sum(new for _, new in results)
        stale = [line for (line, _), (outcome, _) in zip(pending, results, strict=True)
                 if outcome == "stale"]
        if not stale:
            return stored
        calls = await store.calls_by_id(conn, [x.call_id for x in stale if x.call_id])
        pending = [(line, calls.get(line.call_id)) for line in stale]
    raise RuntimeError(f"calls {[x.call_id for x in pending]}: their grants kept moving while "
                       "they were settled")


# After a process starts, and after the database was away from it, its sweeps wait this
# long: the agents first renew the leases of the calls their nodes still have and import the
# CDRs of those that ended meanwhile, which bill them exactly.
SWEEP_AFTER = 20.0


class LeaseSweep:
    """`sweep` as a process's loop runs it: held back until the database has answered this
    process for SWEEP_AFTER seconds in a row (a lease that lapsed while the database was
    away says nothing about the call)."""

    def __init__(self, pool: asyncpg.Pool, after: float = SWEEP_AFTER) -> None:
        self.pool, self.after = pool, after
        self.answering_since: float | None = None

    def failed(self) -> None:
        """The database failed this process: sweeps wait again."""
        self.answering_since = None

    async def run(self) -> int:
        try:
            if self.answering_since is None or \
                    time.monotonic() - self.answering_since < self.after:
                async with self.pool.acquire() as conn:
                    await conn.fetchval("SELECT 1")
                if self.answering_since is None:
                    self.answering_since = time.monotonic()
                return 0
            return await sweep(self.pool)
        except BaseException:
            self.failed()
            raise


async def sweep(pool: asyncpg.Pool) -> int:
    """Release calls whose lease lapsed: their node or agent stopped vouching for them.
    They are billed for the time they could have talked (at most what was granted) and
    leave a CDR marked as such; a node CDR arriving later changes nothing."""
    released = 0
    async with pool.acquire() as conn:
        while True:
            async with conn.transaction():  # one call at a time: short locks
                expired = await store.expired(conn, limit=1)
                if not expired:
                    return released
                await _release(conn, expired[0])
                released += 1


async def recount_counters(pool: asyncpg.Pool, timeout: float) -> int:
    """Set right the call counters a cap set during traffic left off (migration 0018).
    Returns how many were."""
    async with pool.acquire(timeout=timeout) as conn:
        fixed = await store.recount_call_counters(conn, timeout=timeout)
    for kind, key, delta in fixed:
        log.warning("call counter %s %s was off by %+d calls: set right", kind, key, -delta)
    return len(fixed)


async def _release(conn: asyncpg.Connection, call: asyncpg.Record) -> None:
    now = datetime.now(UTC)
    talk = 0.0
    if call["answered_at"] is not None:
        end = min(now, call["granted_until"] or now)
        talk = max(0.0, (end - call["answered_at"]).total_seconds())
    billed, price = bill(call, talk)
    line = CdrLine(uniqueid=call["channel"], sequence=0, call_id=call["id"],
                   started_at=call["started_at"], answered_at=call["answered_at"], ended_at=now,
                   duration=(now - call["started_at"]).total_seconds(), talk_seconds=talk,
                   disposition="LEASE EXPIRED", src=call["caller"], dst=call["callee"],
                   reason="", sip_code=None, tenant_id=call["tenant_id"], account_code="",
                   direction=call["direction"])
    await store.settle_call(conn, call["id"], call["granted_seconds"], price,
                            _cdr_values(call["node_id"], call, line, talk, billed, price),
                            lapsed_only=True)
    log.warning("call %s on node %s: lease lapsed, released", call["id"], call["node_id"])


async def call_for_channel(conn: asyncpg.Connection, node_id: int,
                           channel: str) -> UUID | None:
    return await conn.fetchval("SELECT id FROM calls WHERE node_id = $1 AND channel = $2",
                               node_id, channel)
