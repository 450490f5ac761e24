"""White-label logos: checked by content, size-limited, served back safely."""

import asyncio
import struct
import zlib


def png(width=1, height=1) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


async def test_png_logo_round_trip(api):
    d = await api.dealer("reseller")
    image = png()
    reply = await api.call("PUT", f"/api/v1/dealers/{d['id']}/logo", raw=image,
                           content_type="image/png")
    assert reply.status == 204, reply
    got = await api.get(f"/api/v1/dealers/{d['id']}/logo")
    assert got.status == 200 and got.body == image
    assert got.headers["Content-Type"] == "image/png"
    assert api.ok(await api.get(f"/api/v1/dealers/{d['id']}"))["logo_url"].endswith("/logo")


async def test_svg_logo_is_accepted_but_scripts_are_not(api):
    d = await api.dealer("reseller")
    ok = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
    reply = await api.call("PUT", f"/api/v1/dealers/{d['id']}/logo", raw=ok,
                           content_type="image/svg+xml")
    assert reply.status == 204
    for evil in (b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
                 b'<svg xmlns="http://www.w3.org/2000/svg" onload="x()"></svg>',
                 b'<svg xmlns="http://www.w3.org/2000/svg"><image href="http://x/y.png"/></svg>'):
        reply = await api.call("PUT", f"/api/v1/dealers/{d['id']}/logo", raw=evil,
                               content_type="image/svg+xml")
        assert reply.status == 422, evil


async def test_logo_content_must_match_its_type_and_size(api):
    d = await api.dealer("reseller")
    wrong = await api.call("PUT", f"/api/v1/dealers/{d['id']}/logo", raw=png(),
                           content_type="image/jpeg")
    assert wrong.status == 422
    fake = await api.call("PUT", f"/api/v1/dealers/{d['id']}/logo", raw=b"GIF89a....",
                          content_type="image/png")
    assert fake.status == 422
    huge = await api.call("PUT", f"/api/v1/dealers/{d['id']}/logo",
                          raw=png() + b"\x00" * (512 * 1024), content_type="image/png")
    assert huge.status == 413
    gif = await api.call("PUT", f"/api/v1/dealers/{d['id']}/logo", raw=b"GIF89a",
                         content_type="image/gif")
    assert gif.status == 415
    assert (await api.get(f"/api/v1/dealers/{d['id']}/logo")).status == 404


async def pieces(data: bytes, size: int):
    """The body as a slow client sends it: in pieces, with pauses between them."""
    for start in range(0, len(data), size):
        yield data[start:start + size]
        await asyncio.sleep(0.02)


async def test_a_logo_sent_in_pieces_is_read_whole(api):
    d = await api.dealer("reseller")
    image = png(64, 64)
    assert len(image) > 3 * 40
    reply = await api.call("PUT", f"/api/v1/dealers/{d['id']}/logo", raw=pieces(image, 40),
                           content_type="image/png")
    assert reply.status == 204, reply
    got = await api.get(f"/api/v1/dealers/{d['id']}/logo")
    assert got.body == image
    huge = png() + b"\x00" * (512 * 1024)
    reply = await api.call("PUT", f"/api/v1/dealers/{d['id']}/logo",
                           raw=pieces(huge, 64 * 1024), content_type="image/png")
    assert reply.status == 413, reply
    assert (await api.get(f"/api/v1/dealers/{d['id']}/logo")).body == image
