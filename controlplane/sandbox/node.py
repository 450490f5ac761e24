"""A sandbox Asterisk node: one Asterisk on its own loopback address, run from the shared root.

A node's state lives in ``base_dir/name``; its ``state.json`` (no secrets) lets a later process
find, query and stop it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.sandbox import namespace
from controlplane.sandbox.ami_probe import AmiAuthenticationError, AmiProbe, AmiProbeError
from controlplane.sandbox.config import (
    TENANTS_DIR,
    Credentials,
    NodeNetwork,
    default_base_conf_dir,
    loaded_module_names,
    render_config_dir,
)
from controlplane.sandbox.errors import NodeError
from controlplane.sandbox.rootfs import ensure_root, root_path

DEFAULT_CACHE_DIR = Path("/var/cache/pbxctl/sandbox")
STATE_FILE = "state.json"
PID_FILE = "asterisk.pid"
OUTPUT_FILE = "asterisk.out"
LOG_FILE = "messages.log"
STATE_SUBDIRS = ("etc", "lib", "lib/sounds/custom", "lib/moh", "lib/priv-callerintros",
                 "spool", "log", "run", "cache", "system")
ASTERISK_OWNED = ("lib", "lib/sounds", "lib/sounds/custom", "lib/moh", "lib/priv-callerintros",
                  "spool", "log", "run", "cache")


_NODE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def default_cache_dir() -> Path:
    return Path(os.environ.get("PBX_SANDBOX_CACHE") or DEFAULT_CACHE_DIR)


def default_rtp_range(address: str) -> tuple[int, int]:
    """A 1,000-port RTP range per loopback address, so nodes never share ports."""
    start = 10000 + (int(address.rsplit(".", 1)[1]) % 50) * 1000
    return start, start + 999


@dataclass(kw_only=True)
class SandboxNode:
    name: str
    base_dir: Path
    ami_user: str
    ami_secret: str = field(repr=False)
    ari_user: str
    ari_password: str = field(repr=False)
    address: str = "127.0.0.2"
    sip_port: int = 5060
    ami_port: int = 5038
    http_port: int = 8088
    rtp_start: int | None = None
    rtp_end: int | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    base_conf_dir: Path = field(default_factory=default_base_conf_dir)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _pid: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_name(self.name)
        self.base_dir = Path(self.base_dir).resolve()
        self.cache_dir = Path(self.cache_dir).resolve()
        self.base_conf_dir = Path(self.base_conf_dir).resolve()
        Credentials(self.ami_user, self.ami_secret).validate("AMI")
        Credentials(self.ari_user, self.ari_password).validate("ARI")
        if self.rtp_start is None or self.rtp_end is None:
            self.rtp_start, self.rtp_end = default_rtp_range(self.address)
        self.network.validate()

    # -- where things are ------------------------------------------------------------------

    @property
    def network(self) -> NodeNetwork:
        assert self.rtp_start is not None and self.rtp_end is not None
        return NodeNetwork(self.address, self.sip_port, self.ami_port, self.http_port,
                           self.rtp_start, self.rtp_end)

    @property
    def state_dir(self) -> Path:
        return self.base_dir / self.name

    @property
    def config_dir(self) -> Path:
        """The node's /etc/asterisk."""
        return self.state_dir / "etc"

    @property
    def tenant_config_dir(self) -> Path:
        """Files in ``pjsip/*.conf`` and ``extensions/*.conf`` here are included by the node."""
        return self.config_dir / TENANTS_DIR

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def cdr_file(self) -> Path:
        """The node's CDR file (asterisk-conf/cdr_custom.conf), as seen from the host."""
        return self.log_dir / "cdr-custom" / "pbx-cdr.csv"

    @property
    def log_file(self) -> Path:
        return self.log_dir / LOG_FILE

    @property
    def root(self) -> Path:
        return root_path(self.cache_dir)

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def ari_url(self) -> str:
        return f"http://{self.address}:{self.http_port}/ari"

    # -- life cycle ------------------------------------------------------------------------

    def is_running(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            return False
        self._adopt_recorded_process()
        return self._pid is not None and namespace.is_node_process(self._pid, self.root)

    def start(self, timeout: float = 60) -> None:
        """Start Asterisk; return once it is fully booted and the AMI user can log in."""
        started = time.monotonic()
        existing = read_state(self.name, self.base_dir)
        if existing and _state_process_alive(existing):
            raise NodeError(
                f"node {self.name!r} is already running (pid {existing['pid']}); stop it first"
            )
        root = ensure_root(self.cache_dir)
        self._check_ports_free()
        uid, gid = _asterisk_ids(root)
        self._prepare_state_dirs(uid, gid)
        render_config_dir(self.config_dir, self.base_conf_dir, self.name, self.network,
                          Credentials(self.ami_user, self.ami_secret),
                          Credentials(self.ari_user, self.ari_password), gid)
        binds = namespace.node_binds(self.state_dir)
        missing = namespace.missing_mount_points(root, binds)
        if missing:
            raise NodeError(f"the root {root} lacks mount points {missing}; delete it and rebuild")
        self.log_file.unlink(missing_ok=True)
        self._process = namespace.spawn_asterisk(
            root, binds, uid, gid, self.log_dir / OUTPUT_FILE
        )
        self._pid = self._process.pid
        (self.state_dir / PID_FILE).write_text(f"{self._pid}\n")
        self._write_state("starting")
        try:
            self._wait_ready(started + timeout)
        except BaseException:
            self._kill_now()
            self._write_state("failed")
            raise
        self._write_state("running", boot_seconds=round(time.monotonic() - started, 2))

    def stop(self, timeout: float = 20) -> None:
        """Stop Asterisk (``core stop now``, then SIGTERM, then SIGKILL) and its namespace."""
        self._adopt_recorded_process()
        if self._pid is not None:
            namespace.stop_asterisk(self._pid, self.root, timeout, self._process)
        self._process = None
        (self.state_dir / PID_FILE).unlink(missing_ok=True)
        if self.state_dir.joinpath(STATE_FILE).exists():
            self._write_state("stopped")

    def rx(self, command: str, timeout: float = 15) -> str:
        """Run an Asterisk CLI command on the node and return its output."""
        if self._pid is None or not self.is_running():
            raise NodeError(f"node {self.name!r} is not running")
        return namespace.cli(self._pid, self.root, command, timeout)

    # -- internals -------------------------------------------------------------------------

    def _adopt_recorded_process(self) -> None:
        """Take over the node recorded in the state file when another process started it."""
        if self._pid is not None:
            return
        state = read_state(self.name, self.base_dir)
        if state and _state_process_alive(state):
            self._pid = int(state["pid"])

    def _wait_ready(self, deadline: float) -> None:
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise NodeError(
                    f"Asterisk of node {self.name!r} exited with code "
                    f"{self._process.returncode} while starting\n{self._log_tail()}"
                )
            try:
                with AmiProbe(self.address, self.ami_port, deadline) as ami:
                    ami.login(self.ami_user, self.ami_secret)
                    ami.wait_event("FullyBooted")
                    self._check_modules(ami.command("module show"))
                return
            except AmiAuthenticationError as exc:
                raise NodeError(f"node {self.name!r}: {exc}\n{self._log_tail()}") from exc
            except (OSError, AmiProbeError) as exc:
                last_error = exc
                time.sleep(0.1)
        raise NodeError(
            f"node {self.name!r} did not become ready on {self.address}:{self.ami_port} "
            f"in time (last error: {last_error})\n{self._log_tail()}"
        )

    def _check_modules(self, module_show: str) -> None:
        # A module that declined is still listed, as "Not Running".
        running = {
            line.split()[0] for line in module_show.splitlines()
            if re.search(r"\s\d+\s+Running\s+\S+\s*$", line)
        }
        missing = [m for m in loaded_module_names(self.base_conf_dir) if m not in running]
        if missing:
            raise NodeError(
                f"node {self.name!r}: modules listed in modules.conf are not running: "
                f"{', '.join(missing)}\n{self._log_tail()}"
            )

    def _check_ports_free(self) -> None:
        checks = [(socket.SOCK_DGRAM, self.sip_port, "SIP/UDP"),
                  (socket.SOCK_STREAM, self.sip_port, "SIP/TCP"),
                  (socket.SOCK_STREAM, self.ami_port, "AMI"),
                  (socket.SOCK_STREAM, self.http_port, "HTTP/ARI")]
        for kind, port, what in checks:
            with socket.socket(socket.AF_INET, kind) as probe:
                if kind == socket.SOCK_STREAM:
                    # As Asterisk does: ignore TIME_WAIT leftovers, still fail on a listener.
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((self.address, port))
                except OSError as exc:
                    raise NodeError(
                        f"node {self.name!r}: {what} port {self.address}:{port} is in use ({exc})"
                    ) from exc

    def _prepare_state_dirs(self, uid: int, gid: int) -> None:
        for sub in STATE_SUBDIRS:
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        for sub in ASTERISK_OWNED:
            os.chown(self.state_dir / sub, uid, gid)
        # cdr_custom writes the node's CDR file here and does not create the folder itself
        self.cdr_file.parent.mkdir(exist_ok=True)
        os.chown(self.cdr_file.parent, uid, gid)
        system = self.state_dir / "system"
        hostname = socket.gethostname()
        names = " ".join(dict.fromkeys([hostname, hostname.split(".", 1)[0]]))
        (system / "hosts").write_text(
            f"127.0.0.1\tlocalhost\n{self.address}\t{names}\n::1\tlocalhost ip6-localhost\n"
        )
        # No name server: a look-up fails at once on loopback instead of leaving the machine.
        (system / "resolv.conf").write_text("options timeout:1 attempts:1\n")

    def _write_state(self, status: str, **extra: Any) -> None:
        state = {
            "name": self.name,
            "status": status,
            "pid": self._pid,
            "address": self.address,
            "sip_port": self.sip_port,
            "ami_port": self.ami_port,
            "http_port": self.http_port,
            "rtp_ports": [self.rtp_start, self.rtp_end],
            "root": str(self.root),
            "state_dir": str(self.state_dir),
            "config_dir": str(self.config_dir),
            "tenant_config_dir": str(self.tenant_config_dir),
            "log_file": str(self.log_file),
            "ami_user": self.ami_user,
            "ari_user": self.ari_user,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }
        previous = read_state(self.name, self.base_dir) or {}
        if "boot_seconds" in previous and "boot_seconds" not in extra and status != "starting":
            state["boot_seconds"] = previous["boot_seconds"]
        _write_json(self.state_dir / STATE_FILE, state)

    def _kill_now(self) -> None:
        if self._pid is not None:
            namespace.signal_group(self._pid, signal.SIGKILL)
            namespace.wait_gone(self._pid, self.root, 10, self._process)

    def _log_tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.log_file, self.log_dir / OUTPUT_FILE):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            if text:
                parts.append(f"--- tail of {path} ---\n" + "\n".join(text))
        return "\n".join(parts) or f"(no log in {self.log_dir})"


# -- functional API (used by `pbxctl sandbox`) ----------------------------------------------


def start_node(
    name: str,
    address: str,
    base_dir: Path,
    ami_user: str,
    ami_secret: str,
    ari_user: str,
    ari_password: str,
    cache_dir: Path | None = None,
    *,
    sip_port: int = 5060,
    ami_port: int = 5038,
    http_port: int = 8088,
    timeout: float = 60,
) -> SandboxNode:
    """Start a node and return it once Asterisk is fully booted and AMI login works."""
    node = SandboxNode(
        name=name, address=address, base_dir=Path(base_dir),
        ami_user=ami_user, ami_secret=ami_secret, ari_user=ari_user, ari_password=ari_password,
        sip_port=sip_port, ami_port=ami_port, http_port=http_port,
        cache_dir=Path(cache_dir) if cache_dir is not None else default_cache_dir(),
    )
    node.start(timeout=timeout)
    return node


def stop_node(name: str, base_dir: Path, timeout: float = 20) -> bool:
    """Stop the node recorded in ``base_dir/name``; False if it was not running."""
    state = read_state(name, base_dir)
    if state is None:
        raise NodeError(f"no sandbox node {name!r} in {base_dir}")
    was_running = _state_process_alive(state)
    if was_running:
        namespace.stop_asterisk(int(state["pid"]), Path(state["root"]), timeout, None)
    (Path(base_dir) / name / PID_FILE).unlink(missing_ok=True)
    _write_json(Path(base_dir) / name / STATE_FILE,
                {**state, "status": "stopped",
                 "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return was_running


def node_status(name: str, base_dir: Path) -> dict[str, Any]:
    """The node's recorded state, with ``running`` checked against the live process."""
    state = read_state(name, base_dir)
    if state is None:
        raise NodeError(f"no sandbox node {name!r} in {base_dir}")
    return {**state, "running": _state_process_alive(state)}


def list_nodes(base_dir: Path) -> list[dict[str, Any]]:
    base = Path(base_dir)
    if not base.is_dir():
        return []
    return [node_status(p.parent.name, base) for p in sorted(base.glob(f"*/{STATE_FILE}"))]


def node_rx(name: str, base_dir: Path, command: str, timeout: float = 15) -> str:
    """Run an Asterisk CLI command on a node started by any process."""
    state = node_status(name, base_dir)
    if not state["running"]:
        raise NodeError(f"sandbox node {name!r} is not running")
    return namespace.cli(int(state["pid"]), Path(state["root"]), command, timeout)


def read_state(name: str, base_dir: Path) -> dict[str, Any] | None:
    path = Path(base_dir) / name / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


# -- helpers ---------------------------------------------------------------------------------


def _state_process_alive(state: dict[str, Any]) -> bool:
    pid = state.get("pid")
    return bool(pid) and namespace.is_node_process(int(pid), Path(state["root"]))


def _asterisk_ids(root: Path) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "asterisk":
            return int(fields[2]), int(fields[3])
    raise NodeError(f"no asterisk user in {root}/etc/passwd; rebuild the root")


def _check_name(name: str) -> None:
    if not _NODE_NAME.match(name):
        raise ValueError(f"node name {name!r} must match {_NODE_NAME.pattern}")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
