"""LISTEN that outlives the database link: a dedicated connection per listener, pinged so a
dead link is noticed, reconnected with backoff; `on_connect` runs after every (re)connection,
since notifications sent while nobody listened are lost and the caller must resync."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

Callback = Callable[[Any, int, str, str], None]
ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


async def listen_forever(dsn: str, channels: Sequence[str], callback: Callback,
                         stop: asyncio.Event, *, on_connect: Callable[[], Awaitable[None]],
                         what: str, timeout: float = 5.0, ping_every: float = 5.0) -> None:
    backoff = 0.5
    while not stop.is_set():
        conn = None
        try:
            conn = await asyncpg.connect(dsn, timeout=timeout)
            for channel in channels:
                await conn.add_listener(channel, callback)
            await on_connect()
            backoff = 0.5
            while not stop.is_set():
                if not await _wait(stop, ping_every):
                    await conn.fetchval("SELECT 1", timeout=timeout)
        except ERRORS as exc:
            log.warning("%s: database link lost (%s); retrying in %.1fs", what, exc, backoff)
        finally:
            if conn is not None and not conn.is_closed():
                await conn.close(timeout=2)
        await _wait(stop, backoff)
        backoff = min(backoff * 2, 30)


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """True if `stop` was set within `seconds`."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
