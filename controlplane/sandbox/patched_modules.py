"""The sandbox root's patched Asterisk modules: Debian's, rebuilt with asterisk-patches/.

As Debian ships them, res_pjsip makes every new AOR scan all endpoints, its per-endpoint hash
tables have 13 to 53 buckets, and res_sorcery_astdb links objects into sorcery's sorted lists
in the worst order: each is O(N) or O(N²) on a node holding N extensions (see
asterisk-patches/README.md and bench/README.md). The modules are built once per root, in a
throw-away copy of it (so the root gets no compiler), from Debian's source package of exactly
the installed version, then installed over the package's files with ``dpkg-divert`` (the
originals stay next to them as ``<module>.so.debian``). The root's marker records the patch
set, so a root built before the patches changed is rebuilt on its next use.

``PBX_SANDBOX_STOCK_ASTERISK=1`` keeps (or puts back) Debian's modules as shipped: nodes then
stay fast only up to a few thousand extensions, and an INVITE with Replaces from a phone takes
an established call's place although its endpoint may not transfer (the e2e test of that
fails then).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

PATCH_DIR = Path(__file__).resolve().parents[2] / "asterisk-patches"
BUILD_SCRIPT = "build-modules.sh"
STOCK_ENV = "PBX_SANDBOX_STOCK_ASTERISK"
MARKER_KEY = "asterisk_patches"
MODULES_KEY = "patched_modules"
STOCK = "stock"
BUILD_TIMEOUT = 2400
COPY_TIMEOUT = 600


def wanted_patch_id(patch_dir: Path = PATCH_DIR) -> str:
    """What the root's marker must record: ``stock``, or the id of the patch set to build.

    The id is the one build-modules.sh writes: the first 16 hex digits of the SHA-256 of
    the patches concatenated in name order.
    """
    if os.environ.get(STOCK_ENV, "").strip().lower() in {"1", "yes", "true"}:
        return STOCK
    patches = sorted(Path(patch_dir).glob("*.patch"))
    if not patches:
        return STOCK
    digest = hashlib.sha256()
    for patch in patches:
        digest.update(patch.read_bytes())
    return digest.hexdigest()[:16]


def copy_tree(source: Path, target: Path) -> None:
    """``cp -a`` (hard links, devices and ownership kept), with a timeout."""
    subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(target)],
                   check=True, timeout=COPY_TIMEOUT, stdin=subprocess.DEVNULL,
                   capture_output=True)


def stage_build_inputs(build_root: Path, patch_dir: Path = PATCH_DIR) -> None:
    """Put the patches and the build script where the script expects them in the copy."""
    target = build_root / "build/patches"
    target.mkdir(parents=True, exist_ok=True)
    for item in [*sorted(Path(patch_dir).glob("*.patch")), Path(patch_dir) / BUILD_SCRIPT]:
        shutil.copyfile(item, target / item.name)


class BuildOutput:
    """What build-modules.sh left in the copy's /build/out, checked."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.asterisk_version = _read(out_dir / "asterisk-version")
        self.patch_id = _read(out_dir / "patch-id")
        self.modules: list[tuple[Path, str]] = []
        for line in _read(out_dir / "modules").splitlines():
            name, _, path = line.partition(" ")
            built = out_dir / name
            if (not name.endswith(".so") or "/" in name or not built.is_file()
                    or not path.startswith("/usr/lib/") or not path.endswith("/" + name)):
                raise ValueError(f"the module build left no usable {name or 'module'} in "
                                 f"{out_dir}")
            self.modules.append((built, path))
        if not self.modules:
            raise ValueError(f"the module build left no modules in {out_dir}")

    @property
    def module_paths(self) -> list[str]:
        return [path for _, path in self.modules]

    def check(self, asterisk_version: str, patch_id: str) -> None:
        if self.asterisk_version != asterisk_version:
            raise ValueError(
                f"the modules were built for asterisk {self.asterisk_version}, "
                f"the root has {asterisk_version}"
            )
        if self.patch_id != patch_id:
            raise ValueError(f"the modules were built with patches {self.patch_id}, "
                             f"not {patch_id}")


def install_modules(root: Path, output: BuildOutput) -> None:
    """Replace the root's modules by the built ones, each atomically (running nodes keep
    the files they loaded)."""
    for built, path in output.modules:
        target = root / path.lstrip("/")
        staged = target.with_name(target.name + ".pbx-new")
        shutil.copyfile(built, staged)
        staged.chmod(0o644)
        staged.rename(target)


def divert_argv(module_path: str) -> list[str]:
    """dpkg-divert keeping the package's module as <module>.debian (a no-op the second time)."""
    return ["dpkg-divert", "--local", "--rename", "--divert", f"{module_path}.debian",
            "--add", module_path]


def undivert_argv(module_path: str) -> list[str]:
    """Drop the built module and let dpkg-divert put the package's back in its place."""
    script = ('rm -f "$1" && exec dpkg-divert --local --rename --divert "$1.debian" '
              '--remove "$1"')
    return ["sh", "-c", script, "sh", module_path]


def marker_modules(marker: dict) -> list[str]:
    """The module paths a root's marker says were replaced (older markers name one)."""
    paths = marker.get(MODULES_KEY) or []
    old = marker.get("res_pjsip_module")
    if old and old not in paths:
        paths = [*paths, old]
    return [p for p in paths if isinstance(p, str) and p.startswith("/usr/lib/")]


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
