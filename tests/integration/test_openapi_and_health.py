"""The OpenAPI document matches the real routes; the docs page works offline; health checks."""

import json
import re

from controlplane.api.app import build_routes


async def test_openapi_lists_exactly_the_routes_the_server_answers(api, client):
    spec = api.ok(await api.get("/api/openapi.json", token=""))
    assert spec["openapi"] == "3.1.0"
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    served = set()
    for route in client.server.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD" and path:
            served.add((route.method, path))
    assert documented == served


async def test_every_documented_body_schema_refuses_unknown_fields(api):
    spec = api.ok(await api.get("/api/openapi.json", token=""))
    bodies = [s for name, s in spec["components"]["schemas"].items()
              if name.endswith(("_create", "_update"))]
    assert len(bodies) >= 14
    assert all(s["additionalProperties"] is False for s in bodies)


async def test_documented_path_parameters_exist_in_the_path(api):
    spec = api.ok(await api.get("/api/openapi.json", token=""))
    for path, ops in spec["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        for op in ops.values():
            params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert params == names, path


async def test_documentation_page_and_assets_are_served_locally(api):
    page = await api.get("/api/documentation", token="")
    assert page.status == 200
    assets = re.findall(r'(?:src|href)="(/[^"]+)"', page.body.decode())
    assert len(assets) == 4
    for asset in assets:
        reply = await api.get(asset, token="")
        assert reply.status == 200, asset
        assert len(reply.body) > 100 if isinstance(reply.body, bytes) else True
    assert "http" not in page.body.decode().replace("http-equiv", "")
    assert (await api.get("/api/documentation/static/..%2fsecrets.py", token="")).status == 404


async def test_health_and_readiness(api):
    assert api.ok(await api.get("/healthz", token=""))["status"] == "ok"
    assert api.ok(await api.get("/readyz", token=""))["database"] == "ok"


async def test_unknown_route_and_method_answer_problem_json(api):
    missing = await api.get("/api/v1/nothing")
    assert missing.status == 404 and missing.body["status"] == 404
    wrong = await api.call("PUT", "/api/v1/tenants")
    assert wrong.status == 405


async def test_route_table_operation_ids_are_unique():
    ops = build_routes().operations
    keys = [(o.method, o.path) for o in ops]
    assert len(keys) == len(set(keys))


async def test_readiness_says_unavailable_without_the_database_error(caplog):
    """Anyone may ask /readyz: the error's text (hosts, users) goes to the log only."""
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from controlplane.api.app import readyz
    from controlplane.api.keys import POOL

    class Down:
        def acquire(self, timeout: float):
            raise OSError("could not connect to db-7.internal as user pbx_admin")

    app = web.Application()
    app[POOL] = Down()
    reply = await readyz(make_mocked_request("GET", "/readyz", app=app))
    assert reply.status == 503
    assert json.loads(reply.body) == {"status": "unavailable", "database": "unavailable"}
    assert "db-7.internal" in caplog.text
