"""The event loop `serve` and `agent` run on (PBX_EVENT_LOOP)."""

import asyncio

import pytest

from controlplane import cli
from controlplane.eventloop import run_loop


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_by_name_and_the_standard_loop_on_request():
    assert run_loop("uvloop", loop_module()).startswith("uvloop")
    assert run_loop("asyncio", loop_module()).startswith("asyncio")


def test_an_unknown_loop_is_refused_before_anything_runs(monkeypatch):
    coro = loop_module()
    with pytest.raises(ValueError, match="PBX_EVENT_LOOP"):
        run_loop("trio", coro)
    assert coro.cr_frame is None  # closed, never started
    monkeypatch.setenv("PBX_EVENT_LOOP", "trio")
    with pytest.raises(SystemExit, match="PBX_EVENT_LOOP must be one of uvloop, asyncio"):
        cli.main(["migrate"])
