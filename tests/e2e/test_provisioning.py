"""Through the API to a real Asterisk node and real SIP phones (SIPp): provisioning,
registration, isolation between tenants, and convergence without operator action."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.provisioning.agent import NodeAgent
from controlplane.provisioning.desired import load_node
from controlplane.sandbox import SandboxNode
from tests.e2e.sipp import Phone, next_port, register, sipp, until_refused, until_registered

pytestmark = pytest.mark.e2e

NODE_ADDRESS = "127.0.0.4"
RESELLER_A = "127.0.0.21"
RESELLER_B = "127.0.0.22"


@pytest.fixture(scope="module")
def pbx_node(sandbox_root, sandbox_cache_dir, node_credentials, tmp_path_factory):
    node = SandboxNode(name="pbx1", address=NODE_ADDRESS, base_dir=tmp_path_factory.mktemp("n"),
                       cache_dir=sandbox_cache_dir, ami_user=node_credentials.ami_user,
                       ami_secret=node_credentials.ami_secret,
                       ari_user=node_credentials.ari_user,
                       ari_password=node_credentials.ari_password)
    node.start(timeout=60)
    yield node
    node.stop()


class Platform:
    """The API, the node, and the agent driving it, as an operator sees them."""

    def __init__(self, api, db, node: SandboxNode, settings, node_id: int) -> None:
        self.api, self.db, self.node, self.settings, self.node_id = api, db, node, settings, \
            node_id
        self.stop = asyncio.Event()
        self.agent: NodeAgent | None = None
        self.task: asyncio.Task | None = None

    async def start_agent(self) -> NodeAgent:
        async with self.db.acquire() as conn:
            record = await load_node(conn, "pbx1")
        self.stop = asyncio.Event()
        self.agent = NodeAgent(self.db, record, self.node.tenant_config_dir,
                               dsn=self.settings.dsn, manage_interface="lo", debounce=0.1)
        self.task = asyncio.create_task(self.agent.run(self.stop))
        await self.until(lambda: self.agent.reconciles >= 1, "first reconcile")
        return self.agent

    async def stop_agent(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)

    async def until(self, predicate, what: str, within: float = 15.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not predicate():
            if self.task is not None and self.task.done():
                self.task.result()  # the agent died: show why
                raise AssertionError("the agent stopped")
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    async def reseller(self, address: str) -> dict:
        dist = await self.api.dealer("distributor", node_id=self.node_id)
        return await self.api.dealer("reseller", parent_id=dist["id"],
                                     registration_address=address)

    async def phone(self, tenant: dict, number: str, registrar: str) -> tuple[dict, Phone]:
        ext = await self.api.extension(tenant["id"], number)
        secret = self.api.ok(await self.api.post(
            f"/api/v1/extensions/{ext['id']}/reveal-password"))
        return ext, Phone(ext["account_code"], secret["sip_password"], registrar)

    async def registered(self, phone: Phone, within: float = 5.0) -> float:
        """Seconds until the phone registers; a failure says what the agent and the node
        showed, and whether the phone registered later."""
        try:
            return await until_registered(phone, within=within)
        except AssertionError as exc:
            seen = await self._diagnose(phone)
            try:
                later = f"registered {await until_registered(phone, within=30):.1f}s later"
            except AssertionError:
                later = "still not registered 30s later"
            raise AssertionError(f"{later}\n{seen}\n{exc}") from None

    async def _diagnose(self, phone: Phone) -> str:
        agent = self.agent
        error = await self.db.fetchval("SELECT last_error FROM nodes WHERE id = $1",
                                       self.node_id)
        listeners = await asyncio.create_subprocess_exec(
            "ss", "-ulpn", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(listeners.communicate(), 10)
        endpoint = self.node.rx(f"pjsip show endpoint {phone.username}")
        log = self.node.log_file.read_text(errors="replace").splitlines() \
            if self.node.log_file.exists() else ["(none)"]
        return "\n".join([
            f"agent: reconciles={agent and agent.reconciles} applied={agent and agent.applied}"
            f" transports={agent and sorted(agent.transports)}"
            f" marker={agent and agent.markers.get(phone.username)} last_error={error!r}",
            "node endpoint: " + " | ".join(
                line.strip() for line in endpoint.splitlines()
                if line.strip().startswith(("Endpoint:", "InAuth:", "Aor:", "Transport:",
                                            "Unable", "transport ", "auth ", "aors "))),
            "node transports: " + self.node.rx("pjsip show transports")[-800:],
            "node log: " + "\n".join(log[-12:]),
            "UDP :5060 listeners: " + " | ".join(
                line for line in out.decode(errors="replace").splitlines() if ":5060" in line),
        ])


@pytest.fixture
async def platform(api, db, pbx_node, settings, node_credentials) -> AsyncIterator[Platform]:
    node = api.ok(await api.post("/api/v1/nodes", {
        "name": "pbx1", "sip_address": NODE_ADDRESS, "ami_host": NODE_ADDRESS,
        "ami_username": node_credentials.ami_user, "ami_secret": node_credentials.ami_secret,
        "ari_url": f"http://{NODE_ADDRESS}:8088", "ari_username": node_credentials.ari_user,
        "ari_password": node_credentials.ari_password}), 201)
    p = Platform(api, db, pbx_node, settings, node["id"])
    await p.start_agent()
    yield p
    await p.stop_agent()


async def test_phone_registers_at_its_resellers_address_with_digest_auth(platform):
    reseller = await platform.reseller(RESELLER_A)
    tenant = await platform.api.tenant(reseller["id"])
    _, phone = await platform.phone(tenant, "1001", RESELLER_A)
    took = await platform.registered(phone, within=5)
    assert took < 5
    transports = platform.node.rx("pjsip show transports")
    assert f"{RESELLER_A}:5060" in transports


async def test_an_extension_written_around_the_api_is_not_pushed_and_stops_nothing(
        platform, caplog):
    """A value that could break out of its place (here a password written by plain SQL) is
    never pushed, its password never logged, and the node's other phones still provision."""
    reseller = await platform.reseller(RESELLER_A)
    tenant = await platform.api.tenant(reseller["id"])
    bad, bad_phone = await platform.phone(tenant, "1001", RESELLER_A)
    await platform.registered(bad_phone)
    await platform.db.execute("UPDATE extensions SET sip_password = $2 WHERE id = $1",
                              bad["id"], "x]\n[evil-secret")
    await platform.db.execute("SELECT pg_notify('pbx_changes', json_build_object("
                              "'kind', 'extension', 'node_id', $1::bigint,"
                              " 'account_codes', json_build_array($2::text))::text)",
                              platform.node_id, bad["account_code"])
    _, good = await platform.phone(tenant, "1002", RESELLER_A)
    await platform.agent.caught_up(15)
    await platform.registered(good)
    assert f"extension {bad['account_code']} not pushed" in caplog.text
    assert "evil-secret" not in caplog.text
    assert "[evil" not in platform.node.rx(f"pjsip show auth {bad['account_code']}")


async def test_wrong_password_is_refused(platform):
    reseller = await platform.reseller(RESELLER_A)
    tenant = await platform.api.tenant(reseller["id"])
    _, phone = await platform.phone(tenant, "1001", RESELLER_A)
    await platform.registered(phone)
    wrong = Phone(phone.username, phone.password + "x", phone.registrar)
    assert not (await register(wrong)).ok


async def test_deactivated_extension_can_no_longer_register(platform):
    reseller = await platform.reseller(RESELLER_A)
    tenant = await platform.api.tenant(reseller["id"])
    ext, phone = await platform.phone(tenant, "1001", RESELLER_A)
    await platform.registered(phone)
    platform.api.ok(await platform.api.patch(f"/api/v1/extensions/{ext['id']}",
                                             {"active": False}))
    assert await until_refused(phone, within=3) < 3
    platform.api.ok(await platform.api.patch(f"/api/v1/extensions/{ext['id']}",
                                             {"active": True}))
    await platform.registered(phone, within=3)


async def test_deleted_extension_can_no_longer_register(platform):
    reseller = await platform.reseller(RESELLER_A)
    tenant = await platform.api.tenant(reseller["id"])
    ext, phone = await platform.phone(tenant, "1001", RESELLER_A)
    await platform.registered(phone)
    assert (await platform.api.delete(f"/api/v1/extensions/{ext['id']}")).status == 204
    await until_refused(phone, within=3)
    assert "900" not in platform.node.rx(f"database show pbx-ext/{tenant['id']}")


async def test_cancelled_tenant_phones_can_no_longer_register(platform):
    reseller = await platform.reseller(RESELLER_A)
    tenant = await platform.api.tenant(reseller["id"])
    _, phone = await platform.phone(tenant, "1001", RESELLER_A)
    await platform.registered(phone)
    platform.api.ok(await platform.api.post(f"/api/v1/tenants/{tenant['id']}/cancel"))
    await until_refused(phone, within=3)


async def test_rotated_password_takes_effect(platform):
    reseller = await platform.reseller(RESELLER_A)
    tenant = await platform.api.tenant(reseller["id"])
    ext, phone = await platform.phone(tenant, "1001", RESELLER_A)
    await platform.registered(phone)
    new = platform.api.ok(await platform.api.post(
        f"/api/v1/extensions/{ext['id']}/rotate-password"))["sip_password"]
    await until_refused(phone, within=3)
    await platform.registered(Phone(phone.username, new, phone.registrar), within=3)


async def test_api_shows_where_and_with_what_an_extension_is_registered(platform):
    reseller = await platform.reseller(RESELLER_A)
    tenant = await platform.api.tenant(reseller["id"])
    ext, phone = await platform.phone(tenant, "1001", RESELLER_A)
    await platform.agent.caught_up(15)
    port = next_port()
    assert (await register(phone, port=port)).ok

    async def seen():
        reply = await platform.api.get(f"/api/v1/extensions/{ext['id']}/registrations")
        return reply.body["items"]

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not (items := await seen()) and loop.time() < deadline:
        await asyncio.sleep(0.1)
    assert len(items) == 1, items
    reg = items[0]
    assert reg["uri"] == f"sip:{phone.username}@127.0.0.1:{port}"
    assert reg["user_agent"] == "SIPp-phone"
    assert reg["via_address"] == f"127.0.0.1:{port}"
    assert reg["expires_at"] and reg["registered_at"]
    listed = platform.api.ok(await platform.api.get(
        f"/api/v1/registrations?tenant_id={tenant['id']}"))["items"]
    assert [r["extension_id"] for r in listed] == [ext["id"]]


async def _answering(phone: Phone) -> tuple[asyncio.Task, int]:
    """The callee: registers from a port, then answers one call on that same port."""
    port = next_port()
    assert (await register(phone, port=port)).ok
    task = asyncio.create_task(sipp("uas_answer.xml", None, [phone.row()], port=port,
                                    timeout=10))
    await asyncio.sleep(0.3)
    return task, port


async def test_call_between_extensions_of_one_tenant_connects(platform):
    reseller = await platform.reseller(RESELLER_A)
    tenant = await platform.api.tenant(reseller["id"])
    _, caller = await platform.phone(tenant, "1001", RESELLER_A)
    _, callee = await platform.phone(tenant, "1002", RESELLER_A)
    await platform.registered(caller)
    await platform.registered(callee)
    answering, _ = await _answering(callee)
    call = await sipp("uac_call.xml", f"{RESELLER_A}:5060", [caller.row("1002")],
                      port=next_port(), timeout=10)
    assert call.ok, call.output
    assert (await answering).ok


async def test_call_to_another_tenants_extension_is_refused(platform):
    reseller_a = await platform.reseller(RESELLER_A)
    reseller_b = await platform.reseller(RESELLER_B)
    tenant_a = await platform.api.tenant(reseller_a["id"])
    tenant_b = await platform.api.tenant(reseller_b["id"])
    _, caller = await platform.phone(tenant_a, "1001", RESELLER_A)
    _, other = await platform.phone(tenant_b, "2002", RESELLER_B)
    await platform.registered(caller)
    await platform.registered(other)
    for dialled in ("2002", other.username):  # its number, and its account code directly
        refused = await sipp("uac_refused.xml", f"{RESELLER_A}:5060",
                             [caller.row(dialled)], port=next_port(), timeout=8)
        assert refused.ok, (dialled, refused.output)


async def test_same_number_in_two_tenants_reaches_each_tenants_own_phone(platform):
    reseller = await platform.reseller(RESELLER_A)
    t1, t2 = await platform.api.tenant(reseller["id"]), await platform.api.tenant(reseller["id"])
    _, caller = await platform.phone(t1, "1001", RESELLER_A)
    _, own = await platform.phone(t1, "1002", RESELLER_A)
    _, foreign = await platform.phone(t2, "1002", RESELLER_A)
    for phone in (caller, own, foreign):
        await platform.registered(phone)
    answering, _ = await _answering(own)
    call = await sipp("uac_call.xml", f"{RESELLER_A}:5060", [caller.row("1002")],
                      port=next_port(), timeout=10)
    assert call.ok, call.output
    assert (await answering).ok


async def test_node_restart_converges_without_any_api_call(platform):
    reseller = await platform.reseller(RESELLER_A)
    tenant = await platform.api.tenant(reseller["id"])
    _, phone = await platform.phone(tenant, "1001", RESELLER_A)
    await platform.registered(phone)
    agent = platform.agent
    logins = agent.ami.logins
    node = platform.node
    await asyncio.get_running_loop().run_in_executor(None, node.stop)
    # Wipe the node's dynamic state: pushed objects, number maps, markers, contacts.
    for item in (node.state_dir / "lib").glob("astdb*"):
        item.unlink()
    await asyncio.get_running_loop().run_in_executor(None, node.start)
    await platform.until(lambda: agent.ami.logins > logins and agent.idle.is_set(),
                         "reconcile after the node restarted", within=30)
    await platform.registered(phone, within=10)


async def test_agent_restart_converges_a_wiped_node(platform):
    reseller = await platform.reseller(RESELLER_A)
    tenant = await platform.api.tenant(reseller["id"])
    _, phone = await platform.phone(tenant, "1001", RESELLER_A)
    await platform.registered(phone)
    await platform.stop_agent()
    # While no agent runs: the node loses its objects, and the database changes.
    for kind in ("endpoint", "aor", "auth"):
        platform.node.rx(f"database deltree ps_{kind}")
    platform.node.rx("database deltree pbx-fp")
    _, late = await platform.phone(tenant, "1002", RESELLER_A)
    stale = await platform.api.tenant(reseller["id"])
    _, gone = await platform.phone(stale, "1003", RESELLER_A)
    platform.api.ok(await platform.api.post(f"/api/v1/tenants/{stale['id']}/cancel"))
    await platform.start_agent()
    await platform.registered(phone, within=10)
    await platform.registered(late, within=10)
    assert not (await register(gone)).ok


async def test_burst_of_tenant_changes_costs_one_dialplan_reload(platform):
    reseller = await platform.reseller(RESELLER_A)
    agent = platform.agent
    await agent.caught_up(15)  # the reseller's own change applied and loaded
    before = getattr(agent, "dialplan_reloads", 0)
    tenants = await asyncio.gather(*(platform.api.tenant(reseller["id"]) for _ in range(5)))
    await agent.caught_up(15)  # every tenant's file written and the dialplan reloaded
    assert all((platform.node.tenant_config_dir / "extensions" / f"t{t['id']}.conf").exists()
               for t in tenants)
    reloads = getattr(agent, "dialplan_reloads", 0) - before
    assert 1 <= reloads <= 2, reloads
    assert f"t{tenants[-1]['id']}-internal" in platform.node.rx("dialplan show contexts") or \
        f"t{tenants[-1]['id']}-internal" in platform.node.rx(
            f"dialplan show t{tenants[-1]['id']}-internal")


async def test_rendered_tenant_is_shown_to_operators_without_secrets(platform):
    reseller = await platform.reseller(RESELLER_A)
    tenant = await platform.api.tenant(reseller["id"])
    _, phone = await platform.phone(tenant, "1001", RESELLER_A)
    text = (await platform.api.get(f"/api/v1/tenants/{tenant['id']}/rendered")).body.decode()
    assert f"[t{tenant['id']}-internal]" in text
    assert f"[{phone.username}]" in text and "type = endpoint" in text
    assert phone.password not in text


def test_sandbox_nodes_dir_is_clean(tmp_path: Path):
    assert shutil.which("sipp"), "SIPp (Debian package sip-tester) is required"
