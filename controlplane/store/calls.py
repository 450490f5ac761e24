"""SQL of calls in progress: who is calling, credit accounts, the admission transaction's
steps, grants, leases, and the end of a call with its CDR."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

# A party of a call (caller, callee, a DID's owner: view call_parties, migration 0010) with
# the digest of what was read, its "facts": a decision taken from a party kept since is
# admitted only while the party still reads the same (admit_call_checked). The rate tables
# come with the version of their rates (migration 0008), which the agent's copies of them
# must match.
PARTY_SQL = {
    "account": "SELECT p.*, md5(p::text) AS facts FROM call_parties p WHERE p.account_code = $1",
    "did": "SELECT p.*, md5(p::text) AS facts FROM call_parties p"
           " WHERE p.extension_id = (SELECT extension_id FROM dids WHERE e164 = $1)",
    "number": "SELECT p.*, md5(p::text) AS facts FROM call_parties p"
              " WHERE p.tenant_id = $2 AND p.number = $1",
}


async def party(conn: asyncpg.Connection, kind: str, key: str,
                tenant_id: int | None = None) -> asyncpg.Record | None:
    """The party found by `kind`: 'account' (account code), 'did' (E.164 number it owns) or
    'number' (extension number within `tenant_id`)."""
    if kind == "number":
        return await conn.fetchrow(PARTY_SQL[kind], key, tenant_id)
    return await conn.fetchrow(PARTY_SQL[kind], key)


class LevelFull(Exception):
    def __init__(self, level: str) -> None:
        super().__init__(level)
        self.kind, _, key = level.partition(":")
        self.id = int(key) if key.isdigit() else None


class NoCredit(Exception):
    pass


class Stale(Exception):
    """A party the decision was taken from reads differently now: nothing was written."""


# The admission commits without waiting for its WAL to reach the disk, and so gives its
# counters' locks back at once: every admission of the same dealers waits for them, and
# waiting for the flush with them held made admissions queue one flush after another. The
# decision is made durable before anyone hears of it by a transaction of its own that
# commits synchronously, in the same CALL (migrations 0008, 0010 and 0014): the WAL is flushed in
# order, so past the admission too, and many sessions' flushes share one write (group
# commit), none of them holding a counter. It commits: never call it inside a transaction
# block.
ADMIT_SQL = ("CALL admit_call_checked($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,"
             " $14, $15, $16, $17, $18, $19, $20, $21, $22)")


async def admit(conn: asyncpg.Connection, v: dict[str, Any], lease: float,
                checks: Sequence[tuple[str, str, int | None, str]] = ()) -> int | None:
    """Record the call, reserve its credit and take its slots, in one statement (see
    migrations 0006, 0008, 0010 and 0014), durable when it returns. `checks`: (kind, key, tenant,
    facts) of each party read earlier than this decision (see `party`), which must read the
    same now; Stale when one does not. Returns the seconds granted (None: not limited)."""
    try:
        row = await conn.fetchrow(
            ADMIT_SQL, [c[0] for c in checks], [c[1] for c in checks],
            [c[2] for c in checks], [c[3] for c in checks], v["id"], v["node_id"],
            v["channel"], v["channel_name"], v["direction"], v["extension_id"], v["tenant_id"],
            v["dealer_path"], v["caller"], v["callee"], v["call_class"], v["carrier_id"],
            v["rate"], v["account_extension"], v["floor"], v["seconds"], v["amounts"], lease)
    except asyncpg.PostgresError as exc:
        state = getattr(exc, "sqlstate", None)
        if state == "PX001":
            raise LevelFull(str(getattr(exc, "message", exc)).removeprefix("full:")) from exc
        if state == "PX002":
            raise NoCredit() from exc
        raise
    if row is None:
        return None
    if row["p_stale"]:
        raise Stale()
    return row["p_grant"]


async def lock_account_by_id(conn: asyncpg.Connection, account_id: int) -> asyncpg.Record:
    return await conn.fetchrow("SELECT id, balance, reserved FROM credit_accounts"
                               " WHERE id = $1 FOR UPDATE", account_id)


async def hold(conn: asyncpg.Connection, account_id: int, amount: Decimal) -> None:
    await conn.execute("UPDATE credit_accounts SET reserved = reserved + $2, updated_at = now()"
                       " WHERE id = $1", account_id, amount)


ANSWERED_SQL = ("SELECT id, granted_seconds FROM calls_answered_at($1::uuid[], $2::text[],"
                " $3::timestamptz[], $4),"
                " (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit")
# One answer alone: the same change as calls_answered_at's, planned once for all.
ANSWERED_ONE_SQL = (
    "UPDATE calls c SET answered_at = answered_time($3, c.started_at), callee_channel = $2,"
    " granted_until = answered_time($3, c.started_at)"
    " + make_interval(secs => c.granted_seconds),"
    " lease_until = greatest(c.lease_until, now() + make_interval(secs => $4))"
    " FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit"
    " WHERE c.id = $1 AND c.answered_at IS NULL RETURNING c.id, c.granted_seconds")

Answer = tuple[UUID, str, datetime | None]  # (call, answering channel, when: None for now)


async def answered(conn: asyncpg.Connection, answers: Sequence[Answer],
                   lease: float) -> dict[UUID, int | None]:
    """Mark calls answered: their granted time starts at the node's time of the answer
    (kept between the call's admission and now: migration 0011). Returns the seconds
    granted to each call answered for the first time.

    Committed without waiting for the disk (one flush a call less): if PostgreSQL crashed
    within the WAL writer's delay, such a call would lose its answer time, so it would not
    be extended and the node would end it at its first grant, which it enforces itself; its
    CDR still bills the time it talked."""
    if len(answers) == 1:
        call, channel, at = answers[0]
        rows = await conn.fetch(ANSWERED_ONE_SQL, call, channel, at, lease)
    else:
        rows = await conn.fetch(ANSWERED_SQL, [a[0] for a in answers],
                                [a[1] for a in answers], [a[2] for a in answers], lease)
    return {row["id"]: row["granted_seconds"] for row in rows}


async def answered_at(conn: asyncpg.Connection, call_id: UUID, callee_channel: str,
                      at: datetime, lease: float) -> bool:
    """Mark a call answered at `at`, the node's own answer time (an answer learnt late: see
    CallControl.resync_answers). Returns whether it was not known answered before."""
    # the node's time, kept between the call's admission and now (migration 0011), as for
    # answers heard live: a node clock running behind must not end the grant at once
    status = await conn.execute(
        "UPDATE calls SET answered_at = answered_time($3::timestamptz, started_at),"
        " callee_channel = $2, granted_until = answered_time($3::timestamptz, started_at)"
        " + make_interval(secs => granted_seconds),"
        " lease_until = greatest(lease_until, now() + make_interval(secs => $4))"
        " WHERE id = $1 AND answered_at IS NULL", call_id, callee_channel, at, lease)
    return status.endswith(" 1")


UNANSWERED_SQL = ("SELECT id, channel, channel_name FROM calls WHERE node_id = $1"
                  " AND answered_at IS NULL AND granted_seconds IS NOT NULL ORDER BY started_at")


DUE_SQL = (
    "SELECT c.id, c.account_id, c.rate, c.reserved, c.granted_seconds, c.callee_channel"
    " FROM calls c WHERE c.node_id = $1 AND c.answered_at IS NOT NULL"
    " AND c.granted_seconds IS NOT NULL AND c.granted_until < now() + make_interval(secs => $2)"
    " AND (NOT c.exhausted OR ($3 AND c.granted_until > now()))")


async def due_for_more(conn: asyncpg.Connection, node_id: int, lead: float,
                       exhausted_too: bool = False) -> list[asyncpg.Record]:
    """Calls whose grant ends within `lead` seconds; `exhausted_too`: also those that found
    no credit before, until their end."""
    return await conn.fetch(DUE_SQL, node_id, lead, exhausted_too)


async def lock_call(conn: asyncpg.Connection, call_id: UUID) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM calls WHERE id = $1 FOR UPDATE", call_id)


async def extend(conn: asyncpg.Connection, call_id: UUID, seconds: int, extra: Decimal,
                 lease: float) -> float:
    """Grant the call `seconds` in all; returns the seconds from now (the clock's, not the
    transaction's start: waits for locks are not counted twice) to the new end."""
    return float(await conn.fetchval(
        "UPDATE calls SET granted_seconds = $2::int, reserved = reserved + $3,"
        " granted_until = answered_at + make_interval(secs => $2::int), exhausted = false,"
        " lease_until = greatest(lease_until, now() + make_interval(secs => $4))"
        " WHERE id = $1"
        " RETURNING extract(epoch FROM granted_until - clock_timestamp())",
        call_id, seconds, extra, lease))


async def mark_exhausted(conn: asyncpg.Connection, call_id: UUID) -> None:
    await conn.execute("UPDATE calls SET exhausted = true WHERE id = $1", call_id)


async def renew_leases(conn: asyncpg.Connection, node_id: int, channels: list[str],
                       lease: float) -> int:
    # rows locked in id order, as answers and settlements lock them: no deadlock between them
    status = await conn.execute(
        "UPDATE calls SET lease_until = greatest(lease_until, now() + make_interval(secs => $3))"
        " WHERE id IN (SELECT id FROM calls WHERE node_id = $1 AND channel = ANY ($2::text[])"
        " ORDER BY id FOR UPDATE)", node_id, channels, lease)
    return int(status.split()[-1])


# Calls of a node whose agent cannot see its channels (AMI away) may still be talking, but
# not past what the node itself enforces: an answered call ends at its grant (plus a moment
# for the cut), a ringing one rings for at most $4 s and then talks for at most its grant.
# A call with no grant has no such end: it is vouched for $3 s more at most.
VOUCH_SQL = (
    "UPDATE calls SET lease_until = greatest(lease_until, least("
    " now() + make_interval(secs => $2), CASE"
    "  WHEN granted_seconds IS NULL THEN now() + make_interval(secs => $3)"
    "  WHEN answered_at IS NULL THEN started_at + make_interval(secs => $4 + granted_seconds)"
    "  ELSE granted_until + make_interval(secs => $5) END))"
    " WHERE id IN (SELECT id FROM calls WHERE node_id = $1 ORDER BY id FOR UPDATE)")


async def vouch_unseen(conn: asyncpg.Connection, node_id: int, lease: float, *,
                       unlimited_for: float, ringing_for: float, cut_slack: float) -> int:
    """Renew the leases of a node's calls while its channels cannot be listed, each only up
    to the latest time it could still be talking (VOUCH_SQL); returns the calls renewed."""
    status = await conn.execute(VOUCH_SQL, node_id, lease, max(0.0, unlimited_for),
                                ringing_for, cut_slack)
    return int(status.split()[-1])


async def end_vouching(conn: asyncpg.Connection, node_id: int, channels: list[str],
                       lag: float) -> int:
    """The node's channels are listed again after an outage: its calls that are not among
    them (and not admitted within `lag` seconds) ended meanwhile, and lose the leases they
    were vouched for (vouch_unseen), keeping `lag` seconds for the CDR of one that ended a
    moment ago to be imported first. Returns how many."""
    status = await conn.execute(
        "UPDATE calls SET lease_until = least(lease_until, now() + make_interval(secs => $3))"
        " WHERE id IN (SELECT id FROM calls WHERE node_id = $1"
        " AND NOT (channel = ANY ($2::text[]))"
        " AND started_at < now() - make_interval(secs => $3) ORDER BY id FOR UPDATE)",
        node_id, channels, lag)
    return int(status.split()[-1])


async def hangups_asked(conn: asyncpg.Connection, node_id: int, before: float,
                        live: list[str]) -> list[tuple[str, str]]:
    """(channel name, unique id) of the node's calls the API was asked to hang up at least
    `before` seconds ago (migration 0020) and still on the node: their unique ids among
    `live`. A name alone could be a new call's after the node restarted (its counter starts
    again)."""
    return [(r["channel_name"], r["channel"]) for r in await conn.fetch(
        "SELECT channel_name, channel FROM calls WHERE node_id = $1 AND channel_name <> ''"
        " AND hangup_requested_at < now() - make_interval(secs => $2)"
        " AND channel = ANY ($3::text[])", node_id, before, live)]


async def expired(conn: asyncpg.Connection, limit: int = 100) -> list[asyncpg.Record]:
    """Calls whose lease lapsed, locked for this transaction (others skip them)."""
    return await conn.fetch("SELECT * FROM calls WHERE lease_until < now()"
                            " ORDER BY lease_until LIMIT $1 FOR UPDATE SKIP LOCKED", limit)


async def release_abandoned(conn: asyncpg.Connection, call_id: UUID, *,
                            timeout: float) -> bool:
    """End a call admitted after its node stopped waiting for the answer, giving back its
    slots and reservation, without a CDR (migration 0016). False: it had ended already."""
    return bool(await conn.fetchval("SELECT release_abandoned_call($1)", call_id,
                                    timeout=timeout))


async def recount_call_counters(conn: asyncpg.Connection, *, timeout: float
                                ) -> list[tuple[str, int, int]]:
    """Set right the call counters that disagree with the calls in progress (migration
    0018), each in a transaction of its own. Returns (kind, id, correction) of those that
    were off."""
    fixed = []
    for row in await conn.fetch("SELECT kind, id FROM call_counters_off()", timeout=timeout):
        delta = await conn.fetchval("SELECT recount_call_counter($1, $2)", row["kind"],
                                    row["id"], timeout=timeout)
        if delta:
            fixed.append((str(row["kind"]), int(row["id"]), int(delta)))
    return fixed


SETTLE_SQL = "SELECT outcome, stored FROM settle_call($1, $2, $3, $4::jsonb, $5, $6)"


async def settle_call(conn: asyncpg.Connection, call_id: UUID | None, granted: int | None,
                      price: Decimal, cdr: dict[str, Any] | None, *, account_code: str = "",
                      lapsed_only: bool = False) -> tuple[str, bool]:
    """Store a CDR and end its call in progress, in one statement (see migration 0007):
    charge the price, give back the reservation and, last, the slots. The tenant's facts
    (external reference, dealer chain) are filled in there. Returns (outcome, whether the
    CDR was new); outcome 'stale' means the call's grant moved since it was priced, and
    nothing changed."""
    row = await conn.fetchrow(SETTLE_SQL, call_id, granted, price, cdr, account_code,
                              lapsed_only)
    return str(row["outcome"]), bool(row["stored"])


SETTLE_MANY_SQL = "SELECT ord, outcome, stored FROM settle_calls($1::jsonb) ORDER BY ord"
# The same, committed without waiting for the disk (the CDR import: see lifecycle._import).
SETTLE_MANY_ASYNC_SQL = (
    "SELECT s.ord, s.outcome, s.stored FROM settle_calls($1::jsonb) AS s,"
    " (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit ORDER BY s.ord")


async def settle_calls(conn: asyncpg.Connection, items: list[dict[str, Any]], *,
                       wait_for_disk: bool = True) -> list[tuple[str, bool]]:
    """settle_call for many CDRs in one statement (migrations 0009 and 0013): `items` as
    {"call", "granted", "price", "cdr", "account_code"}; (outcome, stored) for each, in order.
    The credit accounts and call counters the batch touches are updated once each, last.
    `wait_for_disk` False: committed asynchronously, for a caller that flushes later."""
    rows = await conn.fetch(SETTLE_MANY_SQL if wait_for_disk else SETTLE_MANY_ASYNC_SQL,
                            items)
    return [(str(row["outcome"]), bool(row["stored"])) for row in rows]


async def calls_by_id(conn: asyncpg.Connection, ids: list[UUID]) -> dict[UUID, asyncpg.Record]:
    rows = await conn.fetch("SELECT * FROM calls WHERE id = ANY ($1::uuid[])", ids)
    return {row["id"]: row for row in rows}


async def import_position(conn: asyncpg.Connection, node_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT file_id, offset_, updated_at FROM cdr_import_state"
                               " WHERE node_id = $1", node_id)


async def save_position(conn: asyncpg.Connection, node_id: int, file_id: str,
                        offset: int) -> None:
    await conn.execute(
        "INSERT INTO cdr_import_state (node_id, file_id, offset_) VALUES ($1, $2, $3)"
        " ON CONFLICT (node_id) DO UPDATE SET file_id = $2, offset_ = $3, updated_at = now()",
        node_id, file_id, offset)


NO_CALL = UUID(int=0)


async def warm(conn: asyncpg.Connection) -> None:
    """Run each statement of a call's path once, with keys that match nothing, on a new
    connection: its first use would otherwise cost the call 10-20 ms (the client's lookup of
    the statements' types, the server's compiling of the functions and loading of the
    catalog entries they touch). Writes nothing and locks no row."""
    for kind in ("account", "did"):
        await party(conn, kind, "")
    await party(conn, "number", "", 0)
    # a check that cannot hold: admit_call_checked answers "stale" before admitting
    await conn.fetchrow(ADMIT_SQL, ["account"], [""], [None], ["-"], *[None] * 18)
    await conn.fetch(ANSWERED_ONE_SQL, NO_CALL, "", None, 0.0)
    await conn.fetch(ANSWERED_SQL, [NO_CALL], [""], [None], 0.0)
    await conn.fetch(SETTLE_MANY_SQL, [{"call": str(NO_CALL)}])
    await conn.fetch(SETTLE_MANY_ASYNC_SQL, [{"call": str(NO_CALL)}])
