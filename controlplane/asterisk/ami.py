"""An AMI session that stays honest: every action has a timeout, a dead peer is noticed by
pings, reconnects back off, and every (re)login runs the caller's resync callbacks.

panoramisk speaks the protocol; this module owns the connection's life, because panoramisk
reconnects on a fixed delay, lets actions sent while disconnected hang, and never checks that
its pings are answered.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from panoramisk import Manager

log = logging.getLogger(__name__)

EventCallback = Callable[[Any, Any], Any]
LoginCallback = Callable[[], Awaitable[None]]


class AmiUnavailable(RuntimeError):
    """No logged-in AMI connection right now, or the peer did not answer in time."""


class _Manager(Manager):  # type: ignore[misc]
    """panoramisk's Manager, reporting connection loss instead of reconnecting by itself."""

    def __init__(self, on_lost: Callable[[BaseException | None], None], **config: Any) -> None:
        super().__init__(**config)
        self._on_lost = on_lost

    def connection_made(self, f: asyncio.Future[Any]) -> None:
        if f.cancelled() or f.exception() is not None:
            self._on_lost(None if f.cancelled() else f.exception())
            return
        super().connection_made(f)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._connected = False
        self.authenticated = False
        self._on_lost(exc)


# The event classes a session asks for. The agent listens to ContactStatus (class system)
# and to the dialplan's UserEvent PbxAnswered (class user); every call raises dozens of
# call and dialplan events (Newchannel, Newexten, VarSet...), and with "on" a node at 100
# calls/s kept the agent's event loop half busy parsing them. Replies to actions (their
# event lists included) come whatever the classes.
EVENT_CLASSES = "system,user"


@dataclass
class AmiSession:
    host: str
    port: int
    username: str
    secret: str = field(repr=False)
    timeout: float = 5.0
    ping_interval: float = 5.0
    backoff_max: float = 30.0
    name: str = "ami"
    events: str = EVENT_CLASSES  # "off": replies to actions only
    _manager: _Manager | None = None
    _lost: asyncio.Event = field(default_factory=asyncio.Event)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    _events: list[tuple[str, EventCallback]] = field(default_factory=list)
    _on_login: list[LoginCallback] = field(default_factory=list)
    logins: int = 0

    def on_event(self, pattern: str, callback: EventCallback) -> None:
        self._events.append((pattern, callback))
        if self._manager is not None:
            self._manager.register_event(pattern, callback)

    def on_login(self, callback: LoginCallback) -> None:
        """Run after every successful login (first one and reconnects): resync there."""
        self._on_login.append(callback)

    async def action(self, action: dict[str, str], *, timeout: float | None = None,
                     as_list: bool | None = None) -> Any:
        m = self._manager
        if m is None or not self.connected.is_set():
            raise AmiUnavailable(f"{self.name}: not connected to AMI at {self.host}:{self.port}")
        try:
            return await asyncio.wait_for(m.send_action(action, as_list=as_list),
                                          timeout or self.timeout)
        except TimeoutError as exc:
            raise AmiUnavailable(f"{self.name}: AMI action {action.get('Action')} got no "
                                 f"answer in {timeout or self.timeout}s") from exc

    async def command(self, command: str, *, timeout: float | None = None) -> list[str]:
        """A CLI command over AMI; its output lines."""
        reply = await self.action({"Action": "Command", "Command": command}, timeout=timeout)
        output = reply.get("Output", [])
        return output if isinstance(output, list) else [output]

    def _lose(self, exc: BaseException | None) -> None:
        if exc is not None:
            log.info("%s: connection lost: %s", self.name, exc)
        self.connected.clear()
        self._lost.set()

    async def _connect_once(self) -> None:
        self._lost.clear()
        m = _Manager(self._lose, host=self.host, port=self.port, username=self.username,
                     secret=self.secret, ping_delay=10**9, ping_interval=10**9,
                     reconnect_timeout=10**9, events=self.events,
                     loop=asyncio.get_running_loop())
        for pattern, callback in self._events:
            m.register_event(pattern, callback)
        self._manager = m
        await asyncio.wait_for(m.connect(), self.timeout)
        deadline = asyncio.get_running_loop().time() + self.timeout
        while m.authenticated_future is None and not m.authenticated:
            if self._lost.is_set():
                raise AmiUnavailable(f"{self.name}: connection refused or closed")
            if asyncio.get_running_loop().time() > deadline:
                raise AmiUnavailable(f"{self.name}: no AMI greeting")
            await asyncio.sleep(0.01)
        if m.authenticated_future is not None:
            reply = await asyncio.wait_for(asyncio.shield(m.authenticated_future), self.timeout)
            if not reply.success:
                raise AmiUnavailable(f"{self.name}: AMI login refused for {self.username}")
        self.connected.set()
        self.logins += 1

    def _close(self) -> None:
        self.connected.clear()
        if self._manager is not None:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - the transport may already be gone
                pass
        self._manager = None

    async def _watch(self, stop: asyncio.Event) -> None:
        """Ping until the link dies or stop; a ping without answer means a dead peer."""
        while not stop.is_set() and not self._lost.is_set():
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._lost.wait())]
            try:
                done, _ = await asyncio.wait(waiters, timeout=self.ping_interval,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when cancelled: no waiter outlives the watch
                for w in waiters:
                    w.cancel()
            if done:
                return
            try:
                await self.action({"Action": "Ping"})
            except AmiUnavailable:
                log.warning("%s: AMI peer stopped answering pings; reconnecting", self.name)
                return

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a logged-in session until `stop` is set."""
        backoff = 0.5
        while not stop.is_set():
            try:
                await self._connect_once()
                log.info("%s: logged in to AMI at %s:%s", self.name, self.host, self.port)
                backoff = 0.5
                for callback in list(self._on_login):
                    try:
                        await callback()
                    except Exception:  # noqa: BLE001 - a failed resync must not kill the link
                        log.exception("%s: resync after login failed", self.name)
                await self._watch(stop)
            except (OSError, TimeoutError, AmiUnavailable) as exc:
                log.info("%s: AMI unavailable (%s); retrying in %.1fs", self.name, exc, backoff)
            finally:
                self._close()
            if stop.is_set():
                break
            try:
                await asyncio.wait_for(stop.wait(), backoff * (0.8 + 0.4 * random.random()))
            except TimeoutError:
                pass
            backoff = min(backoff * 2, self.backoff_max)
