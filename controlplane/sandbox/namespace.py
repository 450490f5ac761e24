"""Running Asterisk from the shared root inside a private mount namespace.

Each node gets its own mount namespace (``unshare --mount``) in which the shared root is
bind-mounted read-only onto itself and the node's own directories are bind-mounted over the
Debian paths. Nothing is mounted in the host's namespace, so when the last process of the node
exits every mount goes with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from controlplane.sandbox.errors import NodeError

ASTERISK = "/usr/sbin/asterisk"


@dataclass(frozen=True)
class Bind:
    source: Path
    target: str  # path inside the root


# (directory under the node's state dir, where it appears inside the root)
_NODE_BINDS = (
    ("etc", "/etc/asterisk"),
    ("lib", "/var/lib/asterisk"),
    ("spool", "/var/spool/asterisk"),
    ("log", "/var/log/asterisk"),
    ("run", "/run/asterisk"),
    ("cache", "/var/cache/asterisk"),
    ("system/hosts", "/etc/hosts"),
    ("system/resolv.conf", "/etc/resolv.conf"),
)
# Mounted fresh in every node's namespace.
_OWN_MOUNTS = ("/proc", "/tmp")


def node_binds(state_dir: Path) -> list[Bind]:
    """Where each of the node's directories appears inside the root."""
    return [Bind(state_dir / source, target) for source, target in _NODE_BINDS]


def mount_point_dirs() -> list[str]:
    """Directories the root must contain for a node to start (file targets excluded)."""
    return [t for s, t in _NODE_BINDS if not s.startswith("system/")] + list(_OWN_MOUNTS)


# Runs as root in the new mount namespace, then becomes Asterisk (same pid) via exec.
_LAUNCH_SCRIPT = """
set -eu
root=$1; uid=$2; gid=$3; shift 3
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
while [ "$1" != "--" ]; do
    mount --bind "$1" "$root$2"
    shift 2
done
shift
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t tmpfs -o nosuid,nodev,size=64m,mode=1777 tmpfs "$root/tmp"
exec chroot --userspec="$uid:$gid" --groups="$gid" "$root" "$@"
"""

_CLEAN_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/var/lib/asterisk",
}


def missing_mount_points(root: Path, binds: Sequence[Bind]) -> list[str]:
    return [b.target for b in binds if not os.path.lexists(f"{root}{b.target}")]


def spawn_asterisk(
    root: Path, binds: Sequence[Bind], uid: int, gid: int, output_path: Path
) -> subprocess.Popen[bytes]:
    """Start ``asterisk -f`` as ``uid:gid`` in a new mount namespace and session."""
    argv: list[str] = ["unshare", "--mount", "--propagation", "private",
                       "sh", "-c", _LAUNCH_SCRIPT, "sandbox-node", str(root), str(uid), str(gid)]
    for bind in binds:
        argv += [str(bind.source), bind.target]
    argv += ["--", ASTERISK, "-f", "-n"]
    with open(output_path, "wb") as output:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            env=_CLEAN_ENV, start_new_session=True, close_fds=True,
        )


def run_cli(pid: int, root: Path, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``asterisk -rx`` inside the node's mount namespace, where its control socket is."""
    return subprocess.run(
        ["nsenter", "--mount", f"--target={pid}", "chroot", str(root), ASTERISK, "-rx", command],
        capture_output=True, text=True, timeout=timeout, env=_CLEAN_ENV,
        stdin=subprocess.DEVNULL,
    )


def is_node_process(pid: int, root: Path) -> bool:
    """True if ``pid`` is a live (not zombie) Asterisk chrooted into ``root``."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
        if os.readlink(f"/proc/{pid}/root") != str(root):
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().split(b"\0", 1)[0].endswith(b"asterisk")
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return False


def signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def wait_gone(
    pid: int, root: Path, timeout: float, process: subprocess.Popen[bytes] | None
) -> bool:
    """Wait until the node process has exited (reaping it when this process started it)."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None:
            if process.poll() is not None:
                return True
        elif not is_node_process(pid, root):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def group_members(pgid: int) -> list[int]:
    """Pids still in process group ``pgid`` (children Asterisk may have spawned)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def cli(pid: int, root: Path, command: str, timeout: float) -> str:
    """Run a CLI command on the node and return its output; errors raise ``NodeError``."""
    try:
        result = run_cli(pid, root, command, timeout)
    except subprocess.TimeoutExpired as exc:
        raise NodeError(f"CLI command {command!r} timed out after {timeout} s") from exc
    if result.returncode != 0:
        raise NodeError(
            f"CLI command {command!r} failed ({result.returncode}): {result.stderr.strip()}"
        )
    if result.stdout.startswith("No such command"):
        raise NodeError(f"CLI command {command!r}: {result.stdout.strip()}")
    return result.stdout


def stop_asterisk(
    pid: int, root: Path, timeout: float, process: subprocess.Popen[bytes] | None
) -> None:
    """``core stop now``, then SIGTERM, then SIGKILL to the process group, within ``timeout``."""
    deadline = time.monotonic() + timeout
    if is_node_process(pid, root):
        try:
            run_cli(pid, root, "core stop now", timeout=min(5.0, timeout / 2))
        except subprocess.TimeoutExpired:
            pass
    if not wait_gone(pid, root, max(0.0, deadline - time.monotonic()) / 2, process):
        signal_group(pid, signal.SIGTERM)
        if not wait_gone(pid, root, max(0.5, deadline - time.monotonic()), process):
            signal_group(pid, signal.SIGKILL)
            if not wait_gone(pid, root, 10, process):
                raise NodeError(f"Asterisk pid {pid} survived SIGKILL")
    # Children Asterisk may have started (System(), AGI scripts) share its process group.
    if group_members(pid):
        signal_group(pid, signal.SIGKILL)
