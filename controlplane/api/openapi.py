"""OpenAPI 3.1 built from the route table, and the interactive docs page served offline."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

from aiohttp import web

from controlplane.api.keys import OPENAPI
from controlplane.api.routes import Operation, RouteTable

PROBLEM = {
    "type": "object",
    "properties": {
        "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object", "properties": {
            "pointer": {"type": "string"}, "detail": {"type": "string"}}}},
    },
}


def _operation(op: Operation, schemas: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": op.summary, "tags": [op.tag],
                           "operationId": _operation_id(op)}
    if op.description:
        out["description"] = op.description
    params = [{"name": n, "in": "path", "required": True,
               "schema": {"type": "integer" if n == "id" else "string"}}
              for n in re.findall(r"{(\w+)}", op.path)]
    params += [{"name": q.name, "in": "query", "required": False, "schema": q.schema,
                **({"description": q.description} if q.description else {})} for q in op.query]
    if params:
        out["parameters"] = params
    if op.body is not None:
        name = op.body.name
        schemas[name] = op.body.openapi(partial=op.partial)
        out["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}
    elif op.raw_body:
        schema = op.body_schema or {"type": "string", "format": "binary"}
        out["requestBody"] = {"required": True,
                              "content": {t: {"schema": schema} for t in op.raw_body}}
    responses: dict[str, Any] = {}
    if op.status == 204:
        responses["204"] = {"description": "done"}
    else:
        content = {t: {"schema": op.response or {"type": "string", "format": "binary"}}
                   if t != "application/json" else {"schema": op.response or {"type": "object"}}
                   for t in op.response_types}
        responses[str(op.status)] = {"description": "success", "content": content}
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/problem"}}}
    codes = ["400", "422"] if op.method in ("POST", "PATCH", "PUT") else []
    codes += ["404"] if "{" in op.path else []
    codes += ["409"] if op.method in ("POST", "PATCH", "DELETE", "PUT") else []
    if not op.public:
        codes += ["401", "403"]
    for code in codes:
        responses[code] = {"description": "problem", "content": problem}
    out["responses"] = responses
    if op.public:
        out["security"] = []
    return out


def _operation_id(op: Operation) -> str:
    words = re.sub(r"[{}]", "", op.path).strip("/").replace("-", "_").split("/")
    return op.method.lower() + "_" + "_".join(w for w in words if w not in ("api", "v1"))


def build_spec(routes: RouteTable, resource_schemas: dict[str, Any]) -> dict[str, Any]:
    schemas: dict[str, Any] = {"problem": PROBLEM, **resource_schemas}
    paths: dict[str, Any] = {}
    for op in routes.operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Cloud PBX control plane API",
            "version": "1",
            "description": "Dealers, tenants, extensions, numbering and plans of a white-label "
                           "multi-tenant PBX platform. Obtain a token at /oauth/token with the "
                           "password grant, then send it as `Authorization: Bearer <token>`.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"oauth2": {"type": "oauth2", "flows": {"password": {
                "tokenUrl": "/oauth/token", "refreshUrl": "/oauth/token", "scopes": {}}}}},
        },
        "security": [{"oauth2": []}],
    }


def _swagger_dir() -> Any:
    return resources.files("aiohttp_swagger3") / "swagger_ui"


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>API documentation</title>
<link rel="stylesheet" href="/api/documentation/static/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="/api/documentation/static/swagger-ui-bundle.js"></script>
<script src="/api/documentation/static/swagger-ui-standalone-preset.js"></script>
<script src="/api/documentation/init.js"></script>
</body></html>"""

DOCS_INIT = """window.ui = SwaggerUIBundle({url: "/api/openapi.json", dom_id: "#ui",
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
  layout: "StandaloneLayout", persistAuthorization: true});"""

STATIC_TYPES = {".css": "text/css", ".js": "application/javascript", ".png": "image/png"}


async def docs_page(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_PAGE, content_type="text/html")


async def docs_init(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_INIT, content_type="application/javascript")


async def docs_static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    suffix = name[name.rfind("."):] if "." in name else ""
    if "/" in name or name.startswith(".") or suffix not in STATIC_TYPES:
        raise web.HTTPNotFound()
    item = _swagger_dir() / name
    if not item.is_file():
        raise web.HTTPNotFound()
    return web.Response(body=item.read_bytes(), content_type=STATIC_TYPES[suffix],
                        headers={"Cache-Control": "max-age=86400"})


async def spec(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


def register(routes: RouteTable) -> None:
    routes.add("GET", "/api/openapi.json", spec, "This OpenAPI document", "meta", public=True)
    routes.add("GET", "/api/documentation", docs_page, "Interactive API documentation", "meta",
               public=True, response_types=("text/html",))
    routes.add("GET", "/api/documentation/init.js", docs_init, "Documentation page script",
               "meta", public=True, response_types=("application/javascript",))
    routes.add("GET", "/api/documentation/static/{name}", docs_static,
               "Documentation page assets", "meta", public=True,
               response_types=("text/css", "application/javascript"))
