"""List pages, built as JSON by PostgreSQL, show every object exactly as reading it alone
does: the same keys (hidden ones never), the same values, and key-ordered paging."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import pytest

from controlplane.api.app import RESOURCES
from tests.api_helper import Api

NODE = {"name": "node-1", "sip_address": "198.51.100.10", "ami_host": "10.0.0.10",
        "ami_username": "admin", "ami_secret": "ami-secret-123456",
        "ari_url": "http://10.0.0.10:8088", "ari_username": "ari",
        "ari_password": "ari-password-123456"}
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT[0-9:.]+[+-]\d\d:\d\d")


def normalised(value: Any) -> Any:
    """Timestamps as instants: PostgreSQL's JSON drops trailing zeros of the fraction of a
    second that Python's isoformat keeps."""
    if isinstance(value, str) and TIMESTAMP.fullmatch(value):
        return datetime.fromisoformat(value)
    if isinstance(value, dict):
        return {k: normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalised(v) for v in value]
    return value


async def populate(api: Api) -> None:
    api.ok(await api.post("/api/v1/nodes", NODE), 201)
    dist = await api.dealer("distributor", max_extensions=100, brand_name="Brand")
    plan = api.ok(await api.post("/api/v1/plans", {"dealer_id": dist["id"], "name": "P"}), 201)
    for _ in range(2):
        t = await api.tenant(dist["id"], notes="line one\nline \"two\"")
        for n in range(3):
            await api.extension(t["id"], f"{200 + n}", plan_id=plan["id"], credit_limit="12.5",
                                callerid_number="+5511999990000")
    rng = api.ok(await api.post("/api/v1/number-ranges", {
        "dealer_id": dist["id"], "name": "Range", "country_code": "55", "area_code": "11",
        "first_number": 1000, "last_number": 1999}), 201)
    api.ok(await api.post("/api/v1/dids", {"range_id": rng["id"], "local_number": 1000,
                                           "monthly_value": "2.50"}), 201)


@pytest.mark.parametrize("resource", [r.name for r in RESOURCES])
async def test_every_listed_object_reads_back_the_same_alone(api: Api, resource: str) -> None:
    await populate(api)
    res = next(r for r in RESOURCES if r.name == resource)
    page = api.ok(await api.get(f"/api/v1/{resource}?limit=500"))
    assert page["next_after"] is None
    assert [item["id"] for item in page["items"]] == sorted(i["id"] for i in page["items"])
    for item in page["items"]:
        alone = api.ok(await api.get(f"/api/v1/{resource}/{item['id']}"))
        assert list(item) == list(alone), (resource, list(item), list(alone))
        assert normalised(item) == normalised(alone), (resource, item, alone)
        assert not set(item) & (res.hidden | {"owner_path"})


@pytest.mark.parametrize("limit", [1, 2, 5, 7])
async def test_pages_follow_each_other_by_next_after(api: Api, limit: int) -> None:
    await populate(api)
    everything = api.ok(await api.get("/api/v1/extensions?limit=500"))["items"]
    assert len(everything) == 6
    seen: list[int] = []
    after = None
    while True:
        query = f"?limit={limit}" + (f"&after={after}" if after is not None else "")
        page = api.ok(await api.get("/api/v1/extensions" + query))
        seen += [item["id"] for item in page["items"]]
        assert len(page["items"]) <= limit
        after = page["next_after"]
        if after is None:
            break
        assert after == page["items"][-1]["id"]
    assert seen == [item["id"] for item in everything]
    empty = api.ok(await api.get(f"/api/v1/extensions?after={seen[-1]}"))
    assert empty == {"items": [], "next_after": None}
