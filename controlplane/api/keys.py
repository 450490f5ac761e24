"""Typed keys for what the application and each request carry."""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from controlplane.model.principal import Principal
from controlplane.settings import Settings

POOL = web.AppKey("pool", asyncpg.Pool)
SETTINGS = web.AppKey("settings", Settings)
OPENAPI = web.AppKey("openapi", dict[str, Any])
ROUTES = web.AppKey("routes", object)
PRINCIPAL = web.RequestKey("principal", Principal)
