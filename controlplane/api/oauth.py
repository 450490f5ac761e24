"""OAuth2: the password and refresh_token grants (RFC 6749), revocation (RFC 7009), and the
bearer check that turns every /api/v1 request into a `Principal` or refuses it."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web

from controlplane.api.fields import FieldError, storable
from controlplane.api.keys import POOL, PRINCIPAL, SETTINGS
from controlplane.api.routes import RouteTable
from controlplane.model.principal import Principal
from controlplane.secrets import digest, new_token, verify_password
from controlplane.settings import Settings
from controlplane.store import credentials

log = logging.getLogger(__name__)

# Changes that can end a token's validity are announced on this channel by triggers
# (migration 0004), whoever makes them: this process, another one, or plain SQL.
AUTH_CHANNEL = "pbx_auth"
PRINCIPAL_TTL = 5.0       # seconds a resolved token is reused without asking PostgreSQL
PRINCIPAL_CACHE_MAX = 10_000
LISTEN_PING = 5.0         # seconds between liveness checks of the LISTEN connection

# The one scope tokens are issued with: everything the dealer may do in its subtree.
API_SCOPE = "api"
TOKEN_FIELDS = {"grant_type", "client_id", "client_secret", "username", "password", "scope",
                "refresh_token", "token"}


class OAuthError(Exception):
    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status

    def response(self) -> web.Response:
        headers = {"Cache-Control": "no-store"}
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="oauth"'
        return web.Response(status=self.status, headers=headers, content_type="application/json",
                            text=json.dumps({"error": self.error,
                                             "error_description": self.description}))


def source_ip(request: web.Request, settings: Settings) -> str:
    """The client's address; X-Forwarded-For is believed only from a trusted proxy."""
    peer = request.remote or ""
    if settings.trusted_proxies and peer:
        try:
            peer_addr = ipaddress.ip_address(peer)
            trusted = any(peer_addr in ipaddress.ip_network(n) for n in settings.trusted_proxies)
        except ValueError:
            trusted = False
        forwarded = request.headers.get("X-Forwarded-For", "")
        if trusted and forwarded:
            candidate = forwarded.split(",")[-1].strip()
            try:
                return str(ipaddress.ip_address(candidate))
            except ValueError:
                pass
    return peer


async def _token_params(request: web.Request) -> dict[str, str]:
    if request.content_type == "application/json":
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise OAuthError("invalid_request", "the body is not valid JSON") from exc
        if not isinstance(body, dict):
            raise OAuthError("invalid_request", "the body must be a JSON object")
    elif request.content_type == "application/x-www-form-urlencoded":
        try:
            body = dict(await request.post())
        except (ValueError, LookupError) as exc:  # UnicodeDecodeError, an unknown charset
            raise OAuthError("invalid_request", "the form is not valid UTF-8") from exc
    else:
        raise OAuthError("invalid_request",
                         "send application/json or application/x-www-form-urlencoded")
    unknown = set(body) - TOKEN_FIELDS
    if unknown:
        raise OAuthError("invalid_request", "unknown parameters: " + ", ".join(
            sorted(str(u)[:40] for u in unknown)))
    out: dict[str, str] = {}
    for key, value in body.items():
        if value is None:
            continue
        if not isinstance(value, (str, int)) or isinstance(value, bool) or len(str(value)) > 512:
            raise OAuthError("invalid_request", f"{key} must be a string")
        try:
            out[key] = storable(str(value))
        except FieldError as exc:
            raise OAuthError("invalid_request", f"{key} {exc}") from exc
    return out


def _expiry(seconds: int) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def _issue_pair(conn: Any, settings: Settings, client_pk: int, dealer_id: int,
                      scope: str) -> dict[str, Any]:
    access, refresh = new_token(), new_token()
    await credentials.issue(
        conn, access_hash=digest(access), refresh_hash=digest(refresh), client_pk=client_pk,
        dealer_id=dealer_id, acting_as_id=None, scope=scope,
        expires_at=_expiry(settings.access_token_ttl),
        refresh_expires_at=_expiry(settings.refresh_token_ttl))
    return {"access_token": access, "token_type": "Bearer",
            "expires_in": settings.access_token_ttl, "refresh_token": refresh, "scope": scope}


async def _authenticate_client(conn: Any, params: dict[str, str], ip: str) -> Any:
    client_id, secret = params.get("client_id", ""), params.get("client_secret", "")
    if not client_id or not secret:
        raise OAuthError("invalid_client", "client_id and client_secret are required", 401)
    client = await credentials.client_for_grant(conn, client_id)
    if client is None or not hmac.compare_digest(client["secret_hash"],
                                                 digest(secret).hex()):
        raise OAuthError("invalid_client", "unknown client or wrong client secret", 401)
    if not await credentials.source_allowed(conn, client["id"], ip):
        raise OAuthError("access_denied",
                         f"requests from {ip} are not allowed for this client", 403)
    if not client["dealer_active"]:
        raise OAuthError("invalid_grant", "the dealer account is deactivated")
    return client


async def token_endpoint(request: web.Request) -> web.Response:
    settings: Settings = request.app[SETTINGS]
    try:
        params = await _token_params(request)
        grant = params.get("grant_type", "")
        if grant not in ("password", "refresh_token"):
            raise OAuthError("unsupported_grant_type",
                             "grant_type must be password or refresh_token")
        if params.get("scope", "").strip() not in ("", API_SCOPE):
            # a client asking for less must not be handed more in silence (RFC 6749 3.3)
            raise OAuthError("invalid_scope", f"this API has one scope, {API_SCOPE}: all of "
                             "the dealer's subtree; ask for it or for none")
        ip = source_ip(request, settings)
        async with request.app[POOL].acquire() as conn:
            client = await _authenticate_client(conn, params, ip)
            if grant == "password":
                username, password = params.get("username", ""), params.get("password", "")
                if not username or not password:
                    raise OAuthError("invalid_request", "username and password are required")
                same_login = hmac.compare_digest(client["login"].encode(), username.encode())
                ok = await verify_password(client["password_hash"] if same_login else None,
                                           password)
                if not ok:
                    raise OAuthError("invalid_grant", "wrong username or password")
                async with conn.transaction():
                    body = await _issue_pair(conn, settings, client["id"], client["dealer_id"],
                                             API_SCOPE)
            else:
                refresh = params.get("refresh_token", "")
                if not refresh:
                    raise OAuthError("invalid_request", "refresh_token is required")
                try:
                    async with conn.transaction():
                        old = await credentials.take_refresh(conn, digest(refresh),
                                                             client["id"])
                        if old is None:
                            raise OAuthError("invalid_grant",
                                             "the refresh token is unknown, expired or used")
                        body = await _issue_pair(conn, settings, client["id"],
                                                 old["dealer_id"], API_SCOPE)
                finally:
                    # the old pair's access token was revoked with its refresh token
                    request.app[PRINCIPALS].invalidate()
    except OAuthError as exc:
        return exc.response()
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def revoke_endpoint(request: web.Request) -> web.Response:
    """RFC 7009: the client revokes one of its tokens; unknown tokens are not an error."""
    settings: Settings = request.app[SETTINGS]
    try:
        params = await _token_params(request)
        token = params.get("token", "") or params.get("refresh_token", "")
        async with request.app[POOL].acquire() as conn:
            client = await _authenticate_client(conn, params, source_ip(request, settings))
            if token:
                try:
                    await credentials.revoke_token(conn, digest(token), client["id"])
                finally:
                    request.app[PRINCIPALS].invalidate()
    except OAuthError as exc:
        return exc.response()
    return web.Response(status=200)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bearer_error(status: int, error: str, description: str) -> web.Response:
    from controlplane.api.problems import ApiError

    title = "Unauthorized" if status == 401 else "Forbidden"
    return ApiError(status, title, description, kind=error.replace("_", "-"), headers={
        "WWW-Authenticate": f'Bearer error="{error}", error_description="{description}"'
    }).response()


class PrincipalCache:
    """Resolved bearer tokens, reused for up to PRINCIPAL_TTL seconds, keyed by (token
    hash, client address).

    Revocation stays immediate: entries are kept only while a connection LISTENs on
    AUTH_CHANNEL, on which triggers announce every change that can end a token's validity
    (a token revoked or its expiry moved, API credentials revoked, their allowlist changed
    or deleted, a dealer deactivated, its password changed or deleted), made by any process
    or by plain SQL; each notification empties the cache. Writes through this process that
    can revoke (dealer changes, /oauth/revoke, refresh grants) also empty it themselves
    before they answer, so their caller never sees the old token work again. When the
    LISTEN connection is down nothing is cached and every request asks PostgreSQL.
    A lookup that started before an invalidation is not stored (generation check), so an
    answer read before a revocation committed cannot outlive it. Only successful
    resolutions are cached; refusals always ask PostgreSQL again.
    """

    def __init__(self, ttl: float = PRINCIPAL_TTL, max_entries: int = PRINCIPAL_CACHE_MAX):
        self.ttl, self.max_entries = ttl, max_entries
        self.entries: dict[tuple[bytes, str], tuple[float, Principal]] = {}
        self.generation = 0
        self.listening = False
        self.served = False  # the last LISTEN connection came up

    def get(self, key: tuple[bytes, str]) -> Principal | None:
        hit = self.entries.get(key)
        if hit is None:
            return None
        if hit[0] <= time.monotonic() or not self.listening:
            self.entries.pop(key, None)
            return None
        return hit[1]

    def put(self, key: tuple[bytes, str], principal: Principal, token_expires: datetime,
            generation: int) -> None:
        if not self.listening or generation != self.generation:
            return
        now = time.monotonic()
        left = (token_expires - datetime.now(UTC)).total_seconds()
        if left <= 0:
            return
        if len(self.entries) >= self.max_entries:
            self.entries = {k: v for k, v in self.entries.items() if v[0] > now}
            if len(self.entries) >= self.max_entries:
                self.entries.clear()
        self.entries[key] = (now + min(self.ttl, left), principal)

    def invalidate(self) -> None:
        self.generation += 1
        self.entries.clear()

    def _notified(self, *_: Any) -> None:
        self.invalidate()

    def _lost(self, *_: Any) -> None:
        self.listening = False
        self.invalidate()

    async def listen(self, pool: asyncpg.Pool) -> None:
        """Hold one pooled connection LISTENing on AUTH_CHANNEL for as long as the
        application runs; reconnect with backoff when it is lost."""
        backoff = 0.5
        while True:
            try:
                await self._listen_once(pool)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    TimeoutError) as exc:
                log.warning("token cache off: %s channel lost (%s); retrying in %.1fs",
                            AUTH_CHANNEL, exc, backoff)
            backoff = 0.5 if self.served else min(backoff * 2, 30)
            self.served = False
            await asyncio.sleep(backoff)

    async def _listen_once(self, pool: asyncpg.Pool) -> None:
        async with pool.acquire() as conn:
            await conn.add_listener(AUTH_CHANNEL, self._notified)
            conn.add_termination_listener(self._lost)
            try:
                self.invalidate()  # whatever happened while nobody listened
                self.listening = self.served = True
                while True:
                    await asyncio.sleep(LISTEN_PING)
                    await conn.fetchval("SELECT 1", timeout=LISTEN_PING)
            finally:
                self._lost()
                conn.remove_termination_listener(self._lost)
                if not conn.is_closed():
                    try:  # UNLISTEN before the connection goes back to the pool
                        await conn.remove_listener(AUTH_CHANNEL, self._notified)
                    except Exception:  # noqa: BLE001 - then it does not go back at all
                        conn.terminate()


PRINCIPALS = web.AppKey("principals", PrincipalCache)


async def _principal_cache_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[PRINCIPALS].listen(app[POOL]), name="principal-cache")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def install(app: web.Application) -> None:
    """Give `app` its token cache and the LISTEN connection that keeps it honest."""
    app[PRINCIPALS] = PrincipalCache()
    app.cleanup_ctx.append(_principal_cache_ctx)


# Writes under these paths may revoke tokens (password, deactivation, API credentials).
REVOKING_PREFIX = "/api/v1/dealers"


@web.middleware
async def bearer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/api/v1/"):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return bearer_error(401, "invalid_token", "a Bearer access token is required")
    if not token.strip().isascii():  # bytes that are not text arrive as lone surrogates
        return bearer_error(401, "invalid_token", "the access token is invalid")
    settings: Settings = request.app[SETTINGS]
    ip = source_ip(request, settings)
    cache = request.app[PRINCIPALS]
    key = (digest(token.strip()), ip)
    principal = cache.get(key)
    if principal is None:
        generation = cache.generation
        async with request.app[POOL].acquire() as conn:
            row = await credentials.principal_for_token(conn, key[0], ip or "0.0.0.0")
        if row is None:
            return bearer_error(401, "invalid_token", "the access token is invalid or expired")
        if not row["source_allowed"]:
            return bearer_error(403, "access_denied", f"requests from {ip} are not allowed")
        principal = Principal(
            actor_id=row["dealer_id"], scope_id=row["scope_id"], scope_level=row["level"],
            scope_path=tuple(row["path"]), client_id=row["client_id"],
            impersonating=row["acting_as_id"] is not None, source_ip=ip,
        )
        cache.put(key, principal, row["expires_at"], generation)
    request[PRINCIPAL] = principal
    if request.method == "GET" or not request.path.startswith(REVOKING_PREFIX):
        return await handler(request)
    try:
        return await handler(request)
    finally:
        cache.invalidate()


async def issue_impersonation(conn: Any, settings: Settings, p: Principal,
                              target_id: int) -> dict[str, Any]:
    """An access token (no refresh) with which `p`'s dealer acts as a descendant."""
    client_pk = await conn.fetchval("SELECT id FROM api_clients WHERE client_id = $1",
                                    p.client_id)
    access = new_token()
    ttl = min(settings.access_token_ttl, 3600)
    await credentials.issue(conn, access_hash=digest(access), refresh_hash=None,
                            client_pk=client_pk, dealer_id=p.actor_id, acting_as_id=target_id,
                            scope="impersonation", expires_at=_expiry(ttl),
                            refresh_expires_at=None)
    return {"access_token": access, "token_type": "Bearer", "expires_in": ttl,
            "acting_as": target_id}


def register(routes: RouteTable) -> None:
    form = {"type": "object", "properties": {k: {"type": "string"} for k in sorted(TOKEN_FIELDS)}}
    routes.add("POST", "/oauth/token", token_endpoint, "Obtain or refresh an access token",
               "oauth", public=True, raw_body=("application/json",
                                               "application/x-www-form-urlencoded"),
               description="OAuth2 password grant (grant_type, client_id, client_secret, "
                           "username, password, scope) and refresh_token grant.",
               response={"type": "object", "properties": {
                   "access_token": {"type": "string"}, "token_type": {"type": "string"},
                   "expires_in": {"type": "integer"}, "refresh_token": {"type": "string"},
                   "scope": {"type": "string"}}}, body_schema=form)
    routes.add("POST", "/oauth/revoke", revoke_endpoint, "Revoke a token (RFC 7009)", "oauth",
               public=True, raw_body=("application/json", "application/x-www-form-urlencoded"),
               body_schema=form)
