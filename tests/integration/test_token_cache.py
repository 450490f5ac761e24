"""The bearer check reuses resolved tokens for a few seconds, and revocation still ends a
token at once: through this process's API, through another process, or in plain SQL."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp.test_utils import TestClient

from controlplane.api.oauth import PRINCIPALS, PrincipalCache
from controlplane.model.principal import Principal
from controlplane.secrets import digest
from tests.api_helper import Api


async def cache_of(client: TestClient) -> PrincipalCache:
    cache = client.server.app[PRINCIPALS]
    deadline = time.monotonic() + 5
    while not cache.listening:  # the LISTEN connection comes up with the application
        assert time.monotonic() < deadline, "the token cache never started listening"
        await asyncio.sleep(0.01)
    return cache


async def cached_reseller(api: Api, client: TestClient) -> tuple[dict, dict, Api]:
    """A reseller logged in, its token used once so that it is in the cache."""
    dealer = await api.dealer("reseller")
    cache = await cache_of(client)
    creds = api.ok(await api.post(f"/api/v1/dealers/{dealer['id']}/api-clients", {
        "name": "cached", "allowed_cidrs": ["127.0.0.0/8"]}), 201)
    reseller = Api(api.client, api.pool)
    await reseller.login(dealer["login"], "correct-horse-battery", creds["client_id"],
                         creds["client_secret"])
    assert (await reseller.get("/api/v1/tenants")).status == 200
    assert (digest(reseller.token), "127.0.0.1") in cache.entries
    return dealer, creds, reseller


async def refused_within(api: Api, seconds: float, status: int = 401) -> float:
    """Poll until the token is refused; how long it took."""
    t0 = time.monotonic()
    while True:
        reply = await api.get("/api/v1/tenants")
        if reply.status == status:
            return time.monotonic() - t0
        assert reply.status == 200, reply
        assert time.monotonic() - t0 < seconds, f"still accepted after {seconds}s"
        await asyncio.sleep(0.005)


async def test_revoking_a_cached_token_refuses_it_at_once(api: Api, client: TestClient) -> None:
    _, creds, reseller = await cached_reseller(api, client)
    reply = await api.call("POST", "/oauth/revoke", {
        "client_id": creds["client_id"], "client_secret": creds["client_secret"],
        "token": reseller.token}, token="")
    assert reply.status == 200
    assert (await reseller.get("/api/v1/tenants")).status == 401


async def test_revoking_the_api_client_refuses_its_cached_token_at_once(
        api: Api, client: TestClient) -> None:
    dealer, creds, reseller = await cached_reseller(api, client)
    assert (await api.delete(f"/api/v1/dealers/{dealer['id']}/api-clients/"
                             f"{creds['client_id']}")).status == 204
    assert (await reseller.get("/api/v1/tenants")).status == 401


async def test_password_change_refuses_a_cached_token_at_once(
        api: Api, client: TestClient) -> None:
    dealer, _, reseller = await cached_reseller(api, client)
    api.ok(await api.patch(f"/api/v1/dealers/{dealer['id']}", {"password": "new-password-99"}))
    assert (await reseller.get("/api/v1/tenants")).status == 401


async def test_deactivating_an_ancestor_refuses_a_cached_token_at_once(
        api: Api, client: TestClient) -> None:
    dist = await api.dealer("distributor")
    dealer = await api.dealer("reseller", parent_id=dist["id"])
    await cache_of(client)
    reseller = await api.as_dealer(dealer)
    assert (await reseller.get("/api/v1/tenants")).status == 200
    api.ok(await api.patch(f"/api/v1/dealers/{dist['id']}", {"active": False}))
    assert (await reseller.get("/api/v1/tenants")).status == 401


async def test_refresh_ends_the_cached_access_token_it_replaces(
        api: Api, client: TestClient) -> None:
    _, creds, reseller = await cached_reseller(api, client)
    body = api.ok(await api.call("POST", "/oauth/token", {
        "grant_type": "refresh_token", "client_id": creds["client_id"],
        "client_secret": creds["client_secret"], "refresh_token": reseller.refresh}, token=""))
    assert (await reseller.get("/api/v1/tenants")).status == 401
    assert (await api.get("/api/v1/tenants", token=body["access_token"])).status == 200


@pytest.mark.parametrize(("change", "status"), [
    ("UPDATE oauth_tokens SET revoked_at = now() WHERE access_hash = $1", 401),
    ("UPDATE oauth_tokens SET expires_at = now() - interval '1 second'"
     " WHERE access_hash = $1", 401),
    ("DELETE FROM oauth_tokens WHERE access_hash = $1", 401),
    ("UPDATE api_clients SET revoked_at = now() WHERE id ="
     " (SELECT client_pk FROM oauth_tokens WHERE access_hash = $1)", 401),
    ("UPDATE api_clients SET allowed_cidrs = '{198.51.100.0/24}' WHERE id ="
     " (SELECT client_pk FROM oauth_tokens WHERE access_hash = $1)", 403),
    ("UPDATE dealers SET active = false WHERE id ="
     " (SELECT dealer_id FROM oauth_tokens WHERE access_hash = $1)", 401),
], ids=["token-revoked", "token-expired", "token-deleted", "client-revoked",
        "allowlist-changed", "dealer-deactivated"])
async def test_a_change_made_elsewhere_reaches_a_cached_token_by_notification(
        api: Api, client: TestClient, change: str, status: int) -> None:
    """As another API process or an operator with psql would: straight to PostgreSQL. The
    cache would keep the token for minutes here; the notification ends it in milliseconds."""
    _, _, reseller = await cached_reseller(api, client)
    client.server.app[PRINCIPALS].ttl = 300
    assert (await reseller.get("/api/v1/tenants")).status == 200
    async with api.pool.acquire() as conn:
        await conn.execute(change, digest(reseller.token))
    took = await refused_within(reseller, 2.0, status)
    assert took < 1.0


async def test_nothing_is_cached_while_the_listen_connection_is_down(
        api: Api, client: TestClient) -> None:
    _, _, reseller = await cached_reseller(api, client)
    cache = client.server.app[PRINCIPALS]
    cache._lost()
    try:
        assert not cache.entries
        assert (await reseller.get("/api/v1/tenants")).status == 200
        assert not cache.entries
    finally:
        cache.listening = True


def _principal() -> Principal:
    return Principal(1, 1, "operator", (1,), "client", False, "127.0.0.1")


def test_a_lookup_overtaken_by_an_invalidation_is_not_kept() -> None:
    cache = PrincipalCache()
    cache.listening = True
    later = datetime.now(UTC) + timedelta(hours=1)
    generation = cache.generation  # the lookup starts ...
    cache.invalidate()             # ... a revocation commits meanwhile ...
    cache.put((b"k", "ip"), _principal(), later, generation)  # ... its answer is stale
    assert cache.get((b"k", "ip")) is None
    cache.put((b"k", "ip"), _principal(), later, cache.generation)
    assert cache.get((b"k", "ip")) == _principal()


def test_an_entry_never_outlives_its_token_nor_the_ttl() -> None:
    cache = PrincipalCache(ttl=60)
    cache.listening = True
    cache.put((b"soon", ""), _principal(), datetime.now(UTC) + timedelta(seconds=0.05),
              cache.generation)
    cache.put((b"gone", ""), _principal(), datetime.now(UTC) - timedelta(seconds=1),
              cache.generation)
    assert cache.get((b"soon", "")) is not None and cache.get((b"gone", "")) is None
    time.sleep(0.06)
    assert cache.get((b"soon", "")) is None
    short = PrincipalCache(ttl=0.05)
    short.listening = True
    short.put((b"k", ""), _principal(), datetime.now(UTC) + timedelta(hours=1), 0)
    time.sleep(0.06)
    assert short.get((b"k", "")) is None


def test_the_cache_is_bounded() -> None:
    cache = PrincipalCache(max_entries=10)
    cache.listening = True
    later = datetime.now(UTC) + timedelta(hours=1)
    for n in range(25):
        cache.put((bytes([n]), ""), _principal(), later, cache.generation)
    assert len(cache.entries) <= 10
