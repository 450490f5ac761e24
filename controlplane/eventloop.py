"""The event loop every long-running command runs on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
CHOICES = ("uvloop", "asyncio")


def check(choice: str) -> None:
    """ValueError, saying what is allowed, unless `choice` names a loop."""
    if choice not in CHOICES:
        raise ValueError(f"PBX_EVENT_LOOP must be one of {', '.join(CHOICES)}, not {choice!r}")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the loop `choice` names; None for the standard one. uvloop asked for
    but not installed falls back to the standard loop, with a warning."""
    check(choice)
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed: running on the standard asyncio loop")
        return None
    return uvloop.new_event_loop


def run_loop(choice: str, main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on the loop `choice` names."""
    try:
        factory = loop_factory(choice)
    except ValueError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
