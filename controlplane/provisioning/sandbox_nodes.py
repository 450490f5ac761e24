"""Sandboxed Asterisk nodes registered with the control plane, for one-machine setups."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import asyncpg

from controlplane.provisioning.desired import NodeRecord, load_node
from controlplane.sandbox import SandboxNode, default_cache_dir, ensure_root


async def start_sandbox_node(pool: asyncpg.Pool, name: str, address: str, base_dir: Path,
                             *, progress: object = print) -> tuple[SandboxNode, NodeRecord]:
    """Start (building the root first if needed) a node and make sure the database knows it.

    The node's AMI and ARI secrets are generated here and kept only in the database."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, ensure_root, default_cache_dir(), progress)
    async with pool.acquire() as conn:
        node = await load_node(conn, name)
        if node is None:
            await conn.execute(
                "INSERT INTO nodes (name, sip_address, ami_host, ami_port, ami_username,"
                " ami_secret, ari_url, ari_username, ari_password)"
                " VALUES ($1, $2, $2, 5038, 'controlplane', $3, $4, 'controlplane', $5)",
                name, address, secrets.token_urlsafe(18), f"http://{address}:8088",
                secrets.token_urlsafe(18))
            node = await load_node(conn, name)
    assert node is not None
    sandbox = SandboxNode(name=name, base_dir=base_dir, address=node.ami_host,
                          ami_user=node.ami_username, ami_secret=node.ami_secret,
                          ari_user=node.ari_username, ari_password=node.ari_password,
                          ami_port=node.ami_port)
    if not sandbox.is_running():
        await loop.run_in_executor(None, sandbox.start)
    return sandbox, node
