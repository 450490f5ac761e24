"""Admission against the real PostgreSQL: caps under simultaneous arrivals, credit
reservations on a shared balance, refusals that change nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from controlplane.calls import cdr_file, lifecycle
from controlplane.calls.admission import Admission, CallRequest, rate_from_json
from controlplane.calls.cdr_file import CdrLine
from controlplane.store import calls as calls_store
from tests.api_helper import Api

RATES = ("prefix;description;price_per_minute;connection_fee;first_increment;next_increment;"
         "free_seconds\n55;Brazil;6.00;0;6;6;0\n")


async def setup(api: Api, *, dealer_calls: int | None = None, credit: str = "100.00",
                shared: bool = False) -> tuple[int, dict, list[dict]]:
    node = api.ok(await api.post("/api/v1/nodes", {
        "name": "n1", "sip_address": "198.51.100.1", "ami_host": "10.0.0.1",
        "ami_username": "admin", "ami_secret": "ami-secret-123456",
        "ari_url": "http://10.0.0.1:8088", "ari_username": "ari",
        "ari_password": "ari-password-123456"}), 201)
    api.ok(await api.post("/api/v1/carriers", {"node_id": node["id"], "name": "c",
                                               "host": "198.51.100.2"}), 201)
    dist = await api.dealer("distributor", node_id=node["id"], max_calls=dealer_calls)
    table = api.ok(await api.post("/api/v1/rate-tables", {"dealer_id": dist["id"],
                                                          "name": "R"}), 201)
    api.ok(await api.call("POST", f"/api/v1/rate-tables/{table['id']}/import",
                          raw=RATES.encode(), content_type="text/csv"))
    plan = api.ok(await api.post("/api/v1/plans", {"dealer_id": dist["id"], "name": "P",
                                                   "rate_table_id": table["id"]}), 201)
    reseller = await api.dealer("reseller", parent_id=dist["id"])
    tenant = await api.tenant(reseller["id"], shared_credit=shared)
    if shared:
        api.ok(await api.post(f"/api/v1/tenants/{tenant['id']}/credit", {"amount": credit}))
    exts = []
    for n in range(20):
        ext = await api.extension(tenant["id"], f"2{n:03d}", plan_id=plan["id"])
        if not shared:
            api.ok(await api.post(f"/api/v1/extensions/{ext['id']}/credit",
                                  {"amount": credit}))
        exts.append(ext)
    return node["id"], dist, exts


def request(node_id: int, ext: dict, n: int, dialled: str = "1133334444") -> CallRequest:
    return CallRequest(node_id=node_id, direction="external", dialled=dialled,
                       caller=ext["account_code"], caller_number=ext["number"],
                       tenant_id=ext["tenant_id"], channel=f"test-{n}-{uuid.uuid4()}",
                       channel_name=f"PJSIP/{ext['account_code']}-{n:08x}")


async def test_simultaneous_arrivals_never_pass_a_dealers_cap(api: Api, db: asyncpg.Pool):
    node_id, dist, exts = await setup(api, dealer_calls=7)
    admission = Admission(db)
    decisions = await asyncio.gather(*(admission.decide(request(node_id, exts[n % 20], n))
                                       for n in range(60)))
    admitted = [d for d in decisions if d.admitted]
    assert len(admitted) == 7
    assert {(d.sip_code, d.reason) for d in decisions if not d.admitted} == {
        (503, "dealer_call_limit")}
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM calls") == 7
        assert await conn.fetchval("SELECT active FROM call_counters WHERE kind = 'd'"
                                   " AND id = $1", dist["id"]) == 7


async def test_a_call_keeps_its_rate_as_a_json_object(api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api)
    decision = await Admission(db).decide(request(node_id, exts[0], 1))
    assert decision.admitted
    row = await db.fetchrow("SELECT jsonb_typeof(rate) AS kind, rate->>'prefix' AS prefix,"
                            " rate->>'price_per_minute' AS price FROM calls WHERE id = $1",
                            decision.call_id)
    assert (row["kind"], row["prefix"]) == ("object", "55")
    assert Decimal(row["price"]) == Decimal("6.00")
    # a call admitted by an earlier release kept it as a string holding the object
    kept = await db.fetchval("SELECT rate FROM calls WHERE id = $1", decision.call_id)
    assert rate_from_json(json.dumps(kept)) == rate_from_json(kept) is not None


async def test_simultaneous_calls_on_one_balance_reserve_no_more_than_it_holds(
        api: Api, db: asyncpg.Pool):
    # 3.00 at 6.00 a minute in 6-second blocks: 30 seconds in all, 0.60 a block
    _, _, exts = await setup(api, credit="3.00", shared=True)
    node_id = await db.fetchval("SELECT id FROM nodes")
    admission = Admission(db, ahead=6)
    decisions = await asyncio.gather(*(admission.decide(request(node_id, exts[n], n))
                                       for n in range(12)))
    admitted = [d for d in decisions if d.admitted]
    assert len(admitted) == 5 and all(d.grant == 6 for d in admitted)
    assert {d.reason for d in decisions if not d.admitted} == {"no_credit"}
    assert {d.sip_code for d in decisions if not d.admitted} == {402}
    async with db.acquire() as conn:
        row = await conn.fetchrow("SELECT balance, reserved FROM credit_accounts"
                                  " WHERE extension_id IS NULL")
    assert row["balance"] == Decimal("3.0000") and row["reserved"] == Decimal("3.0000")


async def test_refusals_write_nothing(api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api, credit="0")
    admission = Admission(db)
    broke = await admission.decide(request(node_id, exts[0], 1))
    invalid = await admission.decide(request(node_id, exts[1], 2, dialled="12"))
    forbidden = await admission.decide(request(node_id, exts[2], 3, dialled="+14155550100"))
    assert (broke.sip_code, broke.reason) == (402, "no_credit")
    assert (invalid.sip_code, invalid.reason) == (404, "number_invalid")
    assert (forbidden.sip_code, forbidden.reason) == (403, "class_forbidden_international")
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM calls") == 0
        assert await conn.fetchval("SELECT coalesce(sum(reserved), 0) FROM credit_accounts") == 0


async def test_a_caller_cannot_borrow_another_tenants_context(api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api)
    req = request(node_id, exts[0], 1)
    forged = CallRequest(**{**req.__dict__, "tenant_id": exts[0]["tenant_id"] + 1000})
    decision = await Admission(db).decide(forged)
    assert (decision.sip_code, decision.reason) == (403, "caller_outside_tenant")


def cdr_line(decision, req: CallRequest, talk: float, *, sequence: int = 0) -> CdrLine:
    end = datetime.now(UTC)
    answered = end - timedelta(seconds=talk) if talk else None
    return CdrLine(uniqueid=req.channel, sequence=sequence, call_id=decision.call_id,
                   started_at=end - timedelta(seconds=talk + 2), answered_at=answered,
                   ended_at=end, duration=talk + 2, talk_seconds=talk,
                   disposition="ANSWERED" if talk else "NO ANSWER", src=req.caller_number,
                   dst=req.dialled, reason="", sip_code=None, tenant_id=req.tenant_id,
                   account_code=req.caller, direction="external")


async def test_settlement_charges_once_and_gives_everything_back(api: Api, db: asyncpg.Pool):
    # 6.00 a minute in 6-second blocks: 13 s talk is billed 18 s = 1.80
    node_id, dist, exts = await setup(api, dealer_calls=5, credit="10.00")
    admission = Admission(db)
    req = request(node_id, exts[0], 1)
    decision = await admission.decide(req)
    assert decision.admitted
    line = cdr_line(decision, req, 13.0)
    async with db.acquire() as conn:
        assert await lifecycle.finish(conn, node_id, line) is True
        assert await lifecycle.finish(conn, node_id, line) is False  # read again: nothing
        again = dataclasses.replace(line, sequence=1)  # a second line of the same call
        assert await lifecycle.finish(conn, node_id, again) is False
        account = await conn.fetchrow("SELECT balance, reserved FROM credit_accounts"
                                      " WHERE extension_id = $1", exts[0]["id"])
        cdr = await conn.fetchrow("SELECT * FROM cdrs WHERE call_id = $1", decision.call_id)
        assert await conn.fetchval("SELECT count(*) FROM calls") == 0
        assert await conn.fetchval("SELECT active FROM call_counters WHERE kind = 'd'"
                                   " AND id = $1", dist["id"]) == 0
        assert await conn.fetchval("SELECT count(*) FROM credit_movements WHERE call_id = $1",
                                   decision.call_id) == 1
    assert account["balance"] == Decimal("8.2000") and account["reserved"] == 0
    assert (cdr["billed_seconds"], cdr["price"], cdr["rate_prefix"]) == (18, Decimal("1.8000"),
                                                                          "55")
    assert dist["id"] in cdr["dealer_path"] and cdr["tenant_id"] == exts[0]["tenant_id"]
    assert cdr["answered_at"] is not None and cdr["caller"] == exts[0]["number"]


async def test_a_grant_moved_after_pricing_is_priced_again(api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api, credit="10.00")
    req = request(node_id, exts[0], 1)
    decision = await Admission(db, ahead=6).decide(req)
    assert decision.grant == 6
    async with db.acquire() as conn:
        # priced for a grant of 60 s that the call does not have: nothing happens
        outcome, stored = await calls_store.settle_call(conn, decision.call_id, 60,
                                                        Decimal("9.99"), None)
        assert (outcome, stored) == ("stale", False)
        assert await conn.fetchval("SELECT count(*) FROM calls") == 1
        # the call was granted more (AMI extension) after it talked 6.4 s of its 6 s: the
        # cut tolerance bills 6 s against the grant it had; priced again against 12 s
        await conn.execute("UPDATE calls SET granted_seconds = 12 WHERE id = $1",
                           decision.call_id)
        assert await lifecycle.finish(conn, node_id, cdr_line(decision, req, 6.4)) is True
        cdr = await conn.fetchrow("SELECT billed_seconds, price FROM cdrs")
    assert (cdr["billed_seconds"], cdr["price"]) == (12, Decimal("1.2000"))


async def test_settlements_and_admissions_racing_keep_counters_exact(api: Api, db: asyncpg.Pool):
    node_id, dist, exts = await setup(api, dealer_calls=6, credit="100.00")
    admission = Admission(db)
    admitted: list[tuple] = []

    async def one(n: int) -> None:
        req = request(node_id, exts[n % 20], n)
        decision = await admission.decide(req)
        if decision.admitted:
            admitted.append((decision, req))
            await asyncio.sleep(0.01 * (n % 3))
            async with db.acquire() as conn:
                await lifecycle.finish(conn, node_id, cdr_line(decision, req, 3.0))

    await asyncio.gather(*(one(n) for n in range(120)))
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM calls") == 0
        assert await conn.fetchval("SELECT active FROM call_counters WHERE kind = 'd'"
                                   " AND id = $1", dist["id"]) == 0
        assert await conn.fetchval("SELECT count(*) FROM cdrs") == len(admitted)
        assert await conn.fetchval("SELECT sum(reserved) FROM credit_accounts") == 0
        # each admitted call talked 3 s, billed one 6-second block: 0.60
        spent = await conn.fetchval("SELECT sum(100 - balance) FROM credit_accounts")
    assert 6 <= len(admitted) and spent == Decimal("0.60") * len(admitted)


async def test_a_lapsed_lease_is_released_once(api: Api, db: asyncpg.Pool):
    node_id, dist, exts = await setup(api, dealer_calls=5, credit="10.00")
    req = request(node_id, exts[0], 1)
    decision = await Admission(db).decide(req)
    async with db.acquire() as conn:
        await conn.execute("UPDATE calls SET lease_until = now() - interval '1 s'")
    assert await lifecycle.sweep(db) == 1
    assert await lifecycle.sweep(db) == 0
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT disposition FROM cdrs") == "LEASE EXPIRED"
        assert await conn.fetchval("SELECT active FROM call_counters WHERE kind = 'd'"
                                   " AND id = $1", dist["id"]) == 0
        # the node's own CDR arriving later changes nothing
        assert await lifecycle.finish(conn, node_id, cdr_line(decision, req, 30.0)) is False
        assert await conn.fetchval("SELECT balance FROM credit_accounts") == Decimal("10.0000")


async def test_an_abandoned_admission_gives_back_its_slots_and_credit_once(
        api: Api, db: asyncpg.Pool):
    node_id, dist, exts = await setup(api, dealer_calls=5, credit="10.00")
    admission = Admission(db)
    kept = await admission.decide(request(node_id, exts[0], 1))
    abandoned = await admission.decide(request(node_id, exts[0], 2))
    assert kept.admitted and abandoned.admitted and abandoned.call_id is not None
    async with db.acquire() as conn:
        assert await calls_store.release_abandoned(conn, abandoned.call_id, timeout=5) is True
        assert await calls_store.release_abandoned(conn, abandoned.call_id, timeout=5) is False
        assert await conn.fetchval("SELECT array_agg(id) FROM calls") == [kept.call_id]
        assert await conn.fetchval("SELECT active FROM call_counters WHERE kind = 'd'"
                                   " AND id = $1", dist["id"]) == 1
        account = await conn.fetchrow("SELECT balance, reserved FROM credit_accounts"
                                      " WHERE extension_id = $1", exts[0]["id"])
        held = await conn.fetchval("SELECT reserved FROM calls")
        assert held > 0
        assert (account["balance"], account["reserved"]) == (Decimal("10.0000"), held)
        assert await conn.fetchval("SELECT count(*) FROM cdrs") == 0


async def test_an_admission_that_fails_after_its_statement_was_sent_is_reported_unsure(
        api: Api, db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch):
    """The connection lost as the admission committed: the decision fails (the node is
    answered by policy), and the call it may have admitted all the same is named, to be
    undone; a refusal names none."""
    node_id, _, exts = await setup(api, dealer_calls=5, credit="0.01")
    unsure: list[uuid.UUID] = []
    admission = Admission(db, on_unsure=unsure.append)
    real_admit = calls_store.admit

    async def admit_then_lose_the_connection(*args, **kwargs):
        await real_admit(*args, **kwargs)
        raise ConnectionResetError("connection lost")

    monkeypatch.setattr(calls_store, "admit", admit_then_lose_the_connection)
    free = request(node_id, exts[0], 1, dialled=exts[1]["number"])
    free = dataclasses.replace(free, direction="internal")
    with pytest.raises(ConnectionResetError):
        await admission.decide(free)
    assert unsure == [await db.fetchval("SELECT id FROM calls")]
    refused = await admission.decide(request(node_id, exts[2], 2))  # 0.01: no credit
    assert not refused.admitted and refused.reason == "no_credit"
    assert len(unsure) == 1 and not admission.admitting
    assert await db.fetchval("SELECT sum(active) FROM call_counters") > 0
    async with db.acquire() as conn:
        assert await calls_store.release_abandoned(conn, unsure[0], timeout=5) is True
    assert await db.fetchval("SELECT count(*) FROM calls") == 0
    assert await db.fetchval("SELECT coalesce(sum(active), 0) FROM call_counters") == 0


async def test_admission_leaves_the_session_committing_synchronously(api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api)
    async with db.acquire() as conn:
        admission = Admission(db)
        decision = await admission._decide(conn, request(node_id, exts[0], 1))
        assert decision.admitted
        # the admission's own commit did not wait for the disk; nothing after it may skip that
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        assert await conn.fetchval("SELECT count(*) FROM calls WHERE id = $1",
                                   decision.call_id) == 1


async def test_answers_arriving_together_are_recorded_together(api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api)
    admission = Admission(db)
    decisions = [await admission.decide(request(node_id, exts[n], n)) for n in range(6)]
    assert all(d.admitted and d.grant for d in decisions)
    grants = await asyncio.gather(*(admission.answer(d.call_id, f"PJSIP/carrier-{n:08x}")
                                    for n, d in enumerate(decisions)))
    assert grants == [d.grant for d in decisions]
    # all six arrived before the first statement left: one statement for them all
    assert admission._answers.flushes == 1
    rows = await db.fetch("SELECT id, callee_channel, answered_at, granted_until - answered_at"
                          " AS granted FROM calls")
    by_id = {r["id"]: r for r in rows}
    for n, d in enumerate(decisions):
        row = by_id[d.call_id]
        assert row["callee_channel"] == f"PJSIP/carrier-{n:08x}"
        assert row["granted"] == timedelta(seconds=d.grant)
    # a second answer of the same call changes nothing and grants nothing
    assert await admission.answer(decisions[0].call_id, "PJSIP/other") is None
    assert await db.fetchval("SELECT callee_channel FROM calls WHERE id = $1",
                             decisions[0].call_id) == "PJSIP/carrier-00000000"


async def test_an_answer_arriving_alone_starts_its_grant_once(api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api)
    admission = Admission(db, lease=45)
    decision = await admission.decide(request(node_id, exts[0], 1))
    other = await admission.decide(request(node_id, exts[1], 2))

    assert await admission.answer(decision.call_id, "PJSIP/carrier-1") == decision.grant
    assert await admission.answer(decision.call_id, "PJSIP/carrier-2") is None

    row = await db.fetchrow("SELECT callee_channel, granted_until - answered_at AS granted,"
                            " lease_until - answered_at AS lease FROM calls WHERE id = $1",
                            decision.call_id)
    assert row["callee_channel"] == "PJSIP/carrier-1"
    assert row["granted"] == timedelta(seconds=decision.grant)
    assert timedelta(seconds=44) < row["lease"] <= timedelta(seconds=45)
    assert await db.fetchval("SELECT answered_at FROM calls WHERE id = $1",
                             other.call_id) is None
    # the answer's asynchronous commit was for its own transaction only
    for _ in range(3):
        async with db.acquire() as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == "on"


async def test_answers_from_events_wait_together_and_start_at_the_nodes_time(
        api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api)
    admission = Admission(db, answer_window=0.3)
    decisions = [await admission.decide(request(node_id, exts[n], n)) for n in range(4)]
    started = {r["id"]: r["started_at"] for r in await db.fetch("SELECT id, started_at"
                                                                 " FROM calls")}
    now = await db.fetchval("SELECT now()")
    times = [started[decisions[0].call_id] + timedelta(milliseconds=40),  # as the node says
             started[decisions[1].call_id] - timedelta(seconds=5),  # before its admission
             now + timedelta(hours=1),  # a node clock far ahead: no later than the database's
             None]  # no time: the database's
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    first = asyncio.create_task(admission.answer(decisions[0].call_id, "PJSIP/c-0", times[0],
                                                 urgent=False))
    await asyncio.sleep(0.1)
    assert await db.fetchval("SELECT count(*) FROM calls WHERE answered_at IS NOT NULL") == 0
    rest = [asyncio.create_task(admission.answer(d.call_id, f"PJSIP/c-{n}", at, urgent=False))
            for n, (d, at) in enumerate(zip(decisions[1:], times[1:], strict=True), 1)]
    grants = [await first] + [await t for t in rest]
    waited = loop.time() - t0
    after = await db.fetchval("SELECT now()")
    assert grants == [d.grant for d in decisions]
    assert admission._answers.flushes == 1 and 0.25 <= waited < 2
    rows = {r["id"]: r for r in await db.fetch(
        "SELECT id, callee_channel, answered_at, granted_until - answered_at AS granted"
        " FROM calls")}
    got = [rows[d.call_id] for d in decisions]
    assert got[0]["answered_at"] == times[0]
    assert got[1]["answered_at"] == started[decisions[1].call_id]
    assert now <= got[2]["answered_at"] <= after
    assert now <= got[3]["answered_at"] <= after
    assert [g["callee_channel"] for g in got] == [f"PJSIP/c-{n}" for n in range(4)]
    assert all(g["granted"] == timedelta(seconds=d.grant)
               for g, d in zip(got, decisions, strict=True))
    # alone, the single statement keeps the same bounds
    late = await admission.decide(request(node_id, exts[5], 5))
    assert await admission.answer(late.call_id, "PJSIP/c-5",
                                  now - timedelta(days=1)) == late.grant
    assert await db.fetchval("SELECT answered_at = started_at FROM calls WHERE id = $1",
                             late.call_id)


def file_line(decision, req: CallRequest, talk: float, *, sequence: int = 0) -> str:
    """A line of the node's CDR file (asterisk-conf/cdr_custom.conf) for `decision`."""
    line = cdr_line(decision, req, talk, sequence=sequence)
    fields = {"uniqueid": line.uniqueid, "sequence": str(sequence),
              "call": str(decision.call_id), "start": f"{line.started_at.timestamp():.6f}",
              "answer": f"{line.answered_at.timestamp():.6f}" if line.answered_at else "0",
              "end": f"{line.ended_at.timestamp():.6f}", "duration": str(int(line.duration)),
              "billsec": str(int(talk)), "disposition": line.disposition, "src": line.src,
              "dst": line.dst, "reason": "", "sip_code": "", "tenant": str(req.tenant_id),
              "accountcode": req.caller, "direction": "outbound", "cause": "16"}
    return ",".join(f'"{fields[c]}"' for c in cdr_file.COLUMNS) + "\n"


async def test_an_answer_recovered_from_a_node_clock_running_behind_starts_at_admission(
        api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api, dealer_calls=5, credit="10.00")
    decision = await Admission(db).decide(request(node_id, exts[0], 1))
    async with db.acquire() as conn:
        started = await conn.fetchval("SELECT started_at FROM calls")
        behind = started - timedelta(minutes=10)
        assert await calls_store.answered_at(conn, decision.call_id, "PJSIP/c-1", behind,
                                             30.0) is True
        row = await conn.fetchrow("SELECT answered_at, granted_until, granted_seconds"
                                  " FROM calls")
    assert row["answered_at"] == started
    assert row["granted_until"] == started + timedelta(seconds=row["granted_seconds"])


async def test_a_device_that_did_not_answer_never_settles_the_answered_call(
        api: Api, db: asyncpg.Pool):
    """A call rings two devices; the line of the one that did not answer is read first
    (an earlier read of the file): the call waits for the answered line, billed from it."""
    node_id, _, exts = await setup(api, dealer_calls=5, credit="10.00")
    req = request(node_id, exts[0], 1)
    decision = await Admission(db).decide(req)
    async with db.acquire() as conn:
        await conn.execute("UPDATE calls SET answered_at = now() - interval '13 s'")
        assert await lifecycle.finish(conn, node_id, cdr_line(decision, req, 0.0,
                                                              sequence=1)) is False
        assert await conn.fetchval("SELECT count(*) FROM calls") == 1
        assert await lifecycle.finish(conn, node_id, cdr_line(decision, req, 13.0)) is True
        cdr = await conn.fetchrow("SELECT talk_seconds, price FROM cdrs")
        assert (cdr["talk_seconds"], cdr["price"]) == (Decimal("13.000"), Decimal("1.8000"))
        assert await conn.fetchval("SELECT count(*) FROM calls") == 0


async def test_a_line_the_database_refuses_is_skipped_and_its_batch_still_settles(
        api: Api, db: asyncpg.Pool, caplog):
    node_id, _, exts = await setup(api, dealer_calls=5, credit="10.00")
    admission = Admission(db)
    reqs = [request(node_id, exts[n], n) for n in range(3)]
    decisions = [await admission.decide(r) for r in reqs]
    lines = [cdr_line(d, r, 13.0) for d, r in zip(decisions, reqs, strict=True)]
    bad = dataclasses.replace(lines[1], duration=1e12)  # past what a CDR holds
    async with db.acquire() as conn:
        stored = await lifecycle._settle_batch(conn, node_id, [lines[0], bad, lines[2]])
        assert stored == 2
        left = await conn.fetchval("SELECT array_agg(id) FROM calls")
        assert left == [decisions[1].call_id]  # its lease releases it
        assert await conn.fetchval("SELECT sum(price) FROM cdrs") == Decimal("3.6000")
    assert any(bad.uniqueid in r.getMessage() for r in caplog.records)


async def test_an_imported_cdr_keeps_the_hangup_cause(api: Api, db: asyncpg.Pool, tmp_path):
    node_id, _, exts = await setup(api, dealer_calls=5, credit="10.00")
    req = request(node_id, exts[0], 1)
    decision = await Admission(db).decide(req)
    path = tmp_path / "pbx-cdr.csv"
    path.write_text(file_line(decision, req, 13.0))
    assert await lifecycle.import_file(db, node_id, path) == 1
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT hangup_cause FROM cdrs") == "16"


async def test_one_import_settles_many_calls_on_one_balance_exactly(
        api: Api, db: asyncpg.Pool, tmp_path):
    # a shared balance of 20.00 at 6.00 a minute in 6-second blocks (0.60 a block)
    node_id, dist, exts = await setup(api, dealer_calls=50, credit="20.00", shared=True)
    admission = Admission(db, ahead=6)
    reqs = [request(node_id, exts[n % 20], n) for n in range(8)]
    decisions = [await admission.decide(r) for r in reqs]
    assert all(d.admitted for d in decisions)
    talks = [3.0, 6.4, 7.0, 0.0, 12.0, 1.0, 5.0, 6.0]
    for d, talk in zip(decisions, talks, strict=True):
        if talk:
            await admission.answer(d.call_id, "PJSIP/carrier")
    # one call was granted more after it was read: the batch prices it again
    await db.execute("UPDATE calls SET granted_seconds = 12 WHERE id = $1", decisions[1].call_id)
    text = "".join(file_line(d, r, t) for d, r, t in zip(decisions, reqs, talks, strict=True))
    # the first call rang two devices: a second line, which must not be charged again
    text += file_line(decisions[0], reqs[0], 2.0, sequence=1)
    path = tmp_path / "pbx-cdr.csv"
    path.write_text(text)
    assert await lifecycle.import_file(db, node_id, path) == 8
    assert await lifecycle.import_file(db, node_id, path) == 0  # nothing new: nothing done
    # blocks: 1 + 2 (6.4 s of a 12 s grant) + 1 (7 s of a 6 s grant: the cut's tolerance)
    # + 0 + 2 + 1 + 1 + 1 = 9 -> 5.40
    account = await db.fetchrow("SELECT id, balance, reserved FROM credit_accounts"
                                " WHERE extension_id IS NULL")
    assert (account["balance"], account["reserved"]) == (Decimal("14.6000"), 0)
    moves = await db.fetch("SELECT amount, balance FROM credit_movements WHERE reason = 'call'"
                           " AND account_id = $1 ORDER BY id", account["id"])
    assert len(moves) == 7 and sum(m["amount"] for m in moves) == Decimal("-5.40")
    # each movement carries the balance right after it
    running = Decimal("20.00")
    for m in moves:
        running += m["amount"]
        assert m["balance"] == running
    cdrs = await db.fetch("SELECT call_id, price FROM cdrs ORDER BY id")
    assert len(cdrs) == 8 and len({c["call_id"] for c in cdrs}) == 8
    assert {c["call_id"]: c["price"] for c in cdrs}[decisions[1].call_id] == Decimal("1.2000")
    assert await db.fetchval("SELECT count(*) FROM calls") == 0
    assert await db.fetch("SELECT kind, active FROM call_counters WHERE active <> 0") == []
    assert await db.fetchval("SELECT active FROM call_counters WHERE kind = 'd' AND id = $1",
                             dist["id"]) == 0


async def test_a_batch_settles_each_call_once_and_stores_each_cdr_once(
        api: Api, db: asyncpg.Pool):
    node_id, dist, exts = await setup(api, dealer_calls=5, credit="10.00")
    req = request(node_id, exts[0], 1)
    decision = await Admission(db, ahead=6).decide(req)
    assert decision.admitted and decision.grant == 6
    call = (await calls_store.calls_by_id(db, [decision.call_id]))[decision.call_id]
    line = cdr_line(decision, req, 4.0)
    # a refused call's line: no call, no tenant, only the caller's account code
    refused = dataclasses.replace(line, uniqueid="refused-1", call_id=None, tenant_id=None,
                                  talk_seconds=0.0, answered_at=None)
    moved = lifecycle._settlement(node_id, line, call) | {"granted": 60}
    items = [moved,                                             # priced for a grant it lacks
             lifecycle._settlement(node_id, line, call),        # settles the call
             lifecycle._settlement(node_id, dataclasses.replace(line, sequence=1), call),
             lifecycle._settlement(node_id, refused, None),
             lifecycle._settlement(node_id, refused, None)]     # the same node line again
    async with db.acquire() as conn:
        results = await calls_store.settle_calls(conn, items)
        assert results == [("stale", False), ("settled", True), ("no_call", False),
                           ("no_call", True), ("no_call", False)]
        cdrs = await conn.fetch("SELECT * FROM cdrs ORDER BY id")
        assert [c["uniqueid"] for c in cdrs] == [req.channel, "refused-1"]
        assert cdrs[0]["price"] == Decimal("0.6000") and cdrs[0]["sequence"] == 0
        # the refused call's CDR found its tenant, and that tenant's dealer chain
        assert cdrs[1]["tenant_id"] == exts[0]["tenant_id"] and cdrs[1]["call_id"] is None
        assert dist["id"] in cdrs[1]["dealer_path"]
        assert await conn.fetchval("SELECT count(*) FROM calls") == 0
        assert await conn.fetchval("SELECT balance FROM credit_accounts WHERE extension_id"
                                   " = $1", exts[0]["id"]) == Decimal("9.4000")
        assert await conn.fetch("SELECT kind, active FROM call_counters WHERE active <> 0") == []
        # read again, the whole batch changes nothing
        again = await calls_store.settle_calls(conn, items[1:])
        assert again == [("no_call", False)] * 4
        assert await conn.fetchval("SELECT count(*) FROM cdrs") == 2
        assert await conn.fetchval("SELECT count(*) FROM credit_movements WHERE reason = 'call'"
                                   ) == 1


class NoPool:
    """A pool nobody may use: an import that finds nothing new must not ask the database."""

    def acquire(self):
        raise AssertionError("the database was asked although the file had not grown")


async def test_the_import_asks_the_database_only_when_the_file_grew(
        api: Api, db: asyncpg.Pool, tmp_path, monkeypatch):
    node_id, _, exts = await setup(api)
    admission = Admission(db)
    reqs = [request(node_id, exts[n], n) for n in range(4)]
    decisions = [await admission.decide(r) for r in reqs]
    path = tmp_path / "pbx-cdr.csv"
    path.write_text(file_line(decisions[0], reqs[0], 3.0))
    importer = lifecycle.CdrImport(db, node_id, path)
    assert await importer.run() == 1
    importer.pool = NoPool()
    assert await importer.run() == 0  # unchanged: a stat, no query
    importer.pool = db
    with path.open("a") as fh:
        fh.write(file_line(decisions[1], reqs[1], 3.0))
    assert await importer.run() == 1
    # a backlog read a chunk at a time goes on without the file growing again
    monkeypatch.setattr(cdr_file, "MAX_CHUNK", len(file_line(decisions[2], reqs[2], 3.0)) + 8)
    with path.open("a") as fh:
        fh.write(file_line(decisions[2], reqs[2], 3.0) + file_line(decisions[3], reqs[3], 3.0))
    assert await importer.run() == 1
    assert await importer.run() == 1
    assert await db.fetchval("SELECT count(*) FROM calls") == 0
    assert await db.fetchval("SELECT count(*) FROM cdrs") == 4
    # its settlements did not wait for the disk, but that left no session setting behind
    for _ in range(3):
        async with db.acquire() as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == "on"


async def test_a_node_with_calls_in_progress_cannot_be_deleted(api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api)
    decision = await Admission(db).decide(request(node_id, exts[0], 1))
    assert decision.admitted
    with pytest.raises(asyncpg.RestrictViolationError, match="calls in progress"):
        await db.execute("DELETE FROM nodes WHERE id = $1", node_id)
    await db.execute("DELETE FROM calls")
    # without calls, the node's other objects are what still hold it
    with pytest.raises(asyncpg.RestrictViolationError, match="dealers_node_id_fkey"):
        await db.execute("DELETE FROM nodes WHERE id = $1", node_id)


async def test_answers_lease_renewals_and_settlements_never_deadlock(
        api: Api, db: asyncpg.Pool, tmp_path):
    """Each of them changes many calls in one statement; they lock in one order (by id)."""
    node_id, dist, exts = await setup(api, dealer_calls=500, credit="1000.00")
    admission = Admission(db)
    reqs = [request(node_id, exts[n % 20], n) for n in range(120)]
    decisions = await asyncio.gather(*(admission.decide(r) for r in reqs))
    assert all(d.admitted for d in decisions)
    pairs = list(zip(decisions, reqs, strict=True))
    rng = random.Random(7)

    async def renew() -> None:
        for _ in range(40):
            channels = [r.channel for r in reqs]
            rng.shuffle(channels)  # the node lists its channels in its own order
            async with db.acquire() as conn:
                await calls_store.renew_leases(conn, node_id, channels, 30.0)

    def shuffled(size: int) -> list[list[tuple]]:
        order = pairs[:]
        rng.shuffle(order)
        return [order[at:at + size] for at in range(0, len(order), size)]

    async def answer() -> None:
        for part in shuffled(15):
            async with db.acquire() as conn:
                await calls_store.answered(
                    conn, [(d.call_id, f"PJSIP/c-{n}", None) for n, (d, _) in enumerate(part)],
                    30.0)

    async def settle() -> None:
        for part in shuffled(20):
            async with db.acquire() as conn:
                await lifecycle._settle_lines(conn, node_id,
                                              [cdr_line(d, r, 3.0) for d, r in part])

    await asyncio.gather(renew(), renew(), answer(), settle())
    assert await db.fetchval("SELECT count(*) FROM calls") == 0
    assert await db.fetchval("SELECT count(*) FROM cdrs") == 120
    assert await db.fetchval("SELECT active FROM call_counters WHERE kind = 'd' AND id = $1",
                             dist["id"]) == 0


async def test_a_counter_left_off_by_a_cap_set_during_traffic_is_set_right(
        api: Api, db: asyncpg.Pool):
    node_id, dist, exts = await setup(api, dealer_calls=5, credit="10.00")
    admission = Admission(db)
    for n in range(2):
        assert (await admission.decide(request(node_id, exts[n], n))).admitted
    async with db.acquire() as conn:
        assert await calls_store.recount_call_counters(conn, timeout=5) == []
        # a settlement ran beside the cap being set: its call counted, its release not
        await conn.execute("UPDATE call_counters SET active = active + 1 WHERE kind = 'd'"
                           " AND id = $1", dist["id"])
        assert await calls_store.recount_call_counters(conn, timeout=5) == [
            ("d", dist["id"], -1)]
        assert await conn.fetchval("SELECT active FROM call_counters WHERE kind = 'd'"
                                   " AND id = $1", dist["id"]) == 2
        assert await calls_store.recount_call_counters(conn, timeout=5) == []


async def test_sweeps_wait_until_the_database_has_answered_for_a_while(
        api: Api, db: asyncpg.Pool):
    """After a start or an outage the agents renew and import first: a lease that lapsed
    while the database was away is not taken for a dead node at once."""
    node_id, _, exts = await setup(api, dealer_calls=5, credit="10.00")
    await Admission(db).decide(request(node_id, exts[0], 1))
    await db.execute("UPDATE calls SET lease_until = now() - interval '1 s'")
    sweeps = lifecycle.LeaseSweep(db, after=0.3)
    assert await sweeps.run() == 0
    await asyncio.sleep(0.35)
    sweeps.failed()  # the database failed this process meanwhile: it waits again
    assert await sweeps.run() == 0
    assert await db.fetchval("SELECT count(*) FROM calls") == 1
    await asyncio.sleep(0.35)
    assert await sweeps.run() == 1
    assert await db.fetchval("SELECT count(*) FROM calls") == 0


async def test_calls_the_agent_cannot_see_are_vouched_for_until_they_must_have_ended(
        api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api, dealer_calls=5, credit="10.00")
    admission = Admission(db)
    talking, over, ringing = [await admission.decide(request(node_id, exts[n], n))
                              for n in range(3)]
    await db.execute("UPDATE calls SET lease_until = now() - interval '1 s'")
    # answered 10 s ago with 60 s granted: it talks on for 50 s at most
    await db.execute("UPDATE calls SET answered_at = now() - interval '10 s',"
                     " granted_until = now() + interval '50 s' WHERE id = $1",
                     talking.call_id)
    # its grant ended a minute ago: the node has cut it
    await db.execute("UPDATE calls SET answered_at = now() - interval '2 min',"
                     " granted_until = now() - interval '1 min' WHERE id = $1", over.call_id)
    async with db.acquire() as conn:
        await calls_store.vouch_unseen(conn, node_id, 30.0, unlimited_for=0.0,
                                       ringing_for=120.0, cut_slack=1.0)
        lapsed = {r["id"]: r["lapsed"] for r in await conn.fetch(
            "SELECT id, lease_until < now() AS lapsed FROM calls")}
    assert lapsed == {talking.call_id: False, over.call_id: True, ringing.call_id: False}
    assert await lifecycle.sweep(db) == 1


async def test_calls_gone_when_their_node_is_seen_again_lose_their_vouched_leases(
        api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api, dealer_calls=5, credit="10.00")
    admission = Admission(db)
    reqs = [request(node_id, exts[n], n) for n in range(3)]
    gone, still, new = [await admission.decide(r) for r in reqs]
    await db.execute("UPDATE calls SET lease_until = now() + interval '4 min',"
                     " started_at = now() - interval '1 min' WHERE id <> $1", new.call_id)
    async with db.acquire() as conn:
        # the node lists `still` only; `new` was admitted a moment ago and may be missed
        assert await calls_store.end_vouching(conn, node_id, [reqs[1].channel], 10.0) == 1
        leases = {r["id"]: r["left"] for r in await conn.fetch(
            "SELECT id, extract(epoch FROM lease_until - now()) AS left FROM calls")}
    assert 0 < leases[gone.call_id] <= 10  # time for its CDR to be imported, no more
    assert leases[still.call_id] > 200 and leases[new.call_id] > 20


async def test_each_call_gets_its_new_end_as_soon_as_its_time_is_reserved(
        api: Api, db: asyncpg.Pool):
    """The node hears of a call's new end before the next call is extended: an error on a
    later call never keeps an earlier one's end from moving."""
    node_id, _, exts = await setup(api, credit="3.00", shared=True)
    admission = Admission(db, ahead=6)
    decisions = [await admission.decide(request(node_id, exts[n], n)) for n in range(2)]
    for n, d in enumerate(decisions):
        assert await admission.answer(d.call_id, f"PJSIP/carrier-{n}") == 6
    seen: list[tuple[str, float, int]] = []

    async def move(moved: lifecycle.Extension) -> None:
        pending = await db.fetchval("SELECT count(*) FROM calls WHERE granted_seconds = 6")
        seen.append((moved.callee_channel, moved.left_now(), pending))

    assert await lifecycle.extend_due(db, node_id, 10, 30, move, ahead=6) == 2
    assert sorted(c for c, _, _ in seen) == ["PJSIP/carrier-0", "PJSIP/carrier-1"]
    assert [pending for _, _, pending in seen] == [1, 0]
    assert all(10 < left <= 12 for _, left, _ in seen), seen


async def test_a_call_that_found_no_credit_gets_more_time_once_credit_comes_back(
        api: Api, db: asyncpg.Pool):
    # 1.20 at 6.00 a minute: two calls of 6 s, nothing left to extend them
    node_id, _, exts = await setup(api, credit="1.20", shared=True)
    admission = Admission(db, ahead=6)
    decisions = [await admission.decide(request(node_id, exts[n], n)) for n in range(2)]
    for n, d in enumerate(decisions):
        assert await admission.answer(d.call_id, f"PJSIP/carrier-{n}") == 6
    moved: list[lifecycle.Extension] = []

    async def move(extension: lifecycle.Extension) -> None:
        moved.append(extension)

    assert await lifecycle.extend_due(db, node_id, 10, 30, move, ahead=6) == 0
    assert await db.fetchval("SELECT count(*) FROM calls WHERE exhausted") == 2
    tenant_id = exts[0]["tenant_id"]
    api.ok(await api.post(f"/api/v1/tenants/{tenant_id}/credit", {"amount": "0.60"}))
    assert await lifecycle.extend_due(db, node_id, 10, 30, move, ahead=6) == 0
    assert await lifecycle.extend_due(db, node_id, 10, 30, move, ahead=6,
                                      exhausted_too=True) == 1
    rows = await db.fetch("SELECT granted_seconds, exhausted FROM calls ORDER BY granted_seconds")
    assert [(r["granted_seconds"], r["exhausted"]) for r in rows] == [(6, True), (12, False)]
    assert len(moved) == 1 and 10 < moved[0].left_now() <= 12
    account = await db.fetchrow("SELECT balance, reserved FROM credit_accounts"
                                " WHERE extension_id IS NULL")
    assert account["balance"] == Decimal("1.8000") and account["reserved"] == Decimal("1.8000")


@pytest.mark.parametrize("rotation", ["rename", "copytruncate", "removed", "twice"])
async def test_a_rotated_cdr_file_is_read_to_its_end_before_the_new_one(
        api: Api, db: asyncpg.Pool, tmp_path, caplog, rotation: str):
    """The node's file is rotated (renamed, or copied and emptied in place) with records the
    agent has not imported yet, and the node writes on in a new one: those records are read
    from the former file first. A former file that is gone is named in an error; the new one
    is imported all the same."""
    node_id, _, exts = await setup(api, credit="10.00")
    admission = Admission(db)
    reqs = [request(node_id, exts[n], n) for n in range(6)]
    decisions = [await admission.decide(r) for r in reqs]
    path = tmp_path / "pbx-cdr.csv"
    path.write_text(file_line(decisions[0], reqs[0], 0.0))
    assert await lifecycle.import_file(db, node_id, path) == 1
    with path.open("a") as fh:  # written after the last import
        fh.write(file_line(decisions[1], reqs[1], 0.0) + file_line(decisions[2], reqs[2], 0.0))
    rotated = tmp_path / "pbx-cdr.csv.1"
    if rotation == "twice":  # two rotations while the agent was away
        path.rename(tmp_path / "pbx-cdr.csv.2")
        path.write_text(file_line(decisions[5], reqs[5], 0.0))
    if rotation == "copytruncate":
        shutil.copy(path, rotated)
    else:
        path.rename(rotated)
    if rotation == "removed":
        rotated.unlink()
    # as long as the records the former file held: read from the old offset, it would be
    # mistaken for the rest of that file
    path.write_text(file_line(decisions[3], reqs[3], 0.0) * 3)
    former_kept = rotation != "removed"
    with caplog.at_level(logging.ERROR):
        assert await lifecycle.import_file(db, node_id, path) == {
            "twice": 4, "removed": 1}.get(rotation, 3)
    assert await lifecycle.import_file(db, node_id, path) == 0
    stored = {r["uniqueid"] for r in await db.fetch("SELECT uniqueid FROM cdrs")}
    expected = [0, 1, 2, 3] if former_kept else [0, 3]
    expected += [5] if rotation == "twice" else []
    assert stored == {reqs[n].channel for n in expected}
    assert ("was replaced" in caplog.text) is not former_kept
    with path.open("a") as fh:  # the new file goes on from where it was read to
        fh.write(file_line(decisions[4], reqs[4], 0.0))
    assert await lifecycle.import_file(db, node_id, path) == 1


async def test_a_tenant_area_code_none_in_service_is_refused_and_still_reaches_emergency(
        api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api)
    tenant_id = exts[0]["tenant_id"]
    for area in ("20", "10", "1", [], 11, None):
        reply = await api.patch(f"/api/v1/tenants/{tenant_id}", {"area_code": area})
        assert reply.status == 422 and reply.body["errors"][0]["pointer"] == "#/area_code"
    # set around the API (the database allows any two digits): calls are refused with a
    # reason, not failed; emergency calls still go through, free
    await db.execute("UPDATE tenants SET area_code = '20' WHERE id = $1", tenant_id)
    admission = Admission(db)
    refused = await admission.decide(request(node_id, exts[0], 1, dialled="32345678"))
    assert (refused.admitted, refused.sip_code, refused.reason) == (
        False, 503, "caller_area_unknown")
    emergency = await admission.decide(request(node_id, exts[0], 2, dialled="190"))
    assert emergency.admitted and emergency.grant is None
    assert await db.fetchval("SELECT reserved FROM calls WHERE id = $1",
                             emergency.call_id) == 0
