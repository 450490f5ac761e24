"""Real-time call control end to end: two real Asterisk nodes, their agents, SIPp phones and
a SIPp carrier. Admission on every call, caps across nodes, prepaid cut-off, rating, CDRs
imported exactly once from the nodes' files, live calls, DIDs from the carrier."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from controlplane.calls import lifecycle
from controlplane.calls.node_control import CallControlConfig
from controlplane.db.pool import create_pool
from controlplane.provisioning.agent import NodeAgent
from controlplane.provisioning.desired import load_node
from controlplane.sandbox import SandboxNode
from tests.e2e.sipp import (
    SCENARIOS,
    Phone,
    SippRun,
    next_port,
    refused_scenario,
    register,
    sipp,
)
from tests.pg_relay import PgRelay

pytestmark = pytest.mark.e2e

NODE_A, NODE_B = "127.0.0.7", "127.0.0.8"
RESELLER_A, RESELLER_B = "127.0.0.41", "127.0.0.42"
CARRIER = "127.0.0.50"
RATES = ("prefix;description;price_per_minute;connection_fee;first_increment;next_increment;"
         "free_seconds\n"
         "5511;Sao Paulo fixed;0.60;0;6;6;0\n"
         "551144;Expensive test range;6.00;0;6;6;0\n"
         "55;Brazil;1.20;0;30;6;3\n")


def _node(name: str, address: str, base: Path, cache: Path, creds: Any) -> SandboxNode:
    return SandboxNode(name=name, address=address, base_dir=base, cache_dir=cache,
                       ami_user=creds.ami_user, ami_secret=creds.ami_secret,
                       ari_user=creds.ari_user, ari_password=creds.ari_password)


@pytest.fixture(scope="module")
def nodes(sandbox_root, sandbox_cache_dir, node_credentials, tmp_path_factory):
    base = tmp_path_factory.mktemp("calls")
    started = []
    try:
        for name, address in (("calls-a", NODE_A), ("calls-b", NODE_B)):
            node = _node(name, address, base, sandbox_cache_dir, node_credentials)
            node.start(timeout=60)
            started.append(node)
        yield started
    finally:
        for node in started:
            node.stop()


async def until(predicate: Callable[[], Awaitable[bool]], what: str,
                within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Calls:
    """The platform with two nodes, each driven by its agent (provisioning + call control)."""

    def __init__(self, api, db, settings, nodes: list[SandboxNode], node_ids: list[int]):
        self.api, self.db, self.settings = api, db, settings
        self.nodes, self.node_ids = nodes, node_ids
        self.agents: dict[Any, tuple[NodeAgent, asyncio.Event, asyncio.Task]] = {}
        self.lease = 30.0
        self.ahead = 60
        self.decision_timeout = 1.0  # agents started from now on

    async def start_agent(self, i: int, role: str = "all", *, pool: Any = None,
                          fail_policy: str = "closed", cdr_import: str = "inline") -> NodeAgent:
        """Node i's agent; `pool`: the database as this agent reaches it (default the
        tests' own); `cdr_import`: "process" to import the node's CDRs as `pbxctl agent`
        does by default, in a child process (which reaches the database directly)."""
        node = self.nodes[i]
        async with self.db.acquire() as conn:
            record = await load_node(conn, node.name)
        config = CallControlConfig(agi_port=0, cdr_file=node.cdr_file, tick=0.2, lead=5.0,
                                   lease=self.lease, lease_every=0.5, cdr_every=0.1,
                                   ahead=self.ahead, fail_policy=fail_policy,
                                   decision_timeout=self.decision_timeout,
                                   cdr_import=cdr_import)
        agent = NodeAgent(pool or self.db, record, node.tenant_config_dir,
                          dsn=self.settings.dsn, manage_interface="lo", debounce=0.1,
                          calls=config, role=role)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        self.agents[i if role == "all" else (i, role)] = (agent, stop, task)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while (role in ("all", "nodes") and agent.reconciles < 1) or \
                (role in ("all", "calls") and not agent.calls.agi.token_given) or \
                (role == "cdrs" and not agent.ami.connected.is_set()):  # node told PBX_AGI
            if task.done():
                task.result()
            assert loop.time() < deadline, "the agent did not start"
            await asyncio.sleep(0.05)
        return agent

    async def stop_agent(self, i: Any) -> None:
        agent, stop, task = self.agents.pop(i)
        stop.set()
        await asyncio.wait_for(task, 15)

    async def settle(self) -> None:
        """Every agent has applied what the API changed."""
        for agent, _, _ in self.agents.values():
            if agent.role in ("all", "nodes"):
                await agent.caught_up(15)
            if agent.role in ("all", "calls"):
                await agent.calls.sync_carriers()  # carriers follow their own notifications

    async def customer(self, *, dealer_calls: int | None = None) -> dict[str, Any]:
        """A distributor on node A with two resellers, one per node, each with a tenant whose
        plan prices calls with RATES."""
        api = self.api
        dist = await api.dealer("distributor", node_id=self.node_ids[0], max_calls=dealer_calls)
        table = api.ok(await api.post("/api/v1/rate-tables", {
            "dealer_id": dist["id"], "name": "Retail"}), 201)
        api.ok(await api.call("POST", f"/api/v1/rate-tables/{table['id']}/import",
                              raw=RATES.encode(), content_type="text/csv"))
        plan = api.ok(await api.post("/api/v1/plans", {
            "dealer_id": dist["id"], "name": "Standard", "rate_table_id": table["id"]}), 201)
        out: dict[str, Any] = {"dist": dist, "plan": plan, "tenants": []}
        for node_id, address in zip(self.node_ids, (RESELLER_A, RESELLER_B), strict=True):
            reseller = await api.dealer("reseller", parent_id=dist["id"], node_id=node_id,
                                        registration_address=address)
            tenant = await api.tenant(reseller["id"])
            out["tenants"].append((tenant, address))
        return out

    async def phone(self, tenant: dict, registrar: str, number: str, *,
                    credit: str | None = "50.00", **fields: Any) -> tuple[dict, Phone]:
        ext = await self.api.extension(tenant["id"], number, **fields)
        secret = self.api.ok(await self.api.post(
            f"/api/v1/extensions/{ext['id']}/reveal-password"))["sip_password"]
        if credit is not None:
            self.api.ok(await self.api.post(f"/api/v1/extensions/{ext['id']}/credit",
                                            {"amount": credit}))
        return ext, Phone(ext["account_code"], secret, registrar)

    async def carrier(self, node_index: int, port: int = 5060) -> dict:
        return self.api.ok(await self.api.post("/api/v1/carriers", {
            "node_id": self.node_ids[node_index], "name": f"carrier-{node_index}",
            "host": CARRIER, "port": port}), 201)

    async def outbound_caller(self) -> tuple[dict, dict, dict, Phone]:
        """(world, tenant, extension, phone): extension 2001 on node A, priced by the plan,
        with a carrier on its node, provisioned."""
        world = await self.customer()
        tenant, registrar = world["tenants"][0]
        await self.carrier(0)
        ext, phone = await self.phone(tenant, registrar, "2001", plan_id=world["plan"]["id"])
        await self.settle()
        return world, tenant, ext, phone

    async def cdr_of(self, ext: dict) -> dict:
        """The one CDR of the extension, once imported."""
        async def billed() -> bool:
            return bool(await self.cdrs(extension_id=ext["id"]))

        await until(billed, "the CDR")
        [cdr] = await self.cdrs(extension_id=ext["id"])
        return cdr

    async def cdrs(self, **query: Any) -> list[dict]:
        q = "&".join(f"{k}={v}" for k, v in query.items())
        return self.api.ok(await self.api.get(f"/api/v1/cdrs?limit=500&{q}"))["items"]

    async def live(self, **query: Any) -> list[dict]:
        q = "&".join(f"{k}={v}" for k, v in query.items())
        return self.api.ok(await self.api.get(f"/api/v1/calls?{q}"))["items"]

    async def counters(self) -> dict[tuple[str, int], int]:
        async with self.db.acquire() as conn:
            rows = await conn.fetch("SELECT kind, id, active FROM call_counters")
        return {(r["kind"], r["id"]): r["active"] for r in rows}


@pytest.fixture
async def calls(api, db, nodes, settings, node_credentials) -> AsyncIterator[Calls]:
    ids = []
    for node in nodes:
        created = api.ok(await api.post("/api/v1/nodes", {
            "name": node.name, "sip_address": node.address, "ami_host": node.address,
            "ami_username": node_credentials.ami_user,
            "ami_secret": node_credentials.ami_secret,
            "ari_url": f"http://{node.address}:8088", "ari_username": node_credentials.ari_user,
            "ari_password": node_credentials.ari_password}), 201)
        ids.append(created["id"])
    for node in nodes:  # the database is new for every test: so are the nodes' CDR files
        if node.cdr_file.exists():
            node.cdr_file.write_bytes(b"")
    platform = Calls(api, db, settings, nodes, ids)
    for i in range(len(nodes)):
        await platform.start_agent(i)
    try:
        yield platform
    finally:
        for i in list(platform.agents):
            await platform.stop_agent(i)


def carrier_uas(calls: int, seconds: float) -> asyncio.Task[SippRun]:
    """The carrier: answers `calls` calls on CARRIER:5060 and hangs up when told."""
    return asyncio.create_task(sipp("uas_answer.xml", None, ["carrier"], port=5060,
                                    local_ip=CARRIER, calls=calls, timeout=seconds))


async def place(phone: Phone, number: str, *, hold_ms: int = 1000,
                scenario: str = "uac_hold.xml", timeout: float = 15) -> SippRun:
    return await sipp(scenario, f"{phone.registrar}:5060", [phone.row(number)],
                      port=next_port(), timeout=timeout, extra=("-d", str(hold_ms)))


async def test_outbound_call_goes_to_the_carrier_and_leaves_one_rated_cdr(calls):
    world, tenant, ext, phone = await calls.outbound_caller()
    carrier = carrier_uas(1, 20)
    call = asyncio.create_task(place(phone, "33334444", hold_ms=2000))

    async def live() -> bool:
        return bool(await calls.live(extension_id=ext["id"]))

    await until(live, "the call to show as live")
    [item] = await calls.live(tenant_id=tenant["id"])
    assert item["direction"] == "outbound" and item["callee"] == "+551133334444"
    assert item["call_class"] == "local" and item["granted_seconds"] == 60
    assert (await call).ok, call.result().output
    assert (await carrier).ok, carrier.result().output
    cdr = await calls.cdr_of(ext)
    assert cdr["disposition"] == "ANSWERED" and cdr["call_class"] == "local"
    assert cdr["rate_prefix"] == "5511" and cdr["billed_seconds"] == 6
    assert 1.5 < float(cdr["talk_seconds"]) < 3.5
    assert Decimal(cdr["price"]) == Decimal("0.0600")
    assert cdr["dealer_path"][-2:] == [world["dist"]["id"], tenant["dealer_id"]]
    # the phone hung up: normal clearing (Q.850 cause 16)
    assert await calls.db.fetchval("SELECT hangup_cause FROM cdrs WHERE id = $1",
                                   cdr["id"]) == "16"
    account = calls.api.ok(await calls.api.get(f"/api/v1/extensions/{ext['id']}/credit"))
    assert Decimal(account["balance"]) == Decimal("49.9400")
    assert Decimal(account["reserved"]) == 0
    assert await calls.live() == []


async def test_a_transfer_is_declined_and_the_call_goes_on_billed_to_its_end(calls):
    """Transfers are not offered: a phone that hands its paid call to another number (a
    REFER) is declined (603), nothing rings the target, and the call stays the caller's,
    billed until it hangs up. A transfer the node took would leave the carrier's leg up
    after the caller's hang-up settled the call."""
    world, tenant, ext, phone = await calls.outbound_caller()
    _, target = await calls.phone(tenant, phone.registrar, "2002")
    await calls.settle()
    assert (await register(target)).ok
    carrier = carrier_uas(1, 20)
    run = await sipp("uac_refer.xml", f"{phone.registrar}:5060",
                     [phone.row("33334444", "2002")], port=next_port(), timeout=15,
                     extra=("-d", "2000"))
    assert run.ok, run.output
    assert (await carrier).ok, carrier.result().output
    cdr = await calls.cdr_of(ext)
    assert cdr["disposition"] == "ANSWERED" and cdr["callee"] == "+551133334444"
    assert 2.0 < float(cdr["talk_seconds"]) < 4.0 and cdr["billed_seconds"] == 6
    assert len(await calls.cdrs(tenant_id=tenant["id"])) == 1  # nothing rang 2002
    assert await calls.live() == []


async def test_a_call_cannot_be_replaced_from_outside_its_admission(calls, tmp_path):
    """An INVITE with Replaces naming an established call (an attended transfer's last step,
    or a pick-up) would put a new channel in the call's place, outside the dialplan: the
    caller's leg would hang up and settle the call while the carrier's leg went on unbilled.
    The node declines it (603), and the call goes on, the caller's, billed to its end."""
    world, tenant, ext, phone = await calls.outbound_caller()
    log = tmp_path / "dialog.log"
    carrier = carrier_uas(1, 30)
    held = asyncio.create_task(sipp(
        "uac_hold_logged.xml", f"{phone.registrar}:5060", [phone.row("33334444", str(log))],
        port=next_port(), timeout=20, extra=("-d", "4000")))

    async def logged() -> bool:
        return log.exists() and len(log.read_text().split()) >= 3

    await until(logged, "the call's dialog in the log")
    call_id, own_tag, node_tag = log.read_text().split()[-3:]
    replacing = await sipp("uac_replaces.xml", f"{phone.registrar}:5060",
                           [phone.row("33334444", call_id, own_tag, node_tag)],
                           port=next_port(), timeout=10)
    assert replacing.ok, replacing.output
    run = await held
    assert run.ok, run.output
    assert (await carrier).ok, carrier.result().output
    cdr = await calls.cdr_of(ext)
    assert cdr["disposition"] == "ANSWERED" and 3.5 < float(cdr["talk_seconds"]) < 5.5
    assert await calls.live() == []


async def test_simultaneous_calls_on_two_nodes_never_exceed_the_dealers_cap(calls):
    cap, attempts = 3, 8
    # eight decisions at once, each a first one (its rates still to be read): on a loaded
    # machine one may outlast 1 s and be refused by the policy instead of by the cap
    calls.decision_timeout = 5.0
    for i in (0, 1):
        await calls.stop_agent(i)
        await calls.start_agent(i)
    world = await calls.customer(dealer_calls=cap)
    await calls.carrier(0)
    await calls.carrier(1)
    phones = []
    for i in range(attempts):
        tenant, registrar = world["tenants"][i % 2]
        _, phone = await calls.phone(tenant, registrar, f"30{i:02d}", plan_id=world["plan"]["id"])
        phones.append(phone)
    await calls.settle()
    carrier = carrier_uas(cap, 30)
    results = await asyncio.gather(*(place(p, "33334444", hold_ms=4000) for p in phones))
    connected = [r for r in results if r.ok]
    assert len(connected) == cap, [r.output[-400:] for r in results]
    await carrier

    async def all_cdrs() -> bool:
        return len(await calls.cdrs(dealer_id=world["dist"]["id"])) == attempts

    await until(all_cdrs, "a CDR for every attempt", within=15)
    cdrs = await calls.cdrs(dealer_id=world["dist"]["id"])
    refused = [c for c in cdrs if c["refusal"]]
    assert len(refused) == attempts - cap
    assert {(c["refusal"], c["sip_code"]) for c in refused} == {("dealer_call_limit", 503)}
    assert {c["node_id"] for c in cdrs if not c["refusal"]} <= set(calls.node_ids)
    counters = await calls.counters()
    assert counters[("d", world["dist"]["id"])] == 0


async def test_prepaid_call_is_cut_when_its_credit_ends(calls):
    world = await calls.customer()
    tenant, registrar = world["tenants"][0]
    await calls.carrier(0)
    # 6.00 a minute in 6-second blocks: 1.20 pays for exactly 12 seconds
    ext, phone = await calls.phone(tenant, registrar, "4001", plan_id=world["plan"]["id"],
                                   credit="1.20")
    await calls.settle()
    carrier = carrier_uas(1, 40)
    run = await place(phone, "44445555", scenario="uac_until_cut.xml", timeout=30)
    assert run.ok, run.output
    await carrier

    async def billed() -> bool:
        return bool(await calls.cdrs(extension_id=ext["id"]))

    await until(billed, "the CDR")
    [cdr] = await calls.cdrs(extension_id=ext["id"])
    assert cdr["rate_prefix"] == "551144"
    assert abs(float(cdr["talk_seconds"]) - 12.0) <= 0.5, cdr
    account = calls.api.ok(await calls.api.get(f"/api/v1/extensions/{ext['id']}/credit"))
    # never below the floor (0) by more than one increment (6 s at 6.00/min = 0.60)
    assert Decimal(account["balance"]) >= Decimal("-0.60")
    assert Decimal(account["balance"]) == Decimal("0.0000")
    assert Decimal(account["reserved"]) == 0


async def test_calls_sharing_one_account_never_overrun_it(calls):
    """Three calls at once on a tenant's shared prepaid account holding 3.00 at 6.00 a
    minute (30 s in all): they are granted 6 s at a time from the one balance, each is cut
    when nothing is left, and the balance ends between 0 and minus one increment."""
    calls.ahead = 6
    for i in list(calls.agents):
        await calls.stop_agent(i)
        await calls.start_agent(i)
    world = await calls.customer()
    tenant, registrar = world["tenants"][0]
    calls.api.ok(await calls.api.patch(f"/api/v1/tenants/{tenant['id']}",
                                       {"shared_credit": True}))
    calls.api.ok(await calls.api.post(f"/api/v1/tenants/{tenant['id']}/credit",
                                      {"amount": "3.00"}))
    await calls.carrier(0)
    phones = []
    for n in range(3):
        _, phone = await calls.phone(tenant, registrar, f"450{n}", plan_id=world["plan"]["id"],
                                     credit=None)
        phones.append(phone)
    await calls.settle()
    carrier = carrier_uas(3, 60)
    runs = await asyncio.gather(*(place(p, "44445555", scenario="uac_until_cut.xml",
                                        timeout=45) for p in phones))
    assert all(r.ok for r in runs), [r.output[-300:] for r in runs]
    await carrier

    async def billed() -> bool:
        return len(await calls.cdrs(tenant_id=tenant["id"])) == 3

    await until(billed, "the three CDRs")
    cdrs = await calls.cdrs(tenant_id=tenant["id"])
    talk = sum(float(c["talk_seconds"]) for c in cdrs)
    assert 30 - 1.5 <= talk <= 30 + 1.5, [c["talk_seconds"] for c in cdrs]
    # each call was granted 6 s at a time, extended while it talked: it was cut within
    # 500 ms of the end of its last grant
    for c in cdrs:
        seconds = float(c["talk_seconds"])
        assert seconds >= 6 - 0.5 and abs(seconds - 6 * round(seconds / 6)) <= 0.5, seconds
    assert sum(c["billed_seconds"] for c in cdrs) <= 30 + 6
    account = calls.api.ok(await calls.api.get(f"/api/v1/tenants/{tenant['id']}/credit"))
    assert Decimal("-0.60") <= Decimal(account["balance"]) <= Decimal("0.60"), account
    assert Decimal(account["reserved"]) == 0


async def test_a_new_end_goes_only_to_a_channel_still_carrying_its_call(calls):
    """The callee channel's name is all a new end is sent by; after a node restart that name
    may be a newer call's. Here the talking callee channel is made to carry another call's
    id: the agent then leaves its end alone, and the call ends at its first grant (12 s)
    although its account could pay for minutes more."""
    calls.ahead = 12  # the first grant; more is due 5 s before it ends
    for i in list(calls.agents):
        await calls.stop_agent(i)
        await calls.start_agent(i)
    _, _, ext, phone = await calls.outbound_caller()
    agent = calls.agents[0][0]
    carrier = carrier_uas(1, 40)
    call = asyncio.create_task(place(phone, "33334444", scenario="uac_until_cut.xml",
                                     timeout=30))

    async def answered() -> bool:
        return bool(await calls.db.fetchval("SELECT callee_channel FROM calls"))

    await until(answered, "the answer")
    callee, call_id = await calls.db.fetchrow("SELECT callee_channel, id FROM calls")
    owner = await agent.ami.action({"Action": "Getvar", "Channel": callee,
                                    "Variable": "PBX_ANSWERED"})
    assert owner.get("Value") == str(call_id)  # what the dialplan set as it answered
    reply = await agent.ami.action({"Action": "Setvar", "Channel": callee,
                                    "Variable": "PBX_ANSWERED", "Value": str(uuid.uuid4())})
    assert reply.get("Response") == "Success"
    # done before the call was due for more time (else this test proves nothing)
    assert await calls.db.fetchval("SELECT granted_seconds FROM calls") == 12
    run = await call
    assert run.ok, run.output  # cut by the node
    assert (await carrier).ok, carrier.result().output
    cdr = await calls.cdr_of(ext)
    assert abs(float(cdr["talk_seconds"]) - 12.0) <= 0.5, cdr
    account = calls.api.ok(await calls.api.get(f"/api/v1/extensions/{ext['id']}/credit"))
    # a talk a hair over 12 s is billed its next increment, which was reserved for it
    assert cdr["billed_seconds"] in (12, 18)
    assert Decimal(account["balance"]) == Decimal("50.00") - Decimal(cdr["price"])
    assert Decimal(account["reserved"]) == 0


async def test_a_dialled_string_cannot_run_dialplan_functions(calls):
    """A phone may dial any text (pjsip unescapes the request URI's user part): quotes and a
    function call in it must never be evaluated by the shared dialplan, such as a DB_DELETE
    of another tenant's number map. The call is refused as an invalid number and the other
    tenant's extension stays where it was."""
    world, victim_world = await calls.customer(), await calls.customer()
    tenant, registrar = world["tenants"][0]
    victim, victim_registrar = victim_world["tenants"][0]
    _, phone = await calls.phone(tenant, registrar, "7501", plan_id=world["plan"]["id"])
    await calls.phone(victim, victim_registrar, "7502", credit=None)
    await calls.settle()
    node = calls.nodes[0]
    key = f"pbx-ext/{victim['id']} 7502"

    def stored() -> str:
        return node.rx(f"database get {key}")

    assert "Value:" in stored()
    # before the fix this deleted the key: the regex match hands DB_DELETE a bare family/key
    payload = f'1"|DB_DELETE("x/pbx-ext/{victim["id"]}/7502" : "x/(.*)")|"'
    escaped = "".join(c if c.isalnum() or c in "-/()" else f"%{ord(c):02X}" for c in payload)
    run = await place(phone, escaped, scenario=refused_scenario(404), timeout=10)
    assert run.ok, run.output
    assert "Value:" in stored(), "the dialled text ran DB_DELETE"

    async def refused() -> bool:
        return bool(await calls.cdrs(tenant_id=tenant["id"]))

    await until(refused, "the refused call's CDR")
    [cdr] = await calls.cdrs(tenant_id=tenant["id"])
    assert (cdr["refusal"], cdr["sip_code"]) == ("number_invalid", 404)


def contact_scenario(user: str) -> str:
    """register.xml registering `user` as its Contact's user part (what a phone chooses)."""
    text = (SCENARIOS / "register.xml").read_text(encoding="iso-8859-1")
    contact = "Contact: <sip:[field0]@[local_ip]:[local_port]>"
    assert text.count(contact) == 2
    path = Path(tempfile.gettempdir()) / "pbx-register-contact.xml"
    path.write_text(text.replace(contact, f"Contact: <sip:{user}@[local_ip]:[local_port]>"),
                    encoding="iso-8859-1")
    return str(path)


async def test_a_contact_a_phone_registers_never_dials_anything_else(calls):
    """A phone chooses the user part of the Contact it registers, and SIP lets it hold & ,
    ( ): none of that may make a call to its extension ring another tenant's endpoint."""
    world, victim_world = await calls.customer(), await calls.customer()
    tenant, registrar = world["tenants"][0]
    victim, victim_registrar = victim_world["tenants"][0]
    _, caller = await calls.phone(tenant, registrar, "7601", credit=None)
    _, hostile = await calls.phone(tenant, registrar, "7602", credit=None)
    _, target = await calls.phone(victim, victim_registrar, "7603", credit=None)
    await calls.settle()
    victim_port = next_port()
    assert (await register(target, port=victim_port)).ok
    rings = asyncio.create_task(sipp("uas_answer.xml", None, [target.row()], port=victim_port,
                                     timeout=6))
    hostile_port = next_port()
    user = f"1&PJSIP/{target.username}&PJSIP/x"
    run = await sipp(contact_scenario(user), f"{registrar}:5060", [hostile.row()],
                     port=hostile_port, timeout=5)
    assert run.ok, run.output  # the node takes such a contact: what matters is the call
    await place(caller, "7602", hold_ms=500, scenario="uac_call.xml", timeout=8)
    assert not (await rings).ok, "the other tenant's phone rang"


async def test_refusals_answer_with_the_sip_code_of_their_reason(calls):
    world = await calls.customer()
    tenant, registrar = world["tenants"][0]
    await calls.carrier(0)
    _, broke = await calls.phone(tenant, registrar, "5001", plan_id=world["plan"]["id"],
                                 credit=None)
    _, local_only = await calls.phone(tenant, registrar, "5002", plan_id=world["plan"]["id"],
                                      allow_international=False)
    await calls.settle()
    # each scenario succeeds only if the phone receives exactly that SIP answer
    no_credit = await place(broke, "33334444", scenario=refused_scenario(402))
    forbidden = await place(local_only, "+14155550100", scenario=refused_scenario(403))
    assert no_credit.ok, no_credit.output
    assert forbidden.ok, forbidden.output

    async def both() -> bool:
        return len(await calls.cdrs(tenant_id=tenant["id"])) == 2

    await until(both, "the refused calls' CDRs")
    got = {(c["refusal"], c["sip_code"]) for c in await calls.cdrs(tenant_id=tenant["id"])}
    assert got == {("no_credit", 402), ("class_forbidden_international", 403)}
    # Q.850 causes as Asterisk maps the SIP answers: 402 has none of its own (127,
    # interworking), 403 is 21 (call rejected)
    causes = await calls.db.fetch("SELECT refusal, hangup_cause FROM cdrs WHERE tenant_id = $1",
                                  tenant["id"])
    assert {(c["refusal"], c["hangup_cause"]) for c in causes} == {
        ("no_credit", "127"), ("class_forbidden_international", "21")}, causes


async def test_carrier_call_to_a_did_rings_its_extension(calls):
    world = await calls.customer()
    tenant, registrar = world["tenants"][0]
    await calls.carrier(0)
    ext, phone = await calls.phone(tenant, registrar, "6001", credit=None)
    rng = calls.api.ok(await calls.api.post("/api/v1/number-ranges", {
        "dealer_id": tenant["dealer_id"], "name": "DIDs", "country_code": "55",
        "area_code": "11", "first_number": 30000000, "last_number": 30000099}), 201)
    did = calls.api.ok(await calls.api.post("/api/v1/dids", {
        "range_id": rng["id"], "local_number": 30000042, "extension_id": ext["id"]}), 201)
    await calls.settle()
    port = next_port()
    assert (await register(phone, port=port)).ok
    callee = asyncio.create_task(sipp("uas_answer.xml", None, [phone.row()], port=port,
                                      timeout=15))
    await asyncio.sleep(0.3)
    run = await sipp("uac_inbound.xml", f"{NODE_A}:5060",
                     [f"{did['e164'].lstrip('+')};{NODE_A};551199998888"], port=next_port(),
                     local_ip=CARRIER, timeout=10, extra=("-d", "1000"))
    assert run.ok, run.output
    assert (await callee).ok

    async def recorded() -> bool:
        return bool(await calls.cdrs(extension_id=ext["id"]))

    await until(recorded, "the inbound CDR")
    [cdr] = await calls.cdrs(extension_id=ext["id"])
    assert cdr["direction"] == "inbound" and cdr["disposition"] == "ANSWERED"
    assert cdr["callee"] == did["e164"] and Decimal(cdr["price"]) == 0


async def test_unknown_did_from_the_carrier_is_refused(calls):
    await calls.customer()
    await calls.carrier(0)
    await calls.settle()
    run = await sipp("uac_inbound.xml", f"{NODE_A}:5060", [f"551130009999;{NODE_A};5511"],
                     port=next_port(), local_ip=CARRIER, timeout=5, extra=("-d", "100"))
    assert not run.ok

    async def recorded() -> bool:
        return bool(await calls.cdrs(node_id=calls.node_ids[0]))

    await until(recorded, "the refused call's CDR")
    [cdr] = await calls.cdrs(node_id=calls.node_ids[0])
    assert (cdr["direction"], cdr["callee"]) == ("inbound", "551130009999"), cdr
    assert (cdr["refusal"], cdr["sip_code"]) == ("callee_unknown", 404), cdr


async def test_a_caller_id_with_line_breaks_and_quotes_still_leaves_its_cdr(calls):
    """The carrier's From user is unescaped by the node: a line break and quotes in it must
    not split or lose the call's record, nor reach the CDR file at all."""
    await calls.customer()
    await calls.carrier(0)
    await calls.settle()
    caller = "55119%0A8888%22%2C%22x"  # 55119, a line break, 8888", "x
    run = await sipp("uac_inbound.xml", f"{NODE_A}:5060", [f"551130009999;{NODE_A};{caller}"],
                     port=next_port(), local_ip=CARRIER, timeout=5, extra=("-d", "100"))
    assert not run.ok  # no such DID

    async def recorded() -> bool:
        return bool(await calls.cdrs(node_id=calls.node_ids[0]))

    await until(recorded, "the refused call's CDR")
    [cdr] = await calls.cdrs(node_id=calls.node_ids[0])
    assert (cdr["refusal"], cdr["callee"]) == ("callee_unknown", "551130009999"), cdr
    assert cdr["caller"] == "551198888", cdr  # digits and + only, as the node keeps it


async def test_calls_and_cdrs_survive_the_agent_restarting(calls):
    """The call goes on while the agent is away; the restarted agent finds it (live calls
    within 10 s), and its CDR, written by the node meanwhile, is imported once."""
    world = await calls.customer()
    tenant, registrar = world["tenants"][0]
    await calls.carrier(0)
    ext, phone = await calls.phone(tenant, registrar, "7001", plan_id=world["plan"]["id"])
    await calls.settle()
    carrier = carrier_uas(1, 30)
    call = asyncio.create_task(place(phone, "33334444", hold_ms=6000, timeout=20))

    async def live() -> bool:
        return bool(await calls.live(extension_id=ext["id"]))

    await until(live, "the call to be live")
    await calls.stop_agent(0)
    await asyncio.sleep(1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await calls.start_agent(0)
    await until(live, "the call to be seen again", within=10)
    assert loop.time() - started < 10
    assert (await call).ok, call.result().output
    await carrier

    async def billed() -> bool:
        return bool(await calls.cdrs(extension_id=ext["id"]))

    await until(billed, "the CDR")
    await asyncio.sleep(0.5)
    assert len(await calls.cdrs(extension_id=ext["id"])) == 1
    # importing the node's file again from the start stores nothing twice
    async with calls.db.acquire() as conn:
        await conn.execute("UPDATE cdr_import_state SET offset_ = 0")
    node = calls.nodes[0]
    assert await lifecycle.import_file(calls.db, calls.node_ids[0], node.cdr_file) == 0
    assert len(await calls.cdrs(extension_id=ext["id"])) == 1


def process_alive(pid: int) -> bool:
    """The process runs (a zombie has ended: its parent has not reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_cdrs_are_imported_by_a_process_of_their_own_started_again_if_it_ends(calls):
    """PBX_CDR_IMPORT=process, what `pbxctl agent` does by default: a child process
    (`--role cdrs`) imports the node's CDR file, the agent itself none. Killed outright, it
    is started again and the next call is billed too; it ends with its agent."""
    await calls.stop_agent(0)
    agent = await calls.start_agent(0, cdr_import="process")
    _, _, ext, phone = await calls.outbound_caller()

    async def child() -> bool:
        return agent.calls.cdr_process is not None

    await until(child, "the CDR import process")
    first = agent.calls.cdr_process
    assert first is not None
    cmdline = Path(f"/proc/{first.pid}/cmdline").read_bytes().split(b"\0")
    assert [b"--role", b"cdrs"] == cmdline[-3:-1] and b"agent" in cmdline
    carrier = carrier_uas(2, 40)
    result = await place(phone, "33334444", hold_ms=1500)
    assert result.ok, result.output
    cdr = await calls.cdr_of(ext)
    assert cdr["disposition"] == "ANSWERED" and Decimal(cdr["price"]) == Decimal("0.0600")
    assert agent.calls.cdrs_imported == 0  # not by the agent itself

    first.kill()

    async def again() -> bool:
        now = agent.calls.cdr_process
        return now is not None and now.pid != first.pid

    await until(again, "the CDR import process started again", within=10)
    second = agent.calls.cdr_process
    assert second is not None and not process_alive(first.pid)
    result = await place(phone, "33334444", hold_ms=1500)
    assert result.ok, result.output
    assert (await carrier).ok, carrier.result().output

    async def both() -> bool:
        return len(await calls.cdrs(extension_id=ext["id"])) == 2

    await until(both, "the second call's CDR")
    account = calls.api.ok(await calls.api.get(f"/api/v1/extensions/{ext['id']}/credit"))
    assert Decimal(account["balance"]) == Decimal("49.8800")
    assert Decimal(account["reserved"]) == 0 and await calls.live() == []
    await calls.stop_agent(0)
    assert second.returncode is not None and not process_alive(second.pid)


async def test_the_cdr_import_process_lists_the_nodes_channels_without_its_events(calls):
    """A `--role cdrs` agent logs in to the node with Events: off (it needs none) and still
    gets whole listings of the node's channels: a held line (lifecycle.CdrImport) waits
    for its caller's channel to be gone from them."""
    _, _, ext, phone = await calls.outbound_caller()
    cdrs = await calls.start_agent(0, "cdrs")
    assert cdrs.ami.events == "off" and not cdrs.calls.agi_url
    carrier = carrier_uas(1, 30)
    call = asyncio.create_task(place(phone, "33334444", hold_ms=3000))

    async def live() -> bool:
        return bool(await calls.live(extension_id=ext["id"]))

    await until(live, "the call to be live")
    uniqueid = await calls.db.fetchval("SELECT channel FROM calls")
    listed = await cdrs.calls._live_channels()
    assert listed is not None and uniqueid in listed
    assert (await call).ok, call.result().output
    await carrier
    await calls.cdr_of(ext)
    assert cdrs.calls.decisions == 0 and cdrs.calls.cdrs_imported == 0  # not started here
    listed = await cdrs.calls._live_channels()
    assert listed is not None and uniqueid not in listed


async def test_an_answer_raised_while_no_agent_listens_is_recovered(calls):
    """The carrier answers while the agent is away, so nobody hears the answer's AMI event;
    the restarted agent asks the node, and the call's granted time starts when it was
    really answered (as the node's CDR says)."""
    world = await calls.customer()
    tenant, registrar = world["tenants"][0]
    await calls.carrier(0)
    ext, phone = await calls.phone(tenant, registrar, "7201", plan_id=world["plan"]["id"])
    await calls.settle()
    carrier = asyncio.create_task(sipp("uas_answer_late.xml", None, ["carrier"], port=5060,
                                       local_ip=CARRIER, calls=1, timeout=40,
                                       extra=("-d", "4000")))
    # talks 10 s once answered: still up when the restarted agent looks, however slowly
    # the agent stopped and started
    call = asyncio.create_task(place(phone, "33334444", hold_ms=10000, timeout=30))

    async def ringing() -> bool:
        items = await calls.live(extension_id=ext["id"])
        return bool(items) and items[0]["state"] == "ringing"

    await until(ringing, "the call to ring")
    await calls.stop_agent(0)
    await asyncio.sleep(5.0)  # the carrier answers 4 s after it started ringing
    await calls.start_agent(0)

    async def answered() -> bool:
        items = await calls.live(extension_id=ext["id"])
        return bool(items) and items[0]["state"] == "answered"

    await until(answered, "the answer to be recovered", within=10)
    [item] = await calls.live(extension_id=ext["id"])
    assert (await call).ok, call.result().output
    assert (await carrier).ok, carrier.result().output

    async def billed() -> bool:
        return bool(await calls.cdrs(extension_id=ext["id"]))

    await until(billed, "the CDR")
    [cdr] = await calls.cdrs(extension_id=ext["id"])
    recovered = datetime.fromisoformat(item["answered_at"])
    assert abs((recovered - datetime.fromisoformat(cdr["answered_at"])).total_seconds()) < 0.5
    assert item["granted_seconds"] == 60


async def test_cdr_of_a_call_refused_while_no_agent_runs_arrives_later(calls):
    world = await calls.customer()
    tenant, registrar = world["tenants"][0]
    ext, phone = await calls.phone(tenant, registrar, "7101", plan_id=world["plan"]["id"])
    await calls.settle()
    await calls.stop_agent(0)
    run = await place(phone, "33334444")
    assert not run.ok  # closed by default: no admission, no call
    await asyncio.sleep(0.5)
    assert await calls.cdrs(tenant_id=tenant["id"]) == []
    await calls.start_agent(0)

    async def arrived() -> bool:
        return bool(await calls.cdrs(tenant_id=tenant["id"]))

    await until(arrived, "the CDR written while the agent was down")
    [cdr] = await calls.cdrs(tenant_id=tenant["id"])
    assert (cdr["refusal"], cdr["sip_code"]) == ("admission_unavailable", 503)


async def _two_phones_without_agent(calls) -> tuple[dict, Phone, Phone]:
    """(tenant, caller, callee): two extensions of one tenant on node A, provisioned, the
    node's agent then stopped."""
    world = await calls.customer()
    tenant, registrar = world["tenants"][0]
    await calls.carrier(0)
    _, caller = await calls.phone(tenant, registrar, "7301", plan_id=world["plan"]["id"])
    _, callee = await calls.phone(tenant, registrar, "7302", credit=None)
    await calls.settle()
    await calls.stop_agent(0)
    return tenant, caller, callee


async def _cut_off_call_control(calls, relay: PgRelay, policy: str) -> Any:
    """Node A's call control in a process of its own, reaching the database through
    `relay`, which is then cut; returns its pool."""
    pool = await create_pool(relay.dsn, calls.settings)
    await calls.start_agent(0, role="calls", pool=pool, fail_policy=policy)
    relay.cut()
    return pool


async def _refused_in_bounded_time(phone: Phone, number: str) -> float:
    """Seconds until the call is refused with 503 (the scenario fails on any other answer)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    run = await place(phone, number, scenario=refused_scenario(503), timeout=10)
    assert run.ok, run.output
    return loop.time() - started


@pytest.mark.parametrize("policy", ["closed", "open"])
async def test_calls_follow_the_fail_policy_while_the_database_is_unreachable(calls, policy):
    """With the database silent, every decision is answered by the node's policy within
    the decision timeout (1 s): closed refuses all calls with 503, open lets calls between
    the tenant's extensions through uncounted and still refuses external ones. Their CDRs
    are imported once the database answers again."""
    tenant, caller, callee = await _two_phones_without_agent(calls)
    async with PgRelay(calls.settings.dsn) as relay:
        pool = await _cut_off_call_control(calls, relay, policy)
        try:
            assert await _refused_in_bounded_time(caller, "33334444") < 3.0
            if policy == "closed":
                assert await _refused_in_bounded_time(caller, "7302") < 3.0
            else:
                port = next_port()
                assert (await register(callee, port=port)).ok
                answering = asyncio.create_task(sipp("uas_answer.xml", None, [callee.row()],
                                                     port=port, timeout=15))
                await asyncio.sleep(0.3)
                run = await place(caller, "7302", hold_ms=500)
                assert run.ok, run.output
                assert (await answering).ok
            assert await calls.cdrs(tenant_id=tenant["id"]) == []
        finally:
            relay.restore()
            await calls.stop_agent((0, "calls"))
            await pool.close()

    async def both() -> bool:
        return len(await calls.cdrs(tenant_id=tenant["id"])) == 2

    await calls.start_agent(0)
    await until(both, "the CDRs written while the database was away")
    got = {(c["callee"], c["refusal"], c["sip_code"], c["disposition"] == "ANSWERED")
           for c in await calls.cdrs(tenant_id=tenant["id"])}
    internal = ("7302", "admission_unavailable", 503, False) if policy == "closed" \
        else ("7302", None, None, True)
    assert got == {("33334444", "admission_unavailable", 503, False), internal}, got
    assert await calls.live() == []
    assert all(n == 0 for n in (await calls.counters()).values())


async def _call_until_cut(calls, number: str, timeout: float) -> tuple[dict, dict, Any, Any]:
    """A phone's outbound call that talks until it is hung up, once it is answered: the
    extension, the call as the API lists it, and the SIPp caller and carrier tasks."""
    world = await calls.customer()
    tenant, registrar = world["tenants"][0]
    await calls.carrier(0)
    ext, phone = await calls.phone(tenant, registrar, number, plan_id=world["plan"]["id"])
    await calls.settle()
    carrier = carrier_uas(1, 30)
    call = asyncio.create_task(place(phone, "33334444", scenario="uac_until_cut.xml",
                                     timeout=timeout))

    async def answered() -> bool:
        items = await calls.live(extension_id=ext["id"])
        return bool(items) and items[0]["state"] == "answered"

    await until(answered, "the call to be answered")
    [item] = await calls.live(extension_id=ext["id"])
    return ext, item, call, carrier


async def test_api_hangs_up_a_call_in_progress(calls):
    ext, item, call, carrier = await _call_until_cut(calls, "8001", 20)
    reply = await calls.api.delete(f"/api/v1/calls/{item['id']}")
    assert reply.status == 202
    assert (await call).ok, call.result().output
    await carrier

    async def gone() -> bool:
        return not await calls.live(extension_id=ext["id"])

    await until(gone, "the call to end")

    # the answer's AMI event carried the node's time: the grant started when the node's CDR
    # says the call was answered, not when the answer reached the database (it waits up to
    # the answer window to be recorded with others)
    async def billed() -> bool:
        return bool(await calls.cdrs(extension_id=ext["id"]))

    await until(billed, "the CDR")
    [cdr] = await calls.cdrs(extension_id=ext["id"])
    answered_at = datetime.fromisoformat(item["answered_at"])
    assert abs((answered_at - datetime.fromisoformat(cdr["answered_at"])).total_seconds()) \
        < 0.03


async def test_a_caller_who_gives_up_during_admission_frees_the_call_at_once(calls):
    """The caller CANCELs while the decision waits for the database: Asterisk tells the
    FastAGI exchange (HANGUP) and the dialplan stops before the call rings. The agent gives
    the call's slots and reservation back then, not when its 30 s lease lapses."""
    await calls.stop_agent(0)
    calls.decision_timeout = 10.0  # the decision waits for the test, not for the policy
    agent = await calls.start_agent(0)
    world, tenant, ext, phone = await calls.outbound_caller()
    async with calls.db.acquire() as blocker, blocker.transaction():
        # the admission reserves credit on this account: it waits until the test lets go
        await blocker.execute("SELECT 1 FROM credit_accounts WHERE extension_id = $1"
                              " FOR UPDATE", ext["id"])
        given_up = await place(phone, "33334444", hold_ms=300, scenario="uac_cancel.xml")
        assert given_up.ok, given_up.output  # 200 to the CANCEL, 487 to the INVITE
        waiting = await calls.db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE '%admit_call_checked%'")
        assert waiting == 1  # the decision was on its way when the caller left
    loop = asyncio.get_running_loop()
    released_at = loop.time()

    async def released() -> bool:
        async with calls.db.acquire() as conn:
            left = await conn.fetchval("SELECT count(*) FROM calls")
        return left == 0 and agent.calls.agi.hung_up == 1

    await until(released, "the call to be released", within=5)
    assert loop.time() - released_at < calls.lease / 3
    assert all(active == 0 for active in (await calls.counters()).values())
    account = calls.api.ok(await calls.api.get(f"/api/v1/extensions/{ext['id']}/credit"))
    assert Decimal(account["reserved"]) == 0 and Decimal(account["balance"]) == 50
    assert agent.calls.agi.failed == 0


async def test_a_hangup_asked_while_no_agent_listens_is_carried_out_when_it_returns(calls):
    """The NOTIFY of a hang-up reaches no agent while it is away; the request stays with the
    call, and the agent, back, hangs the call up at its first lease renewal."""
    ext, item, call, carrier = await _call_until_cut(calls, "8002", 30)
    await calls.stop_agent(0)
    assert (await calls.api.delete(f"/api/v1/calls/{item['id']}")).status == 202
    await asyncio.sleep(2.0)
    assert not call.done()  # nobody told the node: the call goes on
    loop = asyncio.get_running_loop()
    started = loop.time()
    await calls.start_agent(0)
    assert (await call).ok, call.result().output  # the callee side got its BYE
    assert loop.time() - started < 12
    await carrier

    async def billed() -> bool:
        return bool(await calls.cdrs(extension_id=ext["id"]))

    await until(billed, "the CDR")
    assert not await calls.live(extension_id=ext["id"])


async def _answered_outbound_call(calls, number: str, dialled: str, hold_ms: int,
                                  timeout: float) -> tuple[dict, dict, Any, Any]:
    """With 2 s leases: a phone's outbound call through the carrier, once it is answered.
    Returns the world, the extension, and the SIPp caller and carrier tasks."""
    calls.lease = 2.0
    await calls.stop_agent(0)
    await calls.start_agent(0)
    world = await calls.customer(dealer_calls=5)
    tenant, registrar = world["tenants"][0]
    await calls.carrier(0)
    ext, phone = await calls.phone(tenant, registrar, number, plan_id=world["plan"]["id"])
    await calls.settle()
    carrier = carrier_uas(1, 30)
    call = asyncio.create_task(place(phone, dialled, hold_ms=hold_ms, timeout=timeout))

    async def answered() -> bool:
        items = await calls.live(extension_id=ext["id"])
        return bool(items) and items[0]["state"] == "answered"

    await until(answered, "the call to be answered")
    return world, ext, call, carrier


async def test_a_call_longer_than_its_lease_keeps_it_while_the_agent_vouches(calls):
    world, ext, call, carrier = await _answered_outbound_call(calls, "9002", "33334445",
                                                             hold_ms=12000, timeout=30)
    await asyncio.sleep(3 * calls.lease)  # three leases: only renewals keep it
    await lifecycle.sweep(calls.db)
    assert [c["state"] for c in await calls.live(extension_id=ext["id"])] == ["answered"]
    assert (await calls.counters())[("d", world["dist"]["id"])] == 1
    assert (await call).ok
    await carrier

    async def settled() -> bool:
        return bool(await calls.cdrs(extension_id=ext["id"]))

    await until(settled, "the call's CDR")
    assert [c["disposition"] for c in await calls.cdrs(extension_id=ext["id"])] == ["ANSWERED"]


async def test_a_lapsed_lease_releases_the_call_and_the_late_cdr_changes_nothing(calls):
    world, ext, call, carrier = await _answered_outbound_call(calls, "9001", "33334444",
                                                             hold_ms=5000, timeout=20)
    assert (await calls.counters())[("d", world["dist"]["id"])] == 1
    await calls.stop_agent(0)  # nobody vouches for the call any more
    await asyncio.sleep(calls.lease + 0.5)
    await lifecycle.sweep(calls.db)  # or the other node's agent was first: either releases

    async def released() -> bool:
        return (await calls.counters())[("d", world["dist"]["id"])] == 0

    await until(released, "the lapsed call to be released", within=3)
    [swept] = await calls.cdrs(extension_id=ext["id"])
    assert swept["disposition"] == "LEASE EXPIRED"
    assert (await call).ok
    await carrier
    await calls.start_agent(0)  # imports the node's own CDR of the same call: one CDR a call
    async with calls.db.acquire() as conn:
        await until(lambda: _imported(conn), "the node's CDR file to be read")
    assert [c["disposition"] for c in await calls.cdrs(extension_id=ext["id"])] == [
        "LEASE EXPIRED"]
    assert (await calls.counters())[("d", world["dist"]["id"])] == 0
    account = calls.api.ok(await calls.api.get(f"/api/v1/extensions/{ext['id']}/credit"))
    assert Decimal(account["reserved"]) == 0


async def _imported(conn: Any) -> bool:
    return bool(await conn.fetchval("SELECT offset_ > 0 FROM cdr_import_state"))


async def test_call_control_in_a_process_of_its_own_beside_a_nodes_agent(calls):
    """`pbxctl agent --role nodes` and `--role calls` side by side drive a node as one
    agent does: the extension is provisioned by the one, the call admitted, cut to its
    grant and settled by the other."""
    await calls.stop_agent(0)
    nodes_agent = await calls.start_agent(0, "nodes")
    calls_agent = await calls.start_agent(0, "calls")
    assert not nodes_agent.calls.agi_url and calls_agent.reconciles == 0
    _, _, ext, phone = await calls.outbound_caller()
    carrier = carrier_uas(1, 20)
    result = await place(phone, "33334444", hold_ms=1500)
    assert result.ok, result.output
    assert (await carrier).ok, carrier.result().output
    cdr = await calls.cdr_of(ext)
    assert cdr["disposition"] == "ANSWERED" and cdr["billed_seconds"] == 6
    assert Decimal(cdr["price"]) == Decimal("0.0600")
    assert calls_agent.calls.decisions == 1 and nodes_agent.calls.decisions == 0
    assert all(active == 0 for active in (await calls.counters()).values())
    assert await calls.live() == []
