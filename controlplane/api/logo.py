"""White-label logos: PNG, JPEG or SVG, checked by content, at most 512 KiB."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from aiohttp import web

from controlplane.api.problems import ApiError, invalid

LOGO_TYPES = ("image/png", "image/jpeg", "image/svg+xml")
MAX_LOGO_BYTES = 512 * 1024
_SVG_FORBIDDEN = re.compile(rb"<!DOCTYPE|<!ENTITY|<script|javascript:|\bon[a-z]+\s*=", re.I)


def _is_svg(data: bytes) -> bool:
    if _SVG_FORBIDDEN.search(data):
        return False
    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        return False
    if root.tag not in ("svg", "{http://www.w3.org/2000/svg}svg"):
        return False
    # No external references: the portal shows the logo to other dealers' customers.
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag in ("script", "foreignObject", "iframe", "object", "embed"):
            return False
        for name, value in el.attrib.items():
            if name.rsplit("}", 1)[-1] == "href" and not value.startswith("#"):
                return False
    return True


def sniff(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 24 and data[12:16] == b"IHDR":
        return "image/png"
    if data.startswith(b"\xff\xd8\xff") and data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "image/jpeg"
    head = data.lstrip()[:5]
    if head.startswith((b"<?xml", b"<svg")) and _is_svg(data):
        return "image/svg+xml"
    return None


async def read_logo(request: web.Request) -> bytes:
    """The request's whole body, or its first MAX_LOGO_BYTES + 1 bytes when it is longer (one
    read returns only what has arrived so far: a logo comes in many TCP segments)."""
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_LOGO_BYTES:
        chunk = await request.content.read(MAX_LOGO_BYTES + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def check_logo(data: bytes, declared: str) -> str:
    """The logo's type, or a 4xx naming what is wrong."""
    if len(data) > MAX_LOGO_BYTES:
        raise ApiError(413, "Logo too large", f"a logo is at most {MAX_LOGO_BYTES} bytes",
                       kind="too-large")
    if not data:
        raise invalid([("", "the logo is empty")])
    actual = sniff(data)
    if actual is None:
        raise invalid([("", "is not a valid PNG, JPEG or SVG image (SVG must not contain "
                            "scripts, event handlers or external references)")])
    if actual != declared:
        raise invalid([("", f"the content is {actual} but was sent as {declared}")])
    return actual
