"""Tenants, extensions, numbering and plans: the business rules of the seeds."""

import re


async def test_cancelling_a_tenant_deactivates_all_its_extensions_at_once(api, db):
    t = await api.tenant()
    other = await api.tenant()
    for _ in range(3):
        await api.extension(t["id"])
    keep = await api.extension(other["id"])
    cancelled = api.ok(await api.post(f"/api/v1/tenants/{t['id']}/cancel"))
    assert cancelled["status"] == "cancelled" and cancelled["cancelled_at"]
    exts = api.ok(await api.get(f"/api/v1/extensions?tenant_id={t['id']}"))["items"]
    assert len(exts) == 3 and not any(e["active"] for e in exts)
    assert api.ok(await api.get(f"/api/v1/extensions/{keep['id']}"))["active"] is True


async def test_status_patch_to_cancelled_also_cascades(api):
    t = await api.tenant()
    e = await api.extension(t["id"])
    api.ok(await api.patch(f"/api/v1/tenants/{t['id']}", {"status": "cancelled"}))
    assert api.ok(await api.get(f"/api/v1/extensions/{e['id']}"))["active"] is False


async def test_cancelled_tenant_cannot_get_extensions_back(api):
    t = await api.tenant()
    e = await api.extension(t["id"])
    api.ok(await api.post(f"/api/v1/tenants/{t['id']}/cancel"))
    assert (await api.patch(f"/api/v1/extensions/{e['id']}", {"active": True})).status == 409
    assert (await api.post("/api/v1/extensions", {"tenant_id": t["id"], "number": "55"})
            ).status == 409
    assert (await api.patch(f"/api/v1/tenants/{t['id']}", {"status": "active"})).status == 422


async def test_extension_gets_unique_account_code_and_strong_hidden_password(api):
    t = await api.tenant()
    e = await api.extension(t["id"])
    assert re.fullmatch(r"[0-9]{6}", e["account_code"])
    assert "sip_password" not in e
    listed = api.ok(await api.get("/api/v1/extensions"))["items"]
    assert all("sip_password" not in x for x in listed)
    secret = api.ok(await api.post(f"/api/v1/extensions/{e['id']}/reveal-password"))
    pw = secret["sip_password"]
    assert len(pw) >= 16 and re.search(r"[A-Z]", pw) and re.search(r"[0-9]", pw)
    audit = api.ok(await api.get(f"/api/v1/audit?entity=extension&entity_id={e['id']}"))
    assert [a["action"] for a in audit["items"]] == ["create", "reveal_password"]
    assert all(pw not in str(a) for a in audit["items"])


async def test_account_code_is_unique_on_the_platform(api):
    t1, t2 = await api.tenant(), await api.tenant()
    await api.extension(t1["id"], account_code="123456")
    reply = await api.post("/api/v1/extensions", {"tenant_id": t2["id"], "number": "10",
                                                  "account_code": "123456"})
    assert reply.status == 409
    assert reply.body["errors"][0]["pointer"] == "#/account_code"


async def test_extension_number_unique_per_tenant_only(api):
    t1, t2 = await api.tenant(), await api.tenant()
    await api.extension(t1["id"], "200")
    await api.extension(t2["id"], "200")
    reply = await api.post("/api/v1/extensions", {"tenant_id": t1["id"], "number": "200"})
    assert reply.status == 409 and reply.body["errors"][0]["pointer"] == "#/number"


async def test_rotating_the_password_changes_it(api):
    e = await api.extension((await api.tenant())["id"])
    first = api.ok(await api.post(f"/api/v1/extensions/{e['id']}/reveal-password"))
    rotated = api.ok(await api.post(f"/api/v1/extensions/{e['id']}/rotate-password"))
    again = api.ok(await api.post(f"/api/v1/extensions/{e['id']}/reveal-password"))
    assert rotated["sip_password"] == again["sip_password"] != first["sip_password"]


async def test_dids_come_from_a_range_and_show_as_in_use(api):
    t = await api.tenant()
    e = await api.extension(t["id"])
    rng = api.ok(await api.post("/api/v1/number-ranges", {
        "name": "SP fixed", "country_code": "55", "area_code": "11",
        "first_number": 30000000, "last_number": 30000009}), 201)
    did = api.ok(await api.post("/api/v1/dids", {
        "range_id": rng["id"], "local_number": 30000003, "extension_id": e["id"],
        "monthly_value": "19.90", "collect_calls": True}), 201)
    assert did["e164"] == "+551130000003"
    outside = await api.post("/api/v1/dids", {"range_id": rng["id"], "local_number": 30000010})
    assert outside.status == 422
    numbers = api.ok(await api.get(f"/api/v1/number-ranges/{rng['id']}/numbers"))["items"]
    assert len(numbers) == 10
    assert [n["status"] for n in numbers].count("in_use") == 1
    free = api.ok(await api.get(f"/api/v1/number-ranges/{rng['id']}/numbers?status=available"))
    assert 30000003 not in [n["local_number"] for n in free["items"]]
    shrink = await api.patch(f"/api/v1/number-ranges/{rng['id']}", {"last_number": 30000002})
    assert shrink.status == 409


async def test_number_ranges_are_the_operators_and_never_overlap(api):
    """A reseller cannot claim numbers (and with them another subtree's inbound calls): the
    operator allots it a range, from which it takes DIDs; no two ranges share a number."""
    reseller = await api.dealer("reseller")
    me = await api.as_dealer(reseller)
    t = await api.tenant(reseller["id"])
    e = await api.extension(t["id"])
    body = {"name": "RJ", "country_code": "55", "area_code": "21", "first_number": 39870000,
            "last_number": 39870099}
    claimed = await me.post("/api/v1/number-ranges", body)
    assert claimed.status == 403 and "operator" in claimed.body["detail"]
    rng = api.ok(await api.post("/api/v1/number-ranges",
                                {**body, "dealer_id": reseller["id"]}), 201)
    did = me.ok(await me.post("/api/v1/dids", {"range_id": rng["id"], "local_number": 39870005,
                                               "extension_id": e["id"]}), 201)
    assert did["e164"] == "+552139870005"
    renamed = me.ok(await me.patch(f"/api/v1/number-ranges/{rng['id']}", {"name": "Rio"}))
    assert renamed["name"] == "Rio"
    for change in ({"last_number": 39870199}, {"area_code": "22"}):
        reply = await me.patch(f"/api/v1/number-ranges/{rng['id']}", change)
        assert reply.status == 403, change
    assert (await me.delete(f"/api/v1/number-ranges/{rng['id']}")).status == 403
    for first, last in ((39870099, 39870100), (39869000, 39870000), (39870010, 39870020)):
        reply = await api.post("/api/v1/number-ranges", {**body, "first_number": first,
                                                         "last_number": last})
        assert reply.status == 409 and reply.body["errors"][0]["pointer"] == "#/first_number"
    other = api.ok(await api.post("/api/v1/number-ranges", {
        **body, "first_number": 39870100, "last_number": 39870199}), 201)
    grown = await api.patch(f"/api/v1/number-ranges/{other['id']}", {"first_number": 39870050})
    assert grown.status == 409
    assert api.ok(await api.patch(f"/api/v1/number-ranges/{rng['id']}",
                                  {"last_number": 39870050}))["last_number"] == 39870050
    # the same numbers split otherwise between area code and local number
    split = {**body, "area_code": "213", "first_number": 9870000, "last_number": 9870099}
    reply = await api.post("/api/v1/number-ranges", split)
    assert reply.status == 409 and f"range {rng['id']}" in reply.body["detail"], reply
    shorter = await api.post("/api/v1/number-ranges", {**body, "area_code": "2",
                                                       "first_number": 139870040,
                                                       "last_number": 139870040})
    assert shorter.status == 409, shorter
    api.ok(await api.post("/api/v1/number-ranges", {**split, "first_number": 9870200,
                                                     "last_number": 9870299}), 201)


async def test_extension_plans_must_be_offered_to_the_tenant_dealer(api):
    dist = await api.dealer("distributor")
    other = await api.dealer("distributor")
    own = api.ok(await api.post("/api/v1/plans", {"name": "Basic", "dealer_id": dist["id"]}), 201)
    foreign = api.ok(await api.post("/api/v1/plans", {"name": "X", "dealer_id": other["id"]}),
                     201)
    intl = api.ok(await api.post("/api/v1/plans", {"name": "World", "kind": "international"}),
                  201)
    t = await api.tenant(dist["id"])
    e = await api.extension(t["id"], plan_id=own["id"], intl_plan_id=intl["id"])
    assert (e["plan_id"], e["intl_plan_id"]) == (own["id"], intl["id"])
    bad = await api.post("/api/v1/extensions", {"tenant_id": t["id"], "number": "77",
                                                "plan_id": foreign["id"]})
    assert bad.status == 422 and bad.body["errors"][0]["pointer"] == "#/plan_id"
    wrong_kind = await api.post("/api/v1/extensions", {"tenant_id": t["id"], "number": "78",
                                                       "intl_plan_id": own["id"]})
    assert wrong_kind.status == 422
    in_use = await api.delete(f"/api/v1/plans/{own['id']}")
    assert in_use.status == 409


async def test_every_change_is_audited_with_before_and_after(api):
    t = await api.tenant(name="Acme")
    api.ok(await api.patch(f"/api/v1/tenants/{t['id']}", {"name": "Acme Ltd"}))
    entries = api.ok(await api.get(f"/api/v1/audit?entity=tenant&entity_id={t['id']}"))["items"]
    assert [e["action"] for e in entries] == ["create", "update"]
    assert entries[1]["before"]["name"] == "Acme" and entries[1]["after"]["name"] == "Acme Ltd"
    assert entries[1]["actor_id"] == api.dealer_id and entries[1]["acting_as_id"] is None
    assert entries[1]["source_ip"] == "127.0.0.1"


async def test_secrets_never_appear_in_audit_or_responses(api):
    node = api.ok(await api.post("/api/v1/nodes", {
        "name": "n1", "sip_address": "sip1.example.net", "ami_host": "127.0.0.2",
        "ami_username": "cp", "ami_secret": "ami-secret-123", "ari_url": "http://127.0.0.2:8088",
        "ari_username": "cp", "ari_password": "ari-secret-456"}), 201)
    dealer = await api.dealer("distributor")
    dump = str(node) + str(dealer) + str(api.ok(await api.get("/api/v1/audit?limit=500")))
    dump += str(api.ok(await api.get("/api/v1/nodes")))
    for secret in ("ami-secret-123", "ari-secret-456", "correct-horse-battery", "password_hash"):
        assert secret not in dump


async def test_pagination_walks_every_item_once(api):
    t = await api.tenant()
    made = {(await api.extension(t["id"]))["id"] for _ in range(7)}
    seen, after = [], 0
    while after is not None:
        page = api.ok(await api.get(f"/api/v1/extensions?limit=3&after={after}"))
        seen += [e["id"] for e in page["items"]]
        after = page["next_after"]
    assert sorted(seen) == sorted(made)


async def test_unknown_query_parameter_is_refused(api):
    reply = await api.get("/api/v1/tenants?colour=blue")
    assert reply.status == 422 and reply.body["errors"][0]["pointer"] == "#/query/colour"


async def test_injection_attempts_are_refused_before_storage(api):
    before = await api.count("tenants")
    for name in ("Acme\n[evil]", "a;b", "x${SHELL}", "t\x00", "[section]", "a,b", 'q"uote'):
        reply = await api.post("/api/v1/tenants", {"name": name})
        assert reply.status == 422, (name, reply)
        assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert await api.count("tenants") == before


async def test_the_agent_reads_extensions_by_account_code_through_the_index(api, db):
    from controlplane.provisioning.desired import EXTENSIONS_BY_CODE_SQL as sql

    node = api.ok(await api.post("/api/v1/nodes", {
        "name": "n-index", "sip_address": "198.51.100.9", "ami_host": "10.0.0.9",
        "ami_username": "admin", "ami_secret": "ami-secret-123456",
        "ari_url": "http://10.0.0.9:8088", "ari_username": "ari",
        "ari_password": "ari-password-123456"}), 201)
    dist = await api.dealer("distributor", node_id=node["id"])
    t = await api.tenant((await api.dealer("reseller", parent_id=dist["id"]))["id"])
    codes = []
    for first in ("10000", "11000", "12000"):
        made = api.ok(await api.post(f"/api/v1/tenants/{t['id']}/extensions/bulk",
                                     {"first_number": first, "count": 1000}), 201)
        codes += [item["account_code"] for item in made["items"]]
    async with db.acquire() as conn:
        await conn.execute("ANALYZE extensions")
        node_id = await conn.fetchval("SELECT node_id FROM tenants WHERE id = $1", t["id"])
        assert node_id == node["id"]
        wanted = codes[5:15]
        plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", node_id, wanted))
        # the unique index on account_code, not a scan of every extension of the node
        assert "extensions_account_code_key" in plan, plan
        assert "Seq Scan on extensions" not in plan, plan
        rows = await conn.fetch(sql, node_id, wanted)
        assert sorted(r["account_code"] for r in rows) == sorted(wanted)
