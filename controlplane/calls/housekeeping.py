"""What `serve` does besides the API: release calls whose lease lapsed even when no node
agent is left to do it, and write the periodic CDR export files."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import asyncpg

from controlplane.billing import export
from controlplane.calls import lifecycle
from controlplane.settings import Settings

log = logging.getLogger(__name__)
SWEEP_EVERY = 5.0
EXPORT_EVERY = 600.0
ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


async def housekeeping(pool: asyncpg.Pool, settings: Settings, stop: asyncio.Event) -> None:
    if settings.cdr_export_period not in ("daily", "monthly"):
        raise SystemExit("PBX_CDR_EXPORT_PERIOD must be daily or monthly")
    exported_at = 0.0
    while not stop.is_set():
        try:
            released = await lifecycle.sweep(pool)
            if released:
                log.warning("released %d calls whose lease lapsed", released)
            if settings.cdr_export_dir and time.monotonic() - exported_at > EXPORT_EVERY:
                await export.export_closed_periods(pool, Path(settings.cdr_export_dir),
                                                   settings.cdr_export_period)
                exported_at = time.monotonic()
        except ERRORS as exc:
            log.warning("call housekeeping failed (will retry): %s", exc)
        try:
            await asyncio.wait_for(stop.wait(), SWEEP_EVERY)
        except TimeoutError:
            pass
