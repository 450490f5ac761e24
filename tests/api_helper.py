"""A thin client for the tests: tokens, JSON calls, and builders for the dealer tree."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient

_seq = itertools.count(1)


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body!r})"


@dataclass
class Api:
    client: TestClient
    pool: asyncpg.Pool
    token: str = ""
    refresh: str = ""
    dealer_id: int = 0
    client_id: str = ""
    client_secret: str = ""
    extra_headers: dict[str, str] = field(default_factory=dict)

    async def call(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                   headers: dict[str, str] | None = None, raw: bytes | None = None,
                   content_type: str = "application/json") -> Reply:
        h = {**self.extra_headers, **(headers or {})}
        tok = self.token if token is None else token
        if tok:
            h["Authorization"] = f"Bearer {tok}"
        kwargs: dict[str, Any] = {"headers": h}
        if raw is not None:
            kwargs["data"] = raw
            h["Content-Type"] = content_type
        elif body is not None:
            kwargs["json"] = body
        async with self.client.request(method, path, **kwargs) as resp:
            text = await resp.read()
            try:
                parsed: Any = await resp.json(content_type=None) if text else None
            except ValueError:
                parsed = text
            return Reply(resp.status, parsed, resp.headers)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.call("GET", path, **kw)

    async def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.call("POST", path, body, **kw)

    async def patch(self, path: str, body: Any, **kw: Any) -> Reply:
        return await self.call("PATCH", path, body, **kw)

    async def delete(self, path: str, **kw: Any) -> Reply:
        return await self.call("DELETE", path, **kw)

    async def grant(self, username: str, password: str, client_id: str, client_secret: str,
                    **extra: str) -> Reply:
        body = {"grant_type": "password", "client_id": client_id,
                "client_secret": client_secret, "username": username, "password": password,
                "scope": "", **extra}
        return await self.call("POST", "/oauth/token", body, token="")

    async def login(self, username: str, password: str, client_id: str,
                    client_secret: str) -> None:
        reply = await self.grant(username, password, client_id, client_secret)
        assert reply.status == 200, reply
        self.token, self.refresh = reply.body["access_token"], reply.body["refresh_token"]
        self.client_id, self.client_secret = client_id, client_secret
        me = await self.get("/api/v1/dealers?limit=1")
        assert me.status == 200, me
        self.dealer_id = me.body["items"][0]["id"]

    def ok(self, reply: Reply, status: int = 200) -> Any:
        assert reply.status == status, reply
        return reply.body

    # -- builders ------------------------------------------------------------------------
    async def dealer(self, level: str, parent_id: int | None = None, **fields: Any) -> dict:
        n = next(_seq)
        body = {"level": level, "name": f"{level} {n}", "login": f"{level}-{n}",
                "password": "correct-horse-battery", **fields}
        if parent_id is not None:
            body["parent_id"] = parent_id
        return self.ok(await self.post("/api/v1/dealers", body), 201)

    async def as_dealer(self, dealer: dict, cidrs: list[str] | None = None) -> Api:
        """A new Api logged in as `dealer` (which must have password correct-horse-battery)."""
        creds = self.ok(await self.post(f"/api/v1/dealers/{dealer['id']}/api-clients", {
            "name": "tests", "allowed_cidrs": cidrs or ["127.0.0.0/8"]}), 201)
        other = Api(self.client, self.pool)
        await other.login(dealer["login"], "correct-horse-battery", creds["client_id"],
                          creds["client_secret"])
        return other

    async def tenant(self, dealer_id: int | None = None, **fields: Any) -> dict:
        body = {"name": f"Tenant {next(_seq)}", **fields}
        if dealer_id is not None:
            body["dealer_id"] = dealer_id
        return self.ok(await self.post("/api/v1/tenants", body), 201)

    async def extension(self, tenant_id: int, number: str | None = None, **fields: Any) -> dict:
        body = {"tenant_id": tenant_id, "number": number or f"{1000 + next(_seq)}", **fields}
        return self.ok(await self.post("/api/v1/extensions", body), 201)

    async def count(self, table: str) -> int:
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
