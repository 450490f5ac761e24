"""Rate tables over the API on a real PostgreSQL: import, lookup, quote, scoping, plans."""

import time
from decimal import Decimal
from urllib.parse import urlencode

from controlplane.rating import csv_import
from controlplane.rating.store import FIND_SQL, find_rate, prefixes_of

HEADER = "prefix;description;price_per_minute;connection_fee;first_increment;next_increment;" \
         "free_seconds\n"
BRAZIL = (HEADER
          + "55;Brasil;0,20;0;30;6;3\n"
          + "5511;São Paulo fixo;0,05;0;30;6;3\n"
          + "551199;São Paulo móvel;0,35;0,01;30;6;3\n")


async def rate_table(api, **fields) -> dict:
    body = {"name": f"Table {time.monotonic_ns()}", **fields}
    return api.ok(await api.post("/api/v1/rate-tables", body), 201)


async def upload(api, table_id: int, text: str, mode: str = "",
                 content_type: str = "text/csv"):
    query = f"?mode={mode}" if mode else ""
    return await api.call("POST", f"/api/v1/rate-tables/{table_id}/import{query}",
                          raw=text.encode(), content_type=content_type)


async def quote(api, table_id: int, number: str, caller_area: str = "11", seconds: int = 60):
    query = urlencode({"number": number, "caller_area": caller_area, "seconds": seconds})
    return await api.get(f"/api/v1/rate-tables/{table_id}/quote?{query}")


async def test_import_a_brazilian_csv_and_the_longest_prefix_wins(api, db):
    t = await rate_table(api, description="Tabela padrão")
    assert (t["currency"], t["rate_count"], t["dealer_id"]) == ("BRL", 0, api.dealer_id)
    counts = api.ok(await upload(api, t["id"], "\ufeff" + BRAZIL))
    assert counts == {"mode": "replace", "rows": 3, "inserted": 3, "updated": 0, "deleted": 0,
                      "rate_count": 3}
    assert api.ok(await api.get(f"/api/v1/rate-tables/{t['id']}"))["rate_count"] == 3
    async with db.acquire() as conn:
        assert (await find_rate(conn, t["id"], "+5511998765432")).prefix == "551199"
        assert (await find_rate(conn, t["id"], "+5511987654321")).prefix == "5511"
        assert (await find_rate(conn, t["id"], "+552133334444")).prefix == "55"
        assert await find_rate(conn, t["id"], "+12125551234") is None
    mobile = api.ok(await quote(api, t["id"], "998765432", seconds=31))
    assert mobile["classification"]["call_class"] == "mobile_vc1"
    assert mobile["rate"]["prefix"] == "551199"
    assert mobile["rate"]["price_per_minute"] == "0.350000"
    # 36 s at 0.35 a minute plus 0.01: 0.22
    assert (mobile["billable_seconds"], mobile["price"]) == (36, "0.2200")
    assert mobile["permission"] == "allow_vc1" and mobile["currency"] == "BRL"
    fixed = api.ok(await quote(api, t["id"], "32345678", seconds=2))
    assert (fixed["rate"]["prefix"], fixed["price"]) == ("5511", "0.0000")
    national = api.ok(await quote(api, t["id"], "0212133334444", seconds=60))
    assert national["rate"]["prefix"] == "55" and national["price"] == "0.2000"
    assert national["classification"]["carrier"] == "21"


async def test_a_bad_csv_reports_every_bad_line_and_writes_nothing(api, db):
    t = await rate_table(api)
    api.ok(await upload(api, t["id"], BRAZIL))
    audit_before = await api.count("audit_log")
    bad = (HEADER + "56;ok;0,10;0;30;6;3\n"
           + "57;preço;x;0;30;6;3\n"
           + "58;a ${X} [b];0,1;0;30;6;3\n"
           + "0;zero;0,1;0;30;0;3\n"
           + "56;again;0,1;0;30;6;3\n")
    reply = await upload(api, t["id"], bad)
    assert reply.status == 422, reply
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert [e["pointer"] for e in reply.body["errors"]] == [
        "#/line/3/price_per_minute", "#/line/4/description", "#/line/5/prefix",
        "#/line/5/next_increment", "#/line/6/prefix"]
    assert "5 errors" in reply.body["detail"]
    rates = api.ok(await api.get(f"/api/v1/rate-tables/{t['id']}/rates"))["items"]
    assert sorted(r["prefix"] for r in rates) == ["55", "5511", "551199"]
    assert await api.count("audit_log") == audit_before
    assert api.ok(await api.get(f"/api/v1/rate-tables/{t['id']}"))["rate_count"] == 3


async def test_replace_and_merge(api):
    t = await rate_table(api)
    api.ok(await upload(api, t["id"], BRAZIL))
    merged = api.ok(await upload(api, t["id"], HEADER + "5511;SP novo;0,07;0;60;60;0\n"
                                 "351;Portugal;0,90;0;30;6;3\n", mode="merge"))
    assert merged == {"mode": "merge", "rows": 2, "inserted": 1, "updated": 1, "deleted": 0,
                      "rate_count": 4}
    rates = {r["prefix"]: r for r in api.ok(await api.get(
        f"/api/v1/rate-tables/{t['id']}/rates"))["items"]}
    assert set(rates) == {"55", "5511", "551199", "351"}
    assert (rates["5511"]["description"], rates["5511"]["price_per_minute"],
            rates["5511"]["first_increment"]) == ("SP novo", "0.070000", 60)
    replaced = api.ok(await upload(api, t["id"], HEADER + "1;NANP;0,15;0;60;6;0\n",
                                   mode="replace"))
    assert replaced == {"mode": "replace", "rows": 1, "inserted": 1, "updated": 0,
                        "deleted": 4, "rate_count": 1}
    rates = api.ok(await api.get(f"/api/v1/rate-tables/{t['id']}/rates"))["items"]
    assert [r["prefix"] for r in rates] == ["1"]
    audit = api.ok(await api.get(f"/api/v1/audit?entity=rate_table&entity_id={t['id']}"))
    imports = [a for a in audit["items"] if a["action"] == "import"]
    assert [a["after"]["mode"] for a in imports] == ["replace", "merge", "replace"]
    assert imports[-1]["before"] == {"rate_count": 4}
    assert len(imports[-1]["after"]["sha256"]) == 64


async def test_class_restricted_rates_price_vc2_and_vc3_of_one_prefix(api):
    t = await rate_table(api)
    api.ok(await upload(api, t["id"], HEADER.replace("\n", ";call_class\n")
                        + "55;fixo;0,10;0;30;6;3;\n"
                        + "55;VC2;0,50;0;30;6;3;mobile_vc2\n"
                        + "55;VC3;0,80;0;30;6;3;mobile_vc3\n"))
    vc2 = api.ok(await quote(api, t["id"], "01519987654321"))
    vc3 = api.ok(await quote(api, t["id"], "02121987654321"))
    ldn = api.ok(await quote(api, t["id"], "0152133334444"))
    vc1 = api.ok(await quote(api, t["id"], "987654321"))
    assert [q["price"] for q in (vc2, vc3, ldn, vc1)] == ["0.5000", "0.8000", "0.1000",
                                                          "0.1000"]
    listed = api.ok(await api.get(f"/api/v1/rate-tables/{t['id']}/rates?call_class=mobile_vc3"))
    assert [r["description"] for r in listed["items"]] == ["VC3"]


async def test_quote_edge_cases(api):
    t = await rate_table(api)
    api.ok(await upload(api, t["id"], BRAZIL))
    sos = api.ok(await quote(api, t["id"], "190"))
    assert (sos["classification"]["call_class"], sos["price"], sos["rate"]) == (
        "emergency", "0.0000", None)
    invalid = api.ok(await quote(api, t["id"], "0212033334444"))
    assert invalid["classification"]["call_class"] == "invalid"
    assert invalid["classification"]["reason"] and invalid["price"] is None
    abroad = api.ok(await quote(api, t["id"], "+12125551234"))
    assert abroad["rate"] is None and abroad["classification"]["needs_carrier"] is True
    base = f"/api/v1/rate-tables/{t['id']}/quote"
    for query, pointer in (("number=32345678", "#/query/caller_area"),
                           ("caller_area=11", "#/query/number"),
                           ("number=1&caller_area=20", "#/query/caller_area"),
                           ("number=1&caller_area=11&seconds=-1", "#/query/seconds"),
                           ("number=1&caller_area=11&x=1", "#/query/x"),
                           ("number=%0A&caller_area=11", "#/query/number")):
        reply = await api.get(f"{base}?{query}")
        assert reply.status == 422, (query, reply)
        assert reply.body["errors"][0]["pointer"] == pointer
    foreign = api.ok(await api.get(f"{base}?number=%2B351912345678&country=351"))
    assert foreign["classification"]["call_class"] == "national"


async def test_listing_rates_by_prefix_and_page(api):
    t = await rate_table(api)
    api.ok(await upload(api, t["id"], HEADER + "".join(
        f"55{n};r{n};0,1;0;30;6;3\n" for n in range(11, 30))))
    base = f"/api/v1/rate-tables/{t['id']}/rates"
    first = api.ok(await api.get(f"{base}?prefix=551&limit=5"))
    assert [r["prefix"] for r in first["items"]] == ["5511", "5512", "5513", "5514", "5515"]
    rest = api.ok(await api.get(f"{base}?prefix=551&limit=5&after={first['next_after']}"))
    assert [r["prefix"] for r in rest["items"]] == ["5516", "5517", "5518", "5519"]
    assert rest["next_after"] is None
    assert (await api.get(f"{base}?prefix=55x")).status == 422
    assert (await api.get(f"{base}?limit=0")).status == 422


async def test_import_refuses_other_media_types_sizes_and_modes(api, monkeypatch):
    t = await rate_table(api)
    path = f"/api/v1/rate-tables/{t['id']}/import"
    assert (await api.call("POST", path, raw=b"{}", content_type="application/json")
            ).status == 415
    assert (await upload(api, t["id"], BRAZIL, content_type="text/csv; charset=latin-1")
            ).status == 415
    assert (await upload(api, t["id"], BRAZIL, mode="append")).status == 422
    assert api.ok(await upload(api, t["id"], BRAZIL, content_type="text/plain"))["rows"] == 3
    monkeypatch.setattr(csv_import, "MAX_BYTES", 100)
    big = await upload(api, t["id"], BRAZIL + "56;x;0,1;0;30;6;3\n" * 10)
    assert big.status == 413 and big.body["status"] == 413
    assert api.ok(await api.get(f"/api/v1/rate-tables/{t['id']}"))["rate_count"] == 3


async def test_scoping_siblings_and_ancestors(api):
    dist = await api.dealer("distributor")
    sub = await api.dealer("sub_distributor", dist["id"])
    r1 = await api.dealer("reseller", sub["id"])
    r2 = await api.dealer("reseller", sub["id"])
    offered = await rate_table(api, dealer_id=dist["id"])
    api.ok(await upload(api, offered["id"], BRAZIL))
    sibling = await rate_table(api, dealer_id=r2["id"])
    as_r1 = await api.as_dealer(r1)
    # a sibling's table does not exist for R1
    for path in ("", "/rates", "/quote?number=190&caller_area=11"):
        assert (await as_r1.get(f"/api/v1/rate-tables/{sibling['id']}{path}")).status == 404
    assert (await as_r1.patch(f"/api/v1/rate-tables/{sibling['id']}", {"name": "x"})
            ).status == 404
    assert (await upload(as_r1, sibling["id"], BRAZIL)).status == 404
    # an ancestor's table is offered read-only
    assert as_r1.ok(await as_r1.get(f"/api/v1/rate-tables/{offered['id']}"))["rate_count"] == 3
    assert len(as_r1.ok(await as_r1.get(
        f"/api/v1/rate-tables/{offered['id']}/rates"))["items"]) == 3
    assert as_r1.ok(await quote(as_r1, offered["id"], "32345678"))["price"] == "0.0500"
    assert (await as_r1.patch(f"/api/v1/rate-tables/{offered['id']}", {"name": "x"})
            ).status == 403
    assert (await as_r1.delete(f"/api/v1/rate-tables/{offered['id']}")).status == 403
    assert (await upload(as_r1, offered["id"], BRAZIL)).status == 403
    listed = as_r1.ok(await as_r1.get("/api/v1/rate-tables"))["items"]
    assert {x["id"] for x in listed} == {offered["id"]}
    own = await rate_table(as_r1)
    assert own["dealer_id"] == r1["id"]
    assert (await as_r1.post("/api/v1/rate-tables", {"name": "x", "dealer_id": r2["id"]})
            ).status == 422


async def test_a_dealer_names_each_of_its_rate_tables_once(api):
    dist = await api.dealer("distributor")
    api.ok(await api.post("/api/v1/rate-tables", {"name": "Padrão"}), 201)
    again = await api.post("/api/v1/rate-tables", {"name": "Padrão"})
    assert again.status == 409, again
    assert again.body["errors"][0]["pointer"] == "#/name"
    # another dealer may use the name
    api.ok(await api.post("/api/v1/rate-tables", {"name": "Padrão", "dealer_id": dist["id"]}),
           201)


async def test_plans_take_only_rate_tables_offered_to_their_owner(api):
    dist = await api.dealer("distributor")
    sub = await api.dealer("sub_distributor", dist["id"])
    other = await api.dealer("distributor")
    above = await rate_table(api, dealer_id=dist["id"])
    below = await rate_table(api, dealer_id=sub["id"])
    foreign = await rate_table(api, dealer_id=other["id"])
    plan = api.ok(await api.post("/api/v1/plans", {
        "name": "SP", "dealer_id": sub["id"], "rate_table_id": above["id"]}), 201)
    assert plan["rate_table_id"] == above["id"]
    for table_id in (foreign["id"], 10**12):
        reply = await api.post("/api/v1/plans", {"name": "X", "dealer_id": sub["id"],
                                                 "rate_table_id": table_id})
        assert reply.status == 422, reply
        assert reply.body["errors"][0]["pointer"] == "#/rate_table_id"
    # a child's table is not offered to its parent
    reply = await api.post("/api/v1/plans", {"name": "Y", "dealer_id": dist["id"],
                                             "rate_table_id": below["id"]})
    assert reply.status == 422
    assert (await api.patch(f"/api/v1/plans/{plan['id']}", {"rate_table_id": foreign["id"]})
            ).status == 422
    changed = api.ok(await api.patch(f"/api/v1/plans/{plan['id']}",
                                     {"rate_table_id": below["id"]}))
    assert changed["rate_table_id"] == below["id"]
    as_sub = await api.as_dealer(sub)
    assert (await as_sub.patch(f"/api/v1/plans/{plan['id']}", {"rate_table_id": None})
            ).status == 200
    api.ok(await api.patch(f"/api/v1/plans/{plan['id']}", {"rate_table_id": above["id"]}))
    in_use = await api.delete(f"/api/v1/rate-tables/{above['id']}")
    assert in_use.status == 409
    api.ok(await api.patch(f"/api/v1/plans/{plan['id']}", {"rate_table_id": None}))
    assert (await api.delete(f"/api/v1/rate-tables/{above['id']}")).status == 204


async def test_deleting_a_table_deletes_its_rates(api):
    t = await rate_table(api)
    api.ok(await upload(api, t["id"], BRAZIL))
    assert (await api.delete(f"/api/v1/rate-tables/{t['id']}")).status == 204
    assert await api.count("rates") == 0


async def test_lookup_stays_on_the_index_with_100000_rates(api, db):
    t = await rate_table(api)
    lines = [HEADER] + [f"{5510000000 + n * 7};r;0,{n % 90 + 10};0;30;6;3\n"
                        for n in range(100_000)]
    started = time.monotonic()
    counts = api.ok(await upload(api, t["id"], "".join(lines)))
    assert counts["rate_count"] == 100_000
    assert time.monotonic() - started < 30
    async with db.acquire() as conn:
        started = time.monotonic()
        for n in range(0, 100_000, 1000):
            number = f"+{5510000000 + n * 7}4321"
            rate = await find_rate(conn, t["id"], number)
            assert rate is not None and rate.prefix == number[1:11]
        assert (time.monotonic() - started) / 100 < 0.01
        plan = "\n".join(r[0] for r in await conn.fetch(
            f"EXPLAIN (ANALYZE, BUFFERS) {FIND_SQL}", t["id"],
            prefixes_of("+5510000000004321"), "mobile_vc1"))
        # an index scan or a bitmap index scan, as statistics make the planner choose
        assert "rates_prefix_key" in plan and "Seq Scan" not in plan, plan
        assert Decimal((await find_rate(conn, t["id"], "+5510000000")).price_per_minute) \
            == Decimal("0.10")


async def test_a_service_code_takes_a_rate_of_exactly_its_code_or_the_countrys(api):
    t = await rate_table(api)
    api.ok(await upload(api, t["id"], (
        "prefix;description;price_per_minute;connection_fee;first_increment;next_increment;"
        "free_seconds;call_class\n"
        "55;Brasil;0,10;0;30;6;3;\n"
        "55;Servicos;0,50;0;60;60;0;special\n"
        "5511;Sao Paulo fixo;0,05;0;30;6;3;\n"
        "5515;Sorocaba fixo;0,06;0;30;6;3;\n"
        "55102;Auxilio a lista;1,00;0;60;60;0;special\n")))
    directory = api.ok(await quote(api, t["id"], "102"))
    assert directory["classification"]["rated_as"] == "+55102"
    assert directory["rate"]["prefix"] == "55102" and directory["price"] == "1.0000"
    # +55156 would match Sorocaba's 5515, +55115 Sao Paulo's 5511: the country's instead
    for code in ("156", "115", "10315"):
        shown = api.ok(await quote(api, t["id"], code))
        assert shown["classification"]["call_class"] == "special", code
        assert (shown["rate"]["prefix"], shown["rate"]["call_class"]) == ("55", "special"), code
    # an E.164 number still takes its longest prefix
    assert api.ok(await quote(api, t["id"], "1532345678"))["rate"]["prefix"] == "5515"
    # a collect call costs its caller nothing: no rate
    collect = api.ok(await quote(api, t["id"], "9015 15 32345678"))
    assert (collect["classification"]["rated_as"], collect["rate"]) == (None, None)
