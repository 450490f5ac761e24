"""A PostgreSQL that stops answering: a byte relay between clients and the real server that
tests can cut (whatever is sent either way is lost, connections stay open and silent, as
when the network to the database drops every packet) and restore (the connections of
before are reset, as a peer that lost their state would; new ones work)."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

CHUNK = 65536


class PgRelay:
    def __init__(self, dsn: str) -> None:
        self.target_dsn = dsn
        self.dir = Path(tempfile.mkdtemp(prefix="pbx-pgrelay-"))
        self.socket = self.dir / ".s.PGSQL.5432"
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def dsn(self) -> str:
        """The target's DSN, through the relay."""
        parts = urlsplit(self.target_dsn)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items() if k not in ("host", "port")}
        query["host"] = str(self.dir)
        user = parts.username or ""
        auth = f"{user}:{parts.password or ''}@" if user else ""
        return urlunsplit((parts.scheme, auth, parts.path, urlencode(query), ""))

    def cut(self) -> None:
        self.flowing.clear()

    def restore(self) -> None:
        if not self.flowing.is_set():
            for writer in self.writers:
                writer.transport.abort()
            self.writers.clear()
        self.flowing.set()

    async def _open_target(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        parts = urlsplit(self.target_dsn)
        query = parse_qs(parts.query)
        port = int(query.get("port", [parts.port or 5432])[-1])
        host = query.get("host", [parts.hostname or "127.0.0.1"])[-1]
        if host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(CHUNK):
                if self.flowing.is_set():
                    writer.write(data)
                    await writer.drain()
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        if not self.flowing.is_set():
            return  # silent until restore() resets it
        target_reader, target_writer = await asyncio.wait_for(self._open_target(), 5)
        self.writers.append(target_writer)
        for pump in (self._pump(reader, target_writer), self._pump(target_reader, writer)):
            task = asyncio.create_task(pump)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def __aenter__(self) -> PgRelay:
        self.server = await asyncio.start_unix_server(self._client, path=str(self.socket))
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.restore()
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.socket.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()
