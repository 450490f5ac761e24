"""After admission: more time for calls that talk on, the end of every call (from the node's
CDR), and the release of calls whose node stopped answering for them (lapsed leases)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg

from controlplane.calls import cdr_file, credit
from controlplane.calls.admission import rate_from_json
from controlplane.calls.cdr_file import CdrLine
from controlplane.rating import tariff
from controlplane.store import calls as store

log = logging.getLogger(__name__)

# Asterisk ends a call at its granted time to within milliseconds; a few hundred more
# are the cut being late, not talk to bill.
CUT_TOLERANCE = 1.0


@dataclass(frozen=True)
class Extension:
    """A call that got more time: the node must move its end."""

    callee_channel: str
    seconds_left: float


async def extend_due(pool: asyncpg.Pool, node_id: int, lead: float, lease: float,
                     ahead: int = credit.AHEAD_SECONDS) -> list[Extension]:
    """Reserve the next interval for every answered call of the node whose granted time
    ends within `lead` seconds, on the balance its account shares with its other calls."""
    moved: list[Extension] = []
    async with pool.acquire() as conn:
        for due in await store.due_for_more(conn, node_id, lead):
            async with conn.transaction():
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
                    await store.mark_exhausted(conn, call["id"])
                    continue
                seconds, extra = chosen
                await store.hold(conn, account["id"], extra)
                left = await store.extend(conn, call["id"], seconds, extra, lease)
            moved.append(Extension(call["callee_channel"] or "", left))
    return moved


async def _floor(conn: asyncpg.Connection, call: asyncpg.Record) -> Decimal:
    row = await conn.fetchrow(
        "SELECT CASE WHEN a.extension_id IS NULL THEN"
        "   CASE WHEN t.billing_mode = 'postpaid' THEN t.credit_limit ELSE 0 END"
        " ELSE CASE WHEN e.billing_type = 'postpaid' THEN e.credit_limit ELSE 0 END END AS lim"
        " FROM credit_accounts a JOIN tenants t ON t.id = a.tenant_id"
        " LEFT JOIN extensions e ON e.id = a.extension_id WHERE a.id = $1", call["account_id"])
    return -Decimal(row["lim"]) if row is not None else Decimal(0)


def bill(call: asyncpg.Record | dict[str, Any], talk: float) -> tuple[int, Decimal]:
    """(billed seconds, price) of a call that talked `talk` seconds."""
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
        "price": price, "disposition": line.disposition, "hangup_cause": "",
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
_UNREAD: Any = object()


async def finish(conn: asyncpg.Connection, node_id: int, line: CdrLine,
                 call: asyncpg.Record | None = _UNREAD) -> bool:
    """Store one node CDR line; if it ends a call in progress, settle that call. Not in a
    transaction: the settlement is one statement (migration 0007), so the shared counters
    are locked only while it runs. `call`: the line's call as read just before (None: it
    has none), read here when not given. Returns whether a CDR was stored (False: it
    already was)."""
    talk = line.talk_seconds if line.answered_at is not None else 0.0
    for _ in range(SETTLE_TRIES):
        if call is _UNREAD:
            call = await store.get_call(conn, line.call_id) if line.call_id else None
        billed, price = bill(call, talk) if call is not None else (0, Decimal(0))
        outcome, stored = await store.settle_call(
            conn, call["id"] if call is not None else None,
            call["granted_seconds"] if call is not None else None, price,
            _cdr_values(node_id, call, line, talk, billed, price),
            account_code=line.account_code)
        if outcome != "stale":
            return stored
        call = _UNREAD
    raise RuntimeError(f"call {line.call_id}: its grant kept moving while it was settled")


def _best_lines(lines: list[CdrLine]) -> list[CdrLine]:
    """A call ringing several devices leaves one line per device: the answered one (the
    longest talk) settles the call, so it goes first."""
    return sorted(lines, key=lambda line: (line.call_id is None, -line.talk_seconds))


async def import_file(pool: asyncpg.Pool, node_id: int, path: Path) -> int:
    """Import what the node's CDR file gained since the last import. Returns CDRs stored.

    Each line is settled by one statement of its own (a call's settlement gives back slots
    on counters every admission of its dealers needs), then the position is saved. Lines
    settled before a crash and read again are stored once and settle nothing twice."""
    ident = cdr_file.file_id(path)
    if ident is None:
        return 0
    stored = 0
    async with pool.acquire() as conn:
        position = await store.import_position(conn, node_id)
        offset = position["offset_"] if position and position["file_id"] == ident else 0
        if offset > cdr_file.size(path):  # truncated in place: it starts again
            offset = 0
        texts, new_offset = cdr_file.read_from(path, offset)
        if new_offset == offset:
            return 0
        # The settlements commit without waiting for their WAL to reach the disk (they
        # hold the shared counters until they commit); saving the position does wait, and
        # that flushes every settlement before it. A crash in between loses at most
        # settlements whose lines are read again, and settled once (the CDR is unique).
        lines = _best_lines(list(cdr_file.records(texts)))
        calls = await store.calls_by_id(conn, [x.call_id for x in lines if x.call_id])
        await conn.execute("SET synchronous_commit = off")
        try:
            for line in lines:
                # a second line of a call finds it settled (or reads it again if not)
                call = calls.pop(line.call_id, None) if line.call_id in calls else _UNREAD
                stored += await finish(conn, node_id, line,
                                       call if line.call_id else None)
        finally:
            await conn.execute("RESET synchronous_commit")
        await store.save_position(conn, node_id, ident, new_offset)
    return stored


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
