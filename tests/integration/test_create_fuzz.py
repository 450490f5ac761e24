"""Property-based tests of every route that takes a JSON body (the creates and the PATCHes).

Hypothesis throws at each route: arbitrary JSON (nested lists and objects of nulls, booleans,
huge integers, NaN and infinities, text with control characters, NUL, lone surrogates,
brackets, semicolons and new lines), objects whose keys are the route's real field names
with arbitrary or nearly valid values, valid bodies with a few fields replaced or dropped,
and raw bytes that are not JSON at all. Whatever it sends:

* the API never answers 5xx;
* every 4xx is application/problem+json whose `status` is the HTTP status, and a 422 lists
  its `errors` as {pointer, detail};
* a 4xx writes nothing: every table keeps its rows and their contents (checksummed);
* a 2xx writes exactly what it reports: one audit entry by the caller, the route's row (and
  only the side effects the schema documents, such as subtree counters), the object as read
  back equals the reply, every field sent comes back as the validator normalised it, and no
  accepted text carries a control character (notes aside, which may span lines).

Hypothesis drives the examples from a worker thread; each example runs on the test's event
loop (the one the aiohttp test server and the asyncpg pool live on) through
`asyncio.run_coroutine_threadsafe`, so generation and shrinking are Hypothesis's own.
PBX_FUZZ_EXAMPLES sets the number of generated examples per route (default 60; a few hundred
make a deeper run).

Product bugs found this way are fixed and keep a regression test below; the property tests
refuse any 5xx and count any silent acceptance of an unsafe value as a failure.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from controlplane.api.app import build_routes
from controlplane.api.fields import Field, Schema
from controlplane.api.routes import Operation
from tests.api_helper import Api, Reply
from tests.conftest import TABLES

EXAMPLES = int(os.environ.get("PBX_FUZZ_EXAMPLES", "60"))
PASSWORD = "correct-horse-battery"
NODE = {"name": "node-1", "sip_address": "198.51.100.10", "ami_host": "10.0.0.10",
        "ami_username": "admin", "ami_secret": "ami-secret-123456",
        "ari_url": "http://10.0.0.10:8088", "ari_username": "ari",
        "ari_password": "ari-password-123456"}
T = TypeVar("T")

_seq = itertools.count(1)


# -- the tree each test works on -------------------------------------------------------------


@dataclass
class Who:
    name: str
    api: Api
    actor: int


@dataclass
class Tree:
    """operator > D (distributor) > S (sub-distributor) > R (reseller), and a second
    distributor D2 whose objects D may not touch. D is the second principal. The operator,
    D, S and D2 each own a rate table (RTO, RT, RTS, RT2): a plan of D may be priced by
    RTO or RT only."""

    op: Who
    d: Who
    ids: dict[str, int]
    refs: dict[str, list[int]]
    range_first: int


async def build_tree(api: Api) -> Tree:
    ids: dict[str, int] = {"op": api.dealer_id}
    ids["N"] = api.ok(await api.post("/api/v1/nodes", NODE), 201)["id"]
    ids["C"] = api.ok(await api.post("/api/v1/carriers", {
        "node_id": ids["N"], "name": "Carrier C", "host": "198.51.100.9"}), 201)["id"]
    d = await api.dealer("distributor")
    ids["D"] = d["id"]
    ids["S"] = (await api.dealer("sub_distributor", ids["D"]))["id"]
    ids["R"] = (await api.dealer("reseller", ids["S"]))["id"]
    ids["D2"] = (await api.dealer("distributor"))["id"]
    for name, owner in (("RTO", "op"), ("RT", "D"), ("RTS", "S"), ("RT2", "D2")):
        ids[name] = api.ok(await api.post("/api/v1/rate-tables", {
            "dealer_id": ids[owner], "name": f"Rates {name}"}), 201)["id"]
    for name, owner, kind, rates in (("PN", "D", "national", "RT"),
                                     ("PI", "D", "international", "RTO"),
                                     ("P2", "D2", "national", "RT2")):
        ids[name] = api.ok(await api.post("/api/v1/plans", {
            "dealer_id": ids[owner], "name": f"Plan {name}", "kind": kind,
            "rate_table_id": ids[rates]}), 201)["id"]
    ids["T"] = (await api.tenant(ids["R"]))["id"]
    ids["T2"] = (await api.tenant(ids["D2"]))["id"]
    ids["TC"] = (await api.tenant(ids["R"]))["id"]
    api.ok(await api.post(f"/api/v1/tenants/{ids['TC']}/cancel"))
    ids["E"] = (await api.extension(ids["T"], "100", plan_id=ids["PN"]))["id"]
    ids["E2"] = (await api.extension(ids["T2"], "100"))["id"]
    first = 100000
    for name, owner, start in (("G", "R", first), ("G2", "D2", 300000)):
        ids[name] = api.ok(await api.post("/api/v1/number-ranges", {
            "dealer_id": ids[owner], "name": f"Range {name}", "country_code": "55",
            "area_code": "11", "first_number": start, "last_number": start + 99998}),
            201)["id"]
    ids["X"] = api.ok(await api.post("/api/v1/dids", {
        "range_id": ids["G"], "local_number": first + 99998,
        "extension_id": ids["E"]}), 201)["id"]
    ids["X2"] = api.ok(await api.post("/api/v1/dids", {
        "range_id": ids["G2"], "local_number": 300000}), 201)["id"]
    d_api = await api.as_dealer(d)
    refs = {
        "dealer": [ids[k] for k in ("op", "D", "S", "R", "D2")],
        "tenant": [ids[k] for k in ("T", "T2", "TC")],
        "plan": [ids[k] for k in ("PN", "PI", "P2")],
        "rate_table": [ids[k] for k in ("RTO", "RT", "RTS", "RT2")],
        "extension": [ids[k] for k in ("E", "E2")],
        "range": [ids[k] for k in ("G", "G2")],
        "did": [ids[k] for k in ("X", "X2")],
        "node": [ids["N"]],
    }
    return Tree(Who("operator", api, api.dealer_id), Who("distributor D", d_api, d_api.dealer_id),
                ids, refs, first)


# -- the routes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """What a JSON-body route writes, and how to call it validly."""

    table: str                                  # the table whose row the route writes
    entity: str                                 # the audit entity
    targets: tuple[str, ...] = ()               # tree objects `{id}` may name
    creates: bool = False
    side: frozenset[str] = frozenset()          # other tables a success may change
    action: str = ""                            # audit action, when not create/update
    valid: Callable[[Tree, Who, int], dict[str, Any]] = lambda t, w, n: {}
    status: int = 0                             # success status, when not 201/200
    bulk: bool = False                          # creates many rows: {"count", "items"}


def _dealer_body(t: Tree, w: Who, n: int) -> dict[str, Any]:
    level = "distributor" if w is t.op else "sub_distributor"
    return {"level": level, "name": f"Fuzz {n}", "login": f"fuzz-{n}", "password": PASSWORD}


def _node_body(t: Tree, w: Who, n: int) -> dict[str, Any]:
    return {**NODE, "name": f"node-f{n}"}


# Setting a cap on simultaneous calls starts that level's call counter.
CAPS = frozenset({"call_counters"})

ROUTES: dict[str, Route] = {
    "POST /api/v1/dealers": Route("dealers", "dealer", creates=True, valid=_dealer_body,
                                  side=CAPS),
    "PATCH /api/v1/dealers/{id}": Route(
        "dealers", "dealer", ("S", "R", "D2"), side=CAPS | {"oauth_tokens"},
        valid=lambda t, w, n: {"brand_name": f"Brand {n}"}),
    "POST /api/v1/dealers/{id}/api-clients": Route(
        "api_clients", "api_client", ("S", "R", "D2"), creates=True,
        valid=lambda t, w, n: {"name": f"Client {n}", "allowed_cidrs": ["10.0.0.0/8"]}),
    "POST /api/v1/dealers/{id}/credit": Route(
        "dealers", "dealer", ("S", "R", "D2"), action="credit", status=200,
        valid=lambda t, w, n: {"amount": "1.5"}),
    "POST /api/v1/tenants": Route(
        "tenants", "tenant", creates=True, side=CAPS | {"dealers"},
        valid=lambda t, w, n: {"name": f"Fuzz {n}", "dealer_id": t.ids["R"]}),
    "PATCH /api/v1/tenants/{id}": Route(
        "tenants", "tenant", ("T", "T2"), side=CAPS | {"dealers", "extensions"},
        valid=lambda t, w, n: {"notes": f"note {n}"}),
    "POST /api/v1/extensions": Route(
        "extensions", "extension", creates=True, side=CAPS | {"tenants", "dealers"},
        valid=lambda t, w, n: {"tenant_id": t.ids["T"], "number": str(10000 + n)}),
    "PATCH /api/v1/extensions/{id}": Route(
        "extensions", "extension", ("E", "E2"), side=CAPS,
        valid=lambda t, w, n: {"name": f"Desk {n}"}),
    "POST /api/v1/tenants/{id}/extensions/bulk": Route(
        "extensions", "extension", ("T", "T2", "TC"), creates=True, bulk=True,
        side=frozenset({"tenants", "dealers", "call_counters"}),
        valid=lambda t, w, n: {"first_number": str(200000 + 10 * n), "count": 1 + n % 5}),
    "POST /api/v1/plans": Route(
        "plans", "plan", creates=True, valid=lambda t, w, n: {"name": f"Fuzz {n}"}),
    "PATCH /api/v1/plans/{id}": Route(
        "plans", "plan", ("PN", "P2"), valid=lambda t, w, n: {"description": f"d {n}"}),
    "POST /api/v1/rate-tables": Route(
        "rate_tables", "rate_table", creates=True, valid=lambda t, w, n: {"name": f"Fuzz {n}"}),
    "PATCH /api/v1/rate-tables/{id}": Route(
        "rate_tables", "rate_table", ("RT", "RTS", "RT2"),
        valid=lambda t, w, n: {"description": f"d {n}"}),
    "POST /api/v1/number-ranges": Route(
        "number_ranges", "number_range", creates=True,
        valid=lambda t, w, n: {"name": f"Fuzz {n}", "country_code": "55", "area_code": "31",
                               "first_number": 1000 * n, "last_number": 1000 * n + 9}),
    "PATCH /api/v1/number-ranges/{id}": Route(
        "number_ranges", "number_range", ("G", "G2"),
        valid=lambda t, w, n: {"name": f"Range {n}"}),
    "POST /api/v1/dids": Route(
        "dids", "did", creates=True,
        valid=lambda t, w, n: {"range_id": t.ids["G"], "local_number": t.range_first + n}),
    "PATCH /api/v1/dids/{id}": Route(
        "dids", "did", ("X", "X2"), valid=lambda t, w, n: {"collect_calls": n % 2 == 0}),
    "POST /api/v1/nodes": Route("nodes", "node", creates=True, valid=_node_body),
    "PATCH /api/v1/nodes/{id}": Route(
        "nodes", "node", ("N",), valid=lambda t, w, n: {"status": "online"}),
    "POST /api/v1/carriers": Route(
        "carriers", "carrier", creates=True,
        valid=lambda t, w, n: {"node_id": t.ids["N"], "name": f"Carrier {n}",
                               "host": "198.51.100.9"}),
    "PATCH /api/v1/carriers/{id}": Route(
        "carriers", "carrier", ("C",), valid=lambda t, w, n: {"priority": n % 1000}),
    "POST /api/v1/extensions/{id}/credit": Route(  # one movement; the account on first use
        "credit_movements", "extension", ("E", "E2"), creates=True, action="credit", status=200,
        side=frozenset({"credit_accounts"}), valid=lambda t, w, n: {"amount": "1.5"}),
    "POST /api/v1/tenants/{id}/credit": Route(  # one movement; the account on first use
        "credit_movements", "tenant", ("T", "T2"), creates=True, action="credit", status=200,
        side=frozenset({"credit_accounts"}), valid=lambda t, w, n: {"amount": "2.5"}),
}


def body_operations() -> list[Operation]:
    return [op for op in build_routes().operations if op.body is not None]


def op_key(op: Operation) -> str:
    return f"{op.method} {op.path}"


def test_every_route_taking_a_json_body_is_fuzzed() -> None:
    assert {op_key(op) for op in body_operations()} == set(ROUTES)


# -- strategies ----------------------------------------------------------------------------------

SPECIAL = ("\n", "\r\n", "\t", "\x00", "\x1b", "\x7f", " ", ";", "[", "]", "${X}", '"', "'",
           "\\", ",", "\u2028", "\ud800", "%", "/", "\u00e9", "\uff10", "\u00b2", "<", "&")
ALL_CHARS = st.characters(exclude_categories=())  # surrogates and control characters too
TEXT = st.one_of(st.text(ALL_CHARS, max_size=30), st.sampled_from(SPECIAL),
                 st.text(st.sampled_from("ab1 .-;[]\n\x00\ud800"), max_size=12))
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(),
    st.integers(min_value=2**63 - 2, max_value=10**40), st.integers(max_value=-(2**63)),
    st.floats(allow_nan=True, allow_infinity=True), TEXT)
JSON = st.recursive(LEAVES, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(TEXT, children, max_size=4)),
    max_leaves=10)

REFERENCE_KINDS = {"parent_id": "dealer", "dealer_id": "dealer", "tenant_id": "tenant",
                   "plan_id": "plan", "intl_plan_id": "plan", "rate_table_id": "rate_table",
                   "extension_id": "extension", "range_id": "range", "node_id": "node"}
HOSTS = st.one_of(
    st.ip_addresses().map(str),
    st.lists(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), min_size=2, max_size=4)
    .map(".".join),
    st.sampled_from(["localhost", "a..b", "-a.b", "1.2.3", "fe80::1%eth0", "[::1]"]))
CIDRS = st.one_of(
    st.ip_addresses().map(lambda a: f"{a}/{a.max_prefixlen}"),
    st.sampled_from(["10.0.0.0/8", "192.168.0.0/16", "::1/128", "10.0.0.1/8", "0.0.0.0/0",
                     "fe80::%eth0/64", "1.2.3.4/33", "::/0"]))
MONEY = st.one_of(
    st.decimals(min_value=-(10**11), max_value=10**11, places=4).map(str),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.integers(min_value=-(10**11), max_value=10**11),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["9999999999", "-9999999999", "9999999999.0001", "1e3", "NaN",
                     "-Infinity", "0.00001", "1.2345", " 1", "1_000", "\u0663", "0x10"]))


def plausible(name: str, f: Field, refs: dict[str, list[int]]) -> st.SearchStrategy[Any]:
    """Values a client might really send for this field: valid ones and near misses."""
    s = f.schema
    if name in REFERENCE_KINDS:
        return st.one_of(st.sampled_from(refs[REFERENCE_KINDS[name]]),
                         st.integers(min_value=-1, max_value=40),
                         st.sampled_from([2**63 - 1, 2**63, 10**12]))
    if "enum" in s:
        return st.one_of(st.sampled_from(s["enum"]),
                         st.sampled_from(s["enum"]).map(str.upper))
    if s.get("type") == "integer":
        lo, hi = s["minimum"], s["maximum"]
        return st.one_of(st.integers(min_value=lo, max_value=hi),
                         st.sampled_from([lo - 1, lo, hi, hi + 1]))
    if s.get("type") == "boolean":
        return st.one_of(st.booleans(), st.sampled_from(["true", 0, 1]))
    if s.get("type") == ["number", "string"]:
        return MONEY
    if s.get("type") == "array":
        return st.lists(st.one_of(CIDRS, TEXT), max_size=3)
    if s.get("format") in ("hostname", "hostname-or-ip"):
        return HOSTS
    if s.get("format") == "uri":
        return st.builds(lambda scheme, host, port, path: f"{scheme}://{host}{port}/{path}",
                         st.sampled_from(["http", "https", "ftp", "javascript"]),
                         HOSTS.map(lambda h: f"[{h}]" if ":" in h else h),
                         st.sampled_from(["", ":8088", ":0", ":99999", ":x"]),
                         st.text(st.sampled_from("ab/?=&#"), max_size=10))
    if s.get("format") == "password":
        return st.text(ALL_CHARS, min_size=6, max_size=20)
    if "pattern" in s:
        limit = s.get("maxLength", 100)
        return st.from_regex(s["pattern"], fullmatch=True).filter(lambda v: len(v) <= limit)
    return st.text(ALL_CHARS, max_size=40)


def near_miss(base: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A plausible string with one special character put before, after or inside it."""
    def splice(value: Any, special: str, where: int) -> Any:
        if not isinstance(value, str):
            return value
        at = {0: 0, 1: len(value), 2: len(value) // 2}[where]
        return value[:at] + special + value[at:]

    return st.builds(splice, base, st.sampled_from(SPECIAL), st.integers(0, 2))


def field_values(name: str, f: Field, refs: dict[str, list[int]]) -> st.SearchStrategy[Any]:
    good = plausible(name, f, refs)
    return st.one_of(good, near_miss(good), JSON)


@dataclass
class Shape:
    """One drawn request: a whole JSON document, a valid body changed here and there, or
    raw bytes."""

    kind: str                                    # "json", "valid", "raw"
    document: Any = None
    overrides: dict[str, Any] = field(default_factory=dict)
    drops: tuple[str, ...] = ()
    raw: bytes = b""
    content_type: str = "application/json"


RAW = st.one_of(
    st.binary(max_size=200),
    st.text(ALL_CHARS, max_size=60).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"{", b'{"a":', b"[1,]", b"{'a': 1}", b"NaN", b"\xef\xbb\xbf{}",
                     b'{"name": "x"} trailing', b"\xff\xfe{\x00}\x00", b"name=x&level=reseller",
                     b'{"a": 1e999999}', b"1" * 5000]),
    st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    JSON.map(lambda v: json.dumps(v).encode("utf-16")),
)
CONTENT_TYPES = st.sampled_from([
    "application/json", "application/json; charset=latin-1", "text/plain",
    "application/x-www-form-urlencoded", "multipart/form-data", "image/png"])


def some_of(values: dict[str, st.SearchStrategy[Any]], most: int
            ) -> st.SearchStrategy[dict[str, Any]]:
    """A dict of at most `most` of the keys of `values`, each with a value it draws."""
    return st.lists(st.sampled_from(sorted(values)), max_size=most, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: values[k] for k in keys}))


def shapes(schema: Schema, refs: dict[str, list[int]]) -> st.SearchStrategy[Shape]:
    values = {k: field_values(k, f, refs) for k, f in schema.fields.items()}
    likely = {k: plausible(k, f, refs) for k, f in schema.fields.items()}
    known = st.fixed_dictionaries({}, optional=values)
    with_unknown = st.builds(lambda d, extra: {**extra, **d}, known,
                             st.dictionaries(TEXT, JSON, min_size=1, max_size=2))
    one_changed = st.sampled_from(sorted(values)).flatmap(
        lambda k: values[k].map(lambda v: Shape("valid", overrides={k: v})))
    one_dropped = st.sampled_from(sorted(values)).map(lambda k: Shape("valid", drops=(k,)))
    branches = [
        # a valid body with one field changed to anything, a near miss or a valid value:
        # the most direct test of that field's validation
        one_changed, one_changed, one_changed,
        # a valid body with a few fields changed to values a client might send
        some_of(likely, 3).map(lambda o: Shape("valid", overrides=o)),
        some_of(likely, 3).map(lambda o: Shape("valid", overrides=o)),
        one_dropped,
        # the route's own field names, with any values, and maybe unknown names
        st.one_of(known, with_unknown).map(lambda d: Shape("json", document=d)),
        # anything at all
        JSON.map(lambda v: Shape("json", document=v)),
        # not JSON at all, or not sent as JSON
        st.builds(lambda raw, ctype: Shape("raw", raw=raw, content_type=ctype), RAW,
                  CONTENT_TYPES),
    ]
    return st.one_of(branches)


# -- observing the database ------------------------------------------------------------------

SNAPSHOT_SQL = " UNION ALL ".join(
    f"SELECT '{t}' AS t, count(*) AS n, md5(string_agg(x::text, '|' ORDER BY x::text)) AS h,"
    f" {'COALESCE(max(x.id), 0)' if t == 'audit_log' else '0'} AS last FROM {t} x"
    for t in TABLES)


async def snapshot(pool: asyncpg.Pool) -> dict[str, tuple[int, str | None, int]]:
    """Per table: rows, a checksum of their contents, and (audit_log) the last id."""
    async with pool.acquire() as conn:
        return {r["t"]: (r["n"], r["h"], r["last"]) for r in await conn.fetch(SNAPSHOT_SQL)}


# -- known product bugs ------------------------------------------------------------------------
# Bug classes the checks below recognise; none is tolerated any more.

KNOWN_BUGS: dict[str, str] = {}
HOST_FORMATS = ("hostname", "hostname-or-ip", "uri")


def unstorable(text: str) -> bool:
    """Text PostgreSQL (UTF-8) cannot hold: NUL, or a lone surrogate."""
    return "\x00" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def accepted_strings(schema: Schema, body: Any) -> list[str]:
    """The strings of `body` that pass their field's validator."""
    out: list[str] = []
    if not isinstance(body, dict):
        return out
    for key, value in body.items():
        spec = schema.fields.get(key)
        if spec is None or value is None:
            continue
        try:
            parsed = spec.parse(value)
        except Exception:  # a refused value does not matter here
            continue
        out += [p for p in (parsed if isinstance(parsed, list) else [parsed])
                if isinstance(p, str)]
    return out


def nesting(raw: bytes) -> int:
    depth = deepest = 0
    for b in raw:
        depth += b in b"[{"
        depth -= b in b"]}"
        deepest = max(deepest, depth)
    return deepest


def control_characters(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


# -- one example ---------------------------------------------------------------------------------


@dataclass
class Tally:
    examples: int = 0
    statuses: Counter = field(default_factory=Counter)
    known: Counter = field(default_factory=Counter)


class Example:
    """One request and the checks on what it did."""

    def __init__(self, tree: Tree, pool: asyncpg.Pool, key: str, schema: Schema,
                 who: Who, target: str, shape: Shape) -> None:
        self.tree, self.pool, self.key, self.schema = tree, pool, key, schema
        self.route = ROUTES[key]
        self.method, self.path = key.split(" ", 1)
        self.who, self.shape = who, shape
        self.target = tree.ids[target] if target else None
        if self.target is not None:
            self.path = self.path.replace("{id}", str(self.target))
        self.sent: Any = None
        if shape.kind == "valid":
            body = self.route.valid(tree, who, next(_seq))
            body.update(shape.overrides)
            for k in shape.drops:
                body.pop(k, None)
            self.sent = body
        elif shape.kind == "json":
            self.sent = shape.document

    def __repr__(self) -> str:
        what = (f"raw {self.shape.raw[:200]!r} as {self.shape.content_type}"
                if self.shape.kind == "raw" else f"{self.sent!r}")
        return f"{self.who.name}: {self.method} {self.path} {what}"

    async def run(self, tally: Tally) -> None:
        if self.shape.kind == "raw":
            raw, ctype = self.shape.raw, self.shape.content_type
        else:
            raw, ctype = json.dumps(self.sent).encode(), "application/json"
        balance = await self._balance()
        before = await snapshot(self.pool)
        mark = before["audit_log"][2]
        reply = await self.who.api.call(self.method, self.path, raw=raw, content_type=ctype)
        after = await snapshot(self.pool)
        tally.examples += 1
        tally.statuses[reply.status] += 1
        if reply.status >= 500:
            known = self._known_5xx(raw, balance)
            assert known, f"{self!r} answered {reply!r}"
            tally.known[known] += 1
            assert before == after, f"{self!r} failed ({reply!r}) yet wrote {diff(before, after)}"
            return
        if reply.status >= 400:
            self._check_problem(reply)
            assert before == after, f"{self!r} refused ({reply!r}) yet wrote {diff(before, after)}"
            return
        if self.shape.kind == "raw":
            self.sent = json.loads(raw)
        await self._check_written(reply, before, after, mark, balance, tally)

    async def _balance(self) -> Decimal | None:
        if not self.key.endswith("/credit"):
            return None
        sql = {"dealers": "SELECT balance FROM dealers WHERE id = $1",
               "extensions": "SELECT coalesce((SELECT balance FROM credit_accounts"
                             " WHERE extension_id = $1), 0)",
               "tenants": "SELECT coalesce((SELECT balance FROM credit_accounts"
                          " WHERE tenant_id = $1 AND extension_id IS NULL), 0)"}
        async with self.pool.acquire() as conn:
            return await conn.fetchval(sql[self.path.split("/")[3]], self.target)

    def _known_5xx(self, raw: bytes, balance: Decimal | None) -> str | None:
        if self.shape.kind == "raw" and nesting(raw) > 200:
            return "deep-json"
        body = self.sent if self.sent is not None else _loads(raw)
        if any(unstorable(s) for s in accepted_strings(self.schema, body)):
            return "unstorable-text"
        if balance is not None and isinstance(body, dict):
            try:
                amount = self.schema.fields["amount"].parse(body["amount"])
            except Exception:  # an invalid amount is no excuse for a 500
                return None
            if abs(balance + amount) >= Decimal(10) ** 10:
                return "credit-overflow"
        return None

    def _check_problem(self, reply: Reply) -> None:
        ctype = reply.headers.get("Content-Type", "")
        assert ctype.startswith("application/problem+json"), f"{self!r}: {ctype} {reply!r}"
        body = reply.body
        assert isinstance(body, dict) and body.get("status") == reply.status, f"{self!r}: {reply!r}"
        assert isinstance(body.get("title"), str) and isinstance(body.get("type"), str), body
        if reply.status == 422 or "errors" in body:
            errors = body.get("errors")
            assert isinstance(errors, list) and errors, f"{self!r}: 422 without errors: {body}"
            for e in errors:
                assert isinstance(e, dict) and set(e) == {"pointer", "detail"}, body
                assert isinstance(e["pointer"], str) and e["pointer"].startswith("#"), body
                assert isinstance(e["detail"], str) and e["detail"], body

    async def _check_written(self, reply: Reply, before: dict, after: dict, mark: int,
                             balance: Decimal | None, tally: Tally) -> None:
        route = self.route
        want = route.status or (201 if route.creates else 200)
        assert reply.status == want, f"{self!r} answered {reply!r}"
        assert isinstance(self.sent, dict), f"{self!r} accepted a non-object: {reply!r}"
        assert reply.headers.get("Content-Type", "").startswith("application/json"), reply
        got = reply.body
        changed = {t for t in TABLES if before[t] != after[t]}
        allowed = {route.table, "audit_log"} | route.side
        assert changed <= allowed, f"{self!r} also changed {sorted(changed - allowed)}"
        if route.bulk:
            await self._check_bulk(got, before, after, mark, tally)
            return
        grown = after[route.table][0] - before[route.table][0]
        assert grown == (1 if route.creates else 0), f"{self!r}: {route.table} grew by {grown}"

        key = got["client_id"] if route.table == "api_clients" else got["id"]
        async with self.pool.acquire() as conn:
            entries = await conn.fetch(
                "SELECT actor_id, action, entity, entity_id FROM audit_log WHERE id > $1", mark)
        action = route.action or ("create" if route.creates else "update")
        assert [tuple(e) for e in entries] == [(self.who.actor, action, route.entity, str(key))], (
            f"{self!r}: audit entries {[dict(e) for e in entries]}")

        await self._check_read_back(got)
        if balance is not None:
            amount = self.schema.fields["amount"].parse(self.sent["amount"])
            assert Decimal(got["balance"]) == balance + amount, f"{self!r}: {got['balance']}"
            return
        self._check_echo(got, tally)

    async def _check_bulk(self, got: dict[str, Any], before: dict, after: dict, mark: int,
                          tally: Tally) -> None:
        """As many rows as asked, numbered as asked, each audited and read back as sent."""
        sent = self.schema.validate(self.sent)
        width, first = len(sent["first_number"]), int(sent["first_number"])
        numbers = [str(first + i).zfill(width) for i in range(sent["count"])]
        items = got["items"]
        assert got["count"] == len(items) == sent["count"], f"{self!r}: {got}"
        assert [i["number"] for i in items] == numbers, f"{self!r}: {got}"
        grown = after[self.route.table][0] - before[self.route.table][0]
        assert grown == len(items), f"{self!r}: {self.route.table} grew by {grown}"
        async with self.pool.acquire() as conn:
            entries = await conn.fetch("SELECT actor_id, action, entity, entity_id FROM audit_log"
                                       " WHERE id > $1 ORDER BY entity_id::bigint", mark)
        assert [tuple(e) for e in entries] == [
            (self.who.actor, "create", "extension", str(i["id"])) for i in items], (
            f"{self!r}: audit entries {[dict(e) for e in entries]}")
        for item in items:
            read = self.who.api.ok(await self.who.api.get(f"/api/v1/extensions/{item['id']}"))
            assert (read["tenant_id"], read["number"], read["account_code"]) == (
                self.target, item["number"], item["account_code"]), f"{self!r}: {read}"
            self._check_echo(read, tally)

    async def _check_read_back(self, got: dict[str, Any]) -> None:
        api = self.who.api
        if self.route.table == "api_clients":
            listed = api.ok(await api.get(f"/api/v1/dealers/{self.target}/api-clients"))
            shown = {k: v for k, v in got.items() if k != "client_secret"}
            assert shown in listed["items"], f"{self!r}: {shown} not in {listed}"
            return
        collection = self.path.split("/")[3]
        if self.key.endswith("/credit") and collection != "dealers":  # the account itself
            read = api.ok(await api.get(self.path))
            assert read == got, f"{self!r}: reported {got} but reads back {read}"
            return
        read = api.ok(await api.get(f"/api/v1/{collection}/{got['id']}"))
        assert read == got, f"{self!r}: reported {got} but reads back {read}"

    def _check_echo(self, got: dict[str, Any], tally: Tally) -> None:
        """Every field sent comes back as its validator made it."""
        for key, value in self.sent.items():
            spec = self.schema.fields[key]
            if spec.write_only or key not in got:
                continue
            if value is None and key in INHERITED:
                continue  # an empty cap inherits the parent's
            want = None if value is None else spec.parse(value)
            if same(got[key], want):
                continue
            if (key == "monthly_value" and isinstance(want, Decimal)
                    and Decimal(got[key]) == want.quantize(Decimal("0.01"))):
                tally.known["did-money-rounding"] += 1
                continue
            raise AssertionError(f"{self!r}: sent {key}={value!r}, which validates as "
                                 f"{want!r}, but the reply holds {got[key]!r}")
        for key, value in got.items():
            if key == "notes" or not isinstance(value, str) or not control_characters(value):
                continue
            spec = self.schema.fields.get(key)
            if spec is not None and spec.schema.get("format") in HOST_FORMATS:
                tally.known["control-characters-in-hosts"] += 1
                continue
            if key == "email":
                tally.known["control-characters-in-email"] += 1
                continue
            raise AssertionError(f"{self!r}: accepted a control character in {key}={value!r}")


INHERITED = frozenset({"max_tenants", "max_extensions", "max_calls", "node_id"})


def same(reported: Any, expected: Any) -> bool:
    if isinstance(expected, Decimal):
        return reported is not None and Decimal(str(reported)) == expected
    return reported == expected and type(reported) is type(expected)


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def diff(before: dict, after: dict) -> list[str]:
    return [t for t in TABLES if before[t] != after[t]]


# -- the property tests ---------------------------------------------------------------------------


def run_on(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on `loop` (owned by another thread) and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=120)


@pytest.mark.parametrize("op", body_operations(), ids=op_key)
async def test_write_route_never_fails_and_writes_only_what_it_reports(
        api: Api, op: Operation) -> None:
    tree = await build_tree(api)
    key = op_key(op)
    route, schema = ROUTES[key], op.body
    assert schema is not None
    loop = asyncio.get_running_loop()
    tally = Tally()
    principals = {tree.op.name: tree.op, tree.d.name: tree.d}

    first = route.targets[0] if route.targets else ""

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    # always tried as well: the valid body as it is, and a body that is not JSON
    @example(who=tree.op.name, target=first, shape=Shape("valid"))
    @example(who=tree.op.name, target=first, shape=Shape("raw", raw=b'{"name": '))
    @given(who=st.sampled_from(sorted(principals)),
           target=st.sampled_from(route.targets or ("",)),
           shape=shapes(schema, tree.refs))
    def prop(who: str, target: str, shape: Shape) -> None:
        example = Example(tree, api.pool, key, schema, principals[who], target, shape)
        run_on(loop, example.run(tally))

    await loop.run_in_executor(None, prop)

    print(f"\n{key}: {tally.examples} examples, statuses {dict(sorted(tally.statuses.items()))}"
          + (f", known bugs met {dict(tally.known)}" if tally.known else ""))
    assert tally.examples >= EXAMPLES
    assert not tally.known, f"product bugs met: {dict(tally.known)}"
    assert any(200 <= s < 300 for s in tally.statuses), "no example was accepted"
    assert any(400 <= s < 500 for s in tally.statuses), "no example was refused"


# -- known bugs, one request each --------------------------------------------------------------


async def few_objects(api: Api) -> dict[str, int]:
    """A dealer R with a tenant T, a range with a DID X, and a node N: enough for one
    request, cheaper than the whole tree."""
    ids = {"R": (await api.dealer("distributor"))["id"]}
    ids["T"] = (await api.tenant(ids["R"]))["id"]
    ids["N"] = api.ok(await api.post("/api/v1/nodes", NODE), 201)["id"]
    rng = api.ok(await api.post("/api/v1/number-ranges", {
        "dealer_id": ids["R"], "name": "Range", "country_code": "55", "area_code": "11",
        "first_number": 1000, "last_number": 1999}), 201)["id"]
    ids["X"] = api.ok(await api.post("/api/v1/dids", {"range_id": rng, "local_number": 1000}),
                      201)["id"]
    return ids


UNSTORABLE = [
    ("tenant-notes-surrogate", "PATCH", "/api/v1/tenants/{T}", {"notes": "a\ud800b"}),
    ("dealer-password-surrogate", "POST", "/api/v1/dealers",
     {"level": "distributor", "name": "X", "login": "x-surrogate", "password": "pass\ud800word"}),
    ("api-client-email-nul", "POST", "/api/v1/dealers/{R}/api-clients",
     {"name": "X", "email": "a\x00b@example.com", "allowed_cidrs": ["10.0.0.0/8"]}),
    ("url-surrogate", "PATCH", "/api/v1/dealers/{R}", {"portal_url": "https://a.example/\ud800"}),
    ("node-secret-surrogate", "PATCH", "/api/v1/nodes/{N}", {"ami_secret": "secret-\ud800-123456"}),
]


@pytest.mark.parametrize(("method", "path", "body"), [u[1:] for u in UNSTORABLE],
                         ids=[u[0] for u in UNSTORABLE])
async def test_text_the_database_cannot_store_is_refused_with_422(
        api: Api, method: str, path: str, body: dict[str, Any]) -> None:
    ids = await few_objects(api)
    before = await snapshot(api.pool)
    reply = await api.call(method, path.format(**ids), body)
    assert reply.status == 422, reply
    assert await snapshot(api.pool) == before


CONTROL = [
    ("sip-domain-trailing-newline", "POST", "/api/v1/tenants",
     {"name": "X", "sip_domain": "pbx.example.com\n"}),
    ("portal-domain-trailing-newline", "PATCH", "/api/v1/dealers/{R}",
     {"portal_domain": "portal.example.com\n"}),
    ("registration-address-trailing-newline", "PATCH", "/api/v1/dealers/{R}",
     {"registration_address": "sip.example.com\n"}),
    ("ari-url-newline", "PATCH", "/api/v1/nodes/{N}",
     {"ari_url": "http://10.0.0.5:8088/ari\n[section]"}),
    ("portal-url-tab", "PATCH", "/api/v1/dealers/{R}", {"portal_url": "https://a.example/\tx"}),
]


@pytest.mark.parametrize(("method", "path", "body"), [c[1:] for c in CONTROL],
                         ids=[c[0] for c in CONTROL])
async def test_host_domain_and_url_fields_refuse_unsafe_characters(
        api: Api, method: str, path: str, body: dict[str, Any]) -> None:
    ids = await few_objects(api)
    before = await snapshot(api.pool)
    reply = await api.call(method, path.format(**ids), body)
    assert reply.status == 422, reply
    assert await snapshot(api.pool) == before


@pytest.mark.parametrize("email", ["ops\x1b[2J@example.com", "ops@example.com\x07"])
async def test_api_client_email_refuses_control_characters(api: Api, email: str) -> None:
    ids = await few_objects(api)
    before = await snapshot(api.pool)
    reply = await api.post(f"/api/v1/dealers/{ids['R']}/api-clients", {
        "name": "X", "email": email, "allowed_cidrs": ["10.0.0.0/8"]})
    assert reply.status == 422, reply
    assert await snapshot(api.pool) == before


async def test_did_monthly_value_is_stored_as_accepted(api: Api) -> None:
    ids = await few_objects(api)
    reply = await api.patch(f"/api/v1/dids/{ids['X']}", {"monthly_value": "1.2345"})
    assert reply.status == 422 or (reply.status == 200
                                   and Decimal(reply.body["monthly_value"]) == Decimal("1.2345")
                                   ), reply


async def test_credit_overflowing_the_balance_is_refused_not_a_500(api: Api) -> None:
    ids = await few_objects(api)
    path = f"/api/v1/dealers/{ids['R']}/credit"
    # The balance holds up to 9,999,999,999.9999: the tenth top-up of a billion overflows.
    for _ in range(9):
        api.ok(await api.post(path, {"amount": "1000000000"}))
    before = await snapshot(api.pool)
    reply = await api.post(path, {"amount": "1000000000"})
    assert reply.status == 409, reply
    assert await snapshot(api.pool) == before


@pytest.mark.parametrize("path", ["/api/v1/tenants", "/api/v1/plans"])
async def test_deeply_nested_json_is_a_400_not_a_500(api: Api, path: str) -> None:
    before = await snapshot(api.pool)
    reply = await api.call("POST", path, raw=b"[" * 1000 + b"]" * 1000)
    assert reply.status == 400, reply
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert await snapshot(api.pool) == before


# Path ids and query strings are parsed with str.isdigit(), which is true for digits int()
# refuses (superscripts, circled digits): the ValueError escapes as a text/plain 500.


@pytest.mark.parametrize("path", ["/api/v1/tenants/%C2%B2", "/api/v1/dealers/%E2%91%A0",
                                  "/api/v1/extensions/1%C2%B2"])
async def test_non_ascii_digit_in_a_path_id_is_404(api: Api, path: str) -> None:
    reply = await api.patch(path, {"name": "X"})
    assert reply.status == 404, reply


@pytest.mark.parametrize("query", ["limit=%C2%B2", "after=%C2%B2", "dealer_id=%C2%B2"])
async def test_non_ascii_digit_in_a_list_query_is_422(api: Api, query: str) -> None:
    reply = await api.get(f"/api/v1/tenants?{query}")
    assert reply.status == 422, reply


async def test_audit_time_filter_before_year_one_is_422(api: Api) -> None:
    reply = await api.get("/api/v1/audit?since=0001-01-01T00:00:00%2B01:00")
    assert reply.status == 422, reply
