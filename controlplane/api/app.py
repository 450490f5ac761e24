"""The aiohttp application: routes, middlewares, and what it needs at start and stop."""

from __future__ import annotations

import logging
import uuid
from typing import Any, cast

import asyncpg
from aiohttp import web

from controlplane.api import oauth, openapi
from controlplane.api.keys import OPENAPI, POOL, ROUTES, SETTINGS
from controlplane.api.oauth import Handler
from controlplane.api.problems import ApiError, from_database
from controlplane.api.resource import Resource
from controlplane.api.resources import (
    audit,
    calls,
    carriers,
    cdrs,
    credit,
    dealers,
    extensions,
    nodes,
    numbering,
    plans,
    rates,
    registrations,
    tenants,
)
from controlplane.api.routes import RouteTable
from controlplane.db.pool import DatabaseUnavailable
from controlplane.settings import Settings

log = logging.getLogger(__name__)

RESOURCES: tuple[Resource, ...] = (
    dealers.DEALERS, tenants.TENANTS, extensions.EXTENSIONS, plans.PLANS, numbering.RANGES,
    numbering.DIDS, nodes.NODES, audit.AUDIT, rates.RATE_TABLES, carriers.CARRIERS,
)
MAX_BODY = 1024 * 1024


class WaitBoundedPool:
    """The pool as requests use it: one waits at most `timeout` seconds for a connection
    (then 503 with Retry-After) rather than for ever behind others holding them all."""

    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self._pool, self._timeout = pool, timeout

    def acquire(self, *, timeout: float | None = None) -> Any:
        return self._pool.acquire(timeout=self._timeout if timeout is None else timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as problem+json; a database refusal is named, never a 500."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return ApiError(exc.status, exc.reason, kind=exc.reason.lower().replace(" ", "-"),
                        headers={k: v for k, v in exc.headers.items()
                                 if k in ("Allow",)}).response()
    except asyncpg.PostgresError as exc:
        mapped = from_database(exc)
        if mapped is not None:
            return mapped.response()
        incident = uuid.uuid4().hex[:12]
        log.exception("database error (incident %s) on %s %s", incident, request.method,
                      request.path)
        return ApiError(500, "Internal error", f"incident {incident}", kind="internal").response()
    except (DatabaseUnavailable, OSError, TimeoutError, asyncpg.InterfaceError) as exc:
        log.warning("database unavailable on %s %s: %s", request.method, request.path, exc)
        return ApiError(503, "Service unavailable",
                        "the database is unreachable or busy; retry later",
                        kind="unavailable", headers={"Retry-After": "5"}).response()
    except Exception:
        incident = uuid.uuid4().hex[:12]
        log.exception("unexpected error (incident %s) on %s %s", incident, request.method,
                      request.path)
        return ApiError(500, "Internal error", f"incident {incident}", kind="internal").response()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        async with request.app[POOL].acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1", timeout=2)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        # anyone may ask: the error (host names, user names) goes to the log only
        log.warning("readiness: the database does not answer: %s",
                    str(exc)[:200] or type(exc).__name__)
        return web.json_response({"status": "unavailable", "database": "unavailable"},
                                 status=503)
    return web.json_response({"status": "ok", "database": "ok"})


def resource_schema(res: Resource) -> dict[str, Any]:
    props: dict[str, Any] = {"id": {"type": "integer"}}
    if res.create_schema is not None:
        props.update({k: f.openapi() for k, f in res.create_schema.fields.items()
                      if not f.write_only})
    props["created_at"] = {"type": "string", "format": "date-time"}
    return {"type": "object", "properties": props}


def build_routes() -> RouteTable:
    routes = RouteTable()
    routes.add("GET", "/healthz", healthz, "Process is up", "meta", public=True)
    routes.add("GET", "/readyz", readyz, "Database is reachable", "meta", public=True)
    oauth.register(routes)
    openapi.register(routes)
    for module in (dealers, tenants, extensions, plans, numbering, nodes, audit, registrations,
                   rates, carriers, calls, cdrs, credit):
        module.register(routes)
    return routes


def build_app(settings: Settings, pool: asyncpg.Pool) -> web.Application:
    app = web.Application(middlewares=[problem_middleware, oauth.bearer_middleware],
                          client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    oauth.install(app)
    app[POOL] = cast(asyncpg.Pool, WaitBoundedPool(pool, settings.db_timeout))
    routes = build_routes()
    routes.register(app)
    app[ROUTES] = routes
    app[OPENAPI] = openapi.build_spec(routes, {r.entity: resource_schema(r) for r in RESOURCES})
    return app
