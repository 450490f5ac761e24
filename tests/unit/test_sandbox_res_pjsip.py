"""The sandbox root's patched res_pjsip: which patch set a root must run, and when it is rebuilt."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from controlplane.sandbox import res_pjsip, rootfs


def test_the_patch_id_is_the_one_the_build_script_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(res_pjsip.STOCK_ENV, raising=False)
    from_script = subprocess.run(
        ["sh", "-c", 'cat "$1"/*.patch | sha256sum | cut -c1-16', "sh", str(res_pjsip.PATCH_DIR)],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout.strip()

    assert res_pjsip.wanted_patch_id() == from_script
    assert len(from_script) == 16


def test_the_id_changes_with_the_patches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(res_pjsip.STOCK_ENV, raising=False)
    (tmp_path / "a.patch").write_text("--- a/x\n+++ b/x\n")
    first = res_pjsip.wanted_patch_id(tmp_path)
    (tmp_path / "b.patch").write_text("--- a/y\n+++ b/y\n")

    assert res_pjsip.wanted_patch_id(tmp_path) not in {first, res_pjsip.STOCK}
    assert res_pjsip.wanted_patch_id(tmp_path / "empty") == res_pjsip.STOCK


@pytest.mark.parametrize("value", ["1", "yes", "true"])
def test_the_stock_module_can_be_asked_for(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(res_pjsip.STOCK_ENV, value)

    assert res_pjsip.wanted_patch_id() == res_pjsip.STOCK


def _build_output(out: Path, version: str = "1:22.10.1-1", patch: str = "feae477d21ed82ca",
                  module_path: str = "/usr/lib/x86_64-linux-gnu/asterisk/modules/res_pjsip.so",
                  ) -> Path:
    out.mkdir(parents=True)
    (out / "res_pjsip.so").write_bytes(b"\x7fELF patched")
    (out / "module-path").write_text(module_path + "\n")
    (out / "asterisk-version").write_text(version + "\n")
    (out / "patch-id").write_text(patch + "\n")
    return out


def test_a_module_built_for_another_version_or_patch_set_is_refused(tmp_path: Path) -> None:
    output = res_pjsip.BuildOutput(_build_output(tmp_path / "out"))
    output.check("1:22.10.1-1", "feae477d21ed82ca")

    with pytest.raises(ValueError, match="built for asterisk 1:22.10.1-1, the root has 1:22.11"):
        output.check("1:22.11.0-1", "feae477d21ed82ca")
    with pytest.raises(ValueError, match="patches feae477d21ed82ca, not 0123"):
        output.check("1:22.10.1-1", "0123")


def test_a_build_without_a_module_is_refused(tmp_path: Path) -> None:
    out = _build_output(tmp_path / "out")
    (out / "res_pjsip.so").unlink()

    with pytest.raises(ValueError, match="no usable module"):
        res_pjsip.BuildOutput(out)


def test_the_module_is_replaced_in_one_rename(tmp_path: Path) -> None:
    output = res_pjsip.BuildOutput(_build_output(tmp_path / "out"))
    root = tmp_path / "root"
    target = root / output.module_path.lstrip("/")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"debian")
    before = target.stat().st_ino

    res_pjsip.install_module(root, output)

    assert target.read_bytes() == b"\x7fELF patched"
    assert target.stat().st_ino != before  # a running Asterisk keeps the file it mapped
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in target.parent.iterdir()] == ["res_pjsip.so"]


def _ready_root(cache: Path, marker: dict) -> Path:
    root = rootfs.root_path(cache)
    root.mkdir(parents=True)
    (root / rootfs.MARKER_NAME).write_text(json.dumps(marker))
    return root


def test_a_root_built_before_the_patch_gets_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(res_pjsip.STOCK_ENV, raising=False)
    monkeypatch.setattr(rootfs, "_require_root_user", lambda: None)
    root = _ready_root(tmp_path, {"asterisk_version": "1:22.10.1-1"})
    updated: list[Path] = []

    def update(self: rootfs._Builder, target: Path) -> None:
        updated.append(target)
        marker = rootfs.read_marker(target)
        marker[res_pjsip.MARKER_KEY] = res_pjsip.wanted_patch_id()
        (target / rootfs.MARKER_NAME).write_text(json.dumps(marker))

    monkeypatch.setattr(rootfs._Builder, "update_res_pjsip", update)

    assert rootfs.ensure_root(tmp_path, progress=lambda _: None) == root
    assert rootfs.ensure_root(tmp_path, progress=lambda _: None) == root
    assert updated == [root]
    assert rootfs.read_marker(root)["asterisk_version"] == "1:22.10.1-1"


def test_a_root_with_the_current_patch_is_used_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(res_pjsip.STOCK_ENV, raising=False)
    root = _ready_root(tmp_path, {res_pjsip.MARKER_KEY: res_pjsip.wanted_patch_id()})

    def refuse(*_: object) -> None:
        raise AssertionError("no build expected")

    monkeypatch.setattr(rootfs, "_require_root_user", refuse)
    assert rootfs.ensure_root(tmp_path, progress=lambda _: None) == root


def test_the_divert_commands_keep_the_package_module_aside() -> None:
    path = "/usr/lib/x86_64-linux-gnu/asterisk/modules/res_pjsip.so"

    assert res_pjsip.divert_argv(path) == [
        "dpkg-divert", "--local", "--rename", "--divert", f"{path}.debian", "--add", path]
    undo = res_pjsip.undivert_argv(path)
    assert undo[-1] == path and "--remove" in undo[2] and 'rm -f "$1"' in undo[2]
