"""OAuth2 password and refresh grants, expiry, revocation and the source CIDR allowlist."""

import asyncio
import dataclasses
import json

from aiohttp.test_utils import TestClient, TestServer

from controlplane.api.app import build_app
from tests.api_helper import Api


async def _reseller_creds(api: Api, cidrs=None):
    dealer = await api.dealer("reseller")
    creds = api.ok(await api.post(f"/api/v1/dealers/{dealer['id']}/api-clients", {
        "name": "billing system", "email": "ops@example.com",
        "allowed_cidrs": cidrs or ["127.0.0.0/8"]}), 201)
    return dealer, creds


async def test_password_grant_exactly_as_the_reseller_api_documents(api):
    dealer, creds = await _reseller_creds(api)
    reply = await api.grant(dealer["login"], "correct-horse-battery", creds["client_id"],
                            creds["client_secret"])
    assert reply.status == 200, reply
    assert reply.body["token_type"] == "Bearer" and reply.body["expires_in"] > 0
    assert reply.body["access_token"] and reply.body["refresh_token"]
    assert reply.headers["Cache-Control"] == "no-store"
    me = await api.get("/api/v1/dealers", token=reply.body["access_token"])
    assert [d["id"] for d in me.body["items"]] == [dealer["id"]]


async def test_password_grant_accepts_form_encoding(api, client):
    dealer, creds = await _reseller_creds(api)
    async with client.post("/oauth/token", data={
            "grant_type": "password", "client_id": creds["client_id"],
            "client_secret": creds["client_secret"], "username": dealer["login"],
            "password": "correct-horse-battery", "scope": ""}) as resp:
        assert resp.status == 200
        assert (await resp.json())["access_token"]


async def test_wrong_password_wrong_secret_and_other_dealers_login_are_refused(api):
    dealer, creds = await _reseller_creds(api)
    other = await api.dealer("reseller")
    cases = [
        (dealer["login"], "wrong-password", creds["client_secret"], 400, "invalid_grant"),
        (dealer["login"], "correct-horse-battery", "wrong-secret", 401, "invalid_client"),
        (other["login"], "correct-horse-battery", creds["client_secret"], 400, "invalid_grant"),
    ]
    for login, password, secret, status, error in cases:
        reply = await api.grant(login, password, creds["client_id"], secret)
        assert (reply.status, reply.body["error"]) == (status, error), (login, reply)


async def test_unsupported_grant_and_unknown_parameters_are_refused(api):
    _, creds = await _reseller_creds(api)
    reply = await api.call("POST", "/oauth/token", {"grant_type": "client_credentials"}, token="")
    assert (reply.status, reply.body["error"]) == (400, "unsupported_grant_type")
    reply = await api.grant("x", "y", creds["client_id"], creds["client_secret"], evil="1")
    assert (reply.status, reply.body["error"]) == (400, "invalid_request")


async def test_refresh_issues_a_new_pair_and_the_old_refresh_token_dies(api):
    dealer, creds = await _reseller_creds(api)
    first = (await api.grant(dealer["login"], "correct-horse-battery", creds["client_id"],
                             creds["client_secret"])).body
    body = {"grant_type": "refresh_token", "client_id": creds["client_id"],
            "client_secret": creds["client_secret"], "refresh_token": first["refresh_token"]}
    second = await api.call("POST", "/oauth/token", body, token="")
    assert second.status == 200, second
    assert second.body["access_token"] != first["access_token"]
    assert (await api.get("/api/v1/tenants", token=second.body["access_token"])).status == 200
    replay = await api.call("POST", "/oauth/token", body, token="")
    assert (replay.status, replay.body["error"]) == (400, "invalid_grant")


async def test_refresh_token_of_another_client_is_refused(api):
    dealer, creds = await _reseller_creds(api)
    tokens = (await api.grant(dealer["login"], "correct-horse-battery", creds["client_id"],
                              creds["client_secret"])).body
    _, other = await _reseller_creds(api)
    reply = await api.call("POST", "/oauth/token", {
        "grant_type": "refresh_token", "client_id": other["client_id"],
        "client_secret": other["client_secret"], "refresh_token": tokens["refresh_token"]},
        token="")
    assert reply.status == 400


async def test_expired_access_token_is_refused_but_refresh_still_works(api, db):
    dealer, creds = await _reseller_creds(api)
    tokens = (await api.grant(dealer["login"], "correct-horse-battery", creds["client_id"],
                              creds["client_secret"])).body
    async with db.acquire() as conn:
        await conn.execute("UPDATE oauth_tokens SET expires_at = now() - interval '1 second'"
                           " WHERE dealer_id = $1", dealer["id"])
    reply = await api.get("/api/v1/tenants", token=tokens["access_token"])
    assert reply.status == 401 and 'error="invalid_token"' in reply.headers["WWW-Authenticate"]
    refreshed = await api.call("POST", "/oauth/token", {
        "grant_type": "refresh_token", "client_id": creds["client_id"],
        "client_secret": creds["client_secret"], "refresh_token": tokens["refresh_token"]},
        token="")
    assert refreshed.status == 200


async def test_revoked_credentials_stop_working_at_once(api):
    dealer, creds = await _reseller_creds(api)
    tokens = (await api.grant(dealer["login"], "correct-horse-battery", creds["client_id"],
                              creds["client_secret"])).body
    assert (await api.get("/api/v1/tenants", token=tokens["access_token"])).status == 200
    assert (await api.delete(f"/api/v1/dealers/{dealer['id']}/api-clients/"
                             f"{creds['client_id']}")).status == 204
    assert (await api.get("/api/v1/tenants", token=tokens["access_token"])).status == 401
    again = await api.grant(dealer["login"], "correct-horse-battery", creds["client_id"],
                            creds["client_secret"])
    assert again.status == 401
    listed = api.ok(await api.get(f"/api/v1/dealers/{dealer['id']}/api-clients"))["items"]
    assert listed[0]["revoked_at"] and "client_secret" not in listed[0]


async def test_token_revocation_endpoint(api):
    dealer, creds = await _reseller_creds(api)
    tokens = (await api.grant(dealer["login"], "correct-horse-battery", creds["client_id"],
                              creds["client_secret"])).body
    reply = await api.call("POST", "/oauth/revoke", {
        "client_id": creds["client_id"], "client_secret": creds["client_secret"],
        "token": tokens["access_token"]}, token="")
    assert reply.status == 200
    assert (await api.get("/api/v1/tenants", token=tokens["access_token"])).status == 401


async def test_password_change_revokes_existing_tokens(api):
    dealer, creds = await _reseller_creds(api)
    tokens = (await api.grant(dealer["login"], "correct-horse-battery", creds["client_id"],
                              creds["client_secret"])).body
    api.ok(await api.patch(f"/api/v1/dealers/{dealer['id']}", {"password": "new-password-99"}))
    assert (await api.get("/api/v1/tenants", token=tokens["access_token"])).status == 401
    assert (await api.grant(dealer["login"], "new-password-99", creds["client_id"],
                            creds["client_secret"])).status == 200


async def test_client_bound_to_other_networks_is_refused_from_here(api):
    dealer, creds = await _reseller_creds(api, ["203.0.113.0/24"])
    reply = await api.grant(dealer["login"], "correct-horse-battery", creds["client_id"],
                            creds["client_secret"])
    assert (reply.status, reply.body["error"]) == (403, "access_denied")
    assert "127.0.0.1" in reply.body["error_description"]


async def test_allowlist_is_checked_on_every_request_too(api, db):
    dealer, creds = await _reseller_creds(api)
    tokens = (await api.grant(dealer["login"], "correct-horse-battery", creds["client_id"],
                              creds["client_secret"])).body
    async with db.acquire() as conn:
        await conn.execute("UPDATE api_clients SET allowed_cidrs = '{198.51.100.0/24}'"
                           " WHERE client_id = $1", creds["client_id"])
    reply = await api.get("/api/v1/tenants", token=tokens["access_token"])
    assert reply.status == 403


async def test_forwarded_address_counts_only_behind_a_trusted_proxy(api, db, settings):
    dealer, creds = await _reseller_creds(api, ["198.51.100.7/32"])
    spoof = {"X-Forwarded-For": "198.51.100.7"}
    untrusted = await api.grant(dealer["login"], "correct-horse-battery", creds["client_id"],
                                creds["client_secret"])
    assert untrusted.status == 403
    proxied = dataclasses.replace(settings, trusted_proxies=("127.0.0.1/32",))
    async with TestClient(TestServer(build_app(proxied, db), host="127.0.0.1")) as c:
        behind = Api(c, db, extra_headers=spoof)
        reply = await behind.grant(dealer["login"], "correct-horse-battery",
                                   creds["client_id"], creds["client_secret"])
        assert reply.status == 200, reply
    direct = Api(api.client, db, extra_headers=spoof)
    reply = await direct.grant(dealer["login"], "correct-horse-battery", creds["client_id"],
                               creds["client_secret"])
    assert reply.status == 403


async def test_api_client_secret_is_stored_hashed(api, db):
    _, creds = await _reseller_creds(api)
    async with db.acquire() as conn:
        row = await conn.fetchrow("SELECT secret_hash FROM api_clients WHERE client_id = $1",
                                  creds["client_id"])
        pw = await conn.fetchval("SELECT password_hash FROM dealers WHERE login = 'operator'")
    assert creds["client_secret"] not in row["secret_hash"]
    assert pw.startswith("$argon2")


async def test_requests_without_a_token_are_refused(api):
    reply = await api.get("/api/v1/tenants", token="")
    assert reply.status == 401
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert (await api.get("/api/v1/tenants", token="not-a-token")).status == 401


async def test_malformed_token_requests_get_400_not_500(api, client):
    """Anyone may reach /oauth/token: no body it sends may end in a server error."""
    _, creds = await _reseller_creds(api)
    bodies = [
        ("application/json", b"[" * 100_000 + b"]" * 100_000),
        ("application/x-www-form-urlencoded", b"grant_type=password&username=\xff"),
        ("application/x-www-form-urlencoded; charset=bogus", b"grant_type=password"),
        ("application/json", b'{"grant_type": "password", "client_id": "\\ud800",'
                             b' "client_secret": "x", "username": "u", "password": "p"}'),
        ("application/json", json.dumps({"grant_type": "password", "username": "u",
                                         "client_id": creds["client_id"], "password": "p",
                                         "client_secret": "\ud800"}).encode()),
        ("application/json", b'{"grant_type": "password", "client_id": "a\\u0000b"}'),
    ]
    for path in ("/oauth/token", "/oauth/revoke"):
        for content_type, raw in bodies:
            async with client.post(path, data=raw,
                                   headers={"Content-Type": content_type}) as resp:
                body = await resp.json()
                assert resp.status == 400, (path, content_type, raw[:60], body)
                assert body["error"] == "invalid_request", body


async def test_tokens_have_the_one_scope_the_api_has(api):
    dealer, creds = await _reseller_creds(api)
    for asked in ("", "api"):
        reply = await api.grant(dealer["login"], "correct-horse-battery", creds["client_id"],
                                creds["client_secret"], scope=asked)
        assert reply.status == 200 and reply.body["scope"] == "api", reply
    refreshed = await api.call("POST", "/oauth/token", {
        "grant_type": "refresh_token", "refresh_token": reply.body["refresh_token"],
        "client_id": creds["client_id"], "client_secret": creds["client_secret"]}, token="")
    assert refreshed.status == 200 and refreshed.body["scope"] == "api", refreshed
    narrower = await api.grant(dealer["login"], "correct-horse-battery", creds["client_id"],
                               creds["client_secret"], scope="read")
    assert (narrower.status, narrower.body["error"]) == (400, "invalid_scope")


async def test_a_token_of_bytes_that_are_not_text_is_refused_not_a_server_error(api, client):
    """Header bytes that are not UTF-8 reach the server as lone surrogates: 401, not 500."""
    url = client.make_url("/api/v1/tenants")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(b"GET /api/v1/tenants HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Authorization: Bearer \xff\xfe-token\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.read(4096), 10)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 401"), head[:200]
    assert b'error="invalid_token"' in head


async def test_a_page_size_of_thousands_of_digits_is_refused_not_a_server_error(api):
    rng = api.ok(await api.post("/api/v1/number-ranges", {
        "dealer_id": api.dealer_id, "name": "long limit", "country_code": "55",
        "area_code": "11", "first_number": 30000000, "last_number": 30000009}), 201)
    huge = "1" * 4400
    for path in ("/api/v1/tenants", "/api/v1/cdrs", f"/api/v1/number-ranges/{rng['id']}/numbers"):
        reply = await api.get(f"{path}?limit={huge}")
        assert reply.status == 422, (path, reply.status)
        assert (await api.get(f"{path}?limit=500")).status == 200, path


async def test_revoking_an_api_client_id_never_issued_is_404_and_changes_nothing(api):
    dealer, creds = await _reseller_creds(api)
    for odd in ("%00", "a%00b", "%FF", "x" * 65, "not.issued"):
        reply = await api.delete(f"/api/v1/dealers/{dealer['id']}/api-clients/{odd}")
        assert reply.status == 404, (odd, reply)
    listed = api.ok(await api.get(f"/api/v1/dealers/{dealer['id']}/api-clients"))["items"]
    assert [c["revoked_at"] for c in listed] == [None]
    tokens = await api.grant(dealer["login"], "correct-horse-battery", creds["client_id"],
                             creds["client_secret"])
    assert tokens.status == 200
