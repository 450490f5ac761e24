"""Which phones are registered where, kept in the `registrations` table.

A ContactStatus event says a contact of an AOR changed but not who registered (no user
agent, no expiry): it queues a refresh of that one endpoint (PJSIPShowEndpoint), coalesced
per account code. After every login, PJSIPShowContacts replaces the node's whole picture.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import asyncpg

from controlplane.asterisk.ami import AmiSession, AmiUnavailable

log = logging.getLogger(__name__)

Row = tuple[int, str, str, str, str, str, datetime | None]
INSERT = ("INSERT INTO registrations (node_id, account_code, uri, user_agent, via_address,"
          " status, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING")
DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


def _expiry(raw: str | None) -> datetime | None:
    if raw and raw.isdigit() and int(raw) > 0:
        return datetime.fromtimestamp(int(raw), UTC)
    return None


def _code(aor: str | None) -> str | None:
    code = (aor or "").split(";")[0]
    return code if len(code) == 6 and code.isdigit() else None


class RegistrationTracker:
    def __init__(self, pool: asyncpg.Pool, node_id: int, ami: AmiSession) -> None:
        self.pool, self.node_id, self.ami = pool, node_id, ami
        self._lock = asyncio.Lock()
        self._queued: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def attach(self) -> None:
        self.ami.on_event("ContactStatus", self._on_contact)

    def _on_contact(self, manager: Any, event: Any) -> None:
        code = _code(event.get("AOR"))
        if code is None:
            return
        self._queued.add(code)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await asyncio.sleep(0.05)  # let a burst of events for one phone arrive
        while self._queued:
            code = self._queued.pop()
            try:
                await self.refresh(code)
            except (AmiUnavailable, *DB_ERRORS) as exc:
                log.warning("could not refresh the registrations of %s: %s", code, exc)

    async def refresh(self, code: str) -> None:
        """Replace what is known of one account's contacts with what the node says."""
        replies = await self.ami.action({"Action": "PJSIPShowEndpoint", "Endpoint": code})
        rows: list[Row] = []
        for msg in replies if isinstance(replies, list) else [replies]:
            if msg.get("Event") == "ContactStatusDetail" and msg.get("URI"):
                rows.append((self.node_id, code, msg["URI"], msg.get("UserAgent") or "",
                             msg.get("ViaAddress") or "", (msg.get("Status") or "").lower(),
                             _expiry(msg.get("RegExpire"))))
        await self._replace(rows, code)

    async def resync(self) -> None:
        """Replace what is known of this node with what the node says now."""
        try:
            replies = await self.ami.action({"Action": "PJSIPShowContacts"},
                                            timeout=60)
        except AmiUnavailable as exc:
            log.warning("contact resync failed: %s", exc)
            return
        rows: list[Row] = []
        for msg in replies if isinstance(replies, list) else [replies]:
            code = _code(msg.get("Endpoint") or msg.get("ObjectName"))
            if msg.get("Event") == "ContactList" and code and msg.get("Uri"):
                via = msg.get("ViaAddr") or ""
                if via and msg.get("ViaPort"):
                    via = f"{via}:{msg['ViaPort']}"
                rows.append((self.node_id, code, msg["Uri"], msg.get("UserAgent") or "", via,
                             (msg.get("Status") or "").lower(),
                             _expiry(msg.get("ExpirationTime"))))
        try:
            await self._replace(rows, None)
        except DB_ERRORS as exc:
            log.warning("contact resync could not be stored: %s", exc)

    async def _replace(self, rows: list[Row], code: str | None) -> None:
        async with self._lock, self.pool.acquire() as conn, conn.transaction():
            if code is None:
                await conn.execute("DELETE FROM registrations WHERE node_id = $1", self.node_id)
            else:
                await conn.execute("DELETE FROM registrations WHERE node_id = $1"
                                   " AND account_code = $2", self.node_id, code)
            if rows:
                await conn.executemany(INSERT, rows)

    async def forget(self, code: str) -> None:
        await self._replace([], code)
