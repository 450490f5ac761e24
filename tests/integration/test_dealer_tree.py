"""Dealer levels, caps inheritance and the counters that enforce them, in PostgreSQL."""

import asyncpg
import pytest

LEVEL_RULES = [
    ("operator", "distributor", True),
    ("operator", "sub_distributor", True),
    ("operator", "reseller", True),
    ("distributor", "distributor", False),
    ("distributor", "sub_distributor", True),
    ("distributor", "reseller", True),
    ("sub_distributor", "distributor", False),
    ("sub_distributor", "sub_distributor", False),
    ("sub_distributor", "reseller", True),
    ("reseller", "distributor", False),
    ("reseller", "sub_distributor", False),
    ("reseller", "reseller", False),
]


@pytest.mark.parametrize(("creator", "created", "allowed"), LEVEL_RULES)
async def test_dealer_level_rules(api, creator, created, allowed):
    parent = None if creator == "operator" else await api.dealer(creator)
    actor = api if parent is None else await api.as_dealer(parent)
    before = await api.count("dealers")
    reply = await actor.post("/api/v1/dealers", {
        "level": created, "name": "Child", "login": f"child-{creator}-{created}",
        "password": "correct-horse-battery"})
    if allowed:
        assert reply.status == 201, reply
        assert reply.body["parent_id"] == actor.dealer_id
    else:
        assert reply.status == 422, reply
        assert reply.body["errors"] == [{"pointer": "#/level",
                                         "detail": f"a {creator} cannot create a {created}"}]
        assert await api.count("dealers") == before


async def test_level_rule_holds_in_the_schema_for_direct_sql(api, db):
    dist = await api.dealer("distributor")
    async with db.acquire() as conn:
        with pytest.raises(asyncpg.CheckViolationError, match="cannot create"):
            await conn.execute(
                "INSERT INTO dealers (parent_id, level, name, login, password_hash)"
                " VALUES ($1, 'distributor', 'x', 'x-direct', 'x')", dist["id"])


async def test_child_inherits_parent_caps_when_not_given(api):
    dist = await api.dealer("distributor", max_tenants=5, max_extensions=50, max_calls=10)
    child = await api.dealer("reseller", parent_id=dist["id"])
    assert (child["max_tenants"], child["max_extensions"], child["max_calls"]) == (5, 50, 10)


async def test_child_caps_cannot_exceed_parent(api):
    dist = await api.dealer("distributor", max_tenants=5)
    reply = await api.post("/api/v1/dealers", {
        "level": "reseller", "parent_id": dist["id"], "name": "Big", "login": "big-one",
        "password": "correct-horse-battery", "max_tenants": 6})
    assert reply.status == 409, reply
    assert "cannot exceed its parent" in reply.body["detail"]


async def test_parent_caps_cannot_drop_below_a_child(api):
    dist = await api.dealer("distributor", max_calls=10)
    await api.dealer("reseller", parent_id=dist["id"], max_calls=8)
    reply = await api.patch(f"/api/v1/dealers/{dist['id']}", {"max_calls": 5})
    assert reply.status == 409, reply
    unchanged = api.ok(await api.get(f"/api/v1/dealers/{dist['id']}"))
    assert unchanged["max_calls"] == 10


async def test_tenant_cap_counts_the_whole_subtree(api):
    dist = await api.dealer("distributor", max_tenants=2)
    r1 = await api.dealer("reseller", parent_id=dist["id"])
    r2 = await api.dealer("reseller", parent_id=dist["id"])
    await api.tenant(r1["id"])
    await api.tenant(r2["id"])
    reply = await api.post("/api/v1/tenants", {"name": "Third", "dealer_id": r1["id"]})
    assert reply.status == 409, reply
    assert "tenant cap" in reply.body["detail"]
    assert await api.count("tenants") == 2


async def test_cancelled_tenant_frees_its_place_under_the_cap(api):
    dist = await api.dealer("distributor", max_tenants=1)
    t = await api.tenant(dist["id"])
    api.ok(await api.post(f"/api/v1/tenants/{t['id']}/cancel"))
    await api.tenant(dist["id"])
    assert api.ok(await api.get(f"/api/v1/dealers/{dist['id']}"))["tenant_count"] == 1


async def test_extension_cap_counts_every_level(api):
    dist = await api.dealer("distributor", max_extensions=3)
    res = await api.dealer("reseller", parent_id=dist["id"])
    t1, t2 = await api.tenant(res["id"]), await api.tenant(dist["id"])
    await api.extension(t1["id"])
    await api.extension(t1["id"])
    await api.extension(t2["id"])
    reply = await api.post("/api/v1/extensions", {"tenant_id": t1["id"], "number": "4000"})
    assert reply.status == 409, reply
    assert "extension cap" in reply.body["detail"]
    assert api.ok(await api.get(f"/api/v1/dealers/{dist['id']}"))["extension_count"] == 3


async def test_tenant_extension_cap(api):
    t = await api.tenant(max_extensions=1)
    await api.extension(t["id"])
    reply = await api.post("/api/v1/extensions", {"tenant_id": t["id"], "number": "4001"})
    assert reply.status == 409, reply


async def test_deleting_an_extension_frees_the_counters(api):
    dist = await api.dealer("distributor", max_extensions=1)
    t = await api.tenant(dist["id"])
    e = await api.extension(t["id"])
    assert (await api.delete(f"/api/v1/extensions/{e['id']}")).status == 204
    await api.extension(t["id"])
    assert api.ok(await api.get(f"/api/v1/dealers/{dist['id']}"))["extension_count"] == 1


async def test_purging_a_cancelled_tenant_settles_every_counter(api):
    dist = await api.dealer("distributor")
    t = await api.tenant(dist["id"])
    for _ in range(3):
        await api.extension(t["id"])
    api.ok(await api.post(f"/api/v1/tenants/{t['id']}/cancel"))
    assert (await api.delete(f"/api/v1/tenants/{t['id']}")).status == 204
    d = api.ok(await api.get(f"/api/v1/dealers/{dist['id']}"))
    root = api.ok(await api.get(f"/api/v1/dealers/{api.dealer_id}"))
    assert (d["tenant_count"], d["extension_count"]) == (0, 0)
    assert (root["tenant_count"], root["extension_count"]) == (0, 0)
    assert await api.count("extensions") == 0


async def test_active_tenant_cannot_be_deleted(api):
    t = await api.tenant()
    reply = await api.delete(f"/api/v1/tenants/{t['id']}")
    assert reply.status == 409
    assert "cancel it first" in reply.body["detail"]


async def test_extension_calls_cannot_exceed_tenant(api):
    t = await api.tenant(max_calls=2)
    reply = await api.post("/api/v1/extensions", {"tenant_id": t["id"], "number": "4002",
                                                  "max_calls": 3})
    assert reply.status == 422, reply
    assert reply.body["errors"][0]["pointer"] == "#/max_calls"


async def test_dealer_cannot_raise_its_own_caps_or_credit(api):
    dist = await api.dealer("distributor", max_calls=10)
    me = await api.as_dealer(dist)
    for change in ({"max_calls": 11}, {"credit_limit": 100}, {"billing_mode": "postpaid"},
                   {"active": False}):
        reply = await me.patch(f"/api/v1/dealers/{dist['id']}", change)
        assert reply.status == 403, (change, reply)
    assert (await me.patch(f"/api/v1/dealers/{dist['id']}", {"brand_name": "My Brand"})
            ).status == 200


async def test_postpaid_balance_stops_at_the_credit_limit(api):
    dist = await api.dealer("distributor", billing_mode="postpaid", credit_limit="100")
    api.ok(await api.post(f"/api/v1/dealers/{dist['id']}/credit", {"amount": "-100"}))
    reply = await api.post(f"/api/v1/dealers/{dist['id']}/credit", {"amount": "-0.01"})
    assert reply.status == 409, reply
    assert api.ok(await api.get(f"/api/v1/dealers/{dist['id']}"))["balance"] == "-100.0000"


async def test_prepaid_balance_cannot_go_negative(api):
    dist = await api.dealer("distributor")
    api.ok(await api.post(f"/api/v1/dealers/{dist['id']}/credit", {"amount": "10.5"}))
    reply = await api.post(f"/api/v1/dealers/{dist['id']}/credit", {"amount": "-11"})
    assert reply.status == 409, reply


async def test_tenant_inherits_the_dealer_node(api):
    node = api.ok(await api.post("/api/v1/nodes", {
        "name": "sp-1", "sip_address": "127.0.0.2", "ami_host": "127.0.0.2",
        "ami_username": "cp", "ami_secret": "s3cret-s3cret", "ari_url": "http://127.0.0.2:8088",
        "ari_username": "cp", "ari_password": "s3cret-s3cret"}), 201)
    dist = await api.dealer("distributor", node_id=node["id"])
    res = await api.dealer("reseller", parent_id=dist["id"])
    t = await api.tenant(res["id"])
    assert res["node_id"] == node["id"] and t["node_id"] == node["id"]


async def test_only_the_operator_assigns_nodes(api):
    dist = await api.dealer("distributor")
    me = await api.as_dealer(dist)
    reply = await me.post("/api/v1/dealers", {
        "level": "reseller", "name": "R", "login": "r-node", "password": "correct-horse-battery",
        "node_id": 1})
    assert reply.status == 403


async def test_only_the_operator_puts_an_ip_address_on_a_node(api):
    """A registration address that is an IP address is added to the node's interface and
    bound there: a parent may give its child a host name, never an address."""
    dist = await api.dealer("distributor")
    me = await api.as_dealer(dist)
    body = {"level": "reseller", "name": "R", "password": "correct-horse-battery"}
    reply = await me.post("/api/v1/dealers", {**body, "login": "r-ip",
                                              "registration_address": "10.1.2.3"})
    assert reply.status == 403 and "operator" in reply.body["detail"]
    child = me.ok(await me.post("/api/v1/dealers", {
        **body, "login": "r-name", "registration_address": "sip.brand.example"}), 201)
    for address in ("10.1.2.3", "127.0.0.77"):
        reply = await me.patch(f"/api/v1/dealers/{child['id']}",
                               {"registration_address": address})
        assert reply.status == 403
    row = await api.pool.fetchrow("SELECT registration_address FROM dealers WHERE id = $1",
                                  child["id"])
    assert row["registration_address"] == "sip.brand.example"
    for address in ("0.0.0.0", "255.255.255.255", "224.0.0.1", "240.0.0.9", "169.254.1.1"):
        reply = await api.patch(f"/api/v1/dealers/{child['id']}",
                                {"registration_address": address})
        assert reply.status == 422, address
        assert reply.body["errors"][0]["pointer"] == "#/registration_address", reply
    api.ok(await api.patch(f"/api/v1/dealers/{child['id']}",
                           {"registration_address": "127.0.0.77"}))


async def test_deleting_a_dealer_with_tenants_is_refused(api):
    dist = await api.dealer("distributor")
    await api.tenant(dist["id"])
    reply = await api.delete(f"/api/v1/dealers/{dist['id']}")
    assert reply.status == 409
    assert "deactivate" in reply.body["detail"]


async def test_deactivated_dealer_and_its_subtree_lose_api_access(api):
    dist = await api.dealer("distributor")
    res = await api.dealer("reseller", parent_id=dist["id"])
    as_res = await api.as_dealer(res)
    assert (await as_res.get("/api/v1/tenants")).status == 200
    api.ok(await api.patch(f"/api/v1/dealers/{dist['id']}", {"active": False}))
    assert (await as_res.get("/api/v1/tenants")).status == 401


async def test_no_tenant_is_created_under_a_dealer_whose_parent_is_deactivated(api, db):
    dist = await api.dealer("distributor")
    res = await api.dealer("reseller", parent_id=dist["id"])
    api.ok(await api.patch(f"/api/v1/dealers/{dist['id']}", {"active": False}))
    reply = await api.post("/api/v1/tenants", {"dealer_id": res["id"], "name": "Late"})
    assert reply.status == 409 and reply.body["errors"][0]["pointer"] == "#/dealer_id", reply
    assert await db.fetchval("SELECT count(*) FROM tenants WHERE dealer_id = $1",
                             res["id"]) == 0
    api.ok(await api.patch(f"/api/v1/dealers/{dist['id']}", {"active": True}))
    api.ok(await api.post("/api/v1/tenants", {"dealer_id": res["id"], "name": "Late"}), 201)
