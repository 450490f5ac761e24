"""Provisioning benchmark: how fast extension changes reach an Asterisk node, on a node holding
~0 extensions and on one holding 50,000, side by side, with phones and calls on the node.

Targets (2 cores, one sandboxed node, loopback):
  (1) one extension created, changed or deleted is effective on a node already holding 50,000
      extensions within 1 s p99 (the phone can register with the new credentials, or is
      refused after deletion);
  (2) bulk creation >= 500 extensions/s end to end (until on the node);
  (3) registered phones and calls in progress are not disturbed;
  (4) a burst of dialplan changes costs one reload.

What it does, end to end, cleaning up whatever it started even on failure:
  1. A fresh embedded PostgreSQL in a temporary directory, migrations, the operator; the API
     (`pbxctl serve`) as a subprocess on 127.0.0.1; one sandboxed Asterisk node (default
     127.0.0.6, started with start_sandbox_node) and its agent (`pbxctl agent`) as a
     subprocess. Through the API: distributor (on the node) > reseller with the registration
     address (default 127.0.0.31), its API credentials, tenants.
  2. Phones: --phones extensions registered with SIPp from fixed ports and re-registered every
     --refresh seconds; two of them answer calls that two others place and hold for
     --call-seconds (bench/sipp/long_call.xml), back to back, --calls at a time, for the
     whole measured window. An AMI session of the benchmark follows ContactStatus events
     and lists the node's contacts every 2 s; OPTIONS go to the registrar every 0.2 s.
  3. (1) at ~0 extensions: --changes single changes through the API, one at a time, in
     cycles of create (POST), password rotation (rotate-password), rename (PATCH name),
     deactivation (PATCH active=false) and deletion (DELETE). Latency from the API response to
     the moment the node shows the change: the agent writes the marker pbx-fp/<code> last,
     after the PJSIP objects, so the benchmark polls it over AMI (DBGet, about every 5 ms).
     Every change is then confirmed with a SIPp REGISTER: the new credentials register (and
     the old password is refused after a rotation; the caller ID shows the new name after a
     rename), or the phone is refused after deactivation and deletion.
  4. (4) a burst of --burst tenant creations through the API (each a new dialplan file): the
     `dialplan reload`s the agent runs for it (counted in its log) and when every new context
     shows on the node.
  5. (2a) --extensions rows by INSERT ... SELECT generate_series in statements of 500 rows,
     each committed (triggers run, one NOTIFY per row; see SEED_BATCH); time from the first
     INSERT until every marker is on the node (`database query` over AMI every 0.25 s), then
     until Asterisk has worked through the new AORs (its sorcery AOR observer idle, at most
     --settle-within seconds).
  6. (1) and (4) again on the node now holding --extensions.
  7. (2b) --api-creates POST /api/v1/extensions from --api-clients concurrent clients, and
     (2c) --api-bulk extensions through POST /api/v1/tenants/{id}/extensions/bulk when the API
     has it: the API's rate, and the rate end to end until every new extension is on the node
     (and until Asterisk is done with them).
  8. Reconcile of the full node when nothing changed (agent restarted), while the phones and
     calls still run; then (3) is judged: every call ended normally (SIPp exit 0 on both
     sides), no phone lost its contact in any sample, no ContactStatus Removed/Unreachable,
     every re-registration succeeded, and the registrations API lists every phone.
  9. Reconcile after wiping the agent's state in the node's astdb (ps_endpoint, ps_aor,
     ps_auth, pbx-fp, pbx-ext): the full re-push rate.
 10. A table with PASS/MISS per target and CPU per phase, printed and written to
     bench/results/provisioning.txt; the agent's log to bench/results/provisioning_agent.log.

--profile samples the agent with py-spy during the bulk push and both reconciles
(`.venv/bin/pip install py-spy`) and appends the top frames to the report.

Exit status: 0 when the run completed (whether or not the targets are met), 1 when the run
itself failed, 2 on bad arguments. Needs root (the sandbox) and SIPp (Debian sip-tester).

    .venv/bin/python bench/provisioning.py --extensions 2000 --changes 20      # quick
    .venv/bin/python bench/provisioning.py --settle-within 300                # 50,000
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import collections
import hashlib
import ipaddress
import itertools
import json
import math
import os
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
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402

from bench.common import (  # noqa: E402
    BenchError,
    cpu_seconds,
    free_port,
    host_cpu,
    log,
    pct,
    stop_process,
    summarize_profile,
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
from controlplane.asterisk.ami import AmiSession, AmiUnavailable  # noqa: E402
from controlplane.provisioning.desired import NodeRecord  # noqa: E402

BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
SCENARIOS = ROOT / "sipp-scenarios"
LONG_CALL = BENCH / "sipp" / "long_call.xml"
REGISTER = BENCH / "sipp" / "register.xml"  # ignores a late 401 to a retransmission
NODE_NAME = "benchprov"
TARGET_P99_S = 1.0
TARGET_RATE = 500.0
PASSWORD = "correct-horse-battery"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)
FP_FAMILY = "pbx-fp"
WIPED_FAMILIES = ("ps_endpoint", "ps_aor", "ps_auth", "pbx-fp", "pbx-ext")
# Account code ranges: seed 100000 + i, victims 800000 + i, single creates 810000 + i,
# phones 900001 + i. Extensions created by --api-creates get codes the API generates.
SEED_CODE, VICTIM_CODE, CREATE_CODE, PHONE_CODE = 100_000, 800_000, 810_000, 900_001
MAX_EXTENSIONS = 600_000


def seeded_password(code: str) -> str:
    """The SIP password of an extension inserted by SQL (same formula as the SQL)."""
    return hashlib.md5(f"bench-{code}".encode()).hexdigest()[:16]


async def until(predicate: Any, what: str, within: float, every: float = 0.1) -> float:
    """Await an async predicate until true; seconds taken; BenchError after `within`."""
    t0 = time.monotonic()
    while True:
        if await predicate():
            return time.monotonic() - t0
        if time.monotonic() - t0 > within:
            raise BenchError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(every)


# -- everything the run starts ----------------------------------------------------------------
CPU_ROLES = ("agent", "asterisk", "pg", "api", "bench")


@dataclass
class PhaseCpu:
    name: str
    wall: float
    percent: dict[str, float]


@dataclass
class Stack:
    workdir: Path
    pg: Any = None
    postmaster: int | None = None
    api: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None
    node: Any = None
    sipps: set[Any] = field(default_factory=set)
    spies: list[subprocess.Popen[bytes]] = field(default_factory=list)
    closed: bool = False
    # (stopped, logged in again) of each agent restart: no FastAGI server in between, so
    # new calls are refused by the closed admission policy (calls in progress go on).
    agent_down: list[tuple[float, float]] = field(default_factory=list)

    @property
    def agent_log(self) -> Path:
        return self.workdir / "agent.log"

    @property
    def api_log(self) -> Path:
        return self.workdir / "api.log"

    def cpu_sample(self) -> dict[str, Any]:
        busy, total = host_cpu()
        me = resource.getrusage(resource.RUSAGE_SELF)
        return {"t": time.monotonic(), "agent": cpu_seconds(self.agent.pid if self.agent
                                                            else None),
                "asterisk": cpu_seconds(self.node.pid if self.node else None),
                "pg": tree_cpu(self.postmaster),
                "api": cpu_seconds(self.api.pid if self.api else None),
                "bench": me.ru_utime + me.ru_stime, "busy": busy, "total": total}

    @staticmethod
    def cpu_phase(name: str, a: dict[str, Any], b: dict[str, Any]) -> PhaseCpu:
        wall = max(1e-6, b["t"] - a["t"])
        out = {k: 100.0 * (b[k] - a[k]) / wall for k in CPU_ROLES if k != "pg"}
        out["pg"] = 100.0 * tree_used(a["pg"], b["pg"]) / wall
        out["host"] = 100.0 * (os.cpu_count() or 1) * (b["busy"] - a["busy"]) / max(
            1.0, b["total"] - a["total"])
        return PhaseCpu(name, wall, out)

    async def reap_sipps(self) -> None:
        """Kill SIPp runs still going (after a failure) while the event loop can reap them."""
        for proc in list(self.sipps):
            try:
                if proc.returncode is None:
                    proc.kill()
                await asyncio.wait_for(proc.wait(), 5)
            except (ProcessLookupError, OSError, TimeoutError):
                pass
        self.sipps.clear()

    def stop_agent(self) -> None:
        proc, self.agent = self.agent, None
        stop_process(proc)

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
        for spy in self.spies:
            if spy.poll() is None:
                spy.kill()
                spy.wait(timeout=10)
        try:
            self.stop_agent()
        except Exception as exc:  # noqa: BLE001 - report and go on cleaning up
            log(f"stopping the agent failed: {exc}")
        if self.agent_log.exists():
            try:
                RESULTS.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.agent_log, RESULTS / "provisioning_agent.log")
            except OSError:
                pass
        stop_services(self)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def tail(self, path: Path, n: int = 30) -> str:
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def start_agent(stack: Stack, dsn: str, tenant_dir: Path) -> float:
    """Spawn `pbxctl agent`; returns the wall-clock time of the spawn."""
    # The node's CDR file as the host sees it: calls end by their CDR, not by a lapsed lease.
    env = service_env(stack, dsn, PBX_LOG_LEVEL="INFO",
                      PBX_CDR_FILE=str(stack.node.cdr_file) if stack.node else "")
    spawned = time.time()
    with stack.agent_log.open("ab") as out:
        stack.agent = subprocess.Popen(
            pbxctl("agent", "--node", NODE_NAME, "--tenant-dir", str(tenant_dir)), env=env,
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return spawned


def check_agent(stack: Stack) -> None:
    if stack.agent is None or stack.agent.poll() is not None:
        code = None if stack.agent is None else stack.agent.returncode
        raise BenchError(f"the agent is not running (exit {code}):\n"
                         + stack.tail(stack.agent_log))


async def agent_quiet(stack: Stack, within: float, window: float = 1.0,
                      threshold: float = 0.03) -> float:
    """Until the agent used less than `threshold` CPU seconds over `window`; returns the
    monotonic time at which that quiet window began."""
    t0 = time.monotonic()
    last, last_t = cpu_seconds(stack.agent.pid if stack.agent else None), time.monotonic()
    while True:
        await asyncio.sleep(window)
        check_agent(stack)
        now = cpu_seconds(stack.agent.pid if stack.agent else None)
        if now - last < threshold:
            return last_t
        last, last_t = now, time.monotonic()
        if last_t - t0 > within:
            raise BenchError(f"the agent stayed busy for {within:g}s")


def agent_log_lines(stack: Stack, offset: int) -> list[tuple[float, str]]:
    """(epoch seconds, message) of the agent's log lines after byte `offset`."""
    if not stack.agent_log.exists():
        return []
    with stack.agent_log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    out = []
    for line in text.splitlines():
        try:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        out.append((stamp, line[24:]))
    return out


# -- py-spy -----------------------------------------------------------------------------------
def start_spy(stack: Stack, pid: int, dest: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "100", "--nonblocking",
                             "--format", "raw", "--output", str(dest)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.spies.append(proc)
    return proc


def stop_spy(proc: subprocess.Popen[bytes] | None) -> None:
    stop_process(proc, "py-spy", signal.SIGINT, 30)  # SIGINT: it writes its profile


# -- the API ----------------------------------------------------------------------------------
class Api:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http, self.base = http, base
        self.token = ""

    async def call(self, method: str, path: str, body: Any = None, token: str | None = None,
                   expect: int = 200) -> Any:
        tok = self.token if token is None else token
        headers = {"Authorization": f"Bearer {tok}"} if tok else {}
        async with self.http.request(method, self.base + path, json=body,
                                     headers=headers) as r:
            text = await r.text()
            if r.status != expect:
                raise BenchError(f"{method} {path} answered {r.status}: {text[:500]}")
            return json.loads(text) if text else None

    async def login(self, login: str, password: str, client_id: str, secret: str) -> str:
        body = await self.call("POST", "/oauth/token", {
            "grant_type": "password", "client_id": client_id, "client_secret": secret,
            "username": login, "password": password}, token="")
        return str(body["access_token"])


# -- SIPp -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phone:
    username: str
    password: str
    registrar: str
    number: str = ""

    def row(self, *extra: str) -> str:
        auth = f"[authentication username={self.username} password={self.password}]"
        return ";".join([self.username, auth, self.registrar, *extra])


@dataclass
class SippRun:
    returncode: int
    output: str
    elapsed: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def refused(self) -> bool:
        """Failed because the node answered with a 4xx (not a timeout)."""
        return self.returncode != 0 and "received 'SIP/2.0 4" in self.output


class Sipp:
    def __init__(self, stack: Stack, registrar: str) -> None:
        self.stack, self.registrar = stack, registrar
        self.dir = stack.workdir / "sipp"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._files = itertools.count()
        # Above the kernel's ephemeral ports (32768-60999 here): a port the agent's or the
        # API's own connections happened to hold made a SIPp run fail to bind.
        self._ports = itertools.cycle(range(61000, 63000))
        self._media = itertools.cycle(range(63000, 65520, 10))

    def port(self) -> int:
        return next(self._ports)

    async def run(self, scenario: Path, target: str | None, rows: list[str], *, port: int,
                  timeout: float, extra: tuple[str, ...] = ()) -> SippRun:
        inf = self.dir / f"{next(self._files)}.csv"
        inf.write_text("SEQUENTIAL\n" + "\n".join(rows) + "\n")
        args = ["sipp", *([target] if target else []), "-sf", str(scenario), "-inf", str(inf),
                "-m", "1", "-i", "127.0.0.1", "-p", str(port), "-mp", str(next(self._media)),
                "-nostdin", "-timeout", f"{math.ceil(timeout)}s", "-timeout_error",
                "-max_recv_loops", "1000", *extra]
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE,
                                                    cwd=self.dir)
        self.stack.sipps.add(proc)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), math.ceil(timeout) + 10)
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
        finally:
            self.stack.sipps.discard(proc)
            inf.unlink(missing_ok=True)
        # stderr says what went wrong; stdout is SIPp's final screen.
        text = err.decode(errors="replace").strip()[-2000:] or \
            out.decode(errors="replace")[-1500:]
        text = "\n".join(line for line in text.splitlines()
                         if not line.startswith("Resolving remote host"))
        return SippRun(proc.returncode if proc.returncode is not None else -9, text,
                       time.monotonic() - t0)

    async def register(self, phone: Phone, *, port: int | None = None, timeout: float = 2,
                       strict: bool = False) -> SippRun:
        """REGISTER; `strict` fails on any unexpected answer (to see a refusal's 4xx)."""
        scenario = SCENARIOS / "register.xml" if strict else REGISTER
        return await self.run(scenario, f"{phone.registrar}:5060", [phone.row()],
                              port=port or self.port(), timeout=timeout)


# -- the benchmark's own view of the node (AMI) -----------------------------------------------
class NodeProbe:
    def __init__(self, record: NodeRecord) -> None:
        self.ami = AmiSession(record.ami_host, record.ami_port, record.ami_username,
                              record.ami_secret, timeout=10, name="bench probe")
        self.ami.on_event("ContactStatus", self._on_contact)
        self.watch: set[str] = set()
        self.events: list[tuple[float, str, str]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.ami.run(self._stop))
        try:
            await asyncio.wait_for(self.ami.connected.wait(), 20)
        except TimeoutError:
            raise BenchError("the benchmark could not log in to the node's AMI") from None

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(asyncio.gather(self._task, return_exceptions=True), 10)

    def _on_contact(self, manager: Any, event: Any) -> None:
        code = (event.get("AOR") or "").split(";")[0]
        if code in self.watch:
            self.events.append((time.monotonic(), code, event.get("ContactStatus") or "?"))

    async def marker(self, code: str) -> str | None:
        reply = await self.ami.action({"Action": "DBGet", "Family": FP_FAMILY, "Key": code})
        for msg in reply if isinstance(reply, list) else [reply]:
            if msg.get("Event") == "DBGetResponse":
                return str(msg.get("Val"))
            if msg.get("Response") == "Error" and "not found" not in (msg.get("Message") or ""):
                raise BenchError(f"DBGet {code}: {msg.get('Message')}")
        return None

    async def count(self, family: str) -> int:
        lines = await self.ami.command(
            f"database query \"SELECT count(*) FROM astdb WHERE key >= '/{family}/'"
            f" AND key < '/{family}0'\"", timeout=30)
        for line in lines:
            if line.startswith("count(*):"):
                return int(line.split(":", 1)[1])
        raise BenchError(f"unexpected `database query` output: {lines}")

    async def contacts(self) -> dict[str, set[str]]:
        reply = await self.ami.action({"Action": "PJSIPShowContacts"}, timeout=30)
        out: dict[str, set[str]] = collections.defaultdict(set)
        for msg in reply if isinstance(reply, list) else [reply]:
            if msg.get("Event") == "ContactList":
                code = (msg.get("Endpoint") or msg.get("ObjectName") or "").split(";")[0]
                out[code].add(msg.get("Uri") or "")
        return out

    async def callerid(self, code: str) -> str:
        reply = await self.ami.action({"Action": "PJSIPShowEndpoint", "Endpoint": code})
        for msg in reply if isinstance(reply, list) else [reply]:
            if msg.get("Event") == "EndpointDetail":
                for k, v in msg.items():
                    if k.lower() == "callerid":
                        return str(v)
        return ""

    async def active_calls(self) -> int:
        for line in await self.ami.command("core show channels count"):
            if line.endswith("active calls") or line.endswith("active call"):
                return int(line.split()[0])
        return -1

    async def aor_observer(self) -> tuple[int, int]:
        """(tasks processed, tasks queued) of Asterisk's sorcery AOR observer serializer."""
        for line in await self.ami.command("core show taskprocessors like sorcery/aor-",
                                           timeout=30):
            parts = line.split()
            if parts and parts[0].startswith("sorcery/aor-") and len(parts) > 2:
                return int(parts[1]), int(parts[2])
        return 0, 0

    async def has_transport(self, address: str) -> bool:
        return any(f"{address}:5060" in line
                   for line in await self.ami.command("pjsip show transports"))

    async def has_context(self, context: str) -> bool:
        # "[ Context 'x' created by 'pbx_config' ]"; a missing one: "There is no existence
        # of 'x' context"
        return any(f"Context '{context}' created by" in line
                   for line in await self.ami.command(f"dialplan show {context}"))


# -- (3) phones and calls ---------------------------------------------------------------------
class SipPinger(asyncio.DatagramProtocol):
    """OPTIONS to the registrar every `every` seconds: is the node's SIP stack answering?

    Any answer counts (401 or 200): it only has to come back."""

    def __init__(self, registrar: str, user: str, every: float = 0.2) -> None:
        self.registrar, self.user, self.every = registrar, user, every
        self.sent: dict[str, float] = {}
        self.results: list[tuple[float, float | None]] = []  # (sent at, seconds or None)
        self.transport: asyncio.DatagramTransport | None = None
        self._seq = itertools.count()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        for line in data.decode(errors="replace").splitlines():
            if line.lower().startswith(("call-id:", "i:")):
                sent = self.sent.pop(line.split(":", 1)[1].strip(), None)
                if sent is not None:
                    self.results.append((sent, time.monotonic() - sent))
                return

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0))
        port = self.transport.get_extra_info("sockname")[1]
        try:
            while True:
                cid = f"bench-ping-{next(self._seq)}-{port}"
                msg = (f"OPTIONS sip:{self.registrar} SIP/2.0\r\n"
                       f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{cid};rport\r\n"
                       f"From: <sip:{self.user}@{self.registrar}>;tag={cid}\r\n"
                       f"To: <sip:{self.registrar}>\r\nCall-ID: {cid}\r\nCSeq: 1 OPTIONS\r\n"
                       "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
                self.sent[cid] = time.monotonic()
                self.transport.sendto(msg.encode(), (self.registrar, 5060))
                await asyncio.sleep(self.every)
        finally:
            self.transport.close()
            now = time.monotonic()
            for sent in self.sent.values():
                self.results.append((sent, None if now - sent > 1 else now - sent))
            self.sent.clear()

    def window(self, a: float, b: float) -> tuple[int, int, float]:
        """(pings sent in [a, b), unanswered, longest wait in seconds) for that window."""
        rows = [(t, lat) for t, lat in self.results if a <= t < b]
        waits = [lat if lat is not None else max(0.0, b - t) for t, lat in rows]
        return len(rows), sum(1 for _, lat in rows if lat is None), max(waits, default=0.0)


@dataclass
class CallResult:
    slot: int
    started: float
    ended: float
    caller_ok: bool
    callee_ok: bool
    detail: str = ""


@dataclass
class Window:
    name: str
    start: float
    end: float


@dataclass
class Disturbance:
    """Registered phones and calls in progress, and everything seen of them and of the node."""

    sipp: Sipp
    probe: NodeProbe
    phones: list[Phone]
    ports: list[int]
    calls: int
    call_seconds: float
    refresh: float
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    refreshes: list[tuple[float, str, bool]] = field(default_factory=list)
    samples: list[tuple[float, int, list[str], int]] = field(default_factory=list)
    backlog: list[tuple[float, int, int]] = field(default_factory=list)  # (t, done, queued)
    results: list[CallResult] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    pinger: SipPinger | None = None
    started: float = 0.0
    stopped: float = 0.0
    _failures_logged: float = 0.0

    async def start(self) -> None:
        self.probe.watch.update(p.username for p in self.phones)
        runs = await asyncio.gather(*(self.sipp.register(p, port=port, timeout=5)
                                      for p, port in zip(self.phones, self.ports, strict=True)))
        bad = [p.username for p, r in zip(self.phones, runs, strict=True) if not r.ok]
        if bad:
            raise BenchError(f"phones could not register: {bad}\n{runs[0].output}")
        self.started = time.monotonic()
        self.pinger = SipPinger(self.phones[-1].registrar, self.phones[-1].username)
        # The first three are the ones stop() cancels; the call slots end by themselves.
        self.tasks = [asyncio.create_task(self._refresher()),
                      asyncio.create_task(self._sampler()),
                      asyncio.create_task(self.pinger.run())]
        for slot in range(self.calls):
            delay = slot * self.call_seconds / max(1, self.calls)
            self.tasks.append(asyncio.create_task(self._call_slot(slot, delay)))
        log(f"{len(self.phones)} phones registered; {self.calls} call slots of "
            f"{self.call_seconds:g}s each; OPTIONS to the registrar every 0.2 s")

    def mark(self, name: str, start: float) -> None:
        self.windows.append(Window(name, start, time.monotonic()))

    async def stop(self) -> None:
        """Let the calls in progress end normally, then stop everything."""
        self.stopping.set()
        try:
            await asyncio.wait_for(asyncio.gather(*self.tasks[3:]), self.call_seconds + 90)
        except TimeoutError:
            raise BenchError("calls did not end in time") from None
        for t in self.tasks[:3]:
            t.cancel()
        await asyncio.gather(*self.tasks[:3], return_exceptions=True)
        self.stopped = time.monotonic()
        for t in self.tasks:
            if not t.cancelled() and t.exception() is not None:
                raise BenchError(f"phone monitor failed: {t.exception()!r}")

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; True when stopping."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
            return True
        except TimeoutError:
            return False

    def _failed(self, what: str, run: SippRun) -> None:
        if time.monotonic() - self._failures_logged > 60:  # at most one a minute
            self._failures_logged = time.monotonic()
            log(f"{what} (further failures counted, not shown for a minute):\n"
                f"{run.output[-600:]}")

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            for i, (phone, port) in enumerate(zip(self.phones, self.ports, strict=True)):
                if i < self.calls:
                    continue  # the call slot re-registers its callee before every call
                run = await self.sipp.register(phone, port=port, timeout=5)
                self.refreshes.append((time.monotonic(), phone.username, run.ok))
                if not run.ok:
                    self._failed(f"phone {phone.username} could not re-register", run)

    async def _sampler(self) -> None:
        codes = [p.username for p in self.phones]
        last: list[str] = []
        while True:
            try:
                contacts = await self.probe.contacts()
                calls = await self.probe.active_calls()
                done, queued = await self.probe.aor_observer()
            except AmiUnavailable as exc:
                log(f"node sample failed: {exc}")
                await asyncio.sleep(2)
                continue
            now = time.monotonic()
            missing = [c for c in codes if not contacts.get(c)]
            self.samples.append((now, len(codes) - len(missing), missing, calls))
            self.backlog.append((now, done, queued))
            if missing != last:
                log(f"phones without a contact on the node: {missing or 'none'}")
                last = missing
            await asyncio.sleep(2)

    async def _call_slot(self, slot: int, delay: float) -> None:
        if await self._sleep(delay):
            return
        callee, port = self.phones[slot], self.ports[slot]
        caller = self.phones[self.calls + slot]
        target = f"{callee.registrar}:5060"
        ms = str(int(self.call_seconds * 1000))
        while not self.stopping.is_set():
            reg = await self.sipp.register(callee, port=port, timeout=5)
            self.refreshes.append((time.monotonic(), callee.username, reg.ok))
            if not reg.ok:
                self._failed(f"callee {callee.username} could not re-register", reg)
                if await self._sleep(1):
                    return
                continue
            limit = self.call_seconds + 30
            answer = asyncio.create_task(self.sipp.run(
                SCENARIOS / "uas_answer.xml", None, [callee.row()], port=port, timeout=limit))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            call = await self.sipp.run(LONG_CALL, target, [caller.row(callee.number)],
                                       port=self.sipp.port(), timeout=limit,
                                       extra=("-d", ms))
            answered = await answer
            detail = "" if call.ok and answered.ok else (
                f"caller exit {call.returncode}: {call.output[-500:]} | "
                f"callee exit {answered.returncode}: {answered.output[-500:]}")
            self.results.append(CallResult(slot, started, time.monotonic(), call.ok,
                                           answered.ok, detail))
            if detail:
                log(f"call in slot {slot} failed: {detail[:300]}")

    def contact_events(self) -> collections.Counter[str]:
        return collections.Counter(status for _, _, status in self.probe.events)

    def summary(self, w: Window) -> dict[str, Any]:
        """What phones, calls and the node's SIP stack went through during one window."""
        present = [s[1] for s in self.samples if w.start <= s[0] < w.end]
        refreshes = [ok for t, _, ok in self.refreshes if w.start <= t < w.end]
        calls = [c for c in self.results if c.started < w.end and c.ended > w.start]
        pings, lost, longest = self.pinger.window(w.start, w.end) if self.pinger else (0, 0, 0)
        events = collections.Counter(st for t, _, st in self.probe.events
                                     if w.start <= t < w.end)
        back = [b for b in self.backlog if w.start <= b[0] < w.end]
        done = back[-1][1] - back[0][1] if len(back) > 1 else 0
        # Seconds per task only mean something while a backlog kept the observer busy.
        busy = len(back) > 1 and all(q > 0 for _, _, q in back)
        span = back[-1][0] - back[0][0] if busy else 0.0
        return {"contacts_min": min(present, default=-1), "samples": len(present),
                "refresh_ok": sum(refreshes), "refreshes": len(refreshes),
                "calls": len(calls), "calls_ok": sum(1 for c in calls if c.caller_ok
                                                     and c.callee_ok),
                "pings": pings, "lost": lost, "longest": longest,
                "removed": events.get("Removed", 0) + events.get("Unreachable", 0),
                "aor_done": done, "aor_span": span,
                "aor_queued": back[-1][2] if back else -1}


# -- (1) single changes -----------------------------------------------------------------------
KINDS = ("create", "rotate", "rename", "deactivate", "delete")


@dataclass
class Change:
    kind: str
    code: str
    api_ms: float
    applied: float | None      # seconds from the API response to the marker showing it
    effective: float | None    # ... to the end of the first SIPp/AMI check that agrees
    first_try: bool            # the first check after `applied` already agreed
    verified: bool             # the secondary check (old password refused, REGISTER ok)
    note: str = ""


@dataclass
class SinglesResult:
    label: str
    node_extensions: int
    changes: list[Change]
    cpu: PhaseCpu | None = None
    agent_failures: int = 0
    agent_reconciles: int = 0

    def applied(self, kind: str | None = None) -> list[float]:
        return [c.applied if c.applied is not None else math.inf for c in self.changes
                if kind is None or c.kind == kind]

    def effective(self, kind: str | None = None) -> list[float]:
        return [c.effective if c.effective is not None else math.inf for c in self.changes
                if kind is None or c.kind == kind]

    @property
    def p99(self) -> float:
        return pct(self.effective(), 0.99)

    @property
    def not_effective(self) -> int:
        return sum(1 for c in self.changes if c.effective is None)

    @property
    def not_verified(self) -> int:
        return sum(1 for c in self.changes if not c.verified)


Check = Any  # async () -> (agreed, note)


class Singles:
    """One change at a time through the API; when the node shows it, and when it works."""

    def __init__(self, api: Api, probe: NodeProbe, sipp: Sipp, stack: Stack, registrar: str,
                 tenant_id: int, applied_within: float, effective_within: float) -> None:
        self.api, self.probe, self.sipp, self.registrar = api, probe, sipp, registrar
        self.stack, self.tenant_id = stack, tenant_id
        self.applied_within, self.effective_within = applied_within, effective_within
        self.created = 0

    async def _applied(self, code: str, t0: float, done: Any) -> float | None:
        while True:
            value = await self.probe.marker(code)
            now = time.monotonic()
            if done(value):
                return now - t0
            if now - t0 > self.applied_within:
                return None
            await asyncio.sleep(0.005)

    async def _effective(self, t0: float, check: Check) -> tuple[float | None, bool, str]:
        """Run `check` until it agrees; (seconds from t0, agreed first time, note)."""
        first, deadline = True, time.monotonic() + self.effective_within
        while True:
            ok, note = await check()
            now = time.monotonic()
            if ok:
                return now - t0, first, ""
            if now > deadline:
                return None, False, note
            first = False
            await asyncio.sleep(0.05)

    def registers(self, phone: Phone) -> Check:
        async def check() -> tuple[bool, str]:
            run = await self.sipp.register(phone)
            return run.ok, "" if run.ok else f"REGISTER failed: {run.output[-300:]}"
        return check

    def refused(self, phone: Phone) -> Check:
        async def check() -> tuple[bool, str]:
            run = await self.sipp.register(phone, strict=True)
            if run.ok:
                return False, "REGISTER still accepted"
            return run.refused, "" if run.refused else f"no 4xx: {run.output[-300:]}"
        return check

    def shows_name(self, code: str, name: str) -> Check:
        async def check() -> tuple[bool, str]:
            shown = await self.probe.callerid(code)
            return name in shown, f"caller ID shows {shown!r}"
        return check

    async def one(self, kind: str, code: str, phone: Phone | None, ext_id: int | None
                  ) -> tuple[Change, Phone, int]:
        # One change at a time: the previous one may still keep the agent busy.
        await agent_quiet(self.stack, 600, window=0.25, threshold=0.01)
        old = await self.probe.marker(code) if kind != "create" else None
        old_phone, new_name = phone, ""
        t_call = time.monotonic()
        if kind == "create":
            self.created += 1
            password = secrets.token_hex(10)
            body = await self.api.call("POST", "/api/v1/extensions", {
                "tenant_id": self.tenant_id, "number": str(5000 + self.created),
                "name": f"Single {self.created}", "account_code": code,
                "sip_password": password}, expect=201)
            ext_id = int(body["id"])
            phone = Phone(code, password, self.registrar)
        elif kind == "rotate":
            body = await self.api.call("POST", f"/api/v1/extensions/{ext_id}/rotate-password")
            phone = Phone(code, body["sip_password"], self.registrar)
        elif kind == "rename":
            new_name = f"Renamed {code} {self.created}"
            await self.api.call("PATCH", f"/api/v1/extensions/{ext_id}", {"name": new_name})
        elif kind == "deactivate":
            await self.api.call("PATCH", f"/api/v1/extensions/{ext_id}", {"active": False})
        else:
            await self.api.call("DELETE", f"/api/v1/extensions/{ext_id}", expect=204)
        t0 = time.monotonic()
        api_ms = (t0 - t_call) * 1000
        assert phone is not None and ext_id is not None
        if kind == "create":
            applied = await self._applied(code, t0, lambda v: v is not None)
        elif kind in ("rotate", "rename"):
            applied = await self._applied(code, t0, lambda v: v is not None and v != old)
        else:
            applied = await self._applied(code, t0, lambda v: v is None)
        # The primary check says the change works; the secondary one that nothing else broke.
        primary: Check
        secondary: Check | None = None
        if kind in ("create", "rotate"):
            primary = self.registers(phone)
            if kind == "rotate" and old_phone is not None:
                secondary = self.refused(old_phone)
        elif kind == "rename":
            primary, secondary = self.shows_name(code, new_name), self.registers(phone)
        else:
            primary = self.refused(phone)
        effective, first, note = await self._effective(t0, primary)
        verified = True
        if secondary is not None:
            verified, extra = await secondary()
            if not verified:
                note = f"{note} secondary check: {extra}".strip()
        return (Change(kind, code, api_ms, applied, effective, first, verified, note),
                phone, ext_id)

    async def run(self, label: str, cycles: int, victims: list[tuple[int, Phone]],
                  node_extensions: int, limit: int) -> SinglesResult:
        changes: list[Change] = []
        victims = list(victims)
        for i in range(cycles):
            code = str(CREATE_CODE + self.created)
            ch, phone, ext_id = await self.one("create", code, None, None)
            changes.append(ch)
            for kind in ("rotate", "rename"):
                ch, phone, ext_id = await self.one(kind, code, phone, ext_id)
                changes.append(ch)
            for kind in ("deactivate", "delete"):
                vid, vphone = victims.pop(0)
                ch, _, _ = await self.one(kind, vphone.username, vphone, vid)
                changes.append(ch)
            if (i + 1) % 4 == 0 or i + 1 == cycles:
                eff = SinglesResult(label, 0, changes).effective()
                log(f"singles {label}: {len(changes)} changes, effective p50 "
                    f"{ms(pct(eff, .5)).strip()} ms, max {ms(max(eff)).strip()} ms")
        return SinglesResult(label, node_extensions, changes[:limit])


# -- seeding ----------------------------------------------------------------------------------
SEED_SQL = """
INSERT INTO extensions (tenant_id, number, name, account_code, sip_password)
SELECT ($1::bigint[])[1 + g % cardinality($1::bigint[])],
       ($3::int + g / cardinality($1::bigint[]))::text,
       $4::text || ' ' || g,
       ($2::int + g)::text,
       substr(md5('bench-' || ($2::int + g)::text), 1, 16)
  FROM generate_series($5::int, $6::int - 1) AS g
"""
# Statements of 500 rows, each its own transaction, as a bulk import would commit them: the
# agent starts pushing while later statements still run, and seeding stays linear on schemas
# whose counter trigger ran once per row (before migration 0004 a statement's cost grew with
# the square of its rows). Every trigger runs either way.
SEED_BATCH = 500


async def seed(conn: asyncpg.Connection, tenants: list[int], code: int, number: int, name: str,
               n: int) -> None:
    """Insert n extensions by SQL, SEED_BATCH rows a statement, each committed at once."""
    for start in range(0, n, SEED_BATCH):
        await conn.execute(SEED_SQL, tenants, code, number, name, start,
                           min(n, start + SEED_BATCH))

DESIRED_COUNT_SQL = """
SELECT count(*) FROM extensions e JOIN tenants t ON t.id = e.tenant_id
 WHERE t.node_id = $1 AND e.active AND t.status = 'active'
"""


@dataclass
class World:
    """What setup created."""

    node: NodeRecord
    op_token: str
    res_token: str
    reseller_id: int
    phones_tenant: int
    singles_tenant: int
    api_tenant: int
    seed_tenants: list[int]
    phones: list[Phone]
    victims: list[tuple[int, Phone]]


async def desired_count(dsn: str, node_id: int) -> int:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return int(await conn.fetchval(DESIRED_COUNT_SQL, node_id))
    finally:
        await conn.close()


async def until_node_holds(probe: NodeProbe, stack: Stack, expected: int, within: float,
                           every: float = 0.25, what: str = "markers",
                           samples: list[tuple[float, int]] | None = None) -> float:
    """Until the node holds `expected` markers; seconds taken."""
    t0 = time.monotonic()
    last_log = t0
    while True:
        n = await probe.count(FP_FAMILY)
        now = time.monotonic()
        if samples is not None:
            samples.append((now, n))
        if n == expected:
            return now - t0
        if now - last_log > 10:
            log(f"{what}: node holds {n} of {expected}")
            last_log = now
        if now - t0 > within:
            raise BenchError(f"{what}: the node holds {n} markers, not {expected}, "
                             f"after {within:g}s")
        check_agent(stack)
        await asyncio.sleep(every)


@dataclass
class Settle:
    """Until Asterisk had worked through what a phase gave it: every new AOR costs its
    sorcery AOR observer a task (res_pjsip's OPTIONS support then reads every endpoint)."""

    seconds: float      # from the start of the phase until the observer's queue was empty
    settled: bool       # False: still busy when --settle-within ran out
    queued: int         # tasks still queued at the end of the wait
    done: int           # tasks done during the wait
    per_task: float     # seconds per task while draining


async def settle(probe: NodeProbe, stack: Stack, t_start: float, within: float) -> Settle:
    t0 = time.monotonic()
    first = await probe.aor_observer()
    done, queued = first
    while True:
        check_agent(stack)
        done, queued = await probe.aor_observer()
        now = time.monotonic()
        if queued == 0:
            break
        if now - t0 > within:
            break
        await asyncio.sleep(1.0)
    drained = done - first[0]
    r = Settle(now - t_start, queued == 0, queued, drained,
               (now - t0) / drained if drained else math.nan)
    log(f"Asterisk {'settled' if r.settled else 'still busy'} {r.seconds:.1f}s after the "
        f"phase began: {drained} AOR observer tasks done ({r.per_task:.2f}s each), "
        f"{queued} queued")
    return r


def settle_line(st: Settle | None, n: int) -> str:
    if st is None:
        return "      (Asterisk's AOR observer not waited for)"
    if st.settled:
        return (f"      until Asterisk finished with them (its AOR observer idle): "
                f"{st.seconds:.1f}s = {n / st.seconds:.0f} ext/s ({st.done} observer tasks, "
                f"{st.per_task:.2f}s each)")
    return (f"      Asterisk NOT finished after {st.seconds:.0f}s: its AOR observer still had "
            f"{st.queued:,} tasks queued ({st.per_task:.2f}s each while draining: about "
            f"{st.queued * st.per_task / 3600:.1f} h more)")


async def setup_world(api: Api, dsn: str, probe: NodeProbe, stack: Stack, node: NodeRecord,
                      operator: dict[str, str], args: argparse.Namespace,
                      cycles: int) -> World:
    op = await api.login(operator["login"], operator["password"], operator["client_id"],
                         operator["client_secret"])
    dist = await api.call("POST", "/api/v1/dealers", {
        "level": "distributor", "name": "Bench Distribution", "login": "bench-distributor",
        "password": PASSWORD, "max_tenants": 100_000, "max_extensions": 5_000_000,
        "max_calls": 100_000, "node_id": node.id}, op, 201)
    reseller = await api.call("POST", "/api/v1/dealers", {
        "level": "reseller", "parent_id": dist["id"], "name": "Bench Reseller",
        "login": "bench-reseller", "password": PASSWORD,
        "portal_domain": "bench-reseller.bench.test",
        "registration_address": args.registrar}, op, 201)
    creds = await api.call("POST", f"/api/v1/dealers/{reseller['id']}/api-clients",
                           {"name": "bench", "allowed_cidrs": ["127.0.0.0/8"]}, op, 201)
    res = await api.login("bench-reseller", PASSWORD, creds["client_id"],
                          creds["client_secret"])
    api.token = res

    async def tenant(name: str) -> int:
        return int((await api.call("POST", "/api/v1/tenants", {"name": name}, expect=201))["id"])

    phones_tenant = await tenant("Bench phones")
    singles_tenant = await tenant("Bench single changes")
    api_tenant = await tenant("Bench API creates")
    seed_tenants = [await tenant(f"Bench seed {i}")
                    for i in range(max(1, math.ceil(args.extensions / 1000)))]
    log(f"dealers and {3 + len(seed_tenants)} tenants created; waiting for the transport "
        f"on {args.registrar} and the dialplans")
    await until(lambda: probe.has_transport(args.registrar),
                f"transport {args.registrar}:5060 on the node", 60, 0.25)
    await until(lambda: probe.has_context(f"t{seed_tenants[-1]}-internal"),
                "the tenants' dialplans on the node", 60, 0.25)
    await until(lambda: probe.has_context(f"t{phones_tenant}-internal"),
                "the phones' dialplan on the node", 60, 0.25)

    phones = []
    for i in range(args.phones):
        code, password, number = str(PHONE_CODE + i), secrets.token_hex(10), str(2001 + i)
        await api.call("POST", "/api/v1/extensions", {
            "tenant_id": phones_tenant, "number": number, "name": f"Phone {i + 1}",
            "account_code": code, "sip_password": password}, expect=201)
        phones.append(Phone(code, password, args.registrar, number))
    conn = await asyncpg.connect(dsn, timeout=10, command_timeout=60)
    try:
        n_victims = 4 * cycles
        await seed(conn, [singles_tenant], VICTIM_CODE, 3000, "Victim", n_victims)
        rows = await conn.fetch("SELECT id, account_code FROM extensions WHERE tenant_id = $1"
                                " ORDER BY account_code", singles_tenant)
    finally:
        await conn.close()
    victims = [(int(r["id"]), Phone(r["account_code"], seeded_password(r["account_code"]),
                                    args.registrar)) for r in rows]
    expected = await desired_count(dsn, node.id)
    await until_node_holds(probe, stack, expected, 120, what="phones and victims")
    return World(node, op, res, int(reseller["id"]), phones_tenant, singles_tenant, api_tenant,
                 seed_tenants, phones, victims)


# -- (2) bulk ---------------------------------------------------------------------------------
@dataclass
class BulkResult:
    n: int
    insert_s: float       # first INSERT -> last commit
    first_s: float        # first INSERT -> first new marker on the node
    push_s: float         # first INSERT -> all markers on the node
    after_s: float        # last commit -> all markers on the node
    steady_rate: float    # between 10% and 90% of the markers
    cpu: PhaseCpu | None = None
    settle: Settle | None = None
    t0: float = 0.0

    @property
    def rate(self) -> float:
        return self.n / self.push_s if self.push_s else float("nan")


def steady_rate(samples: list[tuple[float, int]], base: int, n: int) -> tuple[float, float]:
    """(rate between 10% and 90% of n, seconds from the first sample to the first progress)."""
    t_start = samples[0][0]
    first = next((t for t, c in samples if c > base), samples[-1][0]) - t_start

    def at(frac: float) -> float:
        goal = base + frac * n
        prev = samples[0]
        for s in samples:
            if s[1] >= goal:
                if s[1] == prev[1]:
                    return s[0]
                return prev[0] + (s[0] - prev[0]) * (goal - prev[1]) / (s[1] - prev[1])
            prev = s
        return samples[-1][0]

    t10, t90 = at(0.1), at(0.9)
    return (0.8 * n / (t90 - t10) if t90 > t10 else float("nan")), first


async def bulk_seed(dsn: str, probe: NodeProbe, stack: Stack, world: World, n: int,
                    profile: Path | None) -> BulkResult:
    """Insert n extensions by SQL (committed SEED_BATCH at a time, so the agent starts while
    later statements still run) and time until every one is on the node."""
    base = await probe.count(FP_FAMILY)
    conn = await asyncpg.connect(dsn, timeout=10, command_timeout=600)
    spy = start_spy(stack, stack.agent.pid, profile) if profile and stack.agent else None
    try:
        cpu0 = stack.cpu_sample()
        t0 = time.monotonic()
        samples: list[tuple[float, int]] = [(t0, base)]
        insert = asyncio.create_task(seed(conn, world.seed_tenants, SEED_CODE, 10000,
                                          "Bench", n))
        while not insert.done():
            await asyncio.wait([insert], timeout=0.25)
            samples.append((time.monotonic(), await probe.count(FP_FAMILY)))
        insert.result()
        t_commit = time.monotonic()
        log(f"{n} extensions inserted and committed in {t_commit - t0:.1f}s "
            f"({samples[-1][1] - base} already on the node)")
        expected = base + n
        if int(await conn.fetchval(DESIRED_COUNT_SQL, world.node.id)) != expected:
            raise BenchError("the database does not hold the expected extensions")
        await until_node_holds(probe, stack, expected, max(300.0, n / 20),
                               what="bulk push", samples=samples)
        cpu1 = stack.cpu_sample()
    finally:
        stop_spy(spy)
        await conn.close()
    rate, first = steady_rate(samples, base, n)
    result = BulkResult(n, t_commit - t0, first, samples[-1][0] - t0,
                        samples[-1][0] - t_commit, rate)
    result.t0 = t0
    result.cpu = Stack.cpu_phase("bulk push", cpu0, cpu1)
    log(f"bulk push: {n} in {result.push_s:.1f}s = {result.rate:.0f} ext/s "
        f"(steady {rate:.0f} ext/s, first marker after {first:.2f}s)")
    return result


@dataclass
class ApiCreateResult:
    n: int
    clients: int
    api_s: float
    e2e_s: float
    latencies: list[float]
    cpu: PhaseCpu | None = None
    t0: float = 0.0
    settle: Settle | None = None

    @property
    def api_rate(self) -> float:
        return self.n / self.api_s

    @property
    def e2e_rate(self) -> float:
        return self.n / self.e2e_s


async def api_creates(api: Api, dsn: str, probe: NodeProbe, stack: Stack, world: World, n: int,
                      clients: int) -> ApiCreateResult:
    base = await desired_count(dsn, world.node.id)
    if await probe.count(FP_FAMILY) != base:
        raise BenchError("the node is not in step with the database before the API creates")
    counter = itertools.count()
    latencies: list[float] = []

    async def client() -> None:
        while (i := next(counter)) < n:
            t = time.monotonic()
            await api.call("POST", "/api/v1/extensions", {
                "tenant_id": world.api_tenant, "number": str(20000 + i),
                "name": f"API {i}"}, expect=201)
            latencies.append(time.monotonic() - t)

    cpu0 = stack.cpu_sample()
    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))),
                           max(120.0, n / 5))
    t_api = time.monotonic()
    await until_node_holds(probe, stack, base + n, max(120.0, n / 20), every=0.05,
                           what="API creates")
    t_done = time.monotonic()
    cpu1 = stack.cpu_sample()
    r = ApiCreateResult(n, clients, t_api - t0, t_done - t0, latencies,
                        Stack.cpu_phase("API creates", cpu0, cpu1), t0)
    log(f"API creates: {n} in {r.api_s:.1f}s = {r.api_rate:.0f}/s; on the node after "
        f"{r.e2e_s:.1f}s = {r.e2e_rate:.0f}/s")
    return r


BULK_ROUTE = "/api/v1/tenants/{id}/extensions/bulk"
names = itertools.count(1)  # burst tenants: "Burst 1", "Burst 2", ...


async def bulk_route_max(api: Api) -> int:
    """The most extensions one bulk create takes, or 0 when the API has no bulk create."""
    doc = await api.call("GET", "/api/openapi.json", token="")
    op = doc.get("paths", {}).get(BULK_ROUTE, {}).get("post")
    if not op:
        return 0
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get(
        "schema", {})
    if "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return int(schema.get("properties", {}).get("count", {}).get("maximum", 100))


async def api_bulk(api: Api, dsn: str, probe: NodeProbe, stack: Stack, world: World, n: int,
                   chunk: int) -> ApiCreateResult:
    """n extensions through the API's bulk create, `chunk` a request, one request at a time."""
    base = await desired_count(dsn, world.node.id)
    if await probe.count(FP_FAMILY) != base:
        raise BenchError("the node is not in step with the database before the bulk creates")
    tenant = int((await api.call("POST", "/api/v1/tenants", {"name": "Bench API bulk"},
                                 expect=201))["id"])
    latencies: list[float] = []
    cpu0 = stack.cpu_sample()
    t0 = time.monotonic()
    for start in range(0, n, chunk):
        t = time.monotonic()
        body = await api.call("POST", BULK_ROUTE.format(id=tenant), {
            "first_number": str(100000 + start), "count": min(chunk, n - start),
            "name": "API bulk"}, expect=201)
        latencies.append(time.monotonic() - t)
        if int(body["count"]) != min(chunk, n - start):
            raise BenchError(f"bulk create answered {body['count']} extensions")
    t_api = time.monotonic()
    await until_node_holds(probe, stack, base + n, max(120.0, n / 20), every=0.05,
                           what="API bulk creates")
    t_done = time.monotonic()
    cpu1 = stack.cpu_sample()
    r = ApiCreateResult(n, 1, t_api - t0, t_done - t0, latencies,
                        Stack.cpu_phase("API bulk creates", cpu0, cpu1), t0)
    log(f"API bulk creates: {n} in {r.api_s:.1f}s = {r.api_rate:.0f}/s; on the node after "
        f"{r.e2e_s:.1f}s = {r.e2e_rate:.0f}/s")
    return r


# -- (4) dialplan -----------------------------------------------------------------------------
@dataclass
class BurstResult:
    label: str
    tenants: int
    api_s: float            # first request -> last response
    effective_s: float      # first request -> every new tenant's context on the node
    reloads: list[float]    # seconds each `dialplan reload` of the agent took


async def dialplan_burst(api: Api, probe: NodeProbe, stack: Stack, label: str, n: int,
                         clients: int) -> BurstResult:
    """A burst of n tenant creations through the API (each one a new dialplan file): how many
    `dialplan reload`s the agent runs for it, and when every new context works."""
    await agent_quiet(stack, 300, window=0.25, threshold=0.01)
    mark = agent_log_mark(stack)
    counter = itertools.count()
    ids: list[int] = []

    async def client() -> None:
        while next(counter) < n:
            body = await api.call("POST", "/api/v1/tenants", {"name": f"Burst {next(names)}"},
                                  expect=201)
            ids.append(int(body["id"]))

    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), 120)
    t_api = time.monotonic()
    missing = set(ids)

    async def all_there() -> bool:
        for tid in sorted(missing):
            if await probe.has_context(f"t{tid}-internal"):
                missing.discard(tid)
        return not missing

    await until(all_there, f"the dialplans of {n} new tenants", 60, 0.02)
    t_done = time.monotonic()
    await agent_quiet(stack, 120, window=1.0)
    reloads = [float(m.rsplit(" in ", 1)[1].rstrip("s")) for _, m in
               agent_log_lines(stack, mark) if "dialplan reloaded in" in m]
    r = BurstResult(label, n, t_api - t0, t_done - t0, reloads)
    log(f"dialplan burst ({label}): {n} tenants in {r.api_s:.2f}s, all contexts after "
        f"{r.effective_s:.2f}s, {len(reloads)} reload(s) {reloads}")
    return r


# -- reconcile --------------------------------------------------------------------------------
@dataclass
class ReconcileResult:
    label: str
    extensions: int
    to_login: float        # spawn -> AMI login (from the agent's log)
    to_reconciled: float   # spawn -> first full reconcile done (nodes.last_reconciled_at)
    to_quiet: float        # spawn -> the agent idle (CPU)
    reconciles: list[dict[str, Any]]
    cpu: PhaseCpu | None = None


async def restart_reconcile(label: str, dsn: str, probe: NodeProbe, stack: Stack,
                            world: World, tenant_dir: Path, wipe: bool,
                            profile: Path | None) -> ReconcileResult:
    conn = await asyncpg.connect(dsn, timeout=10, command_timeout=30)
    try:
        expected = int(await conn.fetchval(DESIRED_COUNT_SQL, world.node.id))
        before = await conn.fetchval("SELECT last_reconciled_at FROM nodes WHERE id = $1",
                                     world.node.id)
        down_from = time.monotonic()
        stack.stop_agent()
        if wipe:
            for family in WIPED_FAMILIES:
                out = await probe.ami.command(f"database deltree {family}", timeout=120)
                log(f"wiped {family}: {' '.join(out).strip()}")
            if await probe.count(FP_FAMILY) != 0:
                raise BenchError("the wipe left markers on the node")
        offset = stack.agent_log.stat().st_size if stack.agent_log.exists() else 0
        t0 = time.monotonic()
        spawned = start_agent(stack, dsn, tenant_dir)
        cpu0 = stack.cpu_sample()
        spy = start_spy(stack, stack.agent.pid, profile) if profile and stack.agent else None
        try:
            async def reconciled() -> bool:
                check_agent(stack)
                at = await conn.fetchval("SELECT last_reconciled_at FROM nodes WHERE id = $1",
                                         world.node.id)
                return at is not None and (before is None or at > before)

            limit = max(300.0, expected / 50)
            try:
                to_reconciled = await until(reconciled, f"{label}: the agent's reconcile",
                                            limit, 0.05)
                to_quiet = await agent_quiet(stack, limit) - t0
            except BenchError as exc:
                log(f"{label}: {exc}")
                to_reconciled = to_quiet = math.inf
            cpu1 = stack.cpu_sample()
        finally:
            stop_spy(spy)
    finally:
        await conn.close()
    lines = agent_log_lines(stack, offset)
    logins = [t for t, m in lines if "logged in to AMI" in m]
    reconciles = []
    for t, m in lines:
        if " reconciled: " in m:
            try:
                done = ast.literal_eval(m.split(" reconciled: ", 1)[1])
            except (ValueError, SyntaxError):
                done = {"raw": m}
            done["at"] = round(t - spawned, 2)
            reconciles.append(done)
    # Log stamps are epoch seconds, `spawned` too; calls are timed on the monotonic clock.
    stack.agent_down.append((down_from, t0 + ((logins[0] - spawned) if logins
                                              else to_reconciled)))
    held = await probe.count(FP_FAMILY)
    if held != expected and not math.isinf(to_reconciled):
        raise BenchError(f"{label}: the node holds {held} markers, not {expected}, after "
                         "the reconcile")
    r = ReconcileResult(label, expected, (logins[0] - spawned) if logins else float("nan"),
                        to_reconciled, to_quiet, reconciles,
                        Stack.cpu_phase(label, cpu0, cpu1))
    log(f"{label}: reconciled {r.to_reconciled:.1f}s after the agent started "
        f"(AMI login after {r.to_login:.2f}s; idle after {r.to_quiet:.1f}s): {reconciles}")
    return r


# -- report -----------------------------------------------------------------------------------
def ms(v: float) -> str:
    if math.isnan(v):
        return "      -"
    return "  >lim." if math.isinf(v) else f"{1000 * v:7.0f}"


def trio(values: list[float]) -> str:
    return f"{ms(pct(values, .5))}{ms(pct(values, .99))}{ms(max(values, default=math.nan))}"


def singles_table(small: SinglesResult, large: SinglesResult) -> list[str]:
    sizes = (f"{'':<15}{'node holding ' + format(small.node_extensions, ','):<44}| "
             f"node holding {large.node_extensions:,}")
    head = (f"{'':<15}{'applied':^21}  {'effective':^21} | {'applied':^21}  {'effective':^21}")
    sub = (f"{'change':<11}{'n':>4}" + (f"{'p50':>7}{'p99':>7}{'max':>7}  " * 2 + "| ") * 2)
    lines = [sizes, head, sub.rstrip(" |"), "-" * len(sub.rstrip(" |"))]
    for kind in (*KINDS, None):
        n = len(small.applied(kind))
        lines.append(f"{kind or 'all':<11}{n:>4}{trio(small.applied(kind))}  "
                     f"{trio(small.effective(kind))}  | {trio(large.applied(kind))}  "
                     f"{trio(large.effective(kind))}")
    api_a = [c.api_ms / 1000 for c in small.changes]
    api_b = [c.api_ms / 1000 for c in large.changes]
    lines.append(f"{'(API call)':<11}{len(api_a):>4}{trio(api_a)}{'':<23}| {trio(api_b)}")
    return lines


def cpu_table(phases: list[PhaseCpu]) -> list[str]:
    head = (f"{'phase':<28}{'wall s':>7} " + " ".join(f"{k + '%':>9}" for k in CPU_ROLES)
            + f" {'rest%':>6} {'host%':>6}")
    lines = [head, "-" * len(head)]
    for p in phases:
        rest = p.percent["host"] - sum(p.percent[k] for k in CPU_ROLES)
        lines.append(f"{p.name:<28}{p.wall:>7.1f} "
                     + " ".join(f"{p.percent[k]:>9.0f}" for k in CPU_ROLES)
                     + f" {rest:>6.0f} {p.percent['host']:>6.0f}")
    return lines


def phones_table(dist: Disturbance) -> list[str]:
    head = (f"{'phase':<28}{'wall s':>7}{'contacts':>9}{'re-reg':>10}{'calls':>10}"
            f"{'OPTIONS':>9}{'lost':>6}{'longest':>9}{'Removed':>8}"
            f"{'AOR obs.':>9}{'s/task':>8}{'queued':>8}")
    sub = (f"{'':<28}{'':>7}{'min':>9}{'ok/all':>10}{'ok/all':>10}{'sent':>9}{'':>6}"
           f"{'wait s':>9}{'events':>8}{'done':>9}{'':>8}{'at end':>8}")
    lines = [head, sub, "-" * len(head)]
    whole = Window("whole window", dist.started, dist.stopped)
    for w in (*dist.windows, whole):
        m = dist.summary(w)
        per = m["aor_span"] / m["aor_done"] if m["aor_done"] else math.nan
        contacts = f"{m['contacts_min']}/{len(dist.phones)}" if m["samples"] else "-"
        queued = m["aor_queued"] if m["aor_queued"] >= 0 else "-"
        lines.append(
            f"{w.name:<28}{w.end - w.start:>7.0f}{contacts:>9}"
            f"{str(m['refresh_ok']) + '/' + str(m['refreshes']):>10}"
            f"{str(m['calls_ok']) + '/' + str(m['calls']):>10}"
            f"{m['pings']:>9}{m['lost']:>6}{m['longest']:>9.1f}{m['removed']:>8}"
            f"{m['aor_done']:>9}{per:>8.2f}{queued:>8}")
    return lines


def cpu_per_extension(cpu: PhaseCpu | None, n: int) -> str:
    """CPU milliseconds per extension by component, and the rate two idle cores would allow."""
    if cpu is None or n <= 0:
        return "(no CPU figures)"
    per = {k: cpu.percent[k] / 100 * cpu.wall / n * 1000 for k in ("agent", "asterisk", "pg",
                                                                    "api")}
    total = sum(per.values())
    bound = min(1000 / per["agent"] if per["agent"] else math.inf,
                1000 * (os.cpu_count() or 1) / total if total else math.inf)
    return (f"CPU per extension: agent {per['agent']:.2f} ms, Asterisk {per['asterisk']:.2f} "
            f"ms, PostgreSQL {per['pg']:.2f} ms, API {per['api']:.2f} ms -> on idle cores at "
            f"most {bound:.0f} ext/s (one agent process: 1 core)")


def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def asterisk_version(probe_lines: list[str]) -> str:
    for line in probe_lines:
        if line.startswith("Asterisk"):
            return " ".join(line.split()[:2])
    return "Asterisk ?"


@dataclass
class Run:
    """Everything measured, for the report."""

    args: argparse.Namespace
    version: str
    background: float
    small: SinglesResult
    large: SinglesResult
    bulk: BulkResult
    creates: ApiCreateResult
    bulk_api: ApiCreateResult | None
    bursts: list[BurstResult]
    noop: ReconcileResult
    wiped: ReconcileResult
    dist: Disturbance
    regs_api: int
    final_contacts: int
    backlog_end: tuple[int, int]
    sipp_ms: float
    profiles: list[tuple[str, Path]]
    agent_down: list[tuple[float, float]] = field(default_factory=list)


def bulk_api_lines(res: ApiCreateResult | None, args: argparse.Namespace) -> list[str]:
    if res is None:
        return [f"  (c) API bulk create ({BULK_ROUTE}): "
                + ("not run (--api-bulk 0)" if not args.api_bulk else "not in this API")]
    return [
        f"  (c) API bulk create: {res.n:,} extensions in {len(res.latencies)} requests of at "
        f"most {args.bulk_chunk:,}, one at a time: {res.api_rate:.0f} creates/s (request "
        f"p50 {1000 * pct(res.latencies, .5):.0f} ms, max "
        f"{1000 * max(res.latencies, default=math.nan):.0f} ms);",
        f"      first request -> all on the node {res.e2e_s:.1f}s = {res.e2e_rate:.0f} ext/s "
        f"(the last one {res.e2e_s - res.api_s:.2f}s after the last response)",
        settle_line(res.settle, res.n),
        f"      {cpu_per_extension(res.cpu, res.n)}",
    ]


def build_report(r: Run) -> str:
    args, small, large, bulk, creates, dist = r.args, r.small, r.large, r.bulk, r.creates, \
        r.dist
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, timeout=10).stdout.strip()
    cores = os.cpu_count() or 1
    lines = [
        f"Provisioning benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  commit {commit}",
        f"machine: {cores} cores, {r.background:.0f}% of {100 * cores}% busy before the run "
        f"started (other users); node {args.node_address} ({r.version}), registrar "
        f"{args.registrar}",
        "stack: `pbxctl agent` (one process, concurrency 16), `pbxctl serve`, embedded "
        "PostgreSQL, SIPp; all on loopback",
        f"run: --extensions {args.extensions} --changes {args.changes} --phones {args.phones} "
        f"--calls {args.calls} --call-seconds {args.call_seconds:g} --api-creates "
        f"{args.api_creates} --api-clients {args.api_clients} --api-bulk {args.api_bulk} "
        f"--burst {args.burst} --applied-within "
        f"{args.applied_within:g} --effective-within {args.effective_within:g}",
        "",
        "(1) one change through the API, one at a time; ms from the API response",
        "    applied   = the node shows it: the agent writes pbx-fp/<code> after the PJSIP "
        "objects (polled over AMI every 5 ms)",
        "    effective = the first check that agrees: a SIPp REGISTER with the new credentials "
        "succeeds (create, rotate), the",
        "                endpoint's caller ID shows the new name (rename, AMI), a REGISTER is "
        "refused with a 4xx (deactivate, delete);",
        f"                checks run once applied and repeat for {args.effective_within:g} s; "
        f"one SIPp REGISTER takes {r.sipp_ms:.0f} ms (median) here",
        "    '>lim.': not within --applied-within / --effective-within",
        "",
        *singles_table(small, large),
        "",
    ]
    for res in (small, large):
        lines.append(
            f"    {res.node_extensions:,}: effective on the first check "
            f"{sum(c.first_try for c in res.changes)}/{len(res.changes)}, never "
            f"{res.not_effective}; secondary check failed {res.not_verified} (old password "
            f"still accepted, or no REGISTER after a rename); agent: "
            f"{res.agent_failures} incremental pushes refused (then back-off and a full "
            f"reconcile), {res.agent_reconciles} full reconciles")
    shown = 0
    for res in (small, large):
        for c in res.changes:
            if c.note and shown < 8:
                shown += 1
                lines.append(f"    e.g. {res.node_extensions:,} {c.kind} {c.code}: "
                             f"{' '.join(c.note.split())[:160]}")
    lines += [
        "",
        "(2) bulk creation",
        f"  (a) agent bulk push: {bulk.n:,} extensions by INSERT ... SELECT in statements of "
        f"{SEED_BATCH} rows, each committed: {bulk.insert_s:.1f}s with triggers = "
        f"{bulk.n / bulk.insert_s:.0f} rows/s;",
        f"      first INSERT -> all on the node {bulk.push_s:.1f}s = {bulk.rate:.0f} ext/s "
        f"(steady 10-90%: {bulk.steady_rate:.0f} ext/s; first marker after "
        f"{bulk.first_s:.2f}s; last one {bulk.after_s:.2f}s after the last commit)",
        settle_line(bulk.settle, bulk.n),
        f"      {cpu_per_extension(bulk.cpu, bulk.n)}",
        f"  (b) API: {creates.n:,} POST /api/v1/extensions from {creates.clients} clients: "
        f"{creates.api_rate:.0f} creates/s (latency p50 "
        f"{1000 * pct(creates.latencies, .5):.0f} ms, p99 "
        f"{1000 * pct(creates.latencies, .99):.0f} ms);",
        f"      first request -> all on the node {creates.e2e_s:.1f}s = "
        f"{creates.e2e_rate:.0f} ext/s (the last one {creates.e2e_s - creates.api_s:.2f}s "
        "after the last response)",
        settle_line(creates.settle, creates.n),
        f"      {cpu_per_extension(creates.cpu, creates.n)}",
        *bulk_api_lines(r.bulk_api, args),
        f"  re-push after wiping the astdb (reconcile path): "
        f"{cpu_per_extension(r.wiped.cpu, r.wiped.extensions)}",
        "",
        f"(4) dialplan: a burst of {args.burst} tenant creations through the API "
        f"({args.api_clients} clients; each one a new",
        "    tenant dialplan file); reloads = `dialplan reload`s the agent ran for it (its log), "
        "effective = until every new",
        "    tenant's context shows on the node (`dialplan show`)",
        *[f"  node holding {b.label:>7}: {b.tenants} tenants created in {b.api_s:.2f}s, "
          f"effective after {b.effective_s:.2f}s, {len(b.reloads)} reload(s) "
          f"({', '.join(f'{x:.3f}s' for x in b.reloads) or '-'})" for b in r.bursts],
        "",
        "(3) phones, calls and the node's SIP stack, per phase. contacts: phones with a "
        "contact on the node, sampled every 2 s;",
        "    re-reg: REGISTER refreshes of the phones (every --refresh s, and each callee "
        "before each call); calls: calls overlapping",
        "    the phase and whether both SIPp ends exited 0; OPTIONS: one every 0.2 s to the "
        "registrar, lost = no answer, longest",
        "    wait = the longest time one waited; Removed: ContactStatus Removed/Unreachable "
        "of the phones; AOR obs.: tasks Asterisk's",
        "    sorcery AOR observer finished (s/task: seconds each), queued = its backlog at "
        "the end of the phase",
        "",
        *phones_table(dist),
        "",
    ]
    def refused_while_agent_down(c: CallResult) -> bool:
        return (not c.caller_ok and "received 'SIP/2.0 503" in c.detail
                and any(a - 1 <= c.started <= b + 1 for a, b in r.agent_down))

    refused = [c for c in dist.results if refused_while_agent_down(c)]
    calls_ok = [c for c in dist.results if c.caller_ok and c.callee_ok]
    present = [s[1] for s in dist.samples]
    refresh_ok = sum(1 for _, _, ok in dist.refreshes if ok)
    events = dist.contact_events()
    whole = dist.summary(Window("", dist.started, dist.stopped))
    lines += [
        f"  at the end: contacts {r.final_contacts}/{len(dist.phones)}, registrations API "
        f"lists {r.regs_api}/{len(dist.phones)}; {len(dist.results)} calls of "
        f"{args.call_seconds:g}s, {len(calls_ok)} ended normally; ContactStatus events of "
        f"the phones: {dict(events) or 'none'}",
        f"  Asterisk's AOR observer when the calls ended: {r.backlog_end[0]} tasks done, "
        f"{r.backlog_end[1]} queued",
    ]
    if refused:
        lines.append(f"  {len(refused)} new call(s) refused at setup (503) while the agent "
                     "restarted: no agent, no admission (closed policy); `--role calls` in a "
                     "process of its own keeps admitting through a provisioning restart")
    for c in dist.results:
        if c.detail:
            lines.append(f"    call slot {c.slot} failed: {' '.join(c.detail.split())[:300]}")
            break
    lines += ["", "reconcile of the whole node by a restarted agent (spawn -> AMI login -> "
              "reconcile done -> agent idle)"]
    for rec in (r.noop, r.wiped):
        applied = sum(int(d.get("applied", 0)) for d in rec.reconciles)
        lines.append(
            f"  {rec.label:<24} {rec.extensions:,} ext: login {rec.to_login:.2f}s, "
            f"reconciled {rec.to_reconciled:.1f}s, idle {rec.to_quiet:.1f}s; "
            f"{len(rec.reconciles)} full reconcile(s) done at "
            f"{[d['at'] for d in rec.reconciles]}s, applied {applied}")
    lines += ["", f"CPU per phase (% of one core; host% of {100 * cores}%; rest = SIPp and "
              "other users)"]
    lines += cpu_table([p for p in (small.cpu, bulk.cpu, large.cpu, creates.cpu,
                                    r.bulk_api.cpu if r.bulk_api else None, r.noop.cpu,
                                    r.wiped.cpu) if p is not None])
    ok3 = (len(calls_ok) + len(refused) == len(dist.results) > 0
           and min(present, default=0) == len(dist.phones)
           and r.final_contacts == len(dist.phones) and r.regs_api == len(dist.phones)
           and refresh_ok == len(dist.refreshes)
           and not (events.get("Removed") or events.get("Unreachable")))
    verdicts = [
        (small.p99 <= TARGET_P99_S,
         f"(1)  one change effective p99 <= {TARGET_P99_S:g} s, node holding "
         f"{small.node_extensions:,}: p99 {ms(small.p99).strip()} ms"),
        (large.p99 <= TARGET_P99_S,
         f"(1)  one change effective p99 <= {TARGET_P99_S:g} s, node holding "
         f"{large.node_extensions:,}: p99 {ms(large.p99).strip()} ms"),
        (bulk.rate >= TARGET_RATE,
         f"(2a) bulk push >= {TARGET_RATE:.0f} ext/s: {bulk.rate:.0f} ext/s "
         f"({bulk.n:,} from the first INSERT to the last on the node)"),
        (ok3, f"(3)  phones and calls not disturbed: calls {len(calls_ok)}/{len(dist.results)}"
              f" ok" + (f" ({len(refused)} refused at setup while the agent restarted)"
                        if refused else "")
              + f", contacts min {min(present, default=0)}/{len(dist.phones)}, "
              f"re-registrations {refresh_ok}/{len(dist.refreshes)}, OPTIONS lost "
              f"{whole['lost']}/{whole['pings']} (longest wait {whole['longest']:.1f}s)"),
    ]
    if bulk.settle is not None:
        st = bulk.settle
        verdicts.append((st.settled and bulk.n / st.seconds >= TARGET_RATE,
                         f"(2a) ... and until Asterisk finished with them (AOR observer idle) "
                         f">= {TARGET_RATE:.0f} ext/s: " + (
                             f"{bulk.n / st.seconds:.0f} ext/s ({st.seconds:.0f}s)"
                             if st.settled else f"not finished after {st.seconds:.0f}s, "
                             f"{st.queued:,} tasks queued")))
    if r.bulk_api is not None:
        verdicts.append((r.bulk_api.e2e_rate >= TARGET_RATE,
                         f"(2c) API bulk creates until on the node >= {TARGET_RATE:.0f} ext/s:"
                         f" {r.bulk_api.e2e_rate:.0f} ext/s ({r.bulk_api.api_rate:.0f} "
                         "API creates/s)"))
    for b in r.bursts:
        verdicts.append((len(b.reloads) == 1,
                         f"(4)  a burst of {b.tenants} dialplan changes costs one reload, node "
                         f"holding {b.label}: {len(b.reloads)} reload(s)"))
    lines += ["", "targets:"] + [f"{mark(ok)}  {text}" for ok, text in verdicts]
    # Single creates are not bulk creation: the API's own rate bounds them (reported).
    lines += [f"----  (2b) API single creates until on the node: {creates.e2e_rate:.0f} ext/s "
              f"({creates.api_rate:.0f} API creates/s from {creates.clients} clients)",
              f"----  reconcile, nothing changed, {r.noop.extensions:,} ext: "
              f"{r.noop.to_reconciled:.1f}s from the agent's start",
              f"----  reconcile after wiping the astdb, {r.wiped.extensions:,} ext: "
              f"{r.wiped.to_reconciled:.1f}s = "
              f"{r.wiped.extensions / r.wiped.to_reconciled:.0f} ext/s re-pushed"]
    for title, raw in r.profiles:
        lines += ["", f"== py-spy profile of the agent: {title} ({raw.name}) ==",
                  *summarize_profile(raw, 18, "(100 Hz, idle time included)")]
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------------
def agent_log_mark(stack: Stack) -> int:
    return stack.agent_log.stat().st_size if stack.agent_log.exists() else 0


def agent_log_counts(stack: Stack, offset: int) -> tuple[int, int]:
    """(incremental pushes that failed, full reconciles) logged after `offset`."""
    lines = agent_log_lines(stack, offset)
    return (sum(1 for _, m in lines if "applying changes failed" in m),
            sum(1 for _, m in lines if " reconciled: " in m))


async def background_load(seconds: float = 3.0) -> float:
    a = host_cpu()
    await asyncio.sleep(seconds)
    b = host_cpu()
    return 100.0 * (os.cpu_count() or 1) * (b[0] - a[0]) / max(1.0, b[1] - a[1])


async def main_async(args: argparse.Namespace, stack: Stack) -> int:
    from controlplane import bootstrap
    from controlplane.db.pool import create_pool, migrate
    from controlplane.provisioning.sandbox_nodes import start_sandbox_node
    from controlplane.settings import Settings

    if shutil.which("sipp") is None:
        raise BenchError("SIPp is required: apt-get install sip-tester")
    if os.geteuid() != 0:
        raise BenchError("the Asterisk sandbox needs root")
    RESULTS.mkdir(parents=True, exist_ok=True)
    background = await background_load()
    log(f"machine busy {background:.0f}% of {100 * (os.cpu_count() or 1)}% before the run")
    cycles = math.ceil(args.changes / len(KINDS))
    dsn = await start_postgres(stack)
    conn = await asyncpg.connect(dsn, timeout=10, command_timeout=120)
    try:
        await migrate(conn)
        operator = await bootstrap.ensure_operator(conn)
    finally:
        await conn.close()
    base = await start_api(stack, dsn, free_port())
    log(f"API pid {stack.api.pid if stack.api else '?'} on {base}")
    pool = await create_pool(dsn, Settings(data_dir=stack.workdir / "data", dsn=dsn,
                                           db_pool_min=1, db_pool_max=2))
    try:
        log(f"starting node {NODE_NAME} on {args.node_address}")
        node, record = await asyncio.wait_for(start_sandbox_node(
            pool, NODE_NAME, args.node_address, stack.workdir / "nodes", progress=log), 300)
        stack.node = node
    finally:
        await pool.close()
    tenant_dir = node.tenant_config_dir
    start_agent(stack, dsn, tenant_dir)
    probe = NodeProbe(record)
    await probe.start()
    version = asterisk_version(await probe.ami.command("core show version"))
    log(f"node pid {node.pid} ({version}), agent pid {stack.agent.pid if stack.agent else '?'}")
    profiles: list[tuple[str, Path]] = []

    def profile(name: str, title: str) -> Path | None:
        if not args.profile:
            return None
        path = RESULTS / f"provisioning_profile_{name}.txt"
        profiles.append((title, path))
        return path

    sipp = Sipp(stack, args.registrar)
    try:
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            api = Api(http, base)
            world = await setup_world(api, dsn, probe, stack, record, operator, args, cycles)
            await agent_quiet(stack, 120)
            dist = Disturbance(sipp, probe, world.phones,
                               [41000 + i for i in range(len(world.phones))], args.calls,
                               args.call_seconds, args.refresh)
            await dist.start()
            await asyncio.sleep(2)
            singles = Singles(api, probe, sipp, stack, args.registrar, world.singles_tenant,
                              args.applied_within, args.effective_within)
            half = 2 * cycles

            async def measure(label: str, victims: list[tuple[int, Phone]]) -> SinglesResult:
                held = await desired_count(dsn, world.node.id)
                log(f"single changes on a node holding {held}")
                cpu0, t0, mark0 = stack.cpu_sample(), time.monotonic(), agent_log_mark(stack)
                res = await singles.run(label, cycles, victims, held, args.changes)
                res.cpu = Stack.cpu_phase(f"singles at {held:,}", cpu0, stack.cpu_sample())
                res.agent_failures, res.agent_reconciles = agent_log_counts(stack, mark0)
                dist.mark(f"singles at {held:,}", t0)
                check_agent(stack)
                return res

            small = await measure("small", world.victims[:half])
            bursts = []
            t0 = time.monotonic()
            bursts.append(await dialplan_burst(api, probe, stack, f"{small.node_extensions:,}",
                                               args.burst, args.api_clients))
            dist.mark(f"dialplan burst at {small.node_extensions:,}", t0)
            t0 = time.monotonic()
            bulk = await bulk_seed(dsn, probe, stack, world, args.extensions,
                                   profile("bulk", f"bulk push of {args.extensions:,}"))
            dist.mark(f"bulk push of {args.extensions:,}", t0)
            t0 = time.monotonic()
            bulk.settle = await settle(probe, stack, bulk.t0, args.settle_within)
            dist.mark("Asterisk working through it", t0)
            await agent_quiet(stack, 300)
            large = await measure("large", world.victims[half:])
            t0 = time.monotonic()
            bursts.append(await dialplan_burst(api, probe, stack, f"{large.node_extensions:,}",
                                               args.burst, args.api_clients))
            dist.mark(f"dialplan burst at {large.node_extensions:,}", t0)
            t0 = time.monotonic()
            creates = await api_creates(api, dsn, probe, stack, world, args.api_creates,
                                        args.api_clients)
            creates.settle = await settle(probe, stack, creates.t0, args.settle_within)
            await agent_quiet(stack, 300)
            dist.mark(f"API creates ({args.api_creates:,})", t0)
            bulk_api = None
            chunk = await bulk_route_max(api) if args.api_bulk else 0
            if chunk:
                args.bulk_chunk = min(args.bulk_chunk, chunk)
                t0 = time.monotonic()
                bulk_api = await api_bulk(api, dsn, probe, stack, world, args.api_bulk,
                                          args.bulk_chunk)
                bulk_api.settle = await settle(probe, stack, bulk_api.t0, args.settle_within)
                await agent_quiet(stack, 300)
                dist.mark(f"API bulk creates ({args.api_bulk:,})", t0)
            t0 = time.monotonic()
            noop = await restart_reconcile(
                "nothing changed", dsn, probe, stack, world, tenant_dir, False,
                profile("noop", "reconcile, nothing changed"))
            dist.mark("reconcile, nothing changed", t0)
            log("ending the calls in progress (they end normally)")
            t0 = time.monotonic()
            await dist.stop()
            dist.mark("calls ending", t0)
            contacts = await probe.contacts()
            final_contacts = sum(1 for p in world.phones if contacts.get(p.username))
            regs = await api.call("GET", f"/api/v1/registrations?tenant_id={world.phones_tenant}")
            regs_api = len({r["account_code"] for r in regs["items"]})
            backlog_end = await probe.aor_observer()
            wiped = await restart_reconcile(
                "after wiping the astdb", dsn, probe, stack, world, tenant_dir, True,
                profile("wipe", "reconcile after wiping the astdb"))
            sipp_ms = 1000 * pct([c.effective - c.applied for res in (small, large)
                                  for c in res.changes if c.kind == "create" and c.first_try
                                  and c.effective is not None and c.applied is not None], .5)
            report = build_report(Run(args, version, background, small, large, bulk, creates,
                                      bulk_api, bursts, noop, wiped, dist, regs_api,
                                      final_contacts, backlog_end, sipp_ms, profiles,
                                      list(stack.agent_down)))
    finally:
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        await stack.reap_sipps()
        await probe.close()
    print(report)
    (RESULTS / "provisioning.txt").write_text(report)
    log(f"written to {RESULTS / 'provisioning.txt'}")
    return 0


def loopback(value: str) -> str:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an IP address") from None
    if ip.version != 4 or not ip.is_loopback or value == "127.0.0.1":
        raise argparse.ArgumentTypeError("must be in 127.0.0.0/8 and not 127.0.0.1")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--extensions", type=int, default=50_000,
                   help="extensions of the bulk push, and the large node's size")
    p.add_argument("--changes", type=int, default=100,
                   help="single changes per node size (cycles of create, rotate, rename, "
                        "deactivate, delete)")
    p.add_argument("--phones", type=int, default=20, help="registered SIPp phones")
    p.add_argument("--calls", type=int, default=2, help="calls kept in progress")
    p.add_argument("--call-seconds", type=float, default=30.0, help="length of each call")
    p.add_argument("--refresh", type=float, default=100.0,
                   help="seconds between re-registrations of the phones (they register for "
                        "300 s)")
    p.add_argument("--api-creates", type=int, default=2000)
    p.add_argument("--api-clients", type=int, default=4, help="concurrent API clients")
    p.add_argument("--api-bulk", type=int, default=5000,
                   help="extensions created through the API's bulk create (0: skip)")
    p.add_argument("--bulk-chunk", type=int, default=1000,
                   help="extensions per bulk create request (at most what the API takes)")
    p.add_argument("--settle-within", type=float, default=900.0,
                   help="seconds to wait after each bulk phase for Asterisk to finish with the "
                        "new AORs before going on")
    p.add_argument("--burst", type=int, default=20,
                   help="tenants created in one burst, for the dialplan reload count")
    p.add_argument("--node-address", type=loopback, default="127.0.0.6")
    p.add_argument("--registrar", type=loopback, default="127.0.0.31",
                   help="the reseller's registration address (a transport on the node)")
    p.add_argument("--applied-within", type=float, default=120.0,
                   help="seconds one change may take to show on the node")
    p.add_argument("--effective-within", type=float, default=5.0,
                   help="seconds the checks of one change repeat once it shows")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the agent during the bulk push and the reconciles")
    args = p.parse_args(argv)
    if not 1 <= args.extensions <= MAX_EXTENSIONS:
        p.error(f"--extensions 1..{MAX_EXTENSIONS}")
    if args.changes < len(KINDS) or args.api_creates < 1 or args.api_clients < 1:
        p.error(f"--changes >= {len(KINDS)}, --api-creates >= 1, --api-clients >= 1")
    if args.api_bulk < 0 or args.bulk_chunk < 1 or not 1 <= args.burst <= 1000:
        p.error("--api-bulk >= 0, --bulk-chunk >= 1, --burst 1..1000")
    if args.calls < 1 or args.phones < 2 * args.calls + 1 or args.phones > 99:
        p.error("--calls >= 1 and --phones between 2 * calls + 1 and 99")
    if args.call_seconds < 1 or not 10 <= args.refresh <= 250:
        p.error("--call-seconds >= 1, --refresh 10..250")
    if args.applied_within <= 0 or args.effective_within <= 0:
        p.error("--applied-within and --effective-within must be positive")
    if args.node_address == args.registrar:
        p.error("--node-address and --registrar must differ")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    stack = Stack(Path(tempfile.mkdtemp(prefix="pbx-bench-prov-")))
    try:
        return asyncio.run(main_async(args, stack))
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("benchmark interrupted", file=sys.stderr)
    except Exception:  # noqa: BLE001 - any other failure is a failed run too
        traceback.print_exc()
        print("benchmark failed", file=sys.stderr)
    finally:
        stack.close()
    return 1


if __name__ == "__main__":
    sys.exit(main())
