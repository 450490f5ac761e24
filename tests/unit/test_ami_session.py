"""The AMI session against a scripted AMI peer on loopback: timeouts, dead peers, backoff."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import pytest

from controlplane.asterisk.ami import AmiSession, AmiUnavailable


class FakeAmi:
    """Speaks just enough AMI: greeting, Login, Ping; can go silent or refuse logins."""

    def __init__(self, secret: str = "good-secret") -> None:
        self.secret = secret
        self.silent = False
        self.logins = 0
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(b"Asterisk Call Manager/11.0.0\r\n")
        try:
            while True:
                block = await reader.readuntil(b"\r\n\r\n")
                fields = dict(line.split(": ", 1) for line in block.decode().strip().split("\r\n")
                              if ": " in line)
                if self.silent:
                    continue
                action, aid = fields.get("Action", "").lower(), fields.get("ActionID", "")
                if action == "login":
                    ok = fields.get("Secret") == self.secret
                    self.logins += ok
                    status = "Success" if ok else "Error"
                    writer.write(f"Response: {status}\r\nActionID: {aid}\r\n"
                                 f"Message: Authentication {'accepted' if ok else 'failed'}"
                                 "\r\n\r\n".encode())
                else:
                    writer.write(f"Response: Success\r\nActionID: {aid}\r\nPing: Pong\r\n\r\n"
                                 .encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    @asynccontextmanager
    async def running(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        try:
            yield self.server.sockets[0].getsockname()[1]
        finally:
            self.server.close()
            for w in self.writers:
                w.close()


async def until(predicate, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_login_runs_the_resync_callback():
    fake = FakeAmi()
    async with fake.running() as port:
        session = AmiSession("127.0.0.1", port, "cp", "good-secret", timeout=1,
                             ping_interval=0.2)
        resyncs = []

        async def resync() -> None:
            resyncs.append(1)

        session.on_login(resync)
        stop = asyncio.Event()
        task = asyncio.create_task(session.run(stop))
        await until(lambda: resyncs == [1])
        reply = await session.action({"Action": "Ping"})
        assert reply.success
        stop.set()
        await asyncio.wait_for(task, 3)


async def test_a_silent_peer_is_noticed_and_the_session_logs_in_again():
    fake = FakeAmi()
    async with fake.running() as port:
        session = AmiSession("127.0.0.1", port, "cp", "good-secret", timeout=0.3,
                             ping_interval=0.2)
        stop = asyncio.Event()
        task = asyncio.create_task(session.run(stop))
        await until(lambda: session.connected.is_set())
        fake.silent = True
        await until(lambda: not session.connected.is_set(), within=3)
        fake.silent = False
        await until(lambda: session.logins >= 2, within=5)
        stop.set()
        await asyncio.wait_for(task, 3)


async def test_actions_while_disconnected_fail_at_once_instead_of_hanging():
    session = AmiSession("127.0.0.1", 9, "cp", "x", timeout=0.5)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(AmiUnavailable, match="not connected"):
        await session.action({"Action": "Ping"})
    assert loop.time() - start < 0.1


async def test_an_unanswered_action_times_out():
    fake = FakeAmi()
    async with fake.running() as port:
        session = AmiSession("127.0.0.1", port, "cp", "good-secret", timeout=0.3,
                             ping_interval=60)
        stop = asyncio.Event()
        task = asyncio.create_task(session.run(stop))
        await until(lambda: session.connected.is_set())
        fake.silent = True
        with pytest.raises(AmiUnavailable, match="no answer"):
            await session.action({"Action": "Ping"})
        stop.set()
        await asyncio.wait_for(task, 3)


async def test_refused_login_is_retried_with_backoff_not_a_crash():
    fake = FakeAmi(secret="other")
    async with fake.running() as port:
        session = AmiSession("127.0.0.1", port, "cp", "wrong", timeout=0.5, backoff_max=0.4)
        stop = asyncio.Event()
        task = asyncio.create_task(session.run(stop))
        await asyncio.sleep(1.5)
        assert not session.connected.is_set() and not task.done()
        fake.secret = "wrong"
        await until(lambda: session.connected.is_set(), within=3)
        stop.set()
        await asyncio.wait_for(task, 3)
