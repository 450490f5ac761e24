"""Docker-less Asterisk sandbox for development and CI.

One Debian sid root with Asterisk is built per machine (``ensure_root``); every node runs
Asterisk from it in its own mount namespace, on its own loopback address
(``SandboxNode`` / ``start_node``).
"""

from controlplane.sandbox.config import CredentialError
from controlplane.sandbox.errors import NodeError
from controlplane.sandbox.node import (
    SandboxNode,
    default_cache_dir,
    list_nodes,
    node_rx,
    node_status,
    start_node,
    stop_node,
)
from controlplane.sandbox.rootfs import RootBuildError, ensure_root, is_root_ready, root_path

__all__ = [
    "CredentialError",
    "NodeError",
    "RootBuildError",
    "SandboxNode",
    "default_cache_dir",
    "ensure_root",
    "is_root_ready",
    "list_nodes",
    "node_rx",
    "node_status",
    "root_path",
    "start_node",
    "stop_node",
]
