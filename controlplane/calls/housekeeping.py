"""What `serve` does besides the API: release calls whose lease lapsed even when no node
agent is left to do it, and write the periodic CDR export files. No error ends the loop: see
`node_control.surviving`."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import asyncpg

from controlplane.billing import export
from controlplane.calls import lifecycle
from controlplane.calls.node_control import surviving, wait_or_stop
from controlplane.settings import Settings

log = logging.getLogger(__name__)
SWEEP_EVERY = 5.0
EXPORT_EVERY = 600.0
EXPORT_RETRY = 60.0  # after a failed export: soon, but not at every sweep
RECOUNT_EVERY = 60.0  # call counters compared with the calls in progress (migration 0018)
ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


async def housekeeping(pool: asyncpg.Pool, settings: Settings, stop: asyncio.Event) -> None:
    """The lease sweep and counters' recount, and the CDR export, as two loops: an export
    volume that stops answering (a write blocks in its thread) holds up the export alone,
    never the release of lapsed calls."""
    if settings.cdr_export_period not in ("daily", "monthly"):
        raise SystemExit("PBX_CDR_EXPORT_PERIOD must be daily or monthly")
    await asyncio.gather(_calls(pool, settings, stop), _exports(pool, settings, stop))


async def _calls(pool: asyncpg.Pool, settings: Settings, stop: asyncio.Event) -> None:
    recount_due = time.monotonic()
    sweeps = lifecycle.LeaseSweep(pool)
    while not stop.is_set():
        async with surviving("call housekeeping: lease sweep", stop, ERRORS,
                             timeout=settings.db_timeout):
            released = await sweeps.run()
            if released:
                log.warning("released %d calls whose lease lapsed", released)
        if time.monotonic() >= recount_due:
            recount_due = time.monotonic() + RECOUNT_EVERY
            async with surviving("call housekeeping: call counters", stop, ERRORS,
                                 timeout=settings.db_timeout):
                await lifecycle.recount_counters(pool, settings.db_timeout)
        await wait_or_stop(stop, SWEEP_EVERY)


async def _exports(pool: asyncpg.Pool, settings: Settings, stop: asyncio.Event) -> None:
    if not settings.cdr_export_dir:
        return
    while not stop.is_set():
        wait = EXPORT_RETRY
        async with surviving("call housekeeping: CDR export", stop, ERRORS,
                             timeout=settings.db_timeout):
            await export.export_closed_periods(pool, Path(settings.cdr_export_dir),
                                               settings.cdr_export_period)
            wait = EXPORT_EVERY
        await wait_or_stop(stop, wait)

