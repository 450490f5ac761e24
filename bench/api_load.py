"""Load benchmark of the REST API: extension list (three ways) and create, against /healthz.

Target: >= 1,000 list requests/s with p99 <= 50 ms at 10,000 extensions, on 2 cores.

What it does, end to end, cleaning up whatever it started even on failure:
  1. PostgreSQL: a fresh embedded server in a temporary directory, or PBX_DSN if set (that
     database must be empty, or pass --reset to drop and recreate its `public` schema).
  2. Migrations, the operator, then the real service (`pbxctl serve`) as a subprocess on
     127.0.0.1 and a free port; waits for /readyz.
  3. Through the API: distributor > reseller (+ a sibling reseller), API credentials and
     tenants; then the extensions with one INSERT ... SELECT generate_series (triggers run;
     --seed-batch splits it into statements of that many rows).
  4. wrk (Debian package; installed with apt-get when missing and running as root) with
     bench/api_load.lua, for every scenario and concurrency level:
       healthz     GET /healthz (the raw HTTP stack, the baseline)
       list-op     GET /api/v1/extensions?limit=50 as the operator (sees everything)
       list-res    same as the reseller (its subtree filter: the realistic case)
       list-deep   GET /api/v1/extensions?limit=50&after=<id near the end>, as the reseller
       create      POST /api/v1/extensions as the reseller, unique number per request
       bulk        POST /api/v1/tenants/{id}/extensions/bulk as the reseller, --bulk-count
                   extensions per request (a new tenant for every run)
  5. A table with requests/s, p50, p99, errors (responses >= 400 and socket errors), the
     ratio to healthz at the same concurrency and the CPU used by the service, PostgreSQL
     and wrk; PASS/MISS against the target. Also written to bench/results/api_load.txt.

Optional diagnostics: --explain (EXPLAIN ANALYZE of the list and principal queries and
per-step timings measured in-process), --profile (py-spy on the service during list-res).

Exit status: 0 when the run completed (whether or not the target is met), 1 when the run
itself failed, 2 on bad arguments.

    .venv/bin/python bench/api_load.py [--duration 10] [--concurrency 4,16,64] [--explain]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402

from bench.common import (  # noqa: E402
    BenchError,
    children_of,
    cpu_seconds,
    free_port,
    host_cpu,
    log,
    stop_process,
    summarize_profile,
)
from bench.services import service_env, wait_ready  # noqa: E402
from bench.services import start_postgres as embedded_postgres  # noqa: E402

BENCH = ROOT / "bench"
LUA = BENCH / "api_load.lua"
RESULTS = BENCH / "results"
TARGET_RPS = 1000.0
TARGET_P99_MS = 50.0
PASSWORD = "correct-horse-battery"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)


# -- wrk -------------------------------------------------------------------------------------
def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchError("wrk is not installed: run `apt-get install -y wrk` (Debian) as root")
    log("wrk missing: apt-get install -y wrk")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-q", "wrk"],
                ["sh", "-c", "apt-get update -q && apt-get install -y -q wrk"]):
        try:
            subprocess.run(cmd, check=True, timeout=300, env=env, capture_output=True)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            continue
        path = shutil.which("wrk")
        if path:
            return path
    raise BenchError("could not install wrk with apt-get; install it and run again")


def wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
    return (out.stdout or out.stderr).splitlines()[0].strip()


@dataclass
class CpuMeter:
    service_pid: int
    postmaster_pid: int | None

    def sample(self) -> dict[str, Any]:
        busy, total = host_cpu()
        pg: dict[int, float] = {}
        if self.postmaster_pid:
            for pid in [self.postmaster_pid, *children_of(self.postmaster_pid)]:
                pg[pid] = cpu_seconds(pid)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {"t": time.monotonic(), "svc": cpu_seconds(self.service_pid), "pg": pg,
                "wrk": kids.ru_utime + kids.ru_stime, "busy": busy, "total": total}

    @staticmethod
    def percent(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
        wall = b["t"] - a["t"]
        ncpu = os.cpu_count() or 1
        # PostgreSQL processes come and go (backends, autovacuum workers): count what each
        # process still alive at the end used since the first sample (or since it started).
        pg_used = sum(max(0.0, cpu - a["pg"].get(pid, 0.0)) for pid, cpu in b["pg"].items())
        out = {k: 100.0 * (b[k] - a[k]) / wall for k in ("svc", "wrk")}
        out["pg"] = 100.0 * pg_used / wall
        out["host"] = 100.0 * ncpu * (b["busy"] - a["busy"]) / max(1.0, b["total"] - a["total"])
        # CPU of processes this run did not start (other work on the machine skews results)
        out["other"] = max(0.0, out["host"] - out["svc"] - out["pg"] - out["wrk"])
        out["svc_s"], out["pg_s"] = b["svc"] - a["svc"], pg_used
        return out


# -- scenarios and results --------------------------------------------------------------------
@dataclass
class Scenario:
    key: str
    title: str
    path: str
    who: str          # "operator", "reseller" or "" (no token)
    mode: str = "get"  # or "create", "bulk"
    list_target: bool = False
    items: int = 1    # objects each request creates (bulk)


@dataclass
class Result:
    scenario: Scenario
    conc: int
    rps: float
    p50: float
    p90: float
    p99: float
    max: float
    requests: int
    status_errors: int
    socket_errors: int
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.status_errors + self.socket_errors

    def cpu_us(self, key: str) -> float:
        """CPU microseconds per request (robust to other load on the machine)."""
        return 1e6 * self.cpu[key] / self.requests if self.requests else float("nan")

    def meets_target(self) -> bool:
        return self.errors == 0 and self.rps >= TARGET_RPS and self.p99 <= TARGET_P99_MS


@dataclass
class Context:
    base_url: str
    tokens: dict[str, str]
    create_tenant: int
    wrk: str
    meter: CpuMeter
    wrk_log: Any
    api: Any = None   # Api, to make a fresh tenant for each bulk run
    number_block: int = 0


async def run_wrk(ctx: Context, scn: Scenario, conc: int, duration: float,
                  threads: int) -> Result:
    cmd = [ctx.wrk, f"-t{min(threads, conc)}", f"-c{conc}", f"-d{duration:g}s", "--latency",
           "--timeout", "5s", "-s", str(LUA)]
    if scn.who:
        cmd += ["-H", f"Authorization: Bearer {ctx.tokens[scn.who]}"]
    path = scn.path
    if scn.mode == "bulk":  # numbers start over in a new tenant for every run
        tenant = await ctx.api.call("POST", "/api/v1/tenants", {
            "name": f"Bench bulk {time.monotonic_ns()}"}, ctx.tokens[scn.who], 201)
        path = path.replace("{id}", str(tenant["id"]))
    cmd.append(ctx.base_url + path)
    if scn.mode == "create":
        ctx.number_block += 1
        if ctx.number_block > 89:
            raise BenchError("out of extension number blocks (8 digits) for creates")
        cmd += ["--", "create", str(ctx.create_tenant), str(10_000_000 + ctx.number_block
                                                             * 1_000_000 - 1)]
    elif scn.mode == "bulk":
        cmd += ["--", "bulk", str(scn.items)]
    else:
        cmd += ["--", "get"]
    before = ctx.meter.sample()
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=duration + 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"wrk did not finish within {duration + 60:g}s") from None
    after = ctx.meter.sample()
    text = out.decode(errors="replace")
    shown = [c if not c.startswith("Authorization:") else "Authorization: Bearer ..."
             for c in cmd]
    ctx.wrk_log.write(f"$ {' '.join(shown)}\n{text}\n")
    ctx.wrk_log.flush()
    line = next((ln for ln in text.splitlines() if ln.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed (exit {proc.returncode}):\n{text[-2000:]}")
    d = json.loads(line.removeprefix("WRKJSON "))
    secs = d["duration_us"] / 1e6
    return Result(scn, conc, d["requests"] / secs if secs else 0.0, d["p50_us"] / 1000,
                  d["p90_us"] / 1000, d["p99_us"] / 1000, d["max_us"] / 1000, d["requests"],
                  d["status"], d["connect"] + d["read"] + d["write"] + d["timeout"],
                  CpuMeter.percent(before, after))


# -- PostgreSQL and the service ---------------------------------------------------------------
def pbxctl_command() -> list[str]:
    script = Path(sys.executable).parent / "pbxctl"
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "controlplane.cli", "serve"]


@dataclass
class Stack:
    """Everything the run started, so that `close` can undo it."""

    workdir: Path
    pg: Any = None
    postmaster: int | None = None
    service: subprocess.Popen[bytes] | None = None
    service_log: Path | None = None
    http: aiohttp.ClientSession | None = None

    def close(self) -> None:
        stop_process(self.service, "the service")
        if self.pg is not None:
            try:
                self.pg.stop()
            except Exception as exc:  # noqa: BLE001 - report and go on cleaning up
                log(f"stopping PostgreSQL failed: {exc}")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def spawn_service(self, env: dict[str, str]) -> None:
        self.service_log = self.workdir / "service.log"
        with self.service_log.open("wb") as out:
            self.service = subprocess.Popen(pbxctl_command(), env=env, cwd=ROOT, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def service_tail(self, n: int = 30) -> str:
        if self.service_log is None or not self.service_log.exists():
            return ""
        return "\n".join(self.service_log.read_text(errors="replace").splitlines()[-n:])


async def start_postgres(stack: Stack, reset: bool) -> tuple[str, int | None]:
    dsn = os.environ.get("PBX_DSN", "")
    if dsn:
        log("using PBX_DSN")
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            if reset:
                await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
            elif await conn.fetchval("SELECT to_regclass('public.dealers') IS NOT NULL"):
                raise BenchError("the PBX_DSN database is not empty: pass --reset to drop and "
                                 "recreate its public schema")
        finally:
            await conn.close()
        return dsn, None
    dsn = await embedded_postgres(stack)
    return dsn, stack.postmaster


async def start_service(stack: Stack, dsn: str, port: int) -> str:
    env = service_env(stack, dsn, PBX_HTTP_HOST="127.0.0.1", PBX_HTTP_PORT=str(port),
                      PBX_LOG_LEVEL="WARNING",
                      # the code of the checkout this script is in, even from another tree
                      PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                               os.environ.get("PYTHONPATH")])))
    stack.spawn_service(env)
    assert stack.service is not None
    return await wait_ready(f"http://127.0.0.1:{port}", stack.service, stack.service_tail,
                            "the service")


# -- seeding ----------------------------------------------------------------------------------
class Api:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http, self.base = http, base

    async def call(self, method: str, path: str, body: Any, token: str = "",
                   expect: int = 200) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, self.base + path, json=body,
                                     headers=headers) as r:
            text = await r.text()
            if r.status != expect:
                raise BenchError(f"{method} {path} answered {r.status}: {text[:500]}")
            return json.loads(text) if text else None

    async def token(self, login: str, password: str, client_id: str, secret: str) -> str:
        body = await self.call("POST", "/oauth/token", {
            "grant_type": "password", "client_id": client_id, "client_secret": secret,
            "username": login, "password": password})
        return str(body["access_token"])


# Rows go round-robin over the tenants, so ids interleave as they would over time. The
# counter triggers count per statement (migration 0004): one statement of 10,000 rows is
# fast. (With the row triggers before 0004 it took ~45 s: pass --seed-batch 500 there.)
EXTENSIONS_SQL = """
INSERT INTO extensions (tenant_id, number, name, account_code, sip_password)
SELECT ($1::bigint[])[1 + g % cardinality($1::bigint[])],
       (10000 + g / cardinality($1::bigint[]))::text,
       'Bench ' || g,
       (100000 + g)::text,
       md5(g::text)
  FROM generate_series($2::int, $3::int - 1) AS g
"""


@dataclass
class Seed:
    tokens: dict[str, str]
    ids: dict[str, int]
    create_tenant: int
    deep_after: int
    counts: dict[str, int]


async def seed(api: Api, dsn: str, operator: dict[str, str], n_ext: int, n_tenants: int,
               other_tenants: int, batch: int) -> Seed:
    t0 = time.monotonic()
    op = await api.token(operator["login"], operator["password"], operator["client_id"],
                         operator["client_secret"])
    dist = await api.call("POST", "/api/v1/dealers", {
        "level": "distributor", "name": "Bench Distribution", "login": "bench-distributor",
        "password": PASSWORD, "max_tenants": 1000, "max_extensions": 5_000_000,
        "max_calls": 100_000}, op, 201)
    resellers = []
    for login in ("bench-reseller", "bench-reseller-2"):
        resellers.append(await api.call("POST", "/api/v1/dealers", {
            "level": "reseller", "parent_id": dist["id"], "name": login.title(),
            "login": login, "password": PASSWORD, "portal_domain": f"{login}.bench.test"},
            op, 201))
    reseller, sibling = resellers
    creds = await api.call("POST", f"/api/v1/dealers/{reseller['id']}/api-clients",
                           {"name": "bench", "allowed_cidrs": ["127.0.0.0/8"]}, op, 201)
    res = await api.token("bench-reseller", PASSWORD, creds["client_id"],
                          creds["client_secret"])
    tenant_ids = []
    for i in range(n_tenants):
        t = await api.call("POST", "/api/v1/tenants", {"name": f"Bench tenant {i}"}, res, 201)
        tenant_ids.append(t["id"])
    for i in range(other_tenants):
        t = await api.call("POST", "/api/v1/tenants", {
            "name": f"Other tenant {i}", "dealer_id": sibling["id"]}, op, 201)
        tenant_ids.append(t["id"])
    create_tenant = (await api.call("POST", "/api/v1/tenants", {
        "name": "Bench creates", "max_extensions": 1_000_000}, res, 201))["id"]
    conn = await asyncpg.connect(dsn, timeout=10, command_timeout=600)
    try:
        t1 = time.monotonic()
        step = batch or n_ext
        for start in range(0, n_ext, step):
            await conn.execute(EXTENSIONS_SQL, tenant_ids, start, min(n_ext, start + step))
        log(f"{n_ext} extensions inserted in {time.monotonic() - t1:.1f}s, statements of "
            f"{step} rows (triggers included)")
        await conn.execute("VACUUM ANALYZE")
        counts = {
            "extensions": await conn.fetchval("SELECT count(*) FROM extensions"),
            "reseller_extensions": await conn.fetchval(
                "SELECT extension_count FROM dealers WHERE id = $1", reseller["id"]),
            "tenants": await conn.fetchval("SELECT count(*) FROM tenants"),
            "dealers": await conn.fetchval("SELECT count(*) FROM dealers"),
        }
        if counts["extensions"] != n_ext or await conn.fetchval(
                "SELECT extension_count FROM dealers WHERE level = 'operator'") != n_ext:
            raise BenchError(f"seeding mismatch: {counts}")
        deep_after = await conn.fetchval(
            "SELECT e.id FROM extensions e JOIN tenants t ON t.id = e.tenant_id"
            " WHERE t.dealer_id = $1 ORDER BY e.id DESC OFFSET 60 LIMIT 1", reseller["id"])
    finally:
        await conn.close()
    log(f"seeded in {time.monotonic() - t0:.1f}s: {counts}")
    return Seed({"operator": op, "reseller": res},
                {"operator": 1, "distributor": dist["id"], "reseller": reseller["id"]},
                create_tenant, int(deep_after), counts)


# -- diagnostics ------------------------------------------------------------------------------
class _Recording:
    """A connection that remembers the statements sent through it (and still runs them)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.statements: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._conn, name)
        if name not in ("fetch", "fetchrow", "fetchval", "execute"):
            return real

        async def call(sql: str, *args: Any, **kw: Any) -> Any:
            self.statements.append((sql, args))
            return await real(sql, *args, **kw)
        return call


async def _mean_us(fn: Any, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        await fn()
    return (time.perf_counter() - t0) / n * 1e6


def _is_postgres(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "postgres"
    except OSError:
        return False


async def _backend_cpu_us(conn: asyncpg.Connection, fn: Any, n: int) -> tuple[float, float]:
    """(PostgreSQL backend CPU, client wall) in microseconds per call of `fn`; the CPU is
    NaN when the server is not on this machine."""
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    local = _is_postgres(pid)
    c0 = cpu_seconds(pid) if local else 0.0
    wall = await _mean_us(fn, n)
    cpu = (cpu_seconds(pid) - c0) / n * 1e6 if local else float("nan")
    return cpu, wall


async def explain(dsn: str, sd: Seed, out: list[str]) -> None:
    """EXPLAIN ANALYZE the SQL of a list request and of the bearer check, and measure what
    each costs in PostgreSQL CPU and in the service, one request at a time (no load)."""
    from controlplane.api.resource import json_response
    from controlplane.api.resources.extensions import EXTENSIONS
    from controlplane.db.pool import _init_connection
    from controlplane.model.principal import Principal
    from controlplane.secrets import digest
    from controlplane.store.credentials import PRINCIPAL_SQL

    conn = await asyncpg.connect(dsn, timeout=10, command_timeout=60)
    await _init_connection(conn)
    n = 500
    try:
        cases = []
        for who, scope, query in (
                ("operator", sd.ids["operator"], {"limit": "50"}),
                ("reseller", sd.ids["reseller"], {"limit": "50"}),
                ("reseller deep", sd.ids["reseller"], {"limit": "50",
                                                       "after": str(sd.deep_after)})):
            rec = _Recording(conn)
            p = Principal(0, scope, "x", (), "", False, "127.0.0.1")
            await EXTENSIONS.list(rec, p, query)  # type: ignore[arg-type]
            cases.append((f"list as {who}", p, query, rec.statements))
        principal = ("bearer check (PRINCIPAL_SQL)", PRINCIPAL_SQL,
                     (digest(sd.tokens["reseller"]), "127.0.0.1"))
        statements = [(title, sql, args) for title, _, _, stmts in cases
                      for sql, args in stmts] + [principal]
        out.append("list SQL: " + " ".join(cases[0][3][-1][0].split()))
        for title, sql, args in statements:
            for _ in range(20):
                await conn.fetch(sql, *args)
            plan = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
            out.append(f"\n-- EXPLAIN ANALYZE: {title}")
            out.extend("   " + r[0] for r in plan)
        out.append(f"\n-- per statement, prepared as asyncpg does, mean of {n} (no load):"
                   " PostgreSQL backend CPU and client wall time, in us")
        out.append(f"   {'statement':<30} {'plan_cache_mode=auto':>24} "
                   f"{'force_generic_plan':>24}")
        reset_sql = conn.get_reset_query()
        for title, sql, args in [("SELECT 1", "SELECT 1", ())] + statements + [
                ("asyncpg default reset query", reset_sql, None)]:
            cells = []
            for mode in ("auto", "force_generic_plan"):
                await conn.execute(f"SET plan_cache_mode = {mode}")
                if args is None:
                    fn: Any = lambda s=sql: conn.execute(s)  # noqa: E731
                else:
                    stmt = await conn.prepare(sql)
                    fn = lambda st=stmt, a=args: st.fetch(*a)  # noqa: E731
                for _ in range(20):
                    await fn()
                cpu, wall = await _backend_cpu_us(conn, fn, n)
                cells.append(f"cpu {cpu:6.0f} wall {wall:6.0f}")
            out.append(f"   {title:<30} {cells[0]:>24} {cells[1]:>24}")
        await conn.execute("RESET plan_cache_mode")
        out.append(f"\n-- in the service's code path, mean of {n} (no load), in us")
        for title, p, query, _ in cases:
            list_us = await _mean_us(lambda p=p, q=query: EXTENSIONS.list(conn, p, q), n)
            page = await EXTENSIONS.list(conn, p, query)
            t0 = time.perf_counter()
            for _ in range(n):
                resp = json_response(page)
            json_us = (time.perf_counter() - t0) / n * 1e6
            body = len(resp.text or "")
            out.append(f"   {title:<22} Resource.list {list_us:6.0f} | json_response "
                       f"{json_us:5.0f} | body {body} bytes")
    finally:
        await conn.close()


def profile_service(pid: int, duration: float, dest: Path) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration",
                             str(max(1, int(duration))), "--rate", "250", "--nonblocking",
                             "--format", "raw", "--output", str(dest)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- report -----------------------------------------------------------------------------------
def table(results: list[Result], healthz: dict[int, float]) -> list[str]:
    head = (f"{'scenario':<10} {'conc':>4} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7} "
            f"{'p99 ms':>7} {'max ms':>7} {'errors':>6} {'vs hz':>5} {'svc%':>4} {'pg%':>4} "
            f"{'wrk%':>4} {'oth%':>4} {'svc us/req':>10} {'pg us/req':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        ratio = r.rps / healthz[r.conc] if healthz.get(r.conc) else float("nan")
        lines.append(
            f"{r.scenario.key:<10} {r.conc:>4} {r.rps:>7.0f} {r.p50:>7.1f} {r.p90:>7.1f} "
            f"{r.p99:>7.1f} {r.max:>7.1f} {r.errors:>6} {ratio:>5.2f} {r.cpu['svc']:>4.0f} "
            f"{r.cpu['pg']:>4.0f} {r.cpu['wrk']:>4.0f} {r.cpu['other']:>4.0f} "
            f"{r.cpu_us('svc_s'):>10.0f} {r.cpu_us('pg_s'):>9.0f}")
    return lines


def verdicts(results: list[Result], scenarios: list[Scenario]) -> tuple[list[str], bool]:
    lines, all_pass = [], True
    for scn in scenarios:
        mine = [r for r in results if r.scenario is scn]
        if not mine:
            continue
        clean = [r for r in mine if r.errors == 0] or mine
        # the operating point: the most requests/s within the latency bound (a closed loop
        # past saturation only adds queueing), else the most requests/s at all
        bounded = [r for r in clean if r.p99 <= TARGET_P99_MS] if scn.list_target else []
        best = max(bounded or clean, key=lambda r: r.rps)
        at16 = next((r for r in mine if r.conc == 16), None)
        for label, r in (("best", best), ("c=16", at16)):
            if r is None:
                continue
            if scn.list_target:
                ok = r.meets_target()
                if label == "best":
                    all_pass &= ok
                mark = "PASS" if ok else "MISS"
            else:
                mark = "----"
            made = f"  = {r.rps * scn.items:.0f} extensions/s" if scn.items > 1 else ""
            lines.append(f"{mark}  {scn.key:<10} {label:<5} c={r.conc:<3} {r.rps:7.0f} req/s  "
                         f"p99 {r.p99:6.1f} ms  errors {r.errors}{made}  ({scn.title})")
    return lines, all_pass


# -- main -------------------------------------------------------------------------------------
def git_commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "-uno", "--",
                            "controlplane"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + (" (controlplane/ has uncommitted changes)" if dirty else "")


async def main_async(args: argparse.Namespace) -> int:
    from controlplane import bootstrap
    from controlplane.db.pool import migrate

    wrk = ensure_wrk()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stack = Stack(Path(tempfile.mkdtemp(prefix="pbx-bench-")))
    try:
        dsn, postmaster = await start_postgres(stack, args.reset)
        conn = await asyncpg.connect(dsn, timeout=10, command_timeout=120)
        try:
            await migrate(conn)
            operator = await bootstrap.ensure_operator(conn)
        finally:
            await conn.close()
        if not operator:
            raise BenchError("an operator already exists; use an empty database")
        port = free_port()
        base = await start_service(stack, dsn, port)
        assert stack.service is not None
        log(f"service pid {stack.service.pid} on {base}")
        http = aiohttp.ClientSession(timeout=HTTP_TIMEOUT)
        stack.http = http
        sd = await seed(Api(http, base), dsn, operator, args.extensions, args.tenants,
                        args.other_tenants, args.seed_batch)
        report: list[str] = []
        if args.explain:
            await explain(dsn, sd, report)
        scenarios = [
            Scenario("healthz", "GET /healthz, no auth: raw HTTP stack", "/healthz", ""),
            Scenario("list-op", "GET /api/v1/extensions?limit=50 as operator",
                     "/api/v1/extensions?limit=50", "operator", list_target=True),
            Scenario("list-res", "GET /api/v1/extensions?limit=50 as reseller",
                     "/api/v1/extensions?limit=50", "reseller", list_target=True),
            Scenario("list-deep", f"GET ...?limit=50&after={sd.deep_after} as reseller",
                     f"/api/v1/extensions?limit=50&after={sd.deep_after}", "reseller",
                     list_target=True),
            Scenario("create", "POST /api/v1/extensions as reseller",
                     "/api/v1/extensions", "reseller", mode="create"),
            Scenario("bulk", f"POST .../extensions/bulk, {args.bulk_count} per request, "
                     "as reseller", "/api/v1/tenants/{id}/extensions/bulk", "reseller",
                     mode="bulk", items=args.bulk_count),
        ]
        if args.only:
            keep = set(args.only.split(","))
            scenarios = [s for s in scenarios if s.key in keep or s.key == "healthz"]
        wrk_log_path = RESULTS / "api_load_wrk.log"
        wrk_log = wrk_log_path.with_suffix(".log.partial").open("w")
        ctx = Context(base, sd.tokens, sd.create_tenant, wrk,
                      CpuMeter(stack.service.pid, postmaster), wrk_log, Api(http, base))
        results: list[Result] = []
        profile_raw = RESULTS / "api_load_profile.txt"
        try:
            for scn in scenarios:
                log(f"{scn.key}: warm-up {args.warmup:g}s")
                await run_wrk(ctx, scn, 16, args.warmup, args.threads)
                for conc in args.concurrency:
                    spy = None
                    if args.profile and scn.key == args.profile and conc == 16:
                        spy = profile_service(stack.service.pid, args.duration,
                                                    profile_raw)
                    runs = [await run_wrk(ctx, scn, conc, args.duration, args.threads)
                            for _ in range(args.repeat)]
                    r = sorted(runs, key=lambda x: x.rps)[len(runs) // 2]
                    if spy is not None:
                        try:
                            spy.wait(timeout=30)
                        except subprocess.TimeoutExpired:
                            spy.kill()
                            spy.wait(timeout=10)
                    results.append(r)
                    log(f"{scn.key:<10} c={conc:<3} {r.rps:7.0f} req/s  p50 {r.p50:6.1f} ms"
                        f"  p99 {r.p99:6.1f} ms  errors {r.errors}  svc {r.cpu['svc']:.0f}%"
                        f"  pg {r.cpu['pg']:.0f}%"
                        + (f"  {r.rps * scn.items:.0f} ext/s" if scn.items > 1 else ""))
                    if stack.service.poll() is not None:
                        raise BenchError("the service died during the run:\n"
                                         + stack.service_tail())
        finally:
            wrk_log.close()
        healthz = {r.conc: r.rps for r in results if r.scenario.key == "healthz"}
        lines, all_pass = verdicts(results, scenarios)
        commit = git_commit()
        header = [
            f"API load benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  commit {commit}",
            f"machine: {os.cpu_count()} cores; {wrk_version(wrk)}, -t{args.threads}, "
            f"{args.duration:g}s per run after a {args.warmup:g}s warm-up; loopback; "
            f"median of {args.repeat} run(s)",
            f"data: {sd.counts['extensions']} extensions in {sd.counts['tenants'] - 1} tenants "
            f"(reseller sees {sd.counts['reseller_extensions']}), {sd.counts['dealers']} "
            f"dealers, seeded in statements of {args.seed_batch or args.extensions} rows; "
            "create and bulk run last and add rows",
            f"service: pbxctl serve, one process, default pool (db_pool_max 10); "
            f"PostgreSQL {'embedded' if postmaster else 'PBX_DSN'}",
            f"target: list >= {TARGET_RPS:.0f} req/s with p99 <= {TARGET_P99_MS:.0f} ms "
            "and no errors",
            "errors = responses >= 400 + socket errors; vs hz = req/s / healthz req/s at the "
            "same concurrency; svc/pg/wrk% = CPU used in % of one core by the service, "
            "PostgreSQL and wrk;",
            "oth% = CPU used by other processes on the machine (anything above ~5 means the "
            "run was disturbed); us/req = CPU microseconds per request",
            "",
        ]
        text = header + table(results, healthz) + ["", *lines, "",
                                                   "LIST TARGET: " + ("PASS" if all_pass
                                                                      else "MISS")]
        if report:
            text += ["", "== diagnostics (--explain) ==", *report]
        if args.profile and profile_raw.exists():
            text += ["", f"== py-spy profile of the service during {args.profile} c=16 "
                     f"({profile_raw.name}) ==", *summarize_profile(profile_raw)]
        output = "\n".join(text) + "\n"
        print(output)
        (RESULTS / "api_load.txt").write_text(output)
        os.replace(wrk_log.name, wrk_log_path)
        log(f"written to {RESULTS / 'api_load.txt'}")
        return 0
    finally:
        if stack.http is not None:
            await stack.http.close()
        stack.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per scenario")
    p.add_argument("--concurrency", default="4,16,64",
                   help="comma-separated connection counts (16 is always included)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per scenario and concurrency; the median by req/s is kept")
    p.add_argument("--extensions", type=int, default=10_000)
    p.add_argument("--seed-batch", type=int, default=0,
                   help="seed the extensions in statements of this many rows (0: one)")
    p.add_argument("--bulk-count", type=int, default=100,
                   help="extensions per request of the bulk scenario (at most 1000)")
    p.add_argument("--tenants", type=int, default=16, help="tenants of the measured reseller")
    p.add_argument("--other-tenants", type=int, default=4,
                   help="tenants of a sibling reseller (rows the reseller must not see)")
    p.add_argument("--only", default="", help="comma-separated scenario keys to run")
    p.add_argument("--explain", action="store_true",
                   help="EXPLAIN ANALYZE the per-request SQL and time each step in-process")
    p.add_argument("--profile", default="", metavar="SCENARIO",
                   help="py-spy record the service during SCENARIO at c=16 (e.g. list-res)")
    p.add_argument("--reset", action="store_true",
                   help="with PBX_DSN: drop and recreate the public schema first")
    args = p.parse_args(argv)
    try:
        levels = {int(c) for c in args.concurrency.split(",") if c.strip()}
    except ValueError:
        p.error("--concurrency takes integers, e.g. 4,16,64")
    args.concurrency = sorted(levels | {16})
    if min(args.concurrency) < 1 or args.duration <= 0 or args.threads < 1 or args.repeat < 1:
        p.error("concurrency, duration and threads must be positive")
    if not 1 <= args.extensions <= 800_000 or args.tenants < 1 or args.other_tenants < 0:
        p.error("--extensions 1..800000, --tenants >= 1, --other-tenants >= 0")
    if not 1 <= args.bulk_count <= 1000 or args.seed_batch < 0:
        p.error("--bulk-count 1..1000, --seed-batch >= 0")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop what was started.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return asyncio.run(main_async(args))
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("benchmark interrupted", file=sys.stderr)
    except Exception:  # noqa: BLE001 - any other failure is a failed run too
        traceback.print_exc()
        print("benchmark failed", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
