"""The Docker-less Asterisk sandbox: real Asterisk nodes on loopback addresses."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from controlplane.sandbox import (
    CredentialError,
    SandboxNode,
    node_rx,
    node_status,
    patched_modules,
    stop_node,
)
from controlplane.sandbox.config import loaded_module_names
from controlplane.sandbox.rootfs import read_marker
from tests.e2e.conftest import NodeCredentials, StartNode

pytestmark = pytest.mark.e2e


async def ami_login(address: str, port: int, username: str, secret: str) -> dict[str, str]:
    """Log in over a plain AMI connection and return the login response."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 5)
    try:
        banner = await asyncio.wait_for(reader.readline(), 5)
        assert banner.startswith(b"Asterisk Call Manager/")
        writer.write(
            f"Action: Login\r\nUsername: {username}\r\nSecret: {secret}\r\n"
            "ActionID: test-login\r\n\r\n".encode()
        )
        await writer.drain()
        while True:
            block = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            fields = [line.split(": ", 1) for line in block.decode().split("\r\n") if ": " in line]
            message = {key: value for key, value in fields}
            if message.get("ActionID") == "test-login":
                return message
    finally:
        writer.close()


async def ari(
    node: SandboxNode, method: str, path: str, user: str, password: str, body: object = None
) -> tuple[int, object]:
    async with aiohttp.ClientSession(
        headers={"Authorization": aiohttp.encode_basic_auth(user, password)},
        timeout=aiohttp.ClientTimeout(total=10),
    ) as session:
        async with session.request(method, f"{node.ari_url}{path}", json=body) as response:
            text = await response.text()
            return response.status, json.loads(text) if text.startswith(("{", "[")) else text


async def push_extension(node: SandboxNode, creds: NodeCredentials, name: str) -> None:
    """Push auth + aor + endpoint through ARI dynamic configuration, as the control plane does."""
    objects = [
        ("auth", f"{name}-auth", {"auth_type": "digest", "username": name,
                                  "password": "extension-secret-1"}),
        ("aor", name, {"max_contacts": "1"}),
        ("endpoint", name, {"auth": f"{name}-auth", "aors": name, "context": "sandbox-test",
                            "allow": "!all,ulaw,alaw", "transport": "transport-udp"}),
    ]
    for kind, object_id, fields in objects:
        status, body = await ari(
            node, "PUT", f"/asterisk/config/dynamic/res_pjsip/{kind}/{object_id}",
            creds.ari_user, creds.ari_password,
            {"fields": [{"attribute": k, "value": v} for k, v in fields.items()]},
        )
        assert status == 200, (kind, object_id, body)


def pjsip_endpoint_summary(node: SandboxNode, name: str) -> str:
    return node.rx(f"pjsip show endpoint {name}").split("ParameterName", 1)[0]


def processes_in_namespace(mount_ns: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") == mount_ns:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def host_mount_points() -> list[str]:
    return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]


async def test_ami_login_succeeds_with_the_credentials_given_at_start(
    sandbox_node: SandboxNode, node_credentials: NodeCredentials
) -> None:
    response = await ami_login(sandbox_node.address, sandbox_node.ami_port,
                               node_credentials.ami_user, node_credentials.ami_secret)

    assert response["Response"] == "Success", response


async def test_ami_login_fails_with_a_wrong_secret(
    sandbox_node: SandboxNode, node_credentials: NodeCredentials
) -> None:
    response = await ami_login(sandbox_node.address, sandbox_node.ami_port,
                               node_credentials.ami_user, "not-the-secret")

    assert response["Response"] == "Error"
    assert "Authentication failed" in response["Message"]


async def test_ari_info_answers_on_the_node_address_with_the_ari_credentials(
    sandbox_node: SandboxNode, node_credentials: NodeCredentials
) -> None:
    status, info = await ari(sandbox_node, "GET", "/asterisk/info",
                             node_credentials.ari_user, node_credentials.ari_password)

    assert status == 200
    assert isinstance(info, dict)
    assert info["system"]["version"].startswith("22.")


async def test_ari_rejects_a_wrong_password(
    sandbox_node: SandboxNode, node_credentials: NodeCredentials
) -> None:
    status, _ = await ari(sandbox_node, "GET", "/asterisk/info",
                          node_credentials.ari_user, "not-the-password")

    assert status == 401


def test_every_module_listed_in_modules_conf_is_running(sandbox_node: SandboxNode) -> None:
    running = {
        line.split()[0] for line in sandbox_node.rx("module show").splitlines()
        if re.search(r"\s\d+\s+Running\s+\S+\s*$", line)
    }

    assert set(loaded_module_names(sandbox_node.base_conf_dir)) <= running
    assert "chan_pjsip.so" in running


def test_pjsip_transports_listen_on_the_node_address(sandbox_node: SandboxNode) -> None:
    transports = sandbox_node.rx("pjsip show transports")

    assert re.search(r"transport-udp\s+udp\s+\d+\s+\d+\s+127\.0\.0\.2:5060", transports)
    assert re.search(r"transport-tcp\s+tcp\s+\d+\s+\d+\s+127\.0\.0\.2:5060", transports)


async def test_two_nodes_run_side_by_side_from_the_same_root(
    start_node: StartNode, node_credentials: NodeCredentials
) -> None:
    first = start_node("node-a", "127.0.0.2")
    second = start_node("node-b", "127.0.0.3")

    assert first.is_running() and second.is_running()
    assert first.root == second.root
    assert os.readlink(f"/proc/{first.pid}/ns/mnt") != os.readlink(f"/proc/{second.pid}/ns/mnt")
    for node in (first, second):
        response = await ami_login(node.address, node.ami_port,
                                   node_credentials.ami_user, node_credentials.ami_secret)
        assert response["Response"] == "Success"
        assert f"{node.address}:5060" in node.rx("pjsip show transports")
        assert re.search(rf"System name:\s+{node.name}\b", node.rx("core show settings"))


async def test_endpoint_pushed_through_ari_is_visible_in_pjsip(
    sandbox_node: SandboxNode, node_credentials: NodeCredentials
) -> None:
    await push_extension(sandbox_node, node_credentials, "ext-1001")

    summary = pjsip_endpoint_summary(sandbox_node, "ext-1001")
    assert re.search(r"Endpoint:\s+ext-1001\b", summary)
    assert re.search(r"InAuth:\s+ext-1001-auth/ext-1001", summary)
    assert re.search(r"Aor:\s+ext-1001\s+1", summary)


async def test_pushed_endpoint_survives_a_node_restart(
    sandbox_node: SandboxNode, node_credentials: NodeCredentials
) -> None:
    await push_extension(sandbox_node, node_credentials, "ext-2002")

    sandbox_node.stop()
    sandbox_node.start()

    assert re.search(r"Endpoint:\s+ext-2002\b", pjsip_endpoint_summary(sandbox_node, "ext-2002"))


async def test_an_aor_pushed_after_its_endpoint_drives_the_endpoint_state(
    sandbox_node: SandboxNode, node_credentials: NodeCredentials
) -> None:
    """The patched res_pjsip links a new AOR to the endpoint of its name without a scan."""

    async def put(kind: str, object_id: str, fields: dict[str, str]) -> None:
        status, body = await ari(
            sandbox_node, "PUT", f"/asterisk/config/dynamic/res_pjsip/{kind}/{object_id}",
            node_credentials.ari_user, node_credentials.ari_password,
            {"fields": [{"attribute": k, "value": v} for k, v in fields.items()]},
        )
        assert status == 200, (kind, object_id, body)

    def state() -> str:
        found = re.search(r"Endpoint:\s+ext-3003\s+(\S+(?: \S+)*?)\s{2,}",
                          pjsip_endpoint_summary(sandbox_node, "ext-3003"))
        assert found, pjsip_endpoint_summary(sandbox_node, "ext-3003")
        return found.group(1)

    await put("endpoint", "ext-3003", {"aors": "ext-3003", "context": "sandbox-test",
                                       "allow": "!all,ulaw", "transport": "transport-udp"})
    assert state() == "Unavailable"

    # A permanent contact, not qualified, counts as reachable once the AOR is linked.
    await put("aor", "ext-3003", {"contact": "sip:ext-3003@127.0.0.99:5060"})
    for _ in range(50):
        if state() != "Unavailable":
            break
        await asyncio.sleep(0.1)
    assert state() == "Not in use"


def test_the_root_runs_modules_built_from_asterisk_patches(sandbox_root: Path) -> None:
    marker = read_marker(sandbox_root)
    wanted = patched_modules.wanted_patch_id()
    assert marker.get(patched_modules.MARKER_KEY) == wanted
    modules = patched_modules.marker_modules(marker)
    if wanted == patched_modules.STOCK:  # PBX_SANDBOX_STOCK_ASTERISK=1: Debian's, as shipped
        assert modules == []
        return
    assert sorted(Path(m).name for m in modules) == ["res_pjsip.so", "res_pjsip_refer.so",
                                                          "res_sorcery_astdb.so"]
    for path in modules:
        module = sandbox_root / path.lstrip("/")
        package_module = module.with_name(module.name + ".debian")
        assert package_module.is_file()
        assert module.read_bytes() != package_module.read_bytes()
        diversions = subprocess.run(
            ["chroot", str(sandbox_root), "dpkg-divert", "--list", path],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
        assert f"{path}.debian" in diversions


def test_node_mounts_stay_inside_its_namespace_and_the_root_is_read_only(
    sandbox_node: SandboxNode,
) -> None:
    assert sandbox_node.pid is not None
    node_mounts = Path(f"/proc/{sandbox_node.pid}/mounts").read_text().splitlines()

    root_mount = [line.split() for line in node_mounts if line.split()[1] == "/"][-1]
    assert "ro" in root_mount[3].split(",")
    assert any(line.split()[1] == "/etc/asterisk" for line in node_mounts)
    assert not [m for m in host_mount_points() if m.startswith(str(sandbox_node.root))]


def test_stop_leaves_no_process_and_no_mount(start_node: StartNode) -> None:
    node = start_node()
    pid = node.pid
    assert pid is not None
    mount_ns = os.readlink(f"/proc/{pid}/ns/mnt")

    node.stop()

    assert not node.is_running()
    assert not Path(f"/proc/{pid}").exists()
    assert processes_in_namespace(mount_ns) == []
    assert not [m for m in host_mount_points() if m.startswith(str(node.root))]
    assert node_status(node.name, node.base_dir)["status"] == "stopped"


def test_a_node_started_by_another_process_is_found_and_stopped_through_its_state_file(
    sandbox_root: Path, sandbox_cache_dir: Path, node_credentials: NodeCredentials,
    tmp_path: Path,
) -> None:
    base_dir = tmp_path / "nodes"
    script = (
        "import os, sys\n"
        "from controlplane.sandbox import start_node\n"
        "start_node('cli-node', '127.0.0.4', sys.argv[1], os.environ['AMI_USER'],\n"
        "           os.environ['AMI_SECRET'], os.environ['ARI_USER'], os.environ['ARI_PASSWORD'],\n"
        "           sys.argv[2])\n"
    )
    env = {**os.environ, "AMI_USER": node_credentials.ami_user,
           "AMI_SECRET": node_credentials.ami_secret, "ARI_USER": node_credentials.ari_user,
           "ARI_PASSWORD": node_credentials.ari_password}
    subprocess.run([sys.executable, "-c", script, str(base_dir), str(sandbox_cache_dir)],
                   env=env, check=True, timeout=90)
    try:
        status = node_status("cli-node", base_dir)
        assert status["running"] and status["address"] == "127.0.0.4"
        assert node_credentials.ami_secret not in json.dumps(status)
        assert "127.0.0.4:5060" in node_rx("cli-node", base_dir, "pjsip show transports")
        adopted = SandboxNode(
            name="cli-node", address="127.0.0.4", base_dir=base_dir, cache_dir=sandbox_cache_dir,
            ami_user=node_credentials.ami_user, ami_secret=node_credentials.ami_secret,
            ari_user=node_credentials.ari_user, ari_password=node_credentials.ari_password,
        )
        assert adopted.is_running() and adopted.pid == status["pid"]

        assert stop_node("cli-node", base_dir) is True
        assert node_status("cli-node", base_dir)["running"] is False
    finally:
        if node_status("cli-node", base_dir)["running"]:
            stop_node("cli-node", base_dir)


def test_a_node_cannot_be_built_without_credentials_from_the_caller(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        SandboxNode(name="bare", base_dir=tmp_path)  # type: ignore[call-arg]
    with pytest.raises(CredentialError):
        SandboxNode(name="empty", base_dir=tmp_path, ami_user="controlplane", ami_secret="",
                    ari_user="controlplane-ari", ari_password="long-enough-secret")
