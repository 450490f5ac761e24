"""Admission on each capped level (extension, tenant), on postpaid credit (an extension's own
limit, a tenant's shared one), and what the calls in progress and the CDRs show of it."""

from __future__ import annotations

from decimal import Decimal

import asyncpg

from controlplane.calls import lifecycle
from controlplane.calls.admission import Admission
from tests.api_helper import Api
from tests.integration.test_admission import cdr_line, file_line, request, setup


async def active(db: asyncpg.Pool, kind: str, key: int) -> int | None:
    return await db.fetchval("SELECT active FROM call_counters WHERE kind = $1 AND id = $2",
                             kind, key)


async def reseller_of(api: Api, ext: dict) -> int:
    return api.ok(await api.get(f"/api/v1/tenants/{ext['tenant_id']}"))["dealer_id"]


async def credited_extension(api: Api, tenant_id: int, number: str, plan_id: int,
                             amount: str) -> dict:
    ext = await api.extension(tenant_id, number, plan_id=plan_id)
    api.ok(await api.post(f"/api/v1/extensions/{ext['id']}/credit", {"amount": amount}))
    return ext


async def test_an_extension_admits_its_max_calls_and_refuses_the_next_until_one_ends(
        api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api)
    capped, other = exts[0], exts[1]
    api.ok(await api.patch(f"/api/v1/extensions/{capped['id']}", {"max_calls": 2}))
    admission = Admission(db)
    reqs = [request(node_id, capped, n) for n in range(2)]
    first = [await admission.decide(r) for r in reqs]
    assert all(d.admitted for d in first)
    refused = await admission.decide(request(node_id, capped, 2))
    assert (refused.admitted, refused.sip_code, refused.reason) == (
        False, 486, "extension_call_limit")
    assert await active(db, "e", capped["id"]) == 2
    # the cap is the extension's own: another extension of the tenant still calls
    assert (await admission.decide(request(node_id, other, 3))).admitted
    assert await db.fetchval("SELECT count(*) FROM calls WHERE extension_id = $1",
                             capped["id"]) == 2
    async with db.acquire() as conn:
        assert await lifecycle.finish(conn, node_id, cdr_line(first[0], reqs[0], 4.0)) is True
    assert await active(db, "e", capped["id"]) == 1
    again = await admission.decide(request(node_id, capped, 4))
    assert again.admitted
    full = await admission.decide(request(node_id, capped, 5))
    assert (full.sip_code, full.reason) == (486, "extension_call_limit")
    assert await active(db, "e", capped["id"]) == 2


async def test_a_tenant_cap_counts_calls_of_all_its_extensions_and_no_other_tenants(
        api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api)
    tenant_id = exts[0]["tenant_id"]
    api.ok(await api.patch(f"/api/v1/tenants/{tenant_id}", {"max_calls": 3}))
    neighbour = await api.tenant(await reseller_of(api, exts[0]))
    outside = await credited_extension(api, neighbour["id"], "3000", exts[0]["plan_id"],
                                       "100.00")
    admission = Admission(db)
    decisions = [await admission.decide(request(node_id, exts[n % 2], n)) for n in range(3)]
    assert all(d.admitted for d in decisions)
    # 2 calls on the first extension, 1 on the second: both are refused now
    for n, ext in enumerate(exts[:2], 3):
        refused = await admission.decide(request(node_id, ext, n))
        assert (refused.admitted, refused.sip_code, refused.reason) == (
            False, 503, "tenant_call_limit")
    assert await active(db, "t", tenant_id) == 3
    assert await db.fetchval("SELECT count(*) FROM calls WHERE tenant_id = $1", tenant_id) == 3
    # another tenant of the same reseller is not held by it
    assert (await admission.decide(request(node_id, outside, 9))).admitted
    assert await active(db, "t", tenant_id) == 3
    assert await db.fetchval("SELECT count(*) FROM calls WHERE tenant_id = $1",
                             neighbour["id"]) == 1


async def test_a_postpaid_extension_reserves_down_to_minus_its_credit_limit(
        api: Api, db: asyncpg.Pool):
    # 6.00 a minute in 6-second blocks (0.60 a block), grants of up to 60 s (6.00)
    node_id, _, exts = await setup(api, credit="0")
    postpaid, prepaid = exts[0], exts[1]
    api.ok(await api.patch(f"/api/v1/extensions/{postpaid['id']}",
                           {"billing_type": "postpaid", "credit_limit": "10.00"}))
    admission = Admission(db)

    async def account() -> tuple[Decimal, Decimal]:
        row = await db.fetchrow("SELECT balance, reserved FROM credit_accounts"
                                " WHERE extension_id = $1", postpaid["id"])
        return row["balance"], row["reserved"]

    req = request(node_id, postpaid, 1)
    full = await admission.decide(req)
    assert full.admitted and full.grant == 60
    # 4.00 left of the limit: the longest grant it pays for, 36 s (3.60)
    part = await admission.decide(request(node_id, postpaid, 2))
    assert part.admitted and part.grant == 36
    assert await account() == (Decimal("0.0000"), Decimal("9.6000"))
    # 0.40 left: not even one block
    broke = await admission.decide(request(node_id, postpaid, 3))
    assert (broke.admitted, broke.sip_code, broke.reason) == (False, 402, "no_credit")
    assert await account() == (Decimal("0.0000"), Decimal("9.6000"))
    held = {r["id"]: r["reserved"] for r in await db.fetch("SELECT id, reserved FROM calls")}
    assert held == {full.call_id: Decimal("6.0000"), part.call_id: Decimal("3.6000")}
    # the limit is the postpaid extension's alone: a prepaid one at 0 calls nothing
    other = await admission.decide(request(node_id, prepaid, 4))
    assert (other.sip_code, other.reason) == (402, "no_credit")
    # 13 s talked, billed 18 s (1.80): the balance goes negative, its hold is given back
    async with db.acquire() as conn:
        assert await lifecycle.finish(conn, node_id, cdr_line(full, req, 13.0)) is True
    assert await account() == (Decimal("-1.8000"), Decimal("3.6000"))
    # 10.00 - 1.80 - 3.60 = 4.60 left: 42 s (4.20)
    after = await admission.decide(request(node_id, postpaid, 5))
    assert after.admitted and after.grant == 42
    balance, reserved = await account()
    assert (balance, reserved) == (Decimal("-1.8000"), Decimal("7.8000"))
    assert balance - reserved >= Decimal("-10.00")


async def test_a_postpaid_tenant_shares_its_credit_limit_among_its_extensions(
        api: Api, db: asyncpg.Pool):
    # 0.60 a call (one 6-second block); the tenant may go down to -3.00: 5 calls
    node_id, _, exts = await setup(api, credit="0", shared=True)
    tenant_id = exts[0]["tenant_id"]
    api.ok(await api.patch(f"/api/v1/tenants/{tenant_id}",
                           {"billing_mode": "postpaid", "credit_limit": "3.00"}))
    # an extension's own postpaid limit does not count when the tenant pays
    api.ok(await api.patch(f"/api/v1/extensions/{exts[0]['id']}",
                           {"billing_type": "postpaid", "credit_limit": "100.00"}))
    admission = Admission(db, ahead=6)
    reqs = [request(node_id, exts[n % 2], n) for n in range(5)]
    decisions = [await admission.decide(r) for r in reqs]
    assert all(d.admitted and d.grant == 6 for d in decisions)
    for n, ext in enumerate(exts[:2], 5):
        refused = await admission.decide(request(node_id, ext, n))
        assert (refused.admitted, refused.sip_code, refused.reason) == (False, 402, "no_credit")
    account = await db.fetchrow("SELECT id, balance, reserved FROM credit_accounts"
                                " WHERE tenant_id = $1 AND extension_id IS NULL", tenant_id)
    assert (account["balance"], account["reserved"]) == (Decimal("0.0000"), Decimal("3.0000"))
    assert await db.fetchval("SELECT coalesce(sum(reserved), 0) FROM credit_accounts"
                             " WHERE extension_id IS NOT NULL") == 0
    assert {r["account_id"] for r in await db.fetch("SELECT account_id FROM calls")} == {
        account["id"]}
    # a call that talked 3 s is charged 0.60: the hold it gave back is spent, nothing frees
    async with db.acquire() as conn:
        assert await lifecycle.finish(conn, node_id, cdr_line(decisions[0], reqs[0], 3.0))
    row = await db.fetchrow("SELECT balance, reserved FROM credit_accounts WHERE id = $1",
                            account["id"])
    assert (row["balance"], row["reserved"]) == (Decimal("-0.6000"), Decimal("2.4000"))
    still = await admission.decide(request(node_id, exts[0], 7))
    assert (still.sip_code, still.reason) == (402, "no_credit")
    # a call that was never answered costs nothing: its block is available again
    async with db.acquire() as conn:
        assert await lifecycle.finish(conn, node_id, cdr_line(decisions[1], reqs[1], 0.0))
    assert (await admission.decide(request(node_id, exts[1], 8))).admitted


async def test_live_calls_filter_by_dealer_within_the_callers_subtree_with_their_grants(
        api: Api, db: asyncpg.Pool):
    node_id, dist, exts = await setup(api)
    mine = await reseller_of(api, exts[0])
    sibling = await api.dealer("reseller", parent_id=dist["id"])
    far = await api.tenant(sibling["id"])
    # 3.00 pays for 30 s at 6.00 a minute, a shorter grant than the others' 60 s
    far_ext = await credited_extension(api, far["id"], "3000", exts[0]["plan_id"], "3.00")
    admission = Admission(db)
    near = [await admission.decide(request(node_id, exts[n], n)) for n in range(2)]
    away = await admission.decide(request(node_id, far_ext, 2))
    assert all(d.admitted for d in [*near, away])
    assert [d.grant for d in near] == [60, 60] and away.grant == 30
    stored = {str(r["id"]): (r["granted_seconds"], r["reserved"])
              for r in await db.fetch("SELECT id, granted_seconds, reserved FROM calls")}
    assert stored == {str(near[0].call_id): (60, Decimal("6.0000")),
                      str(near[1].call_id): (60, Decimal("6.0000")),
                      str(away.call_id): (30, Decimal("3.0000"))}

    def shown(items: list[dict]) -> dict[str, tuple[int, Decimal]]:
        return {i["id"]: (i["granted_seconds"], Decimal(i["reserved"])) for i in items}

    distributor = await api.as_dealer(dist)
    everything = distributor.ok(await distributor.get(f"/api/v1/calls?dealer_id={dist['id']}"))
    assert shown(everything["items"]) == stored
    assert {i["id"]: i["dealer_id"] for i in everything["items"]} == {
        str(near[0].call_id): mine, str(near[1].call_id): mine,
        str(away.call_id): sibling["id"]}
    one = distributor.ok(await distributor.get(f"/api/v1/calls?dealer_id={sibling['id']}"))
    assert shown(one["items"]) == {str(away.call_id): stored[str(away.call_id)]}

    reseller = await api.as_dealer({"id": mine, "login": (await db.fetchval(
        "SELECT login FROM dealers WHERE id = $1", mine))})
    own = reseller.ok(await reseller.get(f"/api/v1/calls?dealer_id={mine}"))
    assert shown(own["items"]) == {k: v for k, v in stored.items() if k != str(away.call_id)}
    # a dealer apart finds nothing, as on the other lists
    apart = reseller.ok(await reseller.get(f"/api/v1/calls?dealer_id={sibling['id']}"))
    assert apart["items"] == []
    tenants_apart = reseller.ok(await reseller.get(f"/api/v1/tenants?dealer_id={sibling['id']}"))
    assert tenants_apart["items"] == []
    above = reseller.ok(await reseller.get(f"/api/v1/calls?dealer_id={dist['id']}"))
    assert shown(above["items"]) == shown(own["items"])


async def test_a_settled_calls_cdr_carries_its_tenants_external_reference(
        api: Api, db: asyncpg.Pool, tmp_path):
    node_id, _, exts = await setup(api)
    tenant_id = exts[0]["tenant_id"]
    api.ok(await api.patch(f"/api/v1/tenants/{tenant_id}", {"external_ref": "ERP-4711"}))
    neighbour = await api.tenant(await reseller_of(api, exts[0]))
    plain = await credited_extension(api, neighbour["id"], "3000", exts[0]["plan_id"], "10.00")
    admission = Admission(db)
    reqs = [request(node_id, exts[0], 1), request(node_id, plain, 2)]
    decisions = [await admission.decide(r) for r in reqs]
    assert all(d.admitted for d in decisions)
    path = tmp_path / "pbx-cdr.csv"
    path.write_text("".join(file_line(d, r, 13.0) for d, r in zip(decisions, reqs,
                                                                   strict=True)))
    assert await lifecycle.import_file(db, node_id, path) == 2
    assert await db.fetchval("SELECT count(*) FROM calls") == 0
    items = api.ok(await api.get(f"/api/v1/cdrs?tenant_id={tenant_id}"))["items"]
    assert [(i["call_id"], i["tenant_id"], i["external_ref"]) for i in items] == [
        (str(decisions[0].call_id), tenant_id, "ERP-4711")]
    assert items[0]["price"] == "1.8000"
    other = api.ok(await api.get(f"/api/v1/cdrs?tenant_id={neighbour['id']}"))["items"]
    assert [(i["call_id"], i["external_ref"]) for i in other] == [
        (str(decisions[1].call_id), "")]


async def test_service_codes_are_routed_and_priced_and_collect_calls_cost_the_caller_nothing(
        api: Api, db: asyncpg.Pool):
    node_id, _, exts = await setup(api)
    admission = Admission(db)
    service = await admission.decide(request(node_id, exts[0], 0, dialled="10315"))
    # priced as +55 and the code (the table's "55" rate), sent to the carrier as dialled
    assert (service.admitted, service.grant) == (True, 60)
    assert service.target.startswith("10315@carrier-")
    row = await db.fetchrow("SELECT callee, call_class, rate->>'prefix' AS prefix, reserved"
                            " FROM calls WHERE id = $1", service.call_id)
    assert (row["callee"], row["call_class"], row["prefix"], row["reserved"]) == (
        "10315", "special", "55", Decimal("6.0000"))
    collect = await admission.decide(request(node_id, exts[1], 1, dialled="9015 11 32345678"))
    assert (collect.admitted, collect.grant) == (True, None)
    assert collect.target.startswith("901511" "32345678@carrier-")
    assert await db.fetchval("SELECT reserved FROM calls WHERE id = $1",
                             collect.call_id) == Decimal(0)
    # a service code is still a national call: without the permission, refused
    api.ok(await api.patch(f"/api/v1/extensions/{exts[2]['id']}", {"allow_national": False}))
    refused = await admission.decide(request(node_id, exts[2], 2, dialled="102"))
    assert (refused.sip_code, refused.reason) == (403, "class_forbidden_special")


async def _answered_call_with_unanswered_line(api: Api, db: asyncpg.Pool, path, monkeypatch,
                                              answered_by: str):
    """No waiting in the importer; a call admitted and answered (the node raised it), and
    one NO ANSWER line of it in the node's CDR file at `path`."""
    for name in ("HOLD_FOR", "GONE_FOR", "HELD_EVERY"):
        monkeypatch.setattr(lifecycle, name, 0.0)
    node_id, _, exts = await setup(api, credit="10.00")
    admission = Admission(db)
    req = request(node_id, exts[0], 0)
    decision = await admission.decide(req)
    assert await admission.answer(decision.call_id, answered_by) == decision.grant
    path.write_text(file_line(decision, req, 0.0))
    return node_id, exts, req, decision


async def _imported(cdrs: lifecycle.CdrImport, turns: int = 3) -> int:
    stored = 0
    for _ in range(turns):
        stored += await cdrs.run()
    return stored


async def test_a_calls_only_node_line_saying_unanswered_settles_it_once_its_caller_is_gone(
        api: Api, db: asyncpg.Pool, tmp_path, monkeypatch):
    """The callee answered (the node raised the answer) but the caller left before the
    bridge: its one CDR line says NO ANSWER. Held while the caller's channel is on the node
    or the node cannot be asked, it settles the call, unbilled, once the channel is gone
    and the file read to its end, instead of the lease billing up to the grant."""
    path = tmp_path / "Master.csv"
    node_id, exts, req, decision = await _answered_call_with_unanswered_line(
        api, db, path, monkeypatch, "PJSIP/carrier-1")
    live: set[str] | None = {req.channel}

    async def channels() -> set[str] | None:
        return live

    cdrs = lifecycle.CdrImport(db, node_id, path, live_channels=channels)
    assert await _imported(cdrs) == 0  # the caller's channel is still there: held
    assert list(cdrs.held) == [decision.call_id]
    live = None  # the node cannot be asked: held still
    assert await _imported(cdrs) == 0
    live = set()
    assert await _imported(cdrs) == 1
    cdr = await db.fetchrow("SELECT uniqueid, disposition, talk_seconds, billed_seconds, price"
                            " FROM cdrs WHERE call_id = $1", decision.call_id)
    assert tuple(cdr) == (req.channel, "NO ANSWER", Decimal("0.000"), 0, Decimal("0.0000"))
    account = await db.fetchrow("SELECT balance, reserved FROM credit_accounts"
                                " WHERE extension_id = $1", exts[0]["id"])
    assert tuple(account) == (Decimal("10.0000"), Decimal("0.0000"))
    assert await db.fetchval("SELECT count(*) FROM calls") == 0 and not cdrs.held


async def test_a_held_line_settles_its_call_under_steady_traffic_too(
        api: Api, db: asyncpg.Pool, tmp_path, monkeypatch):
    """Lines keep arriving (the file is never found where the last import left it): the
    held line still settles its call once the caller is gone, and is not kept."""
    path = tmp_path / "Master.csv"
    node_id, exts, req, decision = await _answered_call_with_unanswered_line(
        api, db, path, monkeypatch, "PJSIP/carrier-1")
    other_req = request(node_id, exts[1], 1)
    other = await Admission(db).decide(other_req)

    async def gone() -> set[str]:
        return set()

    cdrs = lifecycle.CdrImport(db, node_id, path, live_channels=gone)
    for turn in range(4):
        with path.open("a") as fh:
            fh.write(file_line(other, other_req, 0.0, sequence=turn))
        await cdrs.run()
    assert await db.fetchval("SELECT count(*) FROM calls") == 0 and not cdrs.held
    cdr = await db.fetchrow("SELECT disposition, price FROM cdrs WHERE uniqueid = $1",
                            req.channel)
    assert tuple(cdr) == ("NO ANSWER", Decimal("0.0000"))


async def test_a_forked_calls_unanswered_line_first_then_its_answered_line_bills_the_talk(
        api: Api, db: asyncpg.Pool, tmp_path, monkeypatch):
    path = tmp_path / "Master.csv"
    node_id, _, req, decision = await _answered_call_with_unanswered_line(
        api, db, path, monkeypatch, "PJSIP/dev-1")

    async def channels() -> set[str]:
        return {req.channel}  # the call talks on, answered by another device

    cdrs = lifecycle.CdrImport(db, node_id, path, live_channels=channels)
    assert await _imported(cdrs) == 0
    with path.open("a") as fh:
        fh.write(file_line(decision, req, 30.0, sequence=1))
    assert await _imported(cdrs) == 1
    cdr = await db.fetchrow("SELECT disposition, billed_seconds, price FROM cdrs"
                            " WHERE call_id = $1", decision.call_id)
    assert tuple(cdr) == ("ANSWERED", 30, Decimal("3.0000"))
    assert await db.fetchval("SELECT count(*) FROM calls") == 0 and not cdrs.held


def test_a_cdr_showing_whole_increments_is_billed_for_them():
    rate = {"prefix": "55", "price_per_minute": "6.00", "connection_fee": "0",
            "first_increment": 6, "next_increment": 6, "free_seconds": 3, "description": "",
            "call_class": None, "id": 1}
    call = {"rate": rate, "granted_seconds": None}
    # the node's microsecond times: 6.0004 s shows as 6.000 in the CDR, and bills as that
    assert lifecycle.bill(call, 6.0004) == (6, Decimal("0.6000"))
    assert lifecycle.bill(call, 2.9996) == (6, Decimal("0.6000"))  # shows 3.000: not free
    assert lifecycle.bill(call, 2.9994) == (0, Decimal("0"))
    assert lifecycle.bill(call, 6.0006) == (12, Decimal("1.2000"))
