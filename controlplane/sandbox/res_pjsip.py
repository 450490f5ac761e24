"""The sandbox root's res_pjsip: Debian's module rebuilt with the patches in asterisk-patches/.

Debian's res_pjsip makes every new AOR scan all endpoints (O(N²) with sorcery's sorted
result list), which stalls a node holding tens of thousands of extensions; see
asterisk-patches/res_pjsip-new-aor-endpoint-lookup.patch and bench/README.md. The module is
built once per root, in a throw-away copy of it (so the root gets no compiler), from Debian's
source package of exactly the installed version, then installed over the package's file with
``dpkg-divert`` (the original stays next to it as ``res_pjsip.so.debian``). The root's marker
records the patch set, so a root built before a patch changed is rebuilt on its next use.

``PBX_SANDBOX_STOCK_RES_PJSIP=1`` keeps Debian's module as shipped (nodes then stay fast only
up to a few thousand extensions).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

PATCH_DIR = Path(__file__).resolve().parents[2] / "asterisk-patches"
BUILD_SCRIPT = "build-res-pjsip.sh"
STOCK_ENV = "PBX_SANDBOX_STOCK_RES_PJSIP"
MARKER_KEY = "res_pjsip_patch"
STOCK = "stock"
BUILD_TIMEOUT = 2400
COPY_TIMEOUT = 600


def wanted_patch_id(patch_dir: Path = PATCH_DIR) -> str:
    """What the root's marker must record: ``stock``, or the id of the patch set to build.

    The id is the one build-res-pjsip.sh writes: the first 16 hex digits of the SHA-256 of
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
    """What build-res-pjsip.sh left in the copy's /build/out, checked."""

    def __init__(self, out_dir: Path) -> None:
        self.module = out_dir / "res_pjsip.so"
        self.module_path = _read(out_dir / "module-path")
        self.asterisk_version = _read(out_dir / "asterisk-version")
        self.patch_id = _read(out_dir / "patch-id")
        if not self.module.is_file() or not self.module_path.startswith("/usr/lib/"):
            raise ValueError(f"the res_pjsip build left no usable module in {out_dir}")

    def check(self, asterisk_version: str, patch_id: str) -> None:
        if self.asterisk_version != asterisk_version:
            raise ValueError(
                f"res_pjsip was built for asterisk {self.asterisk_version}, "
                f"the root has {asterisk_version}"
            )
        if self.patch_id != patch_id:
            raise ValueError(f"res_pjsip was built with patches {self.patch_id}, not {patch_id}")


def install_module(root: Path, output: BuildOutput) -> None:
    """Replace the root's module by the built one, atomically (running nodes keep theirs)."""
    target = root / output.module_path.lstrip("/")
    staged = target.with_name(target.name + ".pbx-new")
    shutil.copyfile(output.module, staged)
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


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
