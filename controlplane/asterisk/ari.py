"""ARI client for what the control plane needs: push configuration objects (sorcery dynamic
config, stored in the node's astdb) and delete them. Every request has a timeout.

It speaks HTTP/1.1 itself over a few kept-alive connections: a bulk push sends three requests
per extension, and a general-purpose client costs several times more CPU per request than
the exchange needs. A request that finds its kept-alive connection closed by Asterisk (idle
keep-alive expired) is sent once more on a new connection: PUT and DELETE are idempotent.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
MAX_BODY = 16 * 1024 * 1024


class AriError(RuntimeError):
    """ARI refused a request or could not be reached; the message names which."""


class _StaleConnection(Exception):
    """A kept-alive connection was closed before it answered."""


@dataclass
class AriClient:
    base_url: str
    username: str
    password: str = field(repr=False)
    timeout: float = 5.0
    concurrency: int = 8
    _open: bool = False
    _idle: list[Connection] = field(default_factory=list)
    _slots: asyncio.Semaphore | None = None

    def __post_init__(self) -> None:
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"ARI URL must be http(s)://host[:port][/path], not {self.base_url!r}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._tls = url.scheme == "https"
        self._prefix = url.path.rstrip("/") + "/ari"
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        host = self._host if ":" not in self._host else f"[{self._host}]"
        self._headers = (f"Host: {host}:{self._port}\r\nAuthorization: Basic {token}\r\n"
                         "Connection: keep-alive\r\n").encode()

    async def __aenter__(self) -> AriClient:
        self._slots = asyncio.Semaphore(max(1, self.concurrency))
        self._open = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._open = False
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()

    async def _request(self, method: str, path: str, body: object = None) -> tuple[int, str]:
        if not self._open or self._slots is None:
            raise AriError("ARI client is not open")
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        head = (f"{method} {quote(self._prefix + path, safe='/:@')} HTTP/1.1\r\n".encode()
                + self._headers
                + (b"Content-Type: application/json\r\n" if body is not None else b"")
                + f"Content-Length: {len(payload)}\r\n\r\n".encode())
        async with self._slots:
            try:
                async with asyncio.timeout(self.timeout):
                    while True:
                        reused = bool(self._idle)
                        conn = self._idle.pop() if reused else await self._connect()
                        try:
                            status, keep, text = await self._exchange(conn, head + payload)
                        except _StaleConnection:
                            conn[1].close()
                            if reused:
                                continue  # Asterisk closed it while idle: once more, anew
                            raise AriError(f"ARI {method} {path}: connection closed") from None
                        except BaseException:
                            conn[1].close()
                            raise
                        if keep and self._open:
                            self._idle.append(conn)
                        else:
                            conn[1].close()
                        return status, text
            except TimeoutError as exc:
                raise AriError(f"ARI {method} {path}: no answer within {self.timeout:g} s") \
                    from exc
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                raise AriError(f"ARI {method} {path} failed: {exc!r}") from exc

    async def _connect(self) -> Connection:
        context = ssl.create_default_context() if self._tls else None
        return await asyncio.open_connection(self._host, self._port, ssl=context)

    @staticmethod
    async def _exchange(conn: Connection, request: bytes) -> tuple[int, bool, str]:
        reader, writer = conn
        try:
            writer.write(request)
            await writer.drain()
            status_line = await reader.readline()
        except (ConnectionError, BrokenPipeError) as exc:
            raise _StaleConnection from exc
        if not status_line:
            raise _StaleConnection
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP status line: {status_line[:80]!r}")
        status = int(parts[1])
        length: int | None = None
        chunked = False
        keep = parts[0] == b"HTTP/1.1"
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value
            elif name == "connection":
                keep = "close" not in value if keep else "keep-alive" in value
        if chunked:
            data = bytearray()
            while True:
                size = int((await reader.readline()).split(b";", 1)[0], 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                if len(data) + size > MAX_BODY:
                    raise ValueError("ARI answer too large")
                data += await reader.readexactly(size)
                await reader.readexactly(2)
            body = bytes(data)
        elif length is not None:
            if length > MAX_BODY:
                raise ValueError("ARI answer too large")
            body = await reader.readexactly(length)
        else:
            body = await reader.read(MAX_BODY)
            keep = False
        return status, keep, body.decode("utf-8", "replace")

    async def info(self) -> dict[str, object]:
        status, text = await self._request("GET", "/asterisk/info")
        if status != 200:
            raise AriError(f"ARI /asterisk/info answered {status}: {text[:200]}")
        return json.loads(text)  # type: ignore[no-any-return]

    async def put_object(self, config_class: str, object_type: str, object_id: str,
                         fields: Sequence[tuple[str, str]]) -> None:
        body = {"fields": [{"attribute": k, "value": v} for k, v in fields]}
        status, text = await self._request(
            "PUT", f"/asterisk/config/dynamic/{config_class}/{object_type}/{object_id}", body)
        if status != 200:
            raise AriError(f"ARI refused {object_type} {object_id} ({status}): {text[:300]}")

    async def delete_object(self, config_class: str, object_type: str, object_id: str) -> bool:
        """Delete an object; False if it did not exist."""
        status, text = await self._request(
            "DELETE", f"/asterisk/config/dynamic/{config_class}/{object_type}/{object_id}")
        if status == 404:
            return False
        if status not in (200, 204):
            raise AriError(f"ARI could not delete {object_type} {object_id} ({status}): "
                           f"{text[:300]}")
        return True
