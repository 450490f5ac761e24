"""The long-running loops of a node's call control and of `serve` outlive an error nobody
expected (logged with its traceback, naming the node and the loop), and their warnings say
what failed even when the error has no text (asyncpg's and asyncio's TimeoutError)."""

from __future__ import annotations

import asyncio
import logging
import time
import types
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from controlplane.asterisk.ami import AmiUnavailable
from controlplane.asterisk.fastagi import AgiRequest
from controlplane.calls import housekeeping, lifecycle, node_control
from controlplane.calls.node_control import (
    CallControl,
    CallControlConfig,
    describe,
    report_failure,
    surviving,
)
from controlplane.rating.cache import RateCache
from controlplane.settings import Settings

NO_POOL: Any = None  # the loops' work is replaced: nothing reaches a database


class FakeAmi:
    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.actions: list[dict[str, str]] = []
        self.fail_next = False
        self.uniqueids: dict[str, str] = {}  # the node's channels: name -> unique id

    async def action(self, message: dict[str, str], timeout: float = 5) -> dict[str, str]:
        self.actions.append(message)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the node answered something unreadable")
        if message.get("Action") == "Getvar" and message.get("Variable") == "UNIQUEID":
            uniqueid = self.uniqueids.get(message.get("Channel", ""))
            if uniqueid is None:
                return {"Response": "Error", "Message": "No such channel"}
            return {"Response": "Success", "Value": uniqueid}
        return {"Response": "Success"}


@pytest.fixture(autouse=True)
def short_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_control, "UNEXPECTED_PAUSE", 0.01)


def control(ami: FakeAmi | None = None) -> CallControl:
    """A node's call control with nothing behind it: each test replaces what its loop does."""
    config = CallControlConfig(tick=0.001, lease_every=0.001, cdr_every=0.001,
                               cdr_file=Path("/nonexistent/cdr.csv"))
    nothing: Any = None
    node_ami: Any = ami or FakeAmi()
    return CallControl(pool=NO_POOL, node_id=7, node_name="n1", ami=node_ami, ari=nothing,
                       dsn="", config=config)


async def counters_right(pool: object, timeout: float) -> int:
    """Housekeeping's recount of call counters, finding them all right."""
    return 0


@pytest.fixture(autouse=True)
def sweeps_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loops' sweeps run lifecycle.sweep at once (their wait for the database is
    tested in tests/integration/test_admission.py)."""
    monkeypatch.setattr(lifecycle.LeaseSweep, "run",
                        lambda self: lifecycle.sweep(self.pool))


def failing_once(stop: asyncio.Event, turns: list[int], error: Exception,
                 result: Any = None, enough: int = 3) -> Callable[..., Awaitable[Any]]:
    """A loop's work that fails at its first turn, and stops the loop after `enough`."""
    async def work(*args: Any, **kwargs: Any) -> Any:
        turns.append(len(turns) + 1)
        if len(turns) == 1:
            raise error
        if len(turns) >= enough:
            stop.set()
        return result
    return work


def cdr_import_doing(monkeypatch: pytest.MonkeyPatch,
                     work: Callable[..., Awaitable[Any]]) -> None:
    """The node's CDR import, each run of which does `work`."""
    class Import:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.run = work

    monkeypatch.setattr(lifecycle, "CdrImport", Import)


async def run_until_stopped(loop: Awaitable[None], stop: asyncio.Event) -> None:
    await asyncio.wait_for(loop, 5)
    assert stop.is_set()


def unexpected(caplog: pytest.LogCaptureFixture, what: str) -> logging.LogRecord:
    found = [r for r in caplog.records if r.levelno == logging.ERROR and what in r.getMessage()]
    assert len(found) == 1, caplog.text
    assert found[0].exc_info is not None and found[0].exc_info[0] is RuntimeError
    return found[0]


async def test_a_turn_failing_unexpectedly_is_logged_and_the_loop_goes_on(
        caplog: pytest.LogCaptureFixture):
    stop, turns = asyncio.Event(), []
    work = failing_once(stop, turns, RuntimeError("calls [...]: their grants kept moving"))
    with caplog.at_level(logging.WARNING):
        while not stop.is_set():
            async with surviving("node n1: CDR import", stop, node_control.DB_ERRORS):
                await work()
    assert turns == [1, 2, 3]
    record = unexpected(caplog, "node n1: CDR import")
    assert "grants kept moving" in caplog.text and record.name == node_control.log.name


async def test_a_turn_cancelled_mid_call_ends_the_loop_even_when_its_cleanup_raises(
        caplog: pytest.LogCaptureFixture):
    """asyncpg's release of a connection whose query was cancelled can raise an error of
    its own in place of the CancelledError: the loop must still end, and log nothing."""
    stop, turns, started = asyncio.Event(), [], asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            async with surviving("node n1: lease renewal", stop, node_control.DB_ERRORS):
                turns.append(1)
                if len(turns) == 3:
                    stop.set()  # a loop that went on ends here, not never
                if len(turns) > 1:
                    continue
                try:
                    started.set()
                    await asyncio.sleep(30)
                finally:
                    raise asyncpg.InternalClientError("release() called on a free holder")

    task = asyncio.create_task(loop())
    await started.wait()
    with caplog.at_level(logging.WARNING):
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
    assert task.cancelled() and turns == [1]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_the_cdr_import_goes_on_after_an_unexpected_error(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    calls = control()
    stop, turns = asyncio.Event(), []
    grants_moving = RuntimeError("calls [...]: their grants kept moving while they were settled")
    cdr_import_doing(monkeypatch, failing_once(stop, turns, grants_moving, result=2))
    with caplog.at_level(logging.WARNING):
        await run_until_stopped(calls.import_cdrs(stop), stop)
    assert turns == [1, 2, 3] and calls.cdrs_imported == 4
    unexpected(caplog, "node n1: CDR import")


@pytest.mark.parametrize("loop, patched", [
    ("_extend_loop", "extend_due"),
    ("_lease_loop", "sweep"),
])
async def test_grants_and_leases_go_on_after_an_unexpected_error(
        loop: str, patched: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture):
    calls = control()

    async def vouched(unseen_for: float) -> None:
        return None

    monkeypatch.setattr(calls, "_vouch_unseen", vouched)  # the lease loop: AMI down
    if loop == "_extend_loop":
        calls.ami.connected.set()  # extending needs the node's AMI link
    stop, turns = asyncio.Event(), []
    monkeypatch.setattr(lifecycle, patched, failing_once(stop, turns, RuntimeError("bug"),
                                                         result=0))
    with caplog.at_level(logging.WARNING):
        await run_until_stopped(getattr(calls, loop)(stop), stop)
    assert turns == [1, 2, 3]
    what = {"_extend_loop": "extending calls", "_lease_loop": "lease renewal"}[loop]
    unexpected(caplog, f"node n1: {what}")


async def test_carriers_are_synced_again_after_an_unexpected_error(
        caplog: pytest.LogCaptureFixture):
    calls = control()
    stop, turns = asyncio.Event(), []
    sync: Any = failing_once(stop, turns, RuntimeError("bug"), enough=2)
    calls.sync_carriers = sync
    calls.carriers_dirty.set()
    with caplog.at_level(logging.WARNING):
        task = asyncio.create_task(calls._carrier_loop(stop))
        for _ in range(500):
            if stop.is_set():
                break
            await asyncio.sleep(0.01)
        calls.carriers_dirty.set()  # wakes the loop to see stop
        await asyncio.wait_for(task, 5)
    assert turns == [1, 2]
    unexpected(caplog, "node n1: carrier sync")


async def test_hangups_go_on_after_an_unexpected_error(caplog: pytest.LogCaptureFixture):
    ami = FakeAmi()
    ami.fail_next = True
    ami.uniqueids = {"PJSIP/a-1": "100.1", "PJSIP/b-2": "100.2", "PJSIP/c-3": "200.3"}
    calls = control(ami)
    stop = asyncio.Event()
    # a name no Asterisk channel has (an AMI regular expression, a line break) is not sent;
    # a name that is now another call's (the node restarted: 200.3, not 100.3) is left alone
    for channel, uniqueid in (("PJSIP/a-1", "100.1"), ("/.*/", "100.9"),
                              ("PJSIP/x\r\nAction: Logoff", "100.8"), ("PJSIP/c-3", "100.3"),
                              ("PJSIP/d-4", ""), ("PJSIP/b-2", "100.2")):
        calls.hangups.put_nowait({"channel_name": channel, "channel": uniqueid})
    with caplog.at_level(logging.WARNING):
        task = asyncio.create_task(calls._hangup_loop(stop))
        for _ in range(500):
            if ami.actions and ami.actions[-1]["Action"] == "Hangup":
                break
            await asyncio.sleep(0.01)
        stop.set()
        calls.hangups.put_nowait({})
        await asyncio.wait_for(task, 5)
    assert [(a["Action"], a["Channel"]) for a in ami.actions] == [
        ("Getvar", "PJSIP/a-1"), ("Getvar", "PJSIP/c-3"), ("Getvar", "PJSIP/b-2"),
        ("Hangup", "PJSIP/b-2")]
    unexpected(caplog, "node n1: hangup of PJSIP/a-1")


async def test_a_timeout_is_named_in_the_warning(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture):
    calls = control()
    stop, turns = asyncio.Event(), []
    cdr_import_doing(monkeypatch, failing_once(stop, turns, TimeoutError(), result=0,
                                               enough=2))
    with caplog.at_level(logging.WARNING):
        await run_until_stopped(calls.import_cdrs(stop), stop)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["node n1: CDR import failed: TimeoutError"]


def test_describe_says_what_failed_when_the_error_has_no_text():
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(TimeoutError(), timeout=5.0) == "TimeoutError (no answer within 5 s)"
    assert describe(OSError("connection refused"), timeout=5.0) == "connection refused"
    assert describe(asyncpg.InterfaceError("pool is closing")) == "pool is closing"


async def test_housekeeping_goes_on_after_unexpected_errors(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path):
    stop, sweeps, exports = asyncio.Event(), [], []
    swept, exported = asyncio.Event(), asyncio.Event()
    monkeypatch.setattr(housekeeping, "SWEEP_EVERY", 0.001)
    monkeypatch.setattr(housekeeping, "EXPORT_RETRY", 0.0)
    monkeypatch.setattr(lifecycle, "sweep", failing_once(swept, sweeps,
                                                         RuntimeError("bug"), result=0,
                                                         enough=2))
    monkeypatch.setattr(housekeeping.export, "export_closed_periods",
                        failing_once(exported, exports, RuntimeError("bug"), result=[],
                                     enough=2))

    async def both_done() -> None:
        await swept.wait()
        await exported.wait()
        stop.set()

    monkeypatch.setattr(lifecycle, "recount_counters", counters_right)
    settings = Settings(data_dir=tmp_path, cdr_export_dir=str(tmp_path / "cdrs"))
    watcher = asyncio.create_task(both_done())
    with caplog.at_level(logging.WARNING):
        await run_until_stopped(housekeeping.housekeeping(NO_POOL, settings, stop), stop)
    await watcher
    assert exports[:2] == [1, 2] and len(sweeps) >= 2
    unexpected(caplog, "call housekeeping: lease sweep")
    unexpected(caplog, "call housekeeping: CDR export")


async def test_an_export_volume_that_hangs_never_holds_up_the_lease_sweep(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    stop, sweeps, exporting = asyncio.Event(), [], asyncio.Event()
    monkeypatch.setattr(housekeeping, "SWEEP_EVERY", 0.001)

    async def stalled(*args: Any) -> list[Any]:
        exporting.set()
        await asyncio.sleep(3600)  # a write that never returns
        return []

    async def swept(pool: Any) -> int:
        sweeps.append(1)
        if len(sweeps) >= 3 and exporting.is_set():
            stop.set()
        return 0

    class Answering(lifecycle.LeaseSweep):
        async def run(self) -> int:
            return await swept(self.pool)

    monkeypatch.setattr(housekeeping.export, "export_closed_periods", stalled)
    monkeypatch.setattr(lifecycle, "LeaseSweep", Answering)
    monkeypatch.setattr(lifecycle, "recount_counters", counters_right)
    settings = Settings(data_dir=tmp_path, cdr_export_dir=str(tmp_path / "cdrs"))
    task = asyncio.create_task(housekeeping.housekeeping(NO_POOL, settings, stop))
    await asyncio.wait_for(stop.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert exporting.is_set() and len(sweeps) >= 3


async def test_housekeeping_names_a_database_timeout(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path):
    stop, sweeps = asyncio.Event(), []
    monkeypatch.setattr(housekeeping, "SWEEP_EVERY", 0.001)
    monkeypatch.setattr(lifecycle, "sweep", failing_once(stop, sweeps, TimeoutError(),
                                                         result=0, enough=2))

    monkeypatch.setattr(lifecycle, "recount_counters", counters_right)
    settings = Settings(data_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        await run_until_stopped(housekeeping.housekeeping(NO_POOL, settings, stop), stop)
    assert [r.getMessage() for r in caplog.records] == [
        "call housekeeping: lease sweep failed: TimeoutError (no answer within 5 s)"]


async def test_a_background_task_ending_on_an_error_says_so(caplog: pytest.LogCaptureFixture):
    async def dies() -> None:
        raise RuntimeError("bug")

    with caplog.at_level(logging.ERROR):
        task = asyncio.create_task(dies(), name="call housekeeping")
        task.add_done_callback(report_failure)
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)
    unexpected(caplog, "call housekeeping ended on an error")


class ClosingPool:
    """A pool being closed under the cache, as at the agent's shutdown."""

    def acquire(self) -> ClosingPool:
        return self

    async def __aenter__(self) -> None:
        raise asyncpg.InterfaceError("pool is closing")

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_a_rate_table_that_cannot_be_read_is_logged_and_looked_up_meanwhile(
        caplog: pytest.LogCaptureFixture):
    pool: Any = ClosingPool()
    cache = RateCache(pool)
    with caplog.at_level(logging.WARNING):
        cache._load_later(3, 1)
        await asyncio.gather(*cache._loading.values())
    assert 3 not in cache._tables and not cache._loading
    assert "rate table 3 not cached" in caplog.text and "pool is closing" in caplog.text


def releases(calls: CallControl, monkeypatch: pytest.MonkeyPatch, *,
             quiet_too: bool) -> list[Any]:
    """The calls `calls` releases as abandoned, as they are released: their ids, or
    (id, quiet) with `quiet_too`."""
    released: list[Any] = []

    async def release(call_id: uuid.UUID, why: str, *, quiet: bool = False) -> None:
        released.append((call_id, quiet) if quiet_too else call_id)

    monkeypatch.setattr(calls, "_release_abandoned", release)
    return released


@pytest.mark.parametrize("in_statement", [True, False])
async def test_a_decision_given_up_on_is_cancelled_and_undone_if_it_may_commit(
        in_statement: bool, monkeypatch: pytest.MonkeyPatch):
    """Cancelled, a decision still waiting (for a connection, say) never runs; one whose
    admission statement was on its way may commit all the same, and is undone once it ends."""
    calls = control()
    released = releases(calls, monkeypatch, quiet_too=False)
    deciding = asyncio.Event()

    async def decide() -> dict[str, str]:
        deciding.set()
        await asyncio.sleep(10)
        return {}

    task = asyncio.create_task(decide())
    await deciding.wait()
    call_id = uuid.uuid4()
    if in_statement:
        calls.admission.admitting["chan-1"] = call_id
    calls._on_abandoned(AgiRequest("admit", (), {"agi_uniqueid": "chan-1"}), task)
    await asyncio.gather(task, return_exceptions=True)
    for _ in range(3):
        await asyncio.sleep(0)
    assert task.cancelled()
    assert released == ([call_id] if in_statement else [])


@pytest.mark.parametrize("script,decision,call,released_expected", [
    ("admit", "admit", "uuid", True),
    ("admit", "refuse", "uuid", False),
    ("admit", "admit", "not-a-uuid", False),
    ("answer", "admit", "uuid", False),
])
async def test_a_caller_gone_during_admission_frees_only_an_admitted_call(
        script: str, decision: str, call: str, released_expected: bool,
        monkeypatch: pytest.MonkeyPatch):
    """Told the caller hung up before its answer was read, the agent gives back what an
    admitted call took; a refusal, or an answer without a call, has nothing to give back."""
    calls = control()
    released = releases(calls, monkeypatch, quiet_too=True)
    call_id = uuid.uuid4()
    answer = {"PBX_DECISION": decision,
              "PBX_CALL": str(call_id) if call == "uuid" else call}
    calls._on_hung_up(AgiRequest(script, (), {"agi_uniqueid": "chan-1"}), answer)
    for _ in range(3):
        await asyncio.sleep(0)
    assert released == ([(call_id, True)] if released_expected else [])


class ScriptedAmi(FakeAmi):
    """Answers each action with the next of `replies`: a reply, or an exception to raise."""

    def __init__(self, replies: list[Any]) -> None:
        super().__init__()
        self.replies = replies

    async def action(self, message: dict[str, str], timeout: float = 5) -> dict[str, str]:
        self.actions.append(message)
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply


OWNED = {"Response": "Success", "Variable": "PBX_ANSWERED", "Value": "call-1"}


async def test_a_new_end_is_sent_as_what_is_left_when_it_is_sent():
    ami = ScriptedAmi([OWNED, {"Response": "Success"}])
    calls = control(ami)
    await calls._move_end(lifecycle.Extension("PJSIP/b-1", 30.0, time.monotonic() - 5,
                                              "call-1"))
    asked, sent = ami.actions
    assert asked == {"Action": "Getvar", "Channel": "PJSIP/b-1", "Variable": "PBX_ANSWERED"}
    assert sent["Channel"] == "PJSIP/b-1" and sent["Variable"] == "TIMEOUT(absolute)"
    assert 24.5 < float(sent["Value"]) <= 25.0
    assert calls._unmoved == {}


async def test_a_new_end_is_not_sent_to_a_channel_of_that_name_that_is_another_calls():
    """After a node restart chan_pjsip names channels from 1 again: the name a call's callee
    had may be a newer call's, whose end must stay that of its own grant."""
    ami = ScriptedAmi([{**OWNED, "Value": "call-2"}, {"Response": "Success", "Value": ""}])
    calls = control(ami)
    for _ in range(2):  # another call's, or one that says nothing (a channel of no call)
        moved = lifecycle.Extension("PJSIP/b-1", 30.0, time.monotonic(), "call-1")
        calls._unmoved["call-1"] = moved
        await calls._move_end(moved)
        assert calls._unmoved == {}
    assert [a["Action"] for a in ami.actions] == ["Getvar", "Getvar"]


async def test_a_new_end_owed_to_a_call_survives_an_older_call_of_the_same_channel_name():
    """Right after a node restart an old call (lease not yet lapsed) and a new one may share
    their callee's name: what the old one finds there never drops the new one's new end."""
    ami = ScriptedAmi([{**OWNED, "Value": "call-2"}, AmiUnavailable("not connected"),
                       {**OWNED, "Value": "call-2"}, {"Response": "Success"}])
    calls = control(ami)
    new = lifecycle.Extension("PJSIP/b-1", 30.0, time.monotonic(), "call-2")
    calls._unmoved["call-2"] = new
    old = lifecycle.Extension("PJSIP/b-1", 30.0, time.monotonic(), "call-1")
    await calls._move_end(old)  # the name is call-2's: call-1's end is not moved
    assert calls._unmoved == {"call-2": new}
    await calls._move_end(old)  # the node away: call-1 waits beside call-2
    assert calls._unmoved == {"call-2": new, "call-1": old}
    await calls._move_end(new)
    assert calls._unmoved == {"call-1": old}
    assert ami.actions[-1] == {"Action": "Setvar", "Channel": "PJSIP/b-1",
                               "Variable": "TIMEOUT(absolute)",
                               "Value": ami.actions[-1]["Value"]}


async def test_an_answer_through_fastagi_marks_the_channel_as_the_calls(
        monkeypatch: pytest.MonkeyPatch):
    """Dialplans of earlier releases report the answer by the FastAGI script `answer`: the
    channel is told whose it is there too, or its end could never be moved."""
    calls = control()

    async def answered(call: str, channel: str, at: Any = None) -> float:
        return 30.0

    monkeypatch.setattr(calls, "_record_answer", answered)
    variables = await calls._answer(AgiRequest("answer", ("call-7",), {}))
    assert variables == {"TIMEOUT(absolute)": "30.000", "PBX_ANSWERED": "call-7"}


async def test_a_new_end_the_node_did_not_take_is_sent_again_until_it_does():
    ami = ScriptedAmi([AmiUnavailable("not connected"),
                       {"Response": "Error", "Message": "Permission denied"},
                       OWNED, {"Response": "Error", "Message": "Variable not set"},
                       OWNED, {"Response": "Success"}])
    calls = control(ami)
    moved = lifecycle.Extension("PJSIP/b-1", 30.0, time.monotonic(), "call-1")
    for _ in range(3):
        await calls._move_end(moved)
        assert calls._unmoved == {"call-1": moved}
    await calls._move_end(moved)
    assert calls._unmoved == {} and len(ami.actions) == 6
    assert ami.actions[-1]["Variable"] == "TIMEOUT(absolute)"


async def test_a_new_end_that_runs_out_while_the_node_is_asked_is_never_sent_as_zero(
        monkeypatch: pytest.MonkeyPatch):
    """TIMEOUT(absolute)=0 takes a channel's end away: an end that passed while its owner
    was looked at is given up, and what is sent is never below a millisecond."""
    ami = ScriptedAmi([OWNED, OWNED, {"Response": "Success"}])
    calls = control(ami)
    now = [100.0]
    monkeypatch.setattr(lifecycle, "time", types.SimpleNamespace(monotonic=lambda: now[0]))

    async def slow_action(message: dict[str, str], timeout: float = 5) -> dict[str, str]:
        now[0] += 0.0004  # each reply takes 0.4 ms of the time left
        return await ScriptedAmi.action(ami, message, timeout)

    ami.action = slow_action  # type: ignore[method-assign]
    passed = lifecycle.Extension("PJSIP/b-1", 0.0012, now[0], "call-1")
    await calls._move_end(passed)
    assert [a["Action"] for a in ami.actions] == ["Getvar"] and calls._unmoved == {}
    barely = lifecycle.Extension("PJSIP/b-1", 0.0016, now[0], "call-1")
    await calls._move_end(barely)
    assert [a["Action"] for a in ami.actions] == ["Getvar", "Getvar", "Setvar"]
    assert ami.actions[-1]["Value"] == "0.001"


async def test_a_new_end_is_given_up_when_the_call_is_gone_or_its_old_end_passed():
    ami = ScriptedAmi([{"Response": "Error", "Message": "No such channel"},
                       OWNED, {"Response": "Error", "Message": "No such channel"}])
    calls = control(ami)
    for _ in range(2):  # gone before the look at its owner, or between it and the new end
        gone = lifecycle.Extension("PJSIP/b-1", 30.0, time.monotonic(), "call-1")
        calls._unmoved["call-1"] = gone
        await calls._move_end(gone)
        assert calls._unmoved == {}
    late = lifecycle.Extension("PJSIP/b-2", 3.0, time.monotonic() - 4, "call-2")
    calls._unmoved["call-2"] = late
    await calls._move_end(late)
    assert calls._unmoved == {} and len(ami.actions) == 3


async def test_the_extension_loop_sends_again_what_the_node_did_not_take(
        monkeypatch: pytest.MonkeyPatch):
    ami = ScriptedAmi([OWNED, {"Response": "Success"}])
    ami.connected.set()
    calls = control(ami)
    calls._unmoved["call-1"] = lifecycle.Extension("PJSIP/b-1", 30.0, time.monotonic(),
                                                      "call-1")
    stop = asyncio.Event()
    asked: list[bool] = []

    async def extend_due(pool: Any, node_id: int, lead: float, lease: float, move: Any,
                         ahead: int, exhausted_too: bool = False) -> int:
        asked.append(exhausted_too)
        stop.set()
        return 0

    monkeypatch.setattr(lifecycle, "extend_due", extend_due)
    await asyncio.wait_for(calls._extend_loop(stop), 5)
    assert [(a["Action"], a["Channel"]) for a in ami.actions] == [
        ("Getvar", "PJSIP/b-1"), ("Setvar", "PJSIP/b-1")]
    assert calls._unmoved == {} and asked == [True]


async def test_a_decision_that_admitted_as_its_time_ran_out_is_undone(
        monkeypatch: pytest.MonkeyPatch):
    """The time is up in the very turn the decision ends: the admission statement is no
    longer on its way, but the call it admitted is in its answer, and is undone."""
    calls = control()
    released = releases(calls, monkeypatch, quiet_too=False)
    call_id = uuid.uuid4()

    async def decide() -> dict[str, str]:
        return {"PBX_DECISION": "admit", "PBX_CALL": str(call_id)}

    task = asyncio.create_task(decide())
    await task
    calls._on_abandoned(AgiRequest("admit", (), {"agi_uniqueid": "chan-1"}), task)
    calls._on_unsure(other := uuid.uuid4())
    for _ in range(5):
        await asyncio.sleep(0)
    assert sorted(released) == sorted([call_id, other])


class OnePool:
    """A pool whose one connection answers anything with 1."""

    def acquire(self, timeout: float | None = None) -> Any:
        pool = self

        class Held:
            async def __aenter__(self) -> Any:
                return pool

            async def __aexit__(self, *exc: object) -> None:
                return None

        return Held()

    async def fetchval(self, *args: Any, **kwargs: Any) -> int:
        return 1


async def test_an_answer_not_recorded_is_asked_of_the_node_at_the_next_renewal(
        monkeypatch: pytest.MonkeyPatch):
    calls = control()
    calls.pool = OnePool()

    async def database_away(*args: Any, **kwargs: Any) -> None:
        raise OSError("connection refused")

    monkeypatch.setattr(calls.admission, "answer", database_away)
    assert await calls._record_answer(str(uuid.uuid4()), "PJSIP/carrier-1") is None
    assert calls.answers_lost
    stop, resyncs = asyncio.Event(), []

    async def listed() -> list[str]:
        return ["100.1"]

    async def renewed(*args: Any, **kwargs: Any) -> int:
        return 1

    async def resync() -> int:
        resyncs.append(1)
        stop.set()
        return 1

    monkeypatch.setattr(calls, "_listed_channels", listed)
    monkeypatch.setattr(calls, "resync_answers", resync)
    monkeypatch.setattr(node_control.store, "renew_leases", renewed)
    monkeypatch.setattr(node_control.store, "hangups_asked",
                        lambda *args: asyncio.sleep(0, result=[]))
    await asyncio.wait_for(calls._lease_loop(stop), 5)
    assert resyncs == [1] and not calls.answers_lost


@pytest.mark.parametrize("reply, listed", [
    ([{"Response": "Success", "EventList": "start"},
      {"Event": "CoreShowChannel", "Uniqueid": "100.1"},
      {"Event": "CoreShowChannel", "Uniqueid": "100.2"},
      {"Event": "CoreShowChannelsComplete", "EventList": "Complete", "ListItems": "2"}],
     ["100.1", "100.2"]),
    ([{"Response": "Success", "EventList": "start"},
      {"Event": "CoreShowChannelsComplete", "EventList": "Complete", "ListItems": "0"}], []),
    ({"Response": "Error", "Message": "Permission denied"}, None),
    ([{"Response": "Success", "EventList": "start"},
      {"Event": "CoreShowChannel", "Uniqueid": "100.1"}], None),
    ([{"Response": "Success", "EventList": "start"},
      {"Event": "CoreShowChannel", "Uniqueid": "100.1"},
      {"Event": "CoreShowChannelsComplete", "EventList": "Complete", "ListItems": "2"}], None),
])
async def test_only_a_whole_listing_of_the_nodes_channels_is_believed(
        reply: Any, listed: list[str] | None):
    """A listing that is not whole (an error, one cut short) must never read as "no
    channels": the leases of calls still talking would lapse."""
    calls = control(ScriptedAmi([reply]))
    if listed is None:
        with pytest.raises(AmiUnavailable):
            await calls.channels()
    else:
        assert await calls.channels() == listed
