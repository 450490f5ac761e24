"""The CDR import in a process of its own (PBX_CDR_IMPORT=process): the command and
environment the agent gives it, started again when it ends, ended with its agent; the
settings that choose it are checked."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from controlplane import cli
from controlplane.calls import node_control
from controlplane.calls.node_control import CallControl, CallControlConfig
from controlplane.provisioning.agent import NodeAgent
from controlplane.provisioning.desired import NodeRecord
from controlplane.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def control(**config: Any) -> CallControl:
    nothing: Any = None
    return CallControl(pool=nothing, node_id=7, node_name="n1", ami=nothing, ari=nothing,
                       dsn="postgresql://agent:pw@db.example/pbx",
                       config=CallControlConfig(cdr_file=Path("/var/log/asterisk/pbx-cdr.csv"),
                                                cdr_import="process", **config))


def test_the_child_is_this_nodes_cdrs_agent_with_the_database_file_and_priority():
    command, env = control(cdr_import_nice=7).cdr_process_command()
    assert command[:3] == [sys.executable, "-m", "controlplane.cli"]
    assert command[3:] == ["agent", "--node", "n1", "--role", "cdrs"]
    assert env["PBX_DSN"] == "postgresql://agent:pw@db.example/pbx"
    assert env["PBX_CDR_FILE"] == "/var/log/asterisk/pbx-cdr.csv"
    assert env["PBX_CDR_IMPORT_NICE"] == "7" and env["PBX_AGENT_PID"] == str(os.getpid())
    # the secret travels in the environment, never on the command line others can list
    assert not any("pw" in part for part in command)


@pytest.fixture
def fast_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_control, "CDR_PROCESS_PAUSE", 0.01)
    monkeypatch.setattr(node_control, "CDR_PROCESS_PAUSE_MAX", 0.05)


def child_doing(monkeypatch: pytest.MonkeyPatch, calls: CallControl, code: str) -> None:
    monkeypatch.setattr(calls, "cdr_process_command",
                        lambda: ([sys.executable, "-c", code], dict(os.environ)))


async def test_a_child_that_ends_is_started_again_and_says_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fast_restarts: None):
    calls, stop = control(), asyncio.Event()
    child_doing(monkeypatch, calls, "import sys; sys.exit(3)")
    pids: list[int] = []
    create = asyncio.create_subprocess_exec

    async def counted(*args: Any, **kwargs: Any) -> Any:
        child = await create(*args, **kwargs)
        pids.append(child.pid)
        if len(pids) == 3:
            stop.set()
        return child

    monkeypatch.setattr(asyncio, "create_subprocess_exec", counted)
    with caplog.at_level(logging.ERROR):
        await asyncio.wait_for(calls._cdr_process(stop), 20)
    assert len(set(pids)) == 3
    ended = [r.getMessage() for r in caplog.records if "CDR import process" in r.getMessage()]
    assert ended and all("exit status 3" in m and "node n1" in m for m in ended)
    assert calls.cdr_process is None


async def test_the_child_ends_with_its_loop(monkeypatch: pytest.MonkeyPatch, fast_restarts: None):
    calls, stop = control(), asyncio.Event()
    child_doing(monkeypatch, calls, "import time; time.sleep(60)")
    task = asyncio.create_task(calls._cdr_process(stop))
    for _ in range(500):
        if calls.cdr_process is not None:
            break
        await asyncio.sleep(0.01)
    child = calls.cdr_process
    assert child is not None and child.returncode is None
    task.cancel()  # as CallControl.run ends its loops
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 15)
    assert child.returncode == -15 and calls.cdr_process is None  # SIGTERM


async def test_a_child_deaf_to_sigterm_is_killed(monkeypatch: pytest.MonkeyPatch,
                                                 fast_restarts: None):
    monkeypatch.setattr(node_control, "CDR_PROCESS_END", 0.5)
    calls, stop = control(), asyncio.Event()
    child_doing(monkeypatch, calls, "import signal, sys, time\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('ready', flush=True)\ntime.sleep(60)")
    task = asyncio.create_task(calls._cdr_process(stop))
    for _ in range(500):
        if calls.cdr_process is not None:
            break
        await asyncio.sleep(0.01)
    child = calls.cdr_process
    assert child is not None
    await asyncio.sleep(1.0)  # the child has set its handler
    stop.set()
    await asyncio.wait_for(task, 15)
    assert child.returncode == -9


@pytest.mark.parametrize("env, error", [
    ({"PBX_CDR_IMPORT": "thread"}, "PBX_CDR_IMPORT must be process or inline"),
    ({"PBX_CDR_IMPORT_NICE": "20"}, "PBX_CDR_IMPORT_NICE must be 0 to 19"),
    ({"PBX_CDR_IMPORT_NICE": "-5"}, "PBX_CDR_IMPORT_NICE must be 0 to 19"),
])
def test_bad_cdr_import_settings_are_refused_by_name(env: dict[str, str], error: str):
    with pytest.raises(SystemExit, match=error):
        cli.call_control_config(Settings.from_env(env))


def test_the_product_imports_in_a_process_by_default_and_inline_on_request():
    assert cli.call_control_config(Settings.from_env({})).cdr_import == "process"
    inline = cli.call_control_config(Settings.from_env({"PBX_CDR_IMPORT": "inline"}))
    assert inline.cdr_import == "inline" and inline.cdr_import_nice == 5


def test_a_cdrs_agent_asks_its_node_for_no_events():
    node = NodeRecord(id=1, name="n1", sip_address="127.0.0.2", ami_host="127.0.0.2",
                      ami_port=5038, ami_username="agent", ami_secret="s3cret",
                      ari_url="http://127.0.0.2:8088", ari_username="agent",
                      ari_password="s3cret")
    nothing: Any = None
    cdrs = NodeAgent(nothing, node, Path("/nonexistent"), dsn="", role="cdrs")
    assert cdrs.ami.events == "off"
    agent = NodeAgent(nothing, node, Path("/nonexistent"), dsn="")
    assert agent.ami.events == "system,user"


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


FOLLOWER = ("from controlplane.cli import follow_parent\n"
            "follow_parent()\n"
            "import time\nprint('following', flush=True)\ntime.sleep(60)")


def test_a_cdrs_agent_whose_agent_is_gone_stops_at_once():
    env = {**os.environ, "PBX_AGENT_PID": str(os.getpid() + 100000)}  # not its parent
    done = subprocess.run([sys.executable, "-c", FOLLOWER], env=env, capture_output=True,
                          text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 1 and "has ended" in done.stderr
    assert "following" not in done.stdout


def test_a_cdrs_agent_ends_when_its_agent_is_killed_outright():
    """SIGKILL gives the agent no chance to end its child: the child ends by itself."""
    agent = subprocess.Popen(
        [sys.executable, "-c",
         "import os, subprocess, sys, time\n"
         f"child = subprocess.Popen([sys.executable, '-c', {FOLLOWER!r}],"
         " env={**os.environ, 'PBX_AGENT_PID': str(os.getpid())}, stdout=sys.stdout)\n"
         "print(child.pid, flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert agent.stdout is not None
        child = int(agent.stdout.readline())
        assert agent.stdout.readline().strip() == "following"
        assert alive(child)
        agent.kill()
        agent.wait(10)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child)
    finally:
        agent.kill()


async def test_an_import_far_behind_its_file_says_so_until_it_catches_up(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path):
    """A CDR import (niced, or its database slow) that stays behind the node's file warns:
    calls that ended wait for it, and a lease may lapse first."""
    from controlplane.calls import lifecycle

    monkeypatch.setattr(lifecycle, "BEHIND_FOR", 0.05)
    path = tmp_path / "pbx-cdr.csv"
    path.write_bytes(b"x" * (1 << 20))
    step = {"bytes": 100 * 1024}

    async def imported(pool: Any, node_id: int, file: Path, held: Any = None) -> Any:
        ident, size = lifecycle.cdr_file.state(file)
        reached = imported.at = min(size, imported.at + step["bytes"])  # type: ignore[attr-defined]
        return 0, (ident, reached)

    imported.at = 0  # type: ignore[attr-defined]
    monkeypatch.setattr(lifecycle, "_import", imported)
    cdrs = lifecycle.CdrImport(None, 9, path)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        await cdrs.run()
        assert not caplog.records  # behind, not for long yet
        await asyncio.sleep(0.06)
        await cdrs.run()
        await cdrs.run()  # told once a minute at most
    [told] = [r.getMessage() for r in caplog.records]
    assert "node 9: the CDR import has been" in told and "billed up to its grant" in told
    step["bytes"] = 1 << 20
    await cdrs.run()  # caught up
    await cdrs.run()
    assert cdrs.behind_since is None
