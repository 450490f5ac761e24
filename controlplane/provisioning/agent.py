"""The agent that drives one Asterisk node: desired state in PostgreSQL -> the node.

- Each extension is three PJSIP objects pushed through ARI into the node's astdb, plus two
  astdb keys pushed over AMI: its number in the tenant's map (`pbx-ext/<tenant>/<number>`)
  and a marker (`pbx-fp/<code>` = fingerprint:tenant:number). Applying one change therefore
  costs the same on an empty node and on one with 50,000 extensions, and needs no reload.
- Tenant dialplans and the node's transports are files; a burst of changes costs one reload.
- Every AMI login (first start, reconnect, node restart) reconciles the whole node: the
  markers say what the node holds, the database says what it should hold.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from controlplane.asterisk.ami import EVENT_CLASSES, AmiSession, AmiUnavailable
from controlplane.asterisk.ari import AriClient, AriError
from controlplane.asterisk.fastagi import node_token
from controlplane.calls.node_control import CallControl, CallControlConfig
from controlplane.db.listen import listen_forever
from controlplane.provisioning import desired
from controlplane.provisioning.desired import NodeRecord
from controlplane.provisioning.registrations import RegistrationTracker
from controlplane.provisioning.render import (
    ExtensionState,
    UnsafeValue,
    render_tenant_dialplan,
    render_transports,
    transports_for,
)

log = logging.getLogger(__name__)

FP_FAMILY = "pbx-fp"
# Memory caches in front of the astdb (asterisk-conf/sorcery.conf), per object type.
CACHES = {"endpoint": "res_pjsip_endpoint", "auth": "res_pjsip_auth", "aor": "res_pjsip_aor"}
# Account codes read and pushed per step of an incremental apply.
APPLY_SLICE = 1000
EXT_FAMILY = "pbx-ext"
CHANNEL = "pbx_changes"


@dataclass(frozen=True)
class Marker:
    fingerprint: str
    tenant_id: int
    number: str

    @classmethod
    def parse(cls, value: str) -> Marker | None:
        parts = value.split(":")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2])

    def __str__(self) -> str:
        return f"{self.fingerprint}:{self.tenant_id}:{self.number}"


@dataclass
class Pending:
    codes: set[str] = field(default_factory=set)
    tenants: set[int] = field(default_factory=set)
    full: bool = True  # the first pass is always a full reconcile

    def take(self) -> Pending:
        taken = Pending(self.codes, self.tenants, self.full)
        self.codes, self.tenants, self.full = set(), set(), False
        return taken


# What one agent process does for its node: everything, or one half, so that call control
# (FastAGI decisions, grants, leases, CDR import) runs in a process of its own and never
# waits for provisioning's work (a full reconcile of a big node keeps a process busy for
# minutes). Run one "nodes" and one "calls" agent per node for that. "cdrs": the node's CDR
# import alone, the process an "all" or "calls" agent starts for it (PBX_CDR_IMPORT).
ROLES = ("all", "nodes", "calls", "cdrs")


class NodeAgent:
    def __init__(self, pool: asyncpg.Pool, node: NodeRecord, tenant_dir: Path, *,
                 dsn: str, debounce: float = 0.25, concurrency: int = 16,
                 manage_interface: str | None = None, timeout: float = 5.0,
                 calls: CallControlConfig | None = None, role: str = "all") -> None:
        if role not in ROLES:
            raise ValueError(f"an agent's role is one of {', '.join(ROLES)}, not {role!r}")
        self.role = role
        self.pool, self.node, self.dsn = pool, node, dsn
        self.tenant_dir = tenant_dir
        self.debounce, self.concurrency, self.timeout = debounce, concurrency, timeout
        self.manage_interface = manage_interface
        # the CDR import only lists the node's channels: it asks for no events
        self.ami = AmiSession(node.ami_host, node.ami_port, node.ami_username, node.ami_secret,
                              timeout=timeout, name=f"node {node.name}",
                              events="off" if role == "cdrs" else EVENT_CLASSES)
        self.ari = AriClient(node.ari_url, node.ari_username, node.ari_password,
                             timeout=timeout, concurrency=concurrency)
        self.markers: dict[str, Marker] = {}
        self.numbers: dict[tuple[int, str], str] = {}
        self.transports: set[str] = set()
        self.pending = Pending()
        self.wake = asyncio.Event()
        self.dialplan_dirty = asyncio.Event()
        self.dialplan_loaded = asyncio.Event()  # no dialplan file is newer than the node's
        self.registrations = RegistrationTracker(pool, node.id, self.ami)
        # Call control shares the node's AMI and ARI links (one login, one resync).
        self.calls = CallControl(pool, node.id, node.name, self.ami, self.ari, dsn,
                                 calls or CallControlConfig(),
                                 agi_token=node_token(node.ami_secret, node.name))
        self.applied = 0
        self.reconciles = 0
        self.idle = asyncio.Event()
        self.barriers: dict[str, asyncio.Event] = {}

    # -- life ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        jobs = [self.ami.run(stop)]
        if self.role == "cdrs":
            jobs.append(self.calls.import_cdrs(stop))
        elif self.role != "calls":
            self.ami.on_login(self._after_login)
            self.registrations.attach()
            jobs += [self._listen(stop), self._work(stop), self._flush_dialplan(stop)]
        if self.role in ("all", "calls"):
            jobs.append(self.calls.run(stop))
        async with self.ari:
            tasks = [asyncio.create_task(c) for c in jobs]
            await stop.wait()
            self.wake.set()
            self.dialplan_dirty.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _after_login(self) -> None:
        self.pending.full = True
        self.wake.set()
        await self.registrations.resync()

    # -- change notifications -----------------------------------------------------------
    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            change = json.loads(payload)
        except ValueError:
            return
        mine = self.node.id
        if mine not in (change.get("node_id"), change.get("old_node_id")) and \
                change.get("node_id") is not None:
            return
        kind = change.get("kind")
        if kind == "barrier":  # see caught_up(): changes nothing
            heard = self.barriers.get(str(change.get("token")))
            if heard is not None:
                heard.set()
            return
        if kind == "extension":
            self.pending.codes.update(change.get("account_codes") or [])
        elif kind == "tenant":
            self.pending.tenants.add(int(change["id"]))
        else:  # dealers shape transports: rare, so reconcile everything
            self.pending.full = True
        self.idle.clear()
        self.wake.set()

    async def _listen(self, stop: asyncio.Event) -> None:
        """LISTEN on a dedicated connection; after any gap, reconcile everything."""
        async def missed_some() -> None:
            self.pending.full = True  # changes may have been missed while not listening
            self.wake.set()

        await listen_forever(self.dsn, [CHANNEL], self._notified, stop, on_connect=missed_some,
                             what=f"node {self.node.name}", timeout=self.timeout)

    # -- applying -----------------------------------------------------------------------
    async def _work(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            await self.wake.wait()
            self.wake.clear()
            if stop.is_set():
                return
            if not self.ami.connected.is_set():
                continue  # the next login reconciles
            work = self.pending.take()
            try:
                if work.full:
                    await self.reconcile()
                else:
                    await self._apply(work)
                failures = 0
            except (AmiUnavailable, AriError, OSError, asyncpg.PostgresError,
                    asyncpg.InterfaceError, TimeoutError) as exc:
                failures += 1
                log.warning("node %s: applying changes failed (%r); will reconcile",
                            self.node.name, exc)
                self.pending.full = True
                await self._note_error(str(exc))
                await asyncio.sleep(min(0.5 * 2 ** failures, 15))
                self.wake.set()
                continue
            if not self.wake.is_set() and not self.pending.codes and not self.pending.tenants \
                    and not self.pending.full:
                self.idle.set()

    async def _apply(self, work: Pending) -> None:
        codes = set(work.codes)
        tenants: dict[int, desired.TenantState] = {}
        if work.tenants:
            async with self.pool.acquire() as conn:
                codes |= {c for c, m in self.markers.items() if m.tenant_id in work.tenants}
                rows = await conn.fetch(
                    "SELECT account_code FROM extensions WHERE tenant_id = ANY ($1::bigint[])",
                    list(work.tenants))
                codes |= {r["account_code"] for r in rows}
                tenants = await desired.tenants(conn, self.node.id)
        # In slices: a bulk creation leaves tens of thousands of codes pending, and one query
        # for all of them can outlast the database timeout on a busy machine. Number swaps
        # across slices end right: a number is unmapped only while it still maps to its code.
        ordered = sorted(codes)
        for start in range(0, len(ordered), APPLY_SLICE):
            chunk = ordered[start:start + APPLY_SLICE]
            async with self.pool.acquire() as conn:
                want = await desired.extensions(conn, self.node.id, self.transports, chunk)
            await self._converge(chunk, want)
        if work.tenants:
            changed = False
            for tid in work.tenants:
                changed |= self._write_dialplan(tid, tenants.get(tid))
            if changed:
                self.dialplan_loaded.clear()
                self.dialplan_dirty.set()

    async def _converge(self, codes: Iterable[str], want: dict[str, ExtensionState]) -> None:
        """Make the node match `want` for these account codes."""
        removals = [c for c in codes if c not in want and c in self.markers]
        changes = []
        for c in codes:
            if c in want and str(self.markers.get(c)) != want[c].marker:
                try:
                    want[c].check()
                except UnsafeValue as exc:  # written around the API: not pushed, not fatal
                    log.error("node %s: extension %s not pushed: %s", self.node.name, c, exc)
                    continue
                changes.append(want[c])
        sem = asyncio.Semaphore(self.concurrency)

        async def bounded(coro: Any) -> None:
            async with sem:
                await coro

        # Unmap numbers first so a swap of two numbers inside one batch ends right.
        await asyncio.gather(*(bounded(self._remove(c)) for c in removals))
        for state in changes:
            old = self.markers.get(state.account_code)
            if old is not None and (old.tenant_id, old.number) != (state.tenant_id, state.number):
                await self._unmap(old, state.account_code)
        await asyncio.gather(*(bounded(self._push(s)) for s in changes))
        self.applied += len(removals) + len(changes)

    async def _push(self, state: ExtensionState) -> None:
        on_node = state.account_code in self.markers
        for object_type, object_id, fields in state.objects():
            if object_type == "endpoint" and on_node:
                # ARI updates an object by copying the one it retrieves field by field, and an
                # endpoint's set_var values do not survive that copy: the update of a cached
                # endpoint fails ("Allocation failed", 500). One loaded from the astdb has
                # none (the astdb wizard drops them), so drop the cached one first.
                await self._expire_cached(object_type, object_id)
            try:
                await self.ari.put_object("res_pjsip", object_type, object_id, fields)
            except AriError as exc:
                if "Cannot update" not in str(exc):
                    raise
                # The cache still holds an object the astdb lost: forget it and create anew.
                await self._expire_cached(object_type, object_id)
                await self.ari.put_object("res_pjsip", object_type, object_id, fields)
        key = (state.tenant_id, state.number)
        await self._db_put(f"{EXT_FAMILY}/{state.tenant_id}", state.number, state.account_code)
        self.numbers[key] = state.account_code
        await self._db_put(FP_FAMILY, state.account_code, state.marker)
        self.markers[state.account_code] = Marker.parse(state.marker)  # type: ignore[assignment]

    async def _remove(self, code: str) -> None:
        for object_type in ("endpoint", "aor", "auth"):
            await self.ari.delete_object("res_pjsip", object_type, code)
        marker = self.markers.get(code)
        if marker is not None:
            await self._unmap(marker, code)
        await self._db_del(FP_FAMILY, code)
        self.markers.pop(code, None)
        await self.registrations.forget(code)

    async def _unmap(self, marker: Marker, code: str) -> None:
        key = (marker.tenant_id, marker.number)
        if self.numbers.get(key) == code:
            await self._db_del(f"{EXT_FAMILY}/{marker.tenant_id}", marker.number)
            self.numbers.pop(key, None)

    async def _expire_cached(self, object_type: str, object_id: str | None = None) -> None:
        action = {"Action": "SorceryMemoryCacheExpire", "Cache": CACHES[object_type]}
        if object_id is not None:
            action = {"Action": "SorceryMemoryCacheExpireObject", "Cache": CACHES[object_type],
                      "Object": object_id}
        await self.ami.action(action)

    async def _db_put(self, family: str, key: str, value: str) -> None:
        reply = await self.ami.action({"Action": "DBPut", "Family": family, "Key": key,
                                       "Val": value})
        if not reply.success:
            raise AmiUnavailable(f"DBPut {family}/{key} refused: {reply.get('Message')}")

    async def _db_del(self, family: str, key: str) -> None:
        await self.ami.action({"Action": "DBDel", "Family": family, "Key": key})

    async def _db_tree(self, family: str) -> dict[str, str]:
        replies = await self.ami.action({"Action": "DBGetTree", "Family": family},
                                        timeout=max(self.timeout, 60))
        out = {}
        for msg in replies if isinstance(replies, list) else [replies]:
            if msg.get("Event") == "DBGetTreeResponse":
                out[msg["Key"][len(family) + 2:]] = msg["Val"]
        return out

    # -- full reconcile -----------------------------------------------------------------
    async def reconcile(self) -> dict[str, int]:
        """Converge the whole node; returns what was done."""
        for object_type in CACHES:  # read the truth, not what the node cached of it
            await self._expire_cached(object_type)
        await self._reconcile_transports()
        fp = await self._db_tree(FP_FAMILY)
        self.markers = {k: m for k, v in fp.items() if (m := Marker.parse(v)) is not None}
        numbers = await self._db_tree(EXT_FAMILY)
        self.numbers = {}
        stray_numbers = []
        for key, code in numbers.items():
            tenant, _, number = key.partition("/")
            if tenant.isdigit():
                self.numbers[(int(tenant), number)] = code
            else:
                stray_numbers.append(key)
        endpoints = await self._db_tree("ps_endpoint")
        # Extensions are named by their account code (6 digits); other endpoints (carriers)
        # belong to call control.
        on_node = {name for k in endpoints
                   if len(name := k.rsplit("/", 1)[-1]) == 6 and name.isdigit()}
        async with self.pool.acquire() as conn:
            want = await desired.extensions(conn, self.node.id, self.transports)
            tenants = await desired.tenants(conn, self.node.id)
        # Objects without a marker (a push cut short) are removed, or pushed again below.
        for code in on_node - set(self.markers):
            self.markers[code] = Marker("", 0, "")
        codes = set(want) | set(self.markers)
        before = self.applied
        await self._converge(codes, want)
        # Number map entries that no extension explains.
        wanted_numbers = {(s.tenant_id, s.number): c for c, s in want.items()}
        for (tenant, number), code in list(self.numbers.items()):
            if wanted_numbers.get((tenant, number)) != code:
                await self._db_del(f"{EXT_FAMILY}/{tenant}", number)
                self.numbers.pop((tenant, number), None)
        for key in stray_numbers:
            family, _, k = key.rpartition("/")
            await self._db_del(f"{EXT_FAMILY}/{family}" if family else EXT_FAMILY, k)
        changed = self._sync_dialplans(tenants)
        # The first time, also for files a stopped agent wrote and had no time to load.
        if changed or self.reconciles == 0:
            await self._reload_dialplan()
        self.reconciles += 1
        await self._note_reconciled()
        done = {"extensions": len(want), "applied": self.applied - before,
                "dialplans_changed": changed}
        log.info("node %s reconciled: %s", self.node.name, done)
        return done

    async def _reconcile_transports(self) -> None:
        async with self.pool.acquire() as conn:
            addresses = await desired.registration_addresses(conn, self.node.id)
        transports = transports_for(addresses)
        if self.manage_interface:
            from controlplane.net.addresses import ensure_addresses

            usable = set(await asyncio.get_running_loop().run_in_executor(
                None, ensure_addresses, [t.address for t in transports], self.manage_interface))
            # a transport on an address the node does not have would not bind
            transports = [t for t in transports if t.address in usable]
        path = self.tenant_dir / "pjsip" / "transports.conf"
        if _write_if_changed(path, render_transports(transports)):
            await self.ami.command("module reload res_pjsip.so", timeout=30)
        self.transports = {t.name for t in transports}

    # -- dialplan files -----------------------------------------------------------------
    def _dialplan_path(self, tenant_id: int) -> Path:
        return self.tenant_dir / "extensions" / f"t{tenant_id}.conf"

    def _write_dialplan(self, tenant_id: int, tenant: Any) -> bool:
        path = self._dialplan_path(tenant_id)
        if tenant is None:
            if path.exists():
                path.unlink()
                return True
            return False
        return _write_if_changed(path, render_tenant_dialplan(tenant))

    def _sync_dialplans(self, tenants: dict[int, Any]) -> bool:
        changed = False
        folder = self.tenant_dir / "extensions"
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.glob("t*.conf"):
            tid = path.stem[1:]
            if not tid.isdigit() or int(tid) not in tenants:
                path.unlink()
                changed = True
        for tid, tenant in tenants.items():
            changed |= self._write_dialplan(tid, tenant)
        return changed

    async def _flush_dialplan(self, stop: asyncio.Event) -> None:
        """One `dialplan reload` per burst of tenant changes: once `debounce` seconds passed
        without another one, and at the latest 8 x `debounce` after the first."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            await self.dialplan_dirty.wait()
            deadline = loop.time() + 8 * self.debounce
            while not stop.is_set():
                self.dialplan_dirty.clear()
                quiet = min(self.debounce, deadline - loop.time())
                if quiet <= 0:
                    break
                try:
                    await asyncio.wait_for(self.dialplan_dirty.wait(), quiet)
                except TimeoutError:
                    break
            if stop.is_set():
                return
            try:
                await self._reload_dialplan()
            except AmiUnavailable as exc:
                log.warning("node %s: dialplan reload failed (%s); retrying", self.node.name,
                            exc)
                self.pending.full = True
                self.wake.set()

    async def _reload_dialplan(self) -> None:
        started = asyncio.get_running_loop().time()
        await self.ami.command("dialplan reload", timeout=60)
        if not self.dialplan_dirty.is_set():  # nothing written since it began
            self.dialplan_loaded.set()
        self.dialplan_reloads = getattr(self, "dialplan_reloads", 0) + 1
        log.info("node %s: dialplan reloaded in %.3fs", self.node.name,
                 asyncio.get_running_loop().time() - started)

    # -- bookkeeping --------------------------------------------------------------------
    async def _note_reconciled(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute("UPDATE nodes SET last_reconciled_at = now(), last_error = NULL,"
                               " status = 'online' WHERE id = $1", self.node.id)

    async def _note_error(self, message: str) -> None:
        try:
            async with self.pool.acquire() as conn:
                await conn.execute("UPDATE nodes SET last_error = $2 WHERE id = $1",
                                   self.node.id, message[:500])
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            pass

    async def caught_up(self, timeout: float = 30) -> None:
        """For tests and tools: until every change committed before this call has been
        applied. Notifications arrive in commit order, so once a barrier sent now is heard,
        every earlier change has been heard too; what remains is to wait for idle, and for
        the dialplan reload of the tenants it wrote."""
        token = secrets.token_hex(8)
        heard = self.barriers[token] = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                async with self.pool.acquire() as conn:
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, json.dumps(
                        {"kind": "barrier", "token": token, "node_id": self.node.id}))
                await heard.wait()
                await self.idle.wait()
                await self.dialplan_loaded.wait()
        finally:
            del self.barriers[token]


def _write_if_changed(path: Path, text: str) -> bool:
    """Atomic write, readable by the asterisk user; False when the content was already so."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True
