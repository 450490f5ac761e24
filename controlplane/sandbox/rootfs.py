"""A Debian sid root with Asterisk, built once per machine and shared by every sandbox node.

Asterisk is not packaged for Debian bookworm, so the sandbox runs the sid package inside a
chroot. The root is built in a temporary directory and renamed into place only when complete,
so an interrupted build is never reused.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from controlplane.sandbox import patched_modules as pm
from controlplane.sandbox.namespace import mount_point_dirs

ROOT_NAME = "asterisk-root"
MARKER_NAME = ".pbx-sandbox-root.json"
SUITE = "sid"
PACKAGES = ("asterisk", "asterisk-modules", "asterisk-config")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")

DEBOOTSTRAP_TIMEOUT = 1800
APT_UPDATE_TIMEOUT = 600
APT_INSTALL_TIMEOUT = 1800
HOST_APT_TIMEOUT = 600

Progress = Callable[[str], None]


class RootBuildError(RuntimeError):
    """A step of the root build failed; the message names the step and its log file."""


def root_path(cache_dir: Path) -> Path:
    """Where the finished root lives (it may not exist yet)."""
    return Path(cache_dir) / ROOT_NAME


def is_root_ready(cache_dir: Path) -> bool:
    return (root_path(cache_dir) / MARKER_NAME).is_file()


def read_marker(root: Path) -> dict:
    """The root's marker: what was installed, when, and which patched modules it runs."""
    try:
        marker = json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _modules_current(root: Path) -> bool:
    return read_marker(root).get(pm.MARKER_KEY, pm.STOCK) == pm.wanted_patch_id()


def ensure_root(cache_dir: Path, progress: Progress = print) -> Path:
    """Return the Asterisk root under ``cache_dir``, building it first if needed.

    A root whose Asterisk modules were built from other patches (or none) gets the current
    ones.
    Safe to call from several processes at once: the build is serialised by a lock file.
    """
    cache_dir = Path(cache_dir).resolve()
    root = root_path(cache_dir)
    if is_root_ready(cache_dir) and _modules_current(root):
        return root
    _require_root_user()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(cache_dir):
        if not is_root_ready(cache_dir):
            if root.exists():
                raise RootBuildError(
                    f"{root} exists but has no {MARKER_NAME} marker: it was not built by "
                    f"this sandbox; move it away or delete it and retry"
                )
            _Builder(cache_dir, progress).build(root)
        if not _modules_current(root):
            _Builder(cache_dir, progress).update_modules(root)
    return root


@contextmanager
def _build_lock(cache_dir: Path) -> Iterator[None]:
    with open(cache_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _require_root_user() -> None:
    if os.geteuid() != 0:
        raise RootBuildError("building the Asterisk root needs root (debootstrap, chroot)")


class _Builder:
    def __init__(self, cache_dir: Path, progress: Progress) -> None:
        self.cache_dir = cache_dir
        self.progress = progress
        self.log_dir = cache_dir / "logs"
        self.started = time.monotonic()

    def build(self, root: Path) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(self.cache_dir)
        work = self.cache_dir / f"{ROOT_NAME}.tmp-{os.getpid()}"
        mirror = host_debian_mirror()
        self._say(f"building Asterisk root in {work} from {mirror}")
        try:
            self._ensure_debootstrap()
            self._run(
                "debootstrap",
                _isolated(["debootstrap", "--variant=minbase", SUITE, str(work), mirror]),
                DEBOOTSTRAP_TIMEOUT,
                shown=f"debootstrap --variant=minbase {SUITE} {work} {mirror}",
            )
            _prepare_for_apt(work)
            self._in_root(
                "apt-update", work,
                ["apt-get", "-o", "Acquire::Check-Valid-Until=false", "update"],
                APT_UPDATE_TIMEOUT,
            )
            self._in_root(
                "apt-install", work,
                ["apt-get", "-o", "Acquire::Check-Valid-Until=false", "install", "-y",
                 "--no-install-recommends", *PACKAGES],
                APT_INSTALL_TIMEOUT,
            )
            version = self._in_root(
                "asterisk-version", work,
                ["dpkg-query", "-W", "-f=${Version}", "asterisk"], 60,
            ).strip()
            modules = self._install_modules(work, version)
            self._finish(work, version, modules)
            work.rename(root)
        except BaseException:
            _remove_tree(work)
            raise
        self._say(f"Asterisk root ready at {root}")

    def _finish(self, work: Path, version: str, modules: dict[str, object]) -> None:
        self._in_root("apt-clean", work, ["apt-get", "clean"], HOST_APT_TIMEOUT)
        (work / "usr/sbin/policy-rc.d").unlink(missing_ok=True)
        write_hosts_file(work / "etc/hosts", "127.0.0.1")
        # Nodes bind their own directories and files over these.
        for target in mount_point_dirs():
            (work / target.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (work / "etc/resolv.conf").touch()
        marker = {
            "suite": SUITE,
            "packages": list(PACKAGES),
            "asterisk_version": version,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - self.started, 1),
            **modules,
        }
        (work / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        self._say(f"asterisk {version} installed")

    def update_modules(self, root: Path) -> None:
        """Give an existing root the modules the current patches make (or Debian's back)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        marker = read_marker(root)
        version = marker.get("asterisk_version") or self._in_root(
            "asterisk-version", root, ["dpkg-query", "-W", "-f=${Version}", "asterisk"], 60
        ).strip()
        for path in pm.marker_modules(marker):
            # Debian's module back first: the build checks itself against the package's.
            self._in_root("modules-undivert", root, pm.undivert_argv(path), 120)
        for key in (pm.MODULES_KEY, "res_pjsip_module", "res_pjsip_patch"):
            marker.pop(key, None)
        marker.update(self._install_modules(root, version))
        (root / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")

    def _install_modules(self, root: Path, version: str) -> dict[str, object]:
        """Build the patched modules in a copy of ``root`` and install them there; the
        marker's fields."""
        wanted = pm.wanted_patch_id()
        if wanted == pm.STOCK:
            self._say(f"Asterisk modules: Debian's, as shipped ({pm.STOCK_ENV} set)")
            return {pm.MARKER_KEY: pm.STOCK}
        work = root.parent / f"{ROOT_NAME}.tmp-modules-{os.getpid()}"
        _remove_tree(work)
        self._say(f"building Asterisk modules with asterisk-patches/ ({wanted}) in {work}")
        hint = (f"(set {pm.STOCK_ENV}=1 to run Debian's modules as shipped, fast up to a "
                f"few thousand extensions per node)")
        try:
            pm.copy_tree(root, work)
            _prepare_for_apt(work)
            pm.stage_build_inputs(work)
            self._in_root(
                "modules-build", work,
                ["sh", f"/build/patches/{pm.BUILD_SCRIPT}", "/build/patches", "/build/out"],
                pm.BUILD_TIMEOUT,
            )
            output = pm.BuildOutput(work / "build/out")
            output.check(version, wanted)
            for path in output.module_paths:
                self._in_root("modules-divert", root, pm.divert_argv(path), 120)
            pm.install_modules(root, output)
        except RootBuildError as exc:
            raise RootBuildError(f"{exc}\n{hint}") from exc
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise RootBuildError(f"installing the patched modules failed: {exc} {hint}") \
                from exc
        finally:
            _remove_tree(work)
        names = ", ".join(Path(p).name for p in output.module_paths)
        self._say(f"patched {names} ({wanted}); Debian's kept as <module>.so.debian")
        return {pm.MARKER_KEY: wanted, pm.MODULES_KEY: output.module_paths}

    def _ensure_debootstrap(self) -> None:
        if shutil.which("debootstrap"):
            return
        self._run("host-apt-update", ["apt-get", "update"], HOST_APT_TIMEOUT)
        self._run(
            "host-install-debootstrap",
            ["apt-get", "install", "-y", "--no-install-recommends", "debootstrap"],
            HOST_APT_TIMEOUT,
        )

    def _in_root(self, step: str, work: Path, argv: Sequence[str], timeout: float) -> str:
        # /proc and /dev are mounted in the step's private mount namespace only.
        script = (
            'mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" && '
            'root="$1" && shift && exec chroot "$root" "$@"'
        )
        return self._run(
            step,
            _isolated(["sh", "-c", script, "sh", str(work), *argv]),
            timeout,
            env={"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8",
                 "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            shown=f"(in root) {' '.join(argv)}",
        )

    def _run(
        self,
        step: str,
        argv: Sequence[str],
        timeout: float,
        env: dict[str, str] | None = None,
        shown: str | None = None,
    ) -> str:
        """Run one build step; its output goes to logs/<step>.log, stdout is also returned."""
        log_path = self.log_dir / f"{step}.log"
        self._say(f"{step}: {shown or ' '.join(argv)}")
        step_started = time.monotonic()
        with open(log_path, "w") as log:
            # Own process group, so a timeout also stops dpkg and friends started by the step.
            proc = subprocess.Popen(
                list(argv), stdout=subprocess.PIPE, stderr=log, text=True,
                env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                stdout, _ = proc.communicate(timeout=timeout)
            except BaseException as exc:
                _kill_group(proc)
                if isinstance(exc, subprocess.TimeoutExpired):
                    raise RootBuildError(
                        f"root build step {step!r} timed out after {timeout:.0f} s; "
                        f"see {log_path}"
                    ) from exc
                raise
            log.write(stdout)
        if proc.returncode != 0:
            raise RootBuildError(
                f"root build step {step!r} failed with exit code {proc.returncode}; "
                f"see {log_path}:\n{_tail(log_path)}"
            )
        self._say(f"{step}: done in {time.monotonic() - step_started:.1f} s")
        return stdout

    def _say(self, message: str) -> None:
        self.progress(f"[sandbox root {time.monotonic() - self.started:6.1f} s] {message}")


def _isolated(argv: list[str]) -> list[str]:
    """Run ``argv`` in private mount and pid namespaces that die with this process.

    Mounts made by the step (debootstrap's /proc and /sys, our /proc and /dev) vanish with the
    mount namespace, and if the builder is killed, every process of the step is killed too, so
    a stale build directory is never still being written when the next build removes it.
    """
    return ["setpriv", "--pdeathsig", "KILL",
            "unshare", "--mount", "--propagation", "private", "--pid", "--fork",
            "--kill-child", *argv]


def _prepare_for_apt(work: Path) -> None:
    # No init system in the chroot: tell maintainer scripts not to start services.
    policy = work / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    resolv = Path("/etc/resolv.conf")
    if resolv.is_file():
        target = work / "etc/resolv.conf"
        target.unlink(missing_ok=True)
        shutil.copyfile(resolv, target)
    write_hosts_file(work / "etc/hosts", "127.0.0.1")


def write_hosts_file(path: Path, host_address: str) -> None:
    """Write an /etc/hosts in which the machine's host name resolves without DNS."""
    hostname = socket.gethostname()
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if hostname and hostname != "localhost":
        short = hostname.split(".", 1)[0]
        names = hostname if short == hostname else f"{hostname} {short}"
        lines.append(f"{host_address}\t{names}")
    path.write_text("\n".join(lines) + "\n")


def host_debian_mirror() -> str:
    """The Debian archive URI the host's apt uses (falls back to deb.debian.org)."""
    for uri in _apt_debian_uris():
        return uri
    return DEFAULT_MIRROR


def _apt_debian_uris() -> Iterator[str]:
    files: list[Path] = []
    if APT_SOURCES.is_file():
        files.append(APT_SOURCES)
    if APT_SOURCES_DIR.is_dir():
        files.extend(sorted(APT_SOURCES_DIR.glob("*.list")))
        files.extend(sorted(APT_SOURCES_DIR.glob("*.sources")))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        entries = _parse_deb822(text) if path.suffix == ".sources" else _parse_one_line(text)
        for uris, suites in entries:
            if not any(_is_debian_suite(s) for s in suites):
                continue
            for uri in uris:
                if "security" not in uri and "/debian" in uri:
                    yield uri.rstrip("/")


def _is_debian_suite(suite: str) -> bool:
    return suite in {"bookworm", "trixie", "sid", "stable", "testing", "unstable", "forky"}


def _parse_deb822(text: str) -> list[tuple[list[str], list[str]]]:
    entries = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", ""):
            continue
        entries.append((fields.get("uris", "").split(), fields.get("suites", "").split()))
    return entries


def _parse_one_line(text: str) -> list[tuple[list[str], list[str]]]:
    entries = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] != ["deb"]:
            continue
        words = words[1:]
        if words and words[0].startswith("["):
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            entries.append(([words[0]], [words[1]]))
    return entries


def _remove_stale_builds(cache_dir: Path) -> None:
    for stale in cache_dir.glob(f"{ROOT_NAME}.tmp-*"):
        _remove_tree(stale)


def _remove_tree(path: Path) -> None:
    """Remove a partial root without ever following a mount out of it."""
    if not path.exists():
        return
    prefix = str(path.resolve()) + "/"
    mounted = [m for m in _mount_points() if m.startswith(prefix)]
    for mount_point in sorted(mounted, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount_point], timeout=60, check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], timeout=600, check=False)


def _mount_points() -> list[str]:
    with open("/proc/self/mounts") as mounts:
        return [line.split()[1].replace("\\040", " ") for line in mounts]


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
