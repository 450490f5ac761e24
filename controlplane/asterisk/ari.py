"""ARI client for what the control plane needs: push configuration objects (sorcery dynamic
config, stored in the node's astdb) and delete them. Every request has a timeout."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp


class AriError(RuntimeError):
    """ARI refused a request or could not be reached; the message names which."""


@dataclass
class AriClient:
    base_url: str
    username: str
    password: str
    timeout: float = 5.0
    concurrency: int = 8
    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AriClient:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Basic {token}"},
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=self.concurrency, force_close=False),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(self, method: str, path: str, body: object = None) -> tuple[int, str]:
        if self._session is None:
            raise AriError("ARI client is not open")
        url = f"{self.base_url.rstrip('/')}/ari{path}"
        try:
            async with self._session.request(method, url, json=body) as resp:
                return resp.status, await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise AriError(f"ARI {method} {path} failed: {exc!r}") from exc

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
