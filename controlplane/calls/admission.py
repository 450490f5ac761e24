"""The decision taken on every call: may it proceed, where to, and for how long.

One statement per call takes a slot on every capped level (extension, tenant, each dealer
ancestor: counted across all nodes, since the counters live in PostgreSQL), reserves credit
for the first interval on the paying account, and records the call with a lease. A refusal
rolls everything back and says why, with the SIP answer the caller gets.

The parties of a call (caller, callee, a DID's owner) are kept between calls, so a decision
is usually that one statement alone: it checks that every kept party still reads the same,
and when one does not, nothing is written and the call is decided again from a fresh read.
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from controlplane.calls import credit
from controlplane.calls.batching import Batcher
from controlplane.rating.cache import RateCache
from controlplane.rating.classify import (
    PERMISSION_FLAGS,
    CallClass,
    Classification,
    classify,
    permitted,
)
from controlplane.rating.store import rate_of
from controlplane.rating.tariff import Rate
from controlplane.store import calls as store

# A call not yet answered holds its slots this long without news from its node.
LEASE_SECONDS = 30.0
# Answers heard from the node's events wait this long for others to be recorded with: each
# carries the node's time of the answer, so the wait moves no grant (migration 0011).
ANSWER_WINDOW = 0.05


@dataclass(frozen=True)
class CallRequest:
    """What the node asks: see the `pbx-call` and `pbx-from-carrier` dialplan contexts."""

    node_id: int
    direction: str           # internal | external | inbound
    dialled: str
    caller: str              # the caller's account code (the carrier's name when inbound)
    caller_number: str
    tenant_id: int | None    # from the caller's context: never from the caller's input
    channel: str             # unique id of the caller's channel
    channel_name: str


@dataclass
class Decision:
    admitted: bool
    sip_code: int = 0
    reason: str = ""
    call_id: uuid.UUID | None = None
    target: str = ""         # an account code, or the carrier's dial string
    grant: int | None = None  # seconds of talk time granted; None: not limited
    variables: dict[str, str] = field(default_factory=dict)

    def channel_variables(self) -> dict[str, str]:
        """What the node's dialplan reads; `variables` override (an undecided call says so,
        and the dialplan applies the node's fail policy)."""
        if not self.admitted:
            out = {"PBX_DECISION": "refuse", "PBX_SIP_CODE": str(self.sip_code),
                   "PBX_REASON": self.reason}
        else:
            out = {"PBX_DECISION": "admit", "PBX_CALL": str(self.call_id),
                   "PBX_TARGET": self.target, "PBX_GRANT": "" if self.grant is None else
                   str(self.grant)}
        out.update(self.variables)
        return out


class Refused(Exception):
    def __init__(self, sip_code: int, reason: str, *, checked: bool = False) -> None:
        super().__init__(reason)
        self.sip_code, self.reason = sip_code, reason
        # by the admission itself, after it checked every party kept (see Parties): final
        self.checked = checked


LEVEL_REFUSAL = {"e": (486, "extension_call_limit"), "t": (503, "tenant_call_limit"),
                 "d": (503, "dealer_call_limit")}


def unavailable(policy: str) -> Decision:
    """What to answer when the decision cannot be taken in time (database unreachable)."""
    if policy == "open":  # the dialplan lets internal calls through, uncounted
        return Decision(False, 503, "admission_unavailable",
                        variables={"PBX_DECISION": "unavailable"})
    return Decision(False, 503, "admission_unavailable")


def _check_party(party: asyncpg.Record | None, role: str) -> asyncpg.Record:
    if party is None:
        raise Refused(404 if role == "callee" else 403, f"{role}_unknown")
    if not party["active"]:
        raise Refused(404 if role == "callee" else 403, f"{role}_inactive")
    if party["tenant_status"] != "active":
        raise Refused(404 if role == "callee" else 403, f"{role}_tenant_{party['tenant_status']}")
    if not party["dealer_active"]:
        raise Refused(403, f"{role}_dealer_inactive")
    return party


def _floor(party: asyncpg.Record) -> tuple[int | None, Decimal]:
    """(extension id of the paying account or None for the tenant's, lowest balance)."""
    if party["shared_credit"]:
        limit = party["tenant_credit_limit"] if party["tenant_billing_mode"] == "postpaid" \
            else Decimal(0)
        return None, -Decimal(limit)
    limit = party["credit_limit"] if party["billing_type"] == "postpaid" else Decimal(0)
    return party["extension_id"], -Decimal(limit)


# Decisions from parties read afresh, when one keeps changing between its read and the
# admission (an API client editing it in a loop): then the call is refused, 503.
FRESH_TRIES = 3

# Parties kept by the agent (about 2 KiB each): the callers of the calls in progress and of
# the recent ones, with the callees and DIDs they called.
MAX_PARTIES = 20_000

PartyKey = tuple[str, str, int | None]  # (kind, key, tenant): see store.calls.party


class PartyCache:
    """The parties read for recent decisions, least recently used first out. A decision
    taken from a kept party costs one round trip instead of two or three; the admission
    checks that the party still reads the same (migration 0010)."""

    def __init__(self, max_size: int = MAX_PARTIES) -> None:
        self.max_size = max_size
        self._items: OrderedDict[PartyKey, asyncpg.Record] = OrderedDict()
        self.hits = self.misses = self.stale = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: PartyKey) -> asyncpg.Record | None:
        party = self._items.get(key)
        if party is not None:
            self._items.move_to_end(key)
        return party

    def put(self, key: PartyKey, party: asyncpg.Record | None) -> None:
        if party is None:
            self._items.pop(key, None)
            return
        self._items[key] = party
        self._items.move_to_end(key)
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)

    def drop(self, key: PartyKey) -> None:
        self._items.pop(key, None)


class Parties:
    """The parties of one attempt at a decision: kept ones (`use_kept`), or read now. Every
    one found is among the admission's checks: read a moment earlier, in a statement of its
    own, it must still read the same when the call is admitted."""

    def __init__(self, cache: PartyCache, conn: asyncpg.Connection, *, use_kept: bool) -> None:
        self.cache, self.conn, self.use_kept = cache, conn, use_kept
        self.checks: list[tuple[str, str, int | None, str]] = []
        self.kept = False  # whether one of them was kept (a refusal may come from it)

    async def get(self, kind: str, key: str, tenant_id: int | None = None
                  ) -> asyncpg.Record | None:
        ident: PartyKey = (kind, key, tenant_id)
        if self.use_kept:
            party = self.cache.get(ident)
            if party is not None:
                self.cache.hits += 1
                self.kept = True
                self.checks.append((kind, key, tenant_id, party["facts"]))
                return party
        self.cache.misses += 1
        party = await store.party(self.conn, kind, key, tenant_id)
        self.cache.put(ident, party)
        if party is not None:
            self.checks.append((kind, key, tenant_id, party["facts"]))
        return party

    def forget(self) -> None:
        """The kept parties of this attempt may be out of date: read them again next time."""
        for kind, key, tenant_id, _ in self.checks:
            self.cache.drop((kind, key, tenant_id))


def rate_json(rate: Rate) -> dict[str, Any]:
    """The rate a call is billed at, as the call keeps it (`calls.rate`, a JSON object: the
    pool's jsonb codec encodes it)."""
    return {"id": rate.id, "prefix": rate.prefix,
            "price_per_minute": str(rate.price_per_minute),
            "connection_fee": str(rate.connection_fee), "first_increment": rate.first_increment,
            "next_increment": rate.next_increment, "free_seconds": rate.free_seconds,
            "description": rate.description, "call_class": rate.call_class}


def rate_from_json(raw: str | dict[str, Any] | None) -> Rate | None:
    """A call's rate as kept: a JSON object, or a string holding one (calls admitted by
    earlier releases, which encoded it twice)."""
    if raw is None:
        return None
    data = json.loads(raw) if isinstance(raw, str) else raw
    return Rate(prefix=data["prefix"], price_per_minute=Decimal(data["price_per_minute"]),
                connection_fee=Decimal(data["connection_fee"]),
                first_increment=int(data["first_increment"]),
                next_increment=int(data["next_increment"]),
                free_seconds=int(data["free_seconds"]), description=data["description"],
                call_class=data["call_class"], id=data["id"])


class Admission:
    def __init__(self, pool: asyncpg.Pool, *, lease: float = LEASE_SECONDS,
                 ahead: int = credit.AHEAD_SECONDS, answer_window: float = ANSWER_WINDOW,
                 on_unsure: Callable[[uuid.UUID], None] | None = None) -> None:
        self.pool, self.lease, self.ahead = pool, lease, ahead
        # told of an admission that failed after its statement was sent (the connection
        # lost, say): it may have committed all the same, and must then be undone
        self.on_unsure = on_unsure
        self.rates = RateCache(pool)
        self.parties = PartyCache()
        # the calls whose admission statement is on its way, by channel: a decision given up
        # on then may still commit, and must be undone (see CallControl._on_abandoned)
        self.admitting: dict[str, uuid.UUID] = {}
        self._answers: Batcher[uuid.UUID, tuple[str, datetime | None], int | None] = \
            Batcher(self._record_answers, default=None, window=answer_window)

    async def decide(self, req: CallRequest) -> Decision:
        try:
            async with self.pool.acquire() as conn:
                return await self._decide(conn, req)
        except Refused as refusal:
            return Decision(False, refusal.sip_code, refusal.reason)

    async def _decide(self, conn: asyncpg.Connection, req: CallRequest) -> Decision:
        """Decide from the parties kept, if any; a refusal they led to, or an admission
        finding one of them changed, has them read again and the call decided anew."""
        parties = Parties(self.parties, conn, use_kept=True)
        try:
            return await self._decide_with(conn, req, parties)
        except Refused as refusal:
            if refusal.checked or not parties.kept:
                raise
        except store.Stale:
            pass
        for _ in range(FRESH_TRIES):
            self.parties.stale += 1
            parties.forget()
            parties = Parties(self.parties, conn, use_kept=False)
            try:
                return await self._decide_with(conn, req, parties)
            except store.Stale:
                continue  # changed between its read and the admission: read it again
        raise Refused(503, "parties_changing")

    async def _decide_with(self, conn: asyncpg.Connection, req: CallRequest,
                           parties: Parties) -> Decision:
        if req.direction == "inbound":
            return await self._inbound(conn, req, parties)
        party = _check_party(await parties.get("account", req.caller), "caller")
        if req.tenant_id is not None and party["tenant_id"] != req.tenant_id:
            raise Refused(403, "caller_outside_tenant")
        if party["node_id"] != req.node_id:
            raise Refused(403, "caller_on_another_node")
        if req.direction == "internal":
            callee = _check_party(await parties.get("number", req.dialled, party["tenant_id"]),
                                  "callee")
            return await self._admit(conn, req, parties, party, "internal",
                                     caller=party["number"], callee=req.dialled,
                                     target=callee["account_code"], call_class="internal")
        return await self._outbound(conn, req, parties, party)

    async def _inbound(self, conn: asyncpg.Connection, req: CallRequest,
                       parties: Parties) -> Decision:
        digits = req.dialled.lstrip("+")
        if not digits.isascii() or not digits.isdigit():
            raise Refused(404, "did_invalid")
        party = _check_party(await parties.get("did", "+" + digits), "callee")
        if party["node_id"] != req.node_id:
            raise Refused(404, "did_on_another_node")
        return await self._admit(conn, req, parties, party, "inbound",
                                 caller=req.caller_number, callee="+" + digits,
                                 target=party["account_code"], call_class="inbound")

    async def _outbound(self, conn: asyncpg.Connection, req: CallRequest, parties: Parties,
                        party: asyncpg.Record) -> Decision:
        try:
            c = classify(req.dialled, party["area_code"])
        except ValueError:  # the tenant's area code is none in service (set around the API)
            raise Refused(503, "caller_area_unknown") from None
        if c.call_class == CallClass.INVALID:
            raise Refused(404, "number_invalid")
        flags = {flag: party[flag] for flag in set(PERMISSION_FLAGS.values())}
        if not permitted(c, flags):
            raise Refused(403, f"class_forbidden_{c.call_class}")
        if party["carrier_id"] is None:  # the caller's node is the request's (checked)
            raise Refused(503, "no_carrier")
        rate = None
        if c.rated_as is not None:  # None: the caller pays nothing
            rate = await self._rate(conn, party, c)
        number = (c.e164 or c.digits).lstrip("+")
        target = f"{party['carrier_prefix']}{number}@carrier-{party['carrier_id']}"
        return await self._admit(conn, req, parties, party, "outbound", caller=party["number"],
                                 callee=c.e164 or c.digits, target=target,
                                 call_class=str(c.call_class), rate=rate,
                                 carrier_id=party["carrier_id"])

    async def _rate(self, conn: asyncpg.Connection, party: asyncpg.Record,
                    c: Classification) -> Rate:
        table, version = party["plan_rate_table"], party["plan_rates_version"]
        if c.call_class == CallClass.INTERNATIONAL and party["intl_plan_id"] is not None:
            table, version = party["intl_rate_table"], party["intl_rates_version"]
        if table is None:
            raise Refused(403, "no_rate_table")
        rate = await rate_of(c, lambda number: self.rates.find(conn, table, version, number,
                                                               str(c.call_class)))
        if rate is None:
            raise Refused(403, "no_rate")
        return rate

    async def _admit(self, conn: asyncpg.Connection, req: CallRequest, parties: Parties,
                     party: asyncpg.Record, direction: str, *, caller: str, callee: str,
                     target: str, call_class: str, rate: Rate | None = None,
                     carrier_id: int | None = None) -> Decision:
        call_id = uuid.uuid4()
        options: list[tuple[int, Decimal]] = []
        account_extension, floor = _floor(party)
        if rate is not None and not credit.is_free(rate):
            options = list(credit.first_grant_options(rate, self.ahead))
        self.admitting[req.channel] = call_id
        try:
            grant = await store.admit(conn, {
                "id": call_id, "node_id": req.node_id, "channel": req.channel,
                "channel_name": req.channel_name, "direction": direction,
                "extension_id": party["extension_id"], "tenant_id": party["tenant_id"],
                "dealer_path": list(party["dealer_path"]), "caller": caller, "callee": callee,
                "call_class": call_class, "carrier_id": carrier_id,
                "rate": rate_json(rate) if rate is not None else None,
                "account_extension": account_extension, "floor": floor,
                "seconds": [s for s, _ in options], "amounts": [a for _, a in options]},
                self.lease, parties.checks)
        except store.LevelFull as full:
            raise Refused(*LEVEL_REFUSAL[full.kind], checked=True) from None
        except store.NoCredit:
            raise Refused(402, "no_credit", checked=True) from None
        except store.Stale:
            raise
        except Exception:
            if self.on_unsure is not None:
                self.on_unsure(call_id)
            raise
        finally:
            self.admitting.pop(req.channel, None)
        return Decision(True, call_id=call_id, target=target, grant=grant,
                        variables={"PBX_TENANT": str(party["tenant_id"])})

    async def answer(self, call_id: uuid.UUID, callee_channel: str,
                     at: datetime | None = None, *, urgent: bool = True) -> int | None:
        """The call was answered (`at`, the node's time; None: now): its granted time starts
        then. Returns it (None: unlimited, or already answered). Answers arriving together
        are recorded in one statement; those not `urgent` wait up to the answer window for
        others."""
        return await self._answers.submit(call_id, (callee_channel, at), urgent=urgent)

    async def _record_answers(self, answers: Sequence[tuple[uuid.UUID,
                                                            tuple[str, datetime | None]]]
                              ) -> dict[uuid.UUID, int | None]:
        async with self.pool.acquire() as conn:
            return await store.answered(conn, [(call, channel, at)
                                               for call, (channel, at) in answers], self.lease)
