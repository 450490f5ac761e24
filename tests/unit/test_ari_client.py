"""The ARI client's own HTTP/1.1 exchange, against a scripted server on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from controlplane.asterisk.ari import AriClient, AriError

Handler = Callable[[int, str, str, bytes], bytes | None]


class FakeAri:
    """Reads requests; answers with handler(connection number, method, path, body)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[int, str, str, dict[str, str], bytes]] = []
        self.server: asyncio.AbstractServer | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers = {}
                while (h := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = h.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((number, method, path, headers, body))
                answer = self.handler(number, method, path, body)
                if answer is None:  # close without answering
                    return
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer:
                    return
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"


def ok(body: str = "{}", extra: str = "") -> bytes:
    data = body.encode()
    return (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


@pytest.fixture
async def fake() -> AsyncIterator[Callable[[Handler], FakeAri]]:
    servers: list[FakeAri] = []

    def make(handler: Handler) -> FakeAri:
        server = FakeAri(handler)
        servers.append(server)
        return server

    yield make
    for server in servers:
        if server.server is not None:
            server.server.close()
            await server.server.wait_closed()


async def start(server: FakeAri) -> FakeAri:
    server.server = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    return server


async def test_requests_reuse_one_kept_alive_connection(fake) -> None:
    server = await start(fake(lambda n, m, p, b: ok()))
    async with AriClient(server.url, "agent", "pw-1", concurrency=1) as ari:
        for i in range(5):
            await ari.put_object("res_pjsip", "aor", f"10{i}", [("max_contacts", "1")])

    assert server.connections == 1
    assert len(server.requests) == 5
    _, method, path, headers, body = server.requests[0]
    assert (method, path) == ("PUT", "/ari/asterisk/config/dynamic/res_pjsip/aor/100")
    assert headers["authorization"] == "Basic YWdlbnQ6cHctMQ=="
    assert json.loads(body) == {"fields": [{"attribute": "max_contacts", "value": "1"}]}


async def test_a_connection_asterisk_closed_while_idle_is_replaced(fake) -> None:
    # The first connection answers once and is then closed before the next request.
    server = await start(fake(lambda n, m, p, b: ok() if len(server.requests) != 2 else None))
    async with AriClient(server.url, "u", "p", concurrency=1) as ari:
        await ari.put_object("res_pjsip", "auth", "a1", [])
        await ari.put_object("res_pjsip", "auth", "a2", [])

    assert server.connections == 2
    assert [r[2].rsplit("/", 1)[1] for r in server.requests] == ["a1", "a2", "a2"]


async def test_a_fresh_connection_closed_without_answer_is_an_error(fake) -> None:
    server = await start(fake(lambda n, m, p, b: None))
    async with AriClient(server.url, "u", "p") as ari:
        with pytest.raises(AriError, match="connection closed"):
            await ari.put_object("res_pjsip", "aor", "1", [])
    assert server.connections == 1


async def test_connection_close_and_chunked_answers_are_understood(fake) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"7\r\n{\"a\": 1\r\n1\r\n}\r\n0\r\n\r\n")
    answers = [ok('{"system": "x"}', "Connection: close\r\n"), chunked]
    server = await start(fake(lambda n, m, p, b: answers[len(server.requests) - 1]))
    async with AriClient(server.url, "u", "p", concurrency=1) as ari:
        assert await ari.info() == {"system": "x"}
        assert await ari.info() == {"a": 1}
    assert server.connections == 2


async def test_refusals_name_the_object_and_the_status(fake) -> None:
    def handler(n: int, method: str, path: str, body: bytes) -> bytes:
        if method == "DELETE":
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        text = b'{"message": "Cannot update"}'
        return b"HTTP/1.1 500 Error\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text)

    server = await start(fake(handler))
    async with AriClient(server.url, "u", "p") as ari:
        with pytest.raises(AriError, match=r"ARI refused endpoint 7001 \(500\).*Cannot update"):
            await ari.put_object("res_pjsip", "endpoint", "7001", [])
        assert await ari.delete_object("res_pjsip", "endpoint", "7001") is False


async def test_a_silent_server_times_out(fake) -> None:
    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = fake(lambda *a: None)
    server.server = await asyncio.start_server(never, "127.0.0.1", 0)
    async with AriClient(server.url, "u", "p", timeout=0.3) as ari:
        with pytest.raises(AriError, match="no answer within 0.3 s"):
            await ari.put_object("res_pjsip", "aor", "1", [])


async def test_concurrent_requests_use_at_most_concurrency_connections(fake) -> None:
    async def slow_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.serve(reader, writer)

    server = fake(lambda *a: ok())
    server.server = await asyncio.start_server(slow_ok, "127.0.0.1", 0)
    async with AriClient(server.url, "u", "p", concurrency=3) as ari:
        await asyncio.gather(*(ari.put_object("res_pjsip", "aor", str(i), [])
                               for i in range(30)))
    assert len(server.requests) == 30
    assert 1 <= server.connections <= 3


def test_a_bad_url_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="ARI URL"):
        AriClient("ftp://node", "u", "p")


async def test_requests_need_an_open_client() -> None:
    ari = AriClient("http://127.0.0.1:9", "u", "p")
    with pytest.raises(AriError, match="not open"):
        await ari.info()
