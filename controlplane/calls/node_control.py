"""Call control for one node, run beside its provisioning agent.

- A FastAGI server answers the node's dialplan: `admit` on every call. When the callee
  picks up, the dialplan raises the AMI UserEvent PbxAnswered and the granted time starts
  (Asterisk itself ends the call when it runs out: TIMEOUT(absolute) on the answering
  channel). The FastAGI script `answer` does the same for dialplans of earlier releases.
  After every AMI login, answers raised while nobody listened are asked of the node.
- Every `tick`, answered calls whose granted time ends within `lead` get the next interval
  reserved and their end moved (AMI Setvar); with no credit left nothing is moved and the
  node cuts the call on time even if this process is gone.
- Every `lease_every`, the node's channels are listed and the leases of its calls renewed;
  calls of any node whose lease lapsed are released (sweep).
- The node's CDR file is imported continuously: each line stores a CDR and settles its call.
  By default (`cdr_import` "process") a child process does it, `pbxctl agent --role cdrs`
  at a lower CPU priority, started again if it ends: settling a batch of CDRs takes the
  agent's event loop and a CPU for milliseconds, and an admission arriving then waited for
  both (at 500 calls/s on two cores, admissions' p99 5.9-6.5 ms inline, 3.7-4.7 ms so).
- Carrier trunks are pushed to the node through ARI (endpoint, aor, identify).
- Hang-up requests from the API arrive by NOTIFY and become AMI Hangup; those no agent
  heard, or that failed, are found with the calls (`hangup_requested_at`) and asked again
  at every lease renewal until the call ends.

Each of these loops outlives any error of one of its turns (`surviving`): an expected one
(the database, AMI or ARI away) is logged in a line, anything else with its traceback, and
the loop goes on after a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from controlplane.asterisk.ami import AmiSession, AmiUnavailable
from controlplane.asterisk.ari import AriClient, AriError
from controlplane.asterisk.fastagi import CHANNEL_NAME, AgiRequest, FastAgiServer
from controlplane.calls import credit, lifecycle
from controlplane.calls.admission import Admission, CallRequest, Decision, unavailable
from controlplane.calls.batching import BatchCancelled
from controlplane.db.listen import listen_forever
from controlplane.store import calls as store

log = logging.getLogger(__name__)

CALLS_CHANNEL = "pbx_calls"
CARRIER_FAMILY = "pbx-carrier"
DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
# The longest a call rings before its Dial gives up (asterisk-conf/extensions.conf: 120 s for
# external calls, 60 s for the others), and how long a call with no grant is vouched for while
# the node's channels cannot be listed.
RING_SECONDS = 120.0
UNSEEN_UNLIMITED = 300.0
# A call admitted this recently may be missing from a listing taken just before: it keeps
# its lease when the node is seen again.
LISTING_LAG = 10.0
# A hang-up asked through the API this long ago whose call is still there is asked of the
# node again, at every lease renewal (its NOTIFY may have reached no agent).
HANGUP_AGAIN = 2.0
UNEXPECTED_PAUSE = 1.0  # seconds a loop rests after an error nobody foresaw, before going on


@dataclass
class CallControlConfig:
    agi_host: str = "127.0.0.1"       # where the FastAGI server listens
    agi_port: int = 0                 # 0: any free port
    agi_advertise: str | None = None  # the address the node dials (default agi_host)
    cdr_file: Path | None = None      # the node's CDR file, as this process sees it
    fail_policy: str = "closed"       # when the database cannot answer in time
    decision_timeout: float = 1.0
    tick: float = 0.5
    lead: float = 10.0
    lease: float = 30.0
    lease_every: float = 5.0
    cdr_every: float = 0.05
    cdr_import: str = "inline"        # "process": in a child process (see the module)
    cdr_import_nice: int = 5          # that process's niceness, added to this one's
    ahead: int = credit.AHEAD_SECONDS  # talk time reserved at a time, in whole increments


def carrier_objects(carrier: Mapping[str, Any]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    name = f"carrier-{carrier['id']}"
    host = carrier["host"]
    # an IPv6 address goes in brackets in a SIP URI (RFC 3261 19.1.1), or its port is lost
    contact = f"sip:[{host}]:{carrier['port']}" if ":" in host else \
        f"sip:{host}:{carrier['port']}"
    if carrier["transport"] == "tcp":
        contact += ";transport=tcp"
    return [
        ("aor", name, [("contact", contact), ("qualify_frequency", "0")]),
        ("endpoint", name, [("context", "pbx-from-carrier"), ("aors", name),
                            ("disallow", "all"), ("allow", "ulaw,alaw"),
                            ("direct_media", "no"), ("rtp_symmetric", "yes"),
                            ("send_pai", "yes"), ("trust_id_outbound", "yes"),
                            ("allow_transfer", "no")]),
        ("identify", name, [("endpoint", name), ("match", host)]),
    ]


def carrier_fingerprint(carrier: Mapping[str, Any]) -> str:
    """What the node keeps of a carrier it was given: a digest of its objects, so that any
    change of them, a new option of this release's included, has it pushed again."""
    data = json.dumps(carrier_objects(carrier), separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def admitted_call(answer: Mapping[str, str]) -> uuid.UUID | None:
    """The call an admission's answer admitted, if it admitted one."""
    if answer.get("PBX_DECISION") != "admit":
        return None
    try:
        return uuid.UUID(answer.get("PBX_CALL", ""))
    except ValueError:
        return None


class CallControl:
    def __init__(self, pool: asyncpg.Pool, node_id: int, node_name: str, ami: AmiSession,
                 ari: AriClient, dsn: str, config: CallControlConfig,
                 agi_token: str = "") -> None:
        self.pool, self.node_id, self.node_name = pool, node_id, node_name
        self.ami, self.ari, self.dsn, self.config = ami, ari, dsn, config
        self.admission = Admission(pool, lease=config.lease, ahead=config.ahead,
                                   on_unsure=self._on_unsure)
        self.agi = FastAgiServer({"admit": self._admit, "answer": self._answer},
                                 on_timeout=self._on_timeout,
                                 on_abandoned=self._on_abandoned,
                                 on_hung_up=self._on_hung_up,
                                 handler_timeout=config.decision_timeout, token=agi_token)
        self.agi_url = ""
        self.carriers_dirty = asyncio.Event()
        self.hangups: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.decisions = 0
        self.cdrs_imported = 0
        self.cdr_process: asyncio.subprocess.Process | None = None  # the running one, if any
        self._answering: set[asyncio.Task[Any]] = set()
        # new ends the node has not taken yet (AMI away, or an error reply), by channel
        # new ends the node did not take, by call (a channel's name may be two calls')
        self._unmoved: dict[str, lifecycle.Extension] = {}
        self.answers_lost = False  # an answer was not recorded: ask the node for it

    # -- life ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        port = await self.agi.start(self.config.agi_host, self.config.agi_port)
        where = f"agi://{self.config.agi_advertise or self.config.agi_host}:{port}"
        # the node's dialplan calls ${PBX_AGI}/admit: the token goes with the address
        self.agi_url = f"{where}/{self.agi.token}" if self.agi.token else where
        log.info("node %s: FastAGI admission at %s", self.node_name, where)
        self.ami.on_event("UserEvent", self._on_user_event)
        self.ami.on_login(self._after_login)
        if self.ami.connected.is_set():
            await self._after_login()
        loops = [self._extend_loop(stop), self._lease_loop(stop), self._listen(stop),
                 self._carrier_loop(stop), self._hangup_loop(stop)]
        if self.config.cdr_file is not None:
            loops.append(self._cdr_process(stop) if self.config.cdr_import == "process"
                         else self.import_cdrs(stop))
        else:
            log.warning("node %s: no CDR file (PBX_CDR_FILE): its calls are settled only when "
                        "their leases lapse, billed up to their grants, and refused calls leave "
                        "no CDR", self.node_name)
        tasks = [asyncio.create_task(loop, name=f"node {self.node_name}: {loop.__name__}")
                 for loop in loops]
        for task in tasks:
            task.add_done_callback(report_failure)
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.agi.close()

    def _surviving(self, loop: str, stop: asyncio.Event,
                   expected: tuple[type[Exception], ...] = (), pause: float = 0.0
                   ) -> contextlib.AbstractAsyncContextManager[None]:
        """A turn of one of this node's loops (see `surviving`)."""
        return surviving(f"node {self.node_name}: {loop}", stop, expected, pause)

    async def _after_login(self) -> None:
        """The node's dialplan finds admission through globals: set them on every login."""
        given = True
        for name, value in (("PBX_AGI", self.agi_url),
                            ("PBX_ADMISSION_FAIL", self.config.fail_policy)):
            reply = await self.ami.action({"Action": "Setvar", "Variable": name, "Value": value})
            given = given and isinstance(reply, Mapping) and reply.get("Response") == "Success"
        if given:  # from now on, requests without the token are refused
            self.agi.token_given = True
        else:
            log.warning("node %s: the node refused Setvar of PBX_AGI or PBX_ADMISSION_FAIL"
                        " (does the AMI user have the 'call' write permission?): FastAGI"
                        " requests without the token are still answered", self.node_name)
        self.carriers_dirty.set()
        self._in_background(self.resync_answers())

    async def resync_answers(self) -> int:
        """Answers the node raised while this agent was not listening (its AMI link down,
        or itself restarting) are not lost: for every call of the node with a grant and no
        answer, the caller's channel says whether and when it was answered (its CDR's
        answer time) and by whom (BRIDGEPEER). Returns the answers recovered."""
        try:
            async with self.pool.acquire() as conn:
                calls = await conn.fetch(store.UNANSWERED_SQL, self.node_id)
        except DB_ERRORS as exc:
            log.warning("node %s: answers not resynchronised (%s)", self.node_name,
                        describe(exc))
            return 0
        recovered = 0
        for call in calls:
            try:
                if not await self._is_call(call["channel_name"], call["channel"]):
                    continue  # gone (its CDR will come), or the name is a newer call's
                answer = await self._channel_var(call["channel_name"], "CDR(answer,u)")
                at = float(answer or 0)
                if at <= 0:
                    continue  # still ringing (its event will come), or gone (its CDR will)
                peer = await self._channel_var(call["channel_name"], "BRIDGEPEER") or ""
                async with self.pool.acquire() as conn:
                    recovered += await store.answered_at(
                        conn, call["id"], peer, datetime.fromtimestamp(at, UTC),
                        self.config.lease)
            except (AmiUnavailable, ValueError, OverflowError, *DB_ERRORS) as exc:
                log.warning("node %s: answer of %s not resynchronised (%s)", self.node_name,
                            call["id"], describe(exc))
        if recovered:
            log.info("node %s: %d answers recovered after the AMI link came back",
                     self.node_name, recovered)
        return recovered

    async def _is_call(self, channel_name: str, uniqueid: str) -> bool:
        """Whether the node's channel of that name is the call's (its unique id): after a
        node restart a name may be a newer call's (chan_pjsip's counter starts again)."""
        if not uniqueid or not CHANNEL_NAME.fullmatch(channel_name):
            return False
        return await self._channel_var(channel_name, "UNIQUEID") == uniqueid

    async def _channel_var(self, channel: str, name: str) -> str | None:
        reply = await self.ami.action({"Action": "Getvar", "Channel": channel,
                                       "Variable": name})
        if not isinstance(reply, Mapping) or reply.get("Response") != "Success":
            return None
        value = reply.get("Value")
        return None if value in (None, "", "(null)") else str(value)

    # -- FastAGI ------------------------------------------------------------------------
    async def _admit(self, req: AgiRequest) -> Mapping[str, str]:
        args = list(req.args) + [""] * 4
        tenant, direction, dialled, caller = args[:4]
        request = CallRequest(
            node_id=self.node_id, direction=direction, dialled=dialled, caller=caller,
            caller_number=req.env.get("agi_callerid", ""),
            tenant_id=int(tenant) if tenant.isdigit() else None,
            channel=req.uniqueid, channel_name=req.channel)
        if direction not in ("internal", "external", "inbound"):
            return Decision(False, 404, "unknown_direction").channel_variables()
        try:
            decision = await self.admission.decide(request)
        except DB_ERRORS as exc:
            log.warning("node %s: admission failed (%s): policy %s", self.node_name,
                        describe(exc), self.config.fail_policy)
            decision = unavailable(self.config.fail_policy)
        self.decisions += 1
        return decision.channel_variables()

    def _on_timeout(self, req: AgiRequest) -> Mapping[str, str]:
        if req.script == "admit":
            return unavailable(self.config.fail_policy).channel_variables()
        return {}

    def _on_abandoned(self, req: AgiRequest, task: asyncio.Task[Mapping[str, str]]) -> None:
        """The node was answered by policy while the decision went on: it is cancelled (a
        decision still waiting for a connection then never runs), and one whose admission
        statement was on its way, which may commit all the same, is undone once it ends,
        since its call will never ring."""
        call_id = self.admission.admitting.get(req.uniqueid) if req.script == "admit" else None
        task.cancel()
        task.add_done_callback(lambda done: self._after_abandoned(done, call_id))

    def _after_abandoned(self, task: asyncio.Task[Mapping[str, str]],
                         call_id: uuid.UUID | None) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("node %s: a decision given up on failed", self.node_name, exc_info=exc)
        elif call_id is None and not task.cancelled():
            # it admitted the call as its time ran out, in the same turn of the event loop
            call_id = admitted_call(task.result())
        if call_id is not None:
            self._in_background(self._release_abandoned(
                call_id, "was admitted after its node was answered by policy"))

    def _on_hung_up(self, req: AgiRequest, answer: Mapping[str, str]) -> None:
        """The caller hung up while its call was admitted: the call will never ring, and
        what it took is given back now rather than when its lease lapses (its node's CDR
        cannot say which call it was: the dialplan stopped before recording it)."""
        call_id = admitted_call(answer) if req.script == "admit" else None
        if call_id is not None:
            self._in_background(self._release_abandoned(
                call_id, "was left by its caller while it was admitted", quiet=True))

    def _on_unsure(self, call_id: uuid.UUID) -> None:
        """An admission failed after its statement was sent: the node is answered by policy,
        and the call, if it was admitted all the same, is undone."""
        self._in_background(self._release_abandoned(
            call_id, "was admitted although its admission failed"))

    async def _release_abandoned(self, call_id: uuid.UUID, why: str, *,
                                 quiet: bool = False) -> None:
        """Give back the slots and reservation of a call that will never ring; `quiet`: a
        release is part of normal traffic, logged only at debug level."""
        try:
            async with self.pool.acquire(timeout=self.config.lease) as conn:
                released = await store.release_abandoned(conn, call_id,
                                                         timeout=self.config.lease)
        except DB_ERRORS as exc:
            log.warning("node %s: call %s, which %s, not released (%s): its lease will "
                        "release it", self.node_name, call_id, why,
                        describe(exc, self.config.lease))
            return
        if released:
            log.log(logging.DEBUG if quiet else logging.WARNING, "node %s: call %s %s; "
                    "released", self.node_name, call_id, why)

    async def _answer(self, req: AgiRequest) -> Mapping[str, str]:
        call = req.args[0] if req.args else ""
        grant = await self._record_answer(call, req.channel)
        # the channel says whose it is, as pbx-answered has it say (see _move_end)
        return {} if grant is None else {"TIMEOUT(absolute)": f"{grant:.3f}",
                                         "PBX_ANSWERED": call}

    def _on_user_event(self, manager: Any, event: Any) -> None:
        if event.get("UserEvent") != "PbxAnswered":
            return
        self._in_background(self._record_answer(event.get("PbxCall") or "",
                                                event.get("PbxChannel") or "",
                                                event_time(event.get("Timestamp"))))

    def _in_background(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` beside the caller (an AMI callback, which must not wait), keeping a
        reference until it ends."""
        task = asyncio.ensure_future(work)
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _record_answer(self, call: str, channel: str,
                             at: datetime | None = None) -> int | None:
        """The call was answered on `channel` (at `at`, the node's time of its event, which
        lets the answer wait a moment to be recorded with others; None: now, at once).
        Returns the seconds granted (None: unlimited, unknown, or already answered)."""
        try:
            call_id = uuid.UUID(call)
        except ValueError:
            return None
        try:
            return await self.admission.answer(call_id, channel, at, urgent=at is None)
        except BatchCancelled:
            # stopping while the answer waited for others: the next start asks the node
            # about its calls still unanswered (resync_answers)
            log.info("node %s: answer of %s left for the next start", self.node_name, call_id)
            return None
        except DB_ERRORS as exc:
            # The end set from the admission's grant stays: the call is still cut on time,
            # unless the answer is recovered from the node before (resync_answers, at the
            # next lease renewal), and the call gets more time as usual.
            log.warning("node %s: answer of %s not recorded (%s): asked again of the node",
                        self.node_name, call_id, describe(exc))
            self.answers_lost = True
            return None

    # -- granted time ---------------------------------------------------------------------
    async def _extend_loop(self, stop: asyncio.Event) -> None:
        last_retry = 0.0
        while not stop.is_set():
            # no link to the node, no end to move: nothing is reserved that it would not get
            async with self._surviving("extending calls", stop, DB_ERRORS):
                if self.ami.connected.is_set():
                    for unmoved in list(self._unmoved.values()):
                        await self._move_end(unmoved)
                    retry = time.monotonic() - last_retry >= lifecycle.EXHAUSTED_RETRY
                    if retry:
                        last_retry = time.monotonic()
                    await lifecycle.extend_due(self.pool, self.node_id, self.config.lead,
                                               self.config.lease, self._move_end,
                                               self.config.ahead, exhausted_too=retry)
            await wait_or_stop(stop, self.config.tick)

    async def _move_end(self, moved: lifecycle.Extension) -> None:
        """Tell the node a call's new end. One it does not take is tried again every tick
        until it does, the call is gone, or the new end itself has passed.

        Only on the call's own channel: after a node restart the name may be a newer call's
        (chan_pjsip's counter starts again), whose end must stay its own grant's."""
        channel = moved.callee_channel
        if not channel:
            return
        if self._too_late(moved) or not CHANNEL_NAME.fullmatch(channel):
            self._unmoved.pop(moved.call, None)
            return
        try:
            answer = await self._asked(channel, {"Action": "Getvar", "Channel": channel,
                                                 "Variable": "PBX_ANSWERED"}, moved)
            if answer is None:
                return
            owner = answer.get("Value")
            if owner != moved.call:
                self._unmoved.pop(moved.call, None)
                log.warning("node %s: %s is now another call's channel (%s); the end of call "
                            "%s is not moved", self.node_name, channel, owner or "none",
                            moved.call)
                return
            if self._too_late(moved):  # time went by while the node was asked
                self._unmoved.pop(moved.call, None)
                return
            # never below a millisecond: TIMEOUT(absolute)=0 would take the call's end away
            await self._asked(channel, {"Action": "Setvar", "Channel": channel,
                                        "Variable": "TIMEOUT(absolute)",
                                        "Value": f"{max(moved.left_now(), 0.001):.3f}"},
                              moved, last=True)
        except AmiUnavailable as exc:
            self._unmoved[moved.call] = moved
            log.warning("node %s: could not move the end of %s (will try again): %s",
                        self.node_name, channel, describe(exc))

    def _too_late(self, moved: lifecycle.Extension) -> bool:
        """Whether the new end comes after the old one passed: the node ended the call."""
        if moved.left_now() >= 0.001:
            return False
        log.warning("node %s: the end of %s could not be moved in time", self.node_name,
                    moved.callee_channel)
        return True

    async def _asked(self, channel: str, action: dict[str, str], moved: lifecycle.Extension,
                     last: bool = False) -> Mapping[str, Any] | None:
        """One step of moving an end: its successful reply, else None, the call then gone
        (forgotten) or the node refusing (tried again next tick)."""
        reply = await self.ami.action(action)
        answer = reply if isinstance(reply, Mapping) else {}
        if answer.get("Response") == "Success":
            if last:
                self._unmoved.pop(moved.call, None)
            return answer
        if "no such channel" in str(answer.get("Message", "")).lower():
            self._unmoved.pop(moved.call, None)  # the call ended meanwhile
        else:
            self._unmoved[moved.call] = moved
            log.warning("node %s: the node refused to move the end of %s (will try again): "
                        "%s", self.node_name, channel, answer.get("Message", "no answer"))
        return None

    # -- leases ---------------------------------------------------------------------------
    async def channels(self) -> list[str]:
        """The unique ids of the node's channels. A reply that is not a whole listing (an
        error, or one cut short) raises AmiUnavailable: read as "no channels", it would let
        the leases of calls still talking lapse."""
        replies = await self.ami.action({"Action": "CoreShowChannels"}, timeout=10)
        messages = replies if isinstance(replies, list) else [replies]
        listed = [m["Uniqueid"] for m in messages
                  if m.get("Event") == "CoreShowChannel" and m.get("Uniqueid")]
        ends = [m for m in messages if m.get("Event") == "CoreShowChannelsComplete"]
        if not ends or str(ends[-1].get("ListItems", len(listed))) != str(len(listed)):
            first = messages[0] if messages else {}
            raise AmiUnavailable(f"CoreShowChannels answered no whole listing: "
                                 f"{first.get('Message') or first.get('Response') or 'nothing'}")
        return listed

    async def _lease_loop(self, stop: asyncio.Event) -> None:
        sweeps = lifecycle.LeaseSweep(self.pool)
        unseen_since: float | None = None  # when the node's channels were last listable
        while not stop.is_set():
            async with self._surviving("lease renewal", stop, (AmiUnavailable, *DB_ERRORS)):
                try:
                    live = await self._listed_channels()
                    if live is not None:
                        async with self.pool.acquire() as conn:
                            await store.renew_leases(conn, self.node_id, live,
                                                     self.config.lease)
                            if unseen_since is not None:  # seen again: vouched-for calls
                                await store.end_vouching(conn, self.node_id, live,  # gone
                                                         LISTING_LAG)
                            # hang-ups asked while no agent heard (or AMI failed) again
                            for name, uniqueid in await store.hangups_asked(
                                    conn, self.node_id, HANGUP_AGAIN, live):
                                self.hangups.put_nowait({"channel_name": name,
                                                         "channel": uniqueid})
                        unseen_since = None
                        if self.answers_lost:
                            self.answers_lost = False
                            self._in_background(self.resync_answers())
                    else:
                        unseen_since = unseen_since or time.monotonic()
                        await self._vouch_unseen(time.monotonic() - unseen_since)
                except DB_ERRORS:
                    sweeps.failed()
                    raise
                await sweeps.run()
            await wait_or_stop(stop, self.config.lease_every)

    async def _listed_channels(self) -> list[str] | None:
        """The node's channels; None when they cannot be listed (no link, or a link that
        does not answer)."""
        if not self.ami.connected.is_set():
            return None
        try:
            return await self.channels()
        except AmiUnavailable as exc:
            log.warning("node %s: channels not listed (%s)", self.node_name, describe(exc))
            return None

    async def _live_channels(self) -> set[str] | None:
        listed = await self._listed_channels()
        return set(listed) if listed is not None else None

    async def _vouch_unseen(self, unseen_for: float) -> None:
        """The AMI link is down but the node may well be up, its calls talking: they keep
        their slots, and are billed from the node's CDRs, until they must have ended."""
        async with self.pool.acquire() as conn:
            await store.vouch_unseen(conn, self.node_id, self.config.lease,
                                     unlimited_for=UNSEEN_UNLIMITED - unseen_for,
                                     ringing_for=RING_SECONDS, cut_slack=lifecycle.CUT_TOLERANCE)

    # -- CDRs -----------------------------------------------------------------------------
    async def import_cdrs(self, stop: asyncio.Event) -> None:
        """Import the node's CDR file until `stop`: in this process's event loop."""
        assert self.config.cdr_file is not None
        cdrs = lifecycle.CdrImport(self.pool, self.node_id, self.config.cdr_file,
                                   live_channels=self._live_channels)
        while not stop.is_set():
            async with self._surviving("CDR import", stop, DB_ERRORS):
                self.cdrs_imported += await cdrs.run()
            await wait_or_stop(stop, self.config.cdr_every)

    def cdr_process_command(self) -> tuple[list[str], dict[str, str]]:
        """The child process that imports the node's CDR file, and its environment: this
        process's, with the database, the file and the priority it gets."""
        assert self.config.cdr_file is not None
        env = {**os.environ, "PBX_DSN": self.dsn, "PBX_CDR_FILE": str(self.config.cdr_file),
               "PBX_CDR_IMPORT_NICE": str(self.config.cdr_import_nice),
               "PBX_AGENT_PID": str(os.getpid())}
        return [sys.executable, "-m", "controlplane.cli", "agent", "--node", self.node_name,
                "--role", "cdrs"], env

    async def _cdr_process(self, stop: asyncio.Event) -> None:
        """The CDR import in a child process (see the module), started again when it ends
        (after a pause that grows while it keeps ending early), ended with this loop. What
        it settled is in the database; a line it read but did not settle is read again."""
        command, env = self.cdr_process_command()
        pause = CDR_PROCESS_PAUSE
        while not stop.is_set():
            started = time.monotonic()
            child = await asyncio.create_subprocess_exec(*command, env=env,
                                                         stdin=asyncio.subprocess.DEVNULL)
            self.cdr_process = child
            log.info("node %s: CDR import in process %s", self.node_name, child.pid)
            try:
                ended = asyncio.ensure_future(child.wait())
                stopping = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({ended, stopping}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
                    ended.cancel()
            finally:
                if child.returncode is None:
                    await _end_process(child)
                self.cdr_process = None
            if stop.is_set():
                return
            pause = CDR_PROCESS_PAUSE if time.monotonic() - started > CDR_PROCESS_PAUSE_MAX \
                else min(pause * 2, CDR_PROCESS_PAUSE_MAX)
            log.error("node %s: the CDR import process %s ended (exit status %s): started "
                      "again in %.0f s", self.node_name, child.pid, child.returncode, pause)
            await wait_or_stop(stop, pause)

    # -- carriers -------------------------------------------------------------------------
    async def _carrier_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.carriers_dirty.wait()
            self.carriers_dirty.clear()
            if stop.is_set():
                return
            async with self._surviving("carrier sync", stop, (AmiUnavailable, AriError,
                                                              *DB_ERRORS), pause=2.0):
                await self.sync_carriers()
                continue
            self.carriers_dirty.set()  # not synced: again

    async def sync_carriers(self) -> None:
        if not self.ami.connected.is_set():
            return
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT id, host, port, transport FROM carriers"
                                    " WHERE node_id = $1 AND active", self.node_id)
        want = {str(r["id"]): r for r in rows}
        have = await self._carrier_markers()
        for key, row in want.items():
            if have.get(key) != carrier_fingerprint(row):
                for object_type, object_id, fields in carrier_objects(row):
                    await self.ari.put_object("res_pjsip", object_type, object_id, fields)
                await self.ami.action({"Action": "DBPut", "Family": CARRIER_FAMILY, "Key": key,
                                       "Val": carrier_fingerprint(row)})
        for key in set(have) - set(want):
            for object_type in ("identify", "endpoint", "aor"):
                await self.ari.delete_object("res_pjsip", object_type, f"carrier-{key}")
            await self.ami.action({"Action": "DBDel", "Family": CARRIER_FAMILY, "Key": key})

    async def _carrier_markers(self) -> dict[str, str]:
        replies = await self.ami.action({"Action": "DBGetTree", "Family": CARRIER_FAMILY})
        out = {}
        for msg in replies if isinstance(replies, list) else [replies]:
            if msg.get("Event") == "DBGetTreeResponse":
                out[msg["Key"][len(CARRIER_FAMILY) + 2:]] = msg["Val"]
        return out

    # -- notifications ----------------------------------------------------------------------
    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if event.get("node_id") != self.node_id:
            return
        if channel == CALLS_CHANNEL:
            self.hangups.put_nowait(event)
        elif event.get("kind") == "carrier":
            self.carriers_dirty.set()

    async def _listen(self, stop: asyncio.Event) -> None:
        async def resync() -> None:
            self.carriers_dirty.set()

        while not stop.is_set():
            async with self._surviving("listening for hangups and carriers", stop):
                await listen_forever(self.dsn, [CALLS_CHANNEL, "pbx_changes"], self._notified,
                                     stop, on_connect=resync,
                                     what=f"node {self.node_name} call control")

    async def _hangup_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            event = await self.hangups.get()
            channel = event.get("channel_name")
            if not isinstance(channel, str) or not CHANNEL_NAME.fullmatch(channel):
                continue  # none, or not one Asterisk made (admission stores no other)
            async with self._surviving(f"hangup of {channel}", stop, (AmiUnavailable,)):
                # only the call asked for, never a newer one that took its channel's name
                if await self._is_call(channel, str(event.get("channel") or "")):
                    await self.ami.action({"Action": "Hangup", "Channel": channel,
                                           "Cause": "16"})


# The CDR import process is started again this long after it ended; twice as long each time
# it ended within the longest pause of the last start.
CDR_PROCESS_PAUSE = 1.0
CDR_PROCESS_PAUSE_MAX = 30.0
CDR_PROCESS_END = 10.0  # seconds it has to finish its batch once asked to end


async def _end_process(child: asyncio.subprocess.Process) -> None:
    """Ask a child process to end (SIGTERM), and kill it if it has not within
    CDR_PROCESS_END seconds; returns once it has ended."""
    with contextlib.suppress(ProcessLookupError):
        child.terminate()
    try:
        await asyncio.wait_for(child.wait(), CDR_PROCESS_END)
    except TimeoutError:
        log.error("process %s did not end within %.0f s of SIGTERM: killed", child.pid,
                  CDR_PROCESS_END)
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()


def event_time(stamp: Any) -> datetime | None:
    """The time an AMI event was raised (its Timestamp, `timestampevents` in manager.conf);
    None when it has none or an unreadable one."""
    try:
        value = float(stamp)
    except (TypeError, ValueError):
        return None
    if not 0 < value < 2**33:  # also NaN and infinities
        return None
    return datetime.fromtimestamp(value, UTC)


def describe(exc: BaseException, timeout: float | None = None) -> str:
    """What failed, for a log line: asyncpg and asyncio raise TimeoutError with no text."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError) and timeout is not None:
        text += f" (no answer within {timeout:g} s)"
    return text


@contextlib.asynccontextmanager
async def surviving(what: str, stop: asyncio.Event, expected: tuple[type[Exception], ...] = (),
                    pause: float = 0.0, timeout: float | None = None) -> AsyncIterator[None]:
    """One turn of a background loop that no error ends: an `expected` one (the database or
    the node away) is logged in a line and followed by `pause` seconds, any other with its
    traceback and UNEXPECTED_PAUSE, and the loop goes on. `timeout`: the one its outside
    calls have, named when one of them ran out."""
    try:
        yield
    except Exception as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Cancelled mid-call, and the cleanup raised instead (asyncpg's release of a
            # connection whose query was cancelled can): the cancellation wins.
            raise asyncio.CancelledError() from exc
        if not isinstance(exc, expected):
            log.exception("%s failed on an unexpected error; going on in %g s", what,
                          UNEXPECTED_PAUSE)
            await wait_or_stop(stop, UNEXPECTED_PAUSE)
            return
        log.warning("%s failed: %s", what, describe(exc, timeout))
        if pause:
            await wait_or_stop(stop, pause)


def report_failure(task: asyncio.Task[Any]) -> None:
    """Done callback of a long-running task: one that ends on an error says so at once,
    instead of being gathered, and dropped, at shutdown."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s ended on an error", task.get_name(), exc_info=exc)


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less when `stop` is set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
