"""A small FastAGI server: Asterisk's `AGI(agi://host:port/script/arg/arg...)` asks, a
handler answers with channel variables to set.

The arguments travel in the script's path, never as `AGI(...,args)`: Asterisk writes the
environment in a fixed order, `agi_network_script` second, and values from the network (a
caller ID, a Diversion, the dialled text) before the `agi_arg_*` lines, unescaped. A line
break in one of them can end the environment early or add lines of its own; none can come
before the script line. So the request is read from its script line, its channel and its
unique id (all written before any such value), and `agi_arg_*` lines are ignored.

Each request is bounded: the AGI environment must arrive within `read_timeout`, the handler
must answer within `handler_timeout` (otherwise `on_timeout` answers instead, e.g. the
admission policy for an unreachable database), and Asterisk must acknowledge every command
within `read_timeout`. A call never waits on a stuck peer longer than that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

log = logging.getLogger(__name__)

MAX_HEADER_LINES = 200
MAX_REQUEST = 16 * 1024  # bytes a peer may send unanswered (an environment is ~1 KiB)
# Exchanges open at once: far more than a node's admissions in flight, far fewer than what
# would exhaust the agent's file descriptors or memory if anything else floods the port.
MAX_EXCHANGES = 512
FAILURE_LOG_EVERY = 10.0  # seconds between warnings of failed requests, counted
BACKLOG = 1024
MAX_ARGS = 16  # of a route (script/arg/arg...)
# A channel's name as Asterisk makes it (technology/resource-sequence), with nothing an AMI
# action would read otherwise: no blank or control character, not a /regular expression/.
CHANNEL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*/[!-~]+")
HANGUP_LINE = b"HANGUP"  # Asterisk's line to a FastAGI server whose channel hung up
REFUSAL_LOG_EVERY = 60.0  # seconds between warnings of requests without the token


@dataclass(frozen=True)
class AgiRequest:
    script: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def channel(self) -> str:
        return self.env.get("agi_channel", "")

    @property
    def uniqueid(self) -> str:
        return self.env.get("agi_uniqueid", "")

    @property
    def callerid(self) -> str:
        return self.env.get("agi_callerid", "")


Handler = Callable[[AgiRequest], Awaitable[Mapping[str, str]]]
Fallback = Callable[[AgiRequest], Mapping[str, str]]
# Told of a handler still running when `on_timeout` answered: it may finish (and must then
# be undone) or be cancelled. The default cancels it.
Abandoned = Callable[[AgiRequest, "asyncio.Task[Mapping[str, str]]"], None]


# Told of a request whose channel hung up while it was answered (Asterisk said so before it
# acknowledged the variables): the dialplan goes no further, so what the answer started
# (an admitted call, say) will never go on.
HungUp = Callable[[AgiRequest, Mapping[str, str]], None]


def cancel(request: AgiRequest, task: asyncio.Task[Mapping[str, str]]) -> None:
    task.cancel()


def ignore(request: AgiRequest, answer: Mapping[str, str]) -> None:
    pass


def node_token(secret: str, node: str) -> str:
    """The path a node's FastAGI requests start with (`agi://host:port/<token>/admit`): only
    what can read the node's AMI secret can have the agent decide (reserve credit, take
    call slots, mark calls answered). Stable across restarts of the agent; a new AMI secret
    gives a new one."""
    return hmac.new(secret.encode(), f"pbx-fastagi:{node}".encode(),
                    hashlib.sha256).hexdigest()[:32]


class AgiProtocolError(Exception):
    pass


def quote(value: str) -> str:
    """A SET VARIABLE argument: quoted, with the characters AGI parsing treats specially
    escaped; newlines cannot be carried and are refused."""
    if "\n" in value or "\r" in value:
        raise ValueError("an AGI value cannot hold a line break")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Several variables travel in one command, as "NAME1,NAME2|value1,value2" in this
# variable; the dialplan sets it to "PBX_DECISION|" before the AGI and splits it after:
#   Set(ARRAY(${CUT(PBX_R,|,1)})=${CUT(PBX_R,|,2)})
# Every command is a round trip to Asterisk, and a decision sets up to five variables.
PACKED = "PBX_R"
_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_PACKABLE = re.compile(r"[A-Za-z0-9_.@#*+:/-]*")


def pack(variables: Mapping[str, str]) -> str | None:
    """The PACKED value carrying `variables`, or None when one cannot be carried (a name
    that is a function, or a value ARRAY would split or the dialplan would read)."""
    names, values = list(variables), [str(v) for v in variables.values()]
    if not all(_NAME.fullmatch(n) for n in names) or \
            not all(_PACKABLE.fullmatch(v) for v in values):
        return None
    return ",".join(names) + "|" + ",".join(values)


def parse_environment(block: bytes) -> dict[str, str]:
    """The `agi_*` lines of one request, up to and without the blank line that ends them."""
    env: dict[str, str] = {}
    lines = block.decode("utf-8", "replace").split("\n")
    if len(lines) > MAX_HEADER_LINES:
        raise AgiProtocolError("the AGI environment is too long")
    for line in lines:
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key in env:
            # A value Asterisk writes unescaped (a caller ID from the network) held a line
            # break and a key of its own: which of the two is Asterisk's cannot be told.
            raise AgiProtocolError(f"the AGI environment repeats {key[:40]!r}")
        env[key] = value.strip()
    channel = env.get("agi_channel")
    if channel is not None and not CHANNEL_NAME.fullmatch(channel):
        raise AgiProtocolError("the AGI environment names no channel Asterisk could have")
    return env


def parse_request(env: Mapping[str, str]) -> AgiRequest:
    """The request as its script line names it: a route and its arguments are split from
    it once the token is checked (`split_route`)."""
    return AgiRequest(script=env.get("agi_network_script", "").strip("/"), env=dict(env))


def split_route(request: AgiRequest, route: str) -> AgiRequest:
    """`route` is name/arg/arg...: an empty argument stays, as an empty string."""
    name, *args = route.split("/")
    return dataclasses.replace(request, script=name, args=tuple(args[:MAX_ARGS]))


class Throttle:
    """True at most once every `every` seconds: a warning that counts what it left out."""

    def __init__(self, every: float) -> None:
        self.every, self.last = every, float("-inf")

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.every:
            return False
        self.last = now
        return True


class _Exchange(asyncio.Protocol):
    """One FastAGI connection, read straight from its transport: Asterisk sends the whole
    environment at once, so it is parsed in one piece rather than line by line."""

    def __init__(self, server: FastAgiServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's do not derive from asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)
        self.server._start(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > MAX_REQUEST:
            self.lost = True
            assert self.transport is not None
            self.transport.abort()
        self._wake()

    def eof_received(self) -> bool:
        self.lost = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def read_until(self, separator: bytes) -> bytes:
        """Bytes up to and without `separator`; AgiProtocolError if the peer left first."""
        while True:
            at = self.buffer.find(separator)
            if at >= 0:
                block = bytes(self.buffer[:at])
                del self.buffer[:at + len(separator)]
                return block
            if self.lost:
                raise AgiProtocolError("the connection closed inside the AGI exchange")
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("Asterisk closed the FastAGI connection")
        self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is not None and self.transport.can_write_eof() \
                and not self.transport.is_closing():
            self.transport.write_eof()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class FastAgiServer:
    def __init__(self, routes: Mapping[str, Handler], *, on_timeout: Fallback,
                 on_abandoned: Abandoned = cancel, on_hung_up: HungUp = ignore,
                 handler_timeout: float = 1.0, read_timeout: float = 2.0,
                 token: str = "") -> None:
        self.routes = dict(routes)
        # with a token, a script is "<token>/<route>"; a request without it is not answered,
        # once the node was given the token (`token_given`): until then, a node still
        # dialling what an agent of an earlier release or with another AMI secret set is
        # answered (an upgrade must not refuse calls while the AMI link comes up)
        self.token = token
        self.token_given = False
        self.refused = 0
        self._refusal_logged = Throttle(REFUSAL_LOG_EVERY)
        self.on_timeout, self.on_abandoned = on_timeout, on_abandoned
        self.on_hung_up = on_hung_up
        self.hung_up = 0  # requests whose channel hung up before they were answered
        self.handler_timeout, self.read_timeout = handler_timeout, read_timeout
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.served = 0
        self.failed = 0  # requests ended by a protocol error, a timeout, or the cap
        self._failure_logged = Throttle(FAILURE_LOG_EVERY)

    async def start(self, host: str, port: int) -> int:
        # Asterisk opens a connection per AGI request: a burst of calls must not overflow
        # the accept queue (a dropped SYN costs the call a second or more).
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Exchange(self), host, port,
                                               reuse_address=True, backlog=BACKLOG)
        sock = self.server.sockets[0]
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for task in list(self._tasks):
            task.cancel()

    def _start(self, exchange: _Exchange) -> None:
        if len(self._tasks) >= MAX_EXCHANGES:
            assert exchange.transport is not None
            exchange.transport.abort()  # the dialplan then follows the node's policy
            self._failed(f"{MAX_EXCHANGES} exchanges already open")
            return
        task = asyncio.get_running_loop().create_task(self._serve(exchange))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, exchange: _Exchange) -> None:
        try:
            async with asyncio.timeout(self.read_timeout):
                env = parse_environment(await exchange.read_until(b"\n\n"))
            request = self._authorised(parse_request(env))
            if request is None:
                return
            answer = await self._answer(request)
            if await self._set_variables(exchange, answer):
                self.hung_up += 1
                self.on_hung_up(request, answer)
            self.served += 1
        except TimeoutError:
            self._failed(f"the peer did not finish the exchange in {self.read_timeout:.1f}s")
        except (AgiProtocolError, ConnectionError, ValueError) as exc:
            self._failed(repr(exc))
        finally:
            exchange.close()

    def _failed(self, why: str) -> None:
        """Counted; logged at most every FAILURE_LOG_EVERY seconds, so that a flood of bad
        requests cannot flood the log."""
        self.failed += 1
        if self._failure_logged.due():
            log.warning("FastAGI request failed: %s (%d failed so far)", why, self.failed)

    def _authorised(self, request: AgiRequest) -> AgiRequest | None:
        """The request with its route as script, or None (logged, at most once a minute)
        when it lacks the token: nothing is answered and nothing decided."""
        if not self.token:
            return split_route(request, request.script)
        token, sep, route = request.script.partition("/")
        if sep and hmac.compare_digest(token.encode(), self.token.encode()):
            return split_route(request, route)
        if not self.token_given and token in self.routes:
            return split_route(request, request.script)
        self.refused += 1
        if self._refusal_logged.due():
            log.warning("FastAGI: %d requests without this node's token refused so far"
                        " (the node's PBX_AGI is out of date, or someone else connects)",
                        self.refused)
        return None

    async def _answer(self, request: AgiRequest) -> Mapping[str, str]:
        handler = self.routes.get(request.script)
        if handler is None:
            raise AgiProtocolError(f"no FastAGI script {request.script!r}")
        # The handler runs as a task of its own, shielded: the call is answered when the
        # time is up, not when the handler's clean-up (a database connection given back
        # through a silent network, say) is done.
        task = asyncio.ensure_future(handler(request))
        try:
            async with asyncio.timeout(self.handler_timeout):
                return await asyncio.shield(task)
        except TimeoutError:
            log.warning("FastAGI %s took longer than %.1fs: answering by policy",
                        request.script, self.handler_timeout)
            self.on_abandoned(request, task)
            return self.on_timeout(request)
        except Exception:
            # A bug must not leave the call without an answer: the policy answers.
            log.exception("FastAGI %s failed: answering by policy", request.script)
            return self.on_timeout(request)

    async def _set_variables(self, exchange: _Exchange, variables: Mapping[str, str]) -> bool:
        """Send `variables` to the channel; returns whether Asterisk said the channel hung up
        meanwhile."""
        if not variables:
            return False
        packed = pack(variables) if len(variables) > 1 else None
        if packed is not None:
            variables = {PACKED: packed}
        elif len(variables) > 1:  # one at a time, and nothing left for the dialplan to split
            variables = {**variables, PACKED: f"{PACKED}|"}
        commands = [f"SET VARIABLE {name} {quote(str(value))}\n".encode()
                    for name, value in variables.items()]
        # One command at a time, each answered before the next is sent. Asterisk reads AGI
        # commands through a buffered stream but waits for the socket to become readable
        # before each one: commands written ahead land in its buffer and stay there, unread,
        # until the connection closes, so a pipelined exchange always ran into read_timeout.
        # The last command goes with the end of what this side sends: Asterisk, finding the
        # end right after the command, leaves the AGI as soon as it has run it, without
        # waiting for this process to read its acknowledgement and close (a turn of this
        # event loop, which other calls' work may hold up). The acknowledgement is still read.
        hung_up = False
        async with asyncio.timeout(self.read_timeout):
            for n, command in enumerate(commands, 1):
                exchange.write(command)
                if n == len(commands):
                    exchange.write_eof()
                reply = await exchange.read_until(b"\n")
                # A channel that hangs up while its request is answered (the caller gave
                # up) gets the AGI a line of its own, once, ahead of a command's reply. The
                # command still runs (SET VARIABLE does on a hung-up channel; 511 is the
                # answer of one that does not), but the dialplan goes no further.
                while reply == HANGUP_LINE:
                    hung_up = True
                    reply = await exchange.read_until(b"\n")
                if hung_up and reply.startswith(b"511"):
                    return True
                if not reply.startswith(b"200"):
                    raise AgiProtocolError(f"Asterisk answered {reply[:80]!r}")
        return hung_up
