"""The sandbox root's patched Asterisk modules: which patch set a root must run, and when it is
rebuilt."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from controlplane.sandbox import patched_modules as pm
from controlplane.sandbox import rootfs


def test_the_patch_id_is_the_one_the_build_script_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pm.STOCK_ENV, raising=False)
    from_script = subprocess.run(
        ["sh", "-c", 'cat "$1"/*.patch | sha256sum | cut -c1-16', "sh", str(pm.PATCH_DIR)],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout.strip()

    assert pm.wanted_patch_id() == from_script
    assert len(from_script) == 16


def test_the_id_changes_with_the_patches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pm.STOCK_ENV, raising=False)
    (tmp_path / "a.patch").write_text("--- a/x\n+++ b/x\n")
    first = pm.wanted_patch_id(tmp_path)
    (tmp_path / "b.patch").write_text("--- a/y\n+++ b/y\n")

    assert pm.wanted_patch_id(tmp_path) not in {first, pm.STOCK}
    assert pm.wanted_patch_id(tmp_path / "empty") == pm.STOCK


@pytest.mark.parametrize("value", ["1", "yes", "true"])
def test_the_stock_module_can_be_asked_for(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(pm.STOCK_ENV, value)

    assert pm.wanted_patch_id() == pm.STOCK


MODDIR = "/usr/lib/x86_64-linux-gnu/asterisk/modules"


def _build_output(out: Path, version: str = "1:22.10.1-1", patch: str = "feae477d21ed82ca",
                  names: tuple[str, ...] = ("res_pjsip.so", "res_sorcery_astdb.so")) -> Path:
    out.mkdir(parents=True)
    for name in names:
        (out / name).write_bytes(b"\x7fELF patched " + name.encode())
    (out / "modules").write_text("".join(f"{n} {MODDIR}/{n}\n" for n in names))
    (out / "asterisk-version").write_text(version + "\n")
    (out / "patch-id").write_text(patch + "\n")
    return out


def test_a_module_built_for_another_version_or_patch_set_is_refused(tmp_path: Path) -> None:
    output = pm.BuildOutput(_build_output(tmp_path / "out"))
    output.check("1:22.10.1-1", "feae477d21ed82ca")

    with pytest.raises(ValueError, match="for asterisk 1:22.10.1-1, the root has 1:22.11"):
        output.check("1:22.11.0-1", "feae477d21ed82ca")
    with pytest.raises(ValueError, match="patches feae477d21ed82ca, not 0123"):
        output.check("1:22.10.1-1", "0123")


def test_a_build_without_a_module_is_refused(tmp_path: Path) -> None:
    out = _build_output(tmp_path / "out")
    (out / "res_sorcery_astdb.so").unlink()

    with pytest.raises(ValueError, match="no usable res_sorcery_astdb.so"):
        pm.BuildOutput(out)


def test_a_module_path_outside_the_module_directory_is_refused(tmp_path: Path) -> None:
    out = _build_output(tmp_path / "out", names=("res_pjsip.so",))
    (out / "modules").write_text("res_pjsip.so /etc/passwd\n")

    with pytest.raises(ValueError, match="no usable res_pjsip.so"):
        pm.BuildOutput(out)


def test_each_module_is_replaced_in_one_rename(tmp_path: Path) -> None:
    output = pm.BuildOutput(_build_output(tmp_path / "out"))
    root = tmp_path / "root"
    inodes = {}
    for path in output.module_paths:
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"debian")
        inodes[path] = target.stat().st_ino

    pm.install_modules(root, output)

    for path in output.module_paths:
        target = root / path.lstrip("/")
        assert target.read_bytes() == b"\x7fELF patched " + target.name.encode()
        assert target.stat().st_ino != inodes[path]  # a running Asterisk keeps its file
        assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in (root / MODDIR.lstrip("/")).iterdir()) == [
        "res_pjsip.so", "res_sorcery_astdb.so"]


def _ready_root(cache: Path, marker: dict) -> Path:
    root = rootfs.root_path(cache)
    root.mkdir(parents=True)
    (root / rootfs.MARKER_NAME).write_text(json.dumps(marker))
    return root


def test_a_root_built_before_the_patch_gets_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(pm.STOCK_ENV, raising=False)
    monkeypatch.setattr(rootfs, "_require_root_user", lambda: None)
    root = _ready_root(tmp_path, {"asterisk_version": "1:22.10.1-1"})
    updated: list[Path] = []

    def update(self: rootfs._Builder, target: Path) -> None:
        updated.append(target)
        marker = rootfs.read_marker(target)
        marker[pm.MARKER_KEY] = pm.wanted_patch_id()
        (target / rootfs.MARKER_NAME).write_text(json.dumps(marker))

    monkeypatch.setattr(rootfs._Builder, "update_modules", update)

    assert rootfs.ensure_root(tmp_path, progress=lambda _: None) == root
    assert rootfs.ensure_root(tmp_path, progress=lambda _: None) == root
    assert updated == [root]
    assert rootfs.read_marker(root)["asterisk_version"] == "1:22.10.1-1"


def test_a_root_with_the_current_patch_is_used_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(pm.STOCK_ENV, raising=False)
    root = _ready_root(tmp_path, {pm.MARKER_KEY: pm.wanted_patch_id()})

    def refuse(*_: object) -> None:
        raise AssertionError("no build expected")

    monkeypatch.setattr(rootfs, "_require_root_user", refuse)
    assert rootfs.ensure_root(tmp_path, progress=lambda _: None) == root


def test_the_divert_commands_keep_the_package_module_aside() -> None:
    path = "/usr/lib/x86_64-linux-gnu/asterisk/modules/pm.so"

    assert pm.divert_argv(path) == [
        "dpkg-divert", "--local", "--rename", "--divert", f"{path}.debian", "--add", path]
    undo = pm.undivert_argv(path)
    assert undo[-1] == path and "--remove" in undo[2] and 'rm -f "$1"' in undo[2]
