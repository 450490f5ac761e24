"""Fixtures for end-to-end tests against real Asterisk nodes of the Docker-less sandbox.

The Asterisk root is built once per machine in PBX_SANDBOX_CACHE (default
/var/cache/pbxctl/sandbox). A machine that cannot run the sandbox (not root, no unshare) fails
these tests; set PBX_SKIP_E2E=1 to skip them instead.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.sandbox import SandboxNode, default_cache_dir, ensure_root

SKIP_ENV = "PBX_SKIP_E2E"
SANDBOX_TOOLS = ("unshare", "nsenter", "chroot", "mount")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if os.environ.get(SKIP_ENV) == "1" and item.get_closest_marker("e2e"):
        pytest.skip(f"{SKIP_ENV}=1: end-to-end tests against real Asterisk are disabled")


@dataclass(frozen=True)
class NodeCredentials:
    ami_user: str
    ami_secret: str
    ari_user: str
    ari_password: str


StartNode = Callable[..., SandboxNode]


def _sandbox_prerequisite_problems() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("the sandbox needs root (mount namespaces, chroot)")
    problems += [f"{tool} not found" for tool in SANDBOX_TOOLS if shutil.which(tool) is None]
    if not problems:
        probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True,
                               timeout=10)
        if probe.returncode != 0:
            problems.append(f"cannot create a mount namespace: {probe.stderr.strip()}")
    return problems


@pytest.fixture(scope="session")
def sandbox_cache_dir() -> Path:
    return default_cache_dir()


@pytest.fixture(scope="session")
def sandbox_root(pytestconfig: pytest.Config, sandbox_cache_dir: Path) -> Path:
    """The shared Asterisk root, built on first use (about a minute) and reused after."""
    problems = _sandbox_prerequisite_problems()
    if problems:
        pytest.fail(
            "this machine cannot run the Asterisk sandbox: " + "; ".join(problems)
            + f" (set {SKIP_ENV}=1 to skip end-to-end tests)",
            pytrace=False,
        )
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    progress = reporter.write_line if reporter is not None else print
    return ensure_root(sandbox_cache_dir, progress=progress)


@pytest.fixture(scope="session")
def node_credentials() -> NodeCredentials:
    """Fresh credentials per run, as the control plane would generate them."""
    return NodeCredentials(
        ami_user="controlplane",
        ami_secret=secrets.token_urlsafe(24),
        ari_user="controlplane-ari",
        ari_password=secrets.token_urlsafe(24),
    )


@pytest.fixture
def start_node(
    sandbox_root: Path,
    sandbox_cache_dir: Path,
    node_credentials: NodeCredentials,
    tmp_path: Path,
) -> Iterator[StartNode]:
    """Start nodes (``start_node("name", "127.0.0.3")``); all are stopped after the test."""
    nodes: list[SandboxNode] = []

    def start(name: str = "node1", address: str = "127.0.0.2", **options: object) -> SandboxNode:
        node = SandboxNode(
            name=name,
            address=address,
            base_dir=tmp_path / "nodes",
            cache_dir=sandbox_cache_dir,
            ami_user=node_credentials.ami_user,
            ami_secret=node_credentials.ami_secret,
            ari_user=node_credentials.ari_user,
            ari_password=node_credentials.ari_password,
            **options,  # type: ignore[arg-type]
        )
        nodes.append(node)
        node.start(timeout=60)
        return node

    yield start
    for node in reversed(nodes):
        node.stop()


@pytest.fixture
def sandbox_node(start_node: StartNode) -> SandboxNode:
    """A started node on 127.0.0.2, stopped after the test."""
    return start_node()
