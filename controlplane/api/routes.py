"""Routes with their OpenAPI description declared beside them, so the spec cannot drift."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from controlplane.api.fields import Schema

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class QueryParam:
    name: str
    schema: dict[str, Any]
    description: str = ""


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    body: Schema | None = None
    partial: bool = False
    raw_body: tuple[str, ...] = ()
    body_schema: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    status: int = 200
    query: tuple[QueryParam, ...] = ()
    public: bool = False
    description: str = ""
    response_types: tuple[str, ...] = ("application/json",)


@dataclass
class RouteTable:
    """The API's operations; registered on the aiohttp router and rendered to OpenAPI."""

    operations: list[Operation] = field(default_factory=list)

    def add(self, method: str, path: str, handler: Handler, summary: str, tag: str,
            **extra: Any) -> None:
        self.operations.append(Operation(method.upper(), path, handler, summary, tag, **extra))

    def register(self, app: web.Application) -> None:
        for op in self.operations:
            app.router.add_route(op.method, op.path, op.handler)
