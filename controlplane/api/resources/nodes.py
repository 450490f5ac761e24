"""SIP server nodes (Asterisk): operator only. Their AMI/ARI secrets are never returned."""

from __future__ import annotations

from typing import Any

import asyncpg

from controlplane.api import fields as F
from controlplane.api.problems import conflict
from controlplane.api.resource import (
    RawJson,
    Resource,
    register_crud,
    require_operator,
    text_filter,
)
from controlplane.api.routes import RouteTable
from controlplane.model.principal import Principal

USERNAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
STATUSES = ("unknown", "online", "offline", "maintenance")

NODE_FIELDS = {
    "name": F.text(64, required=True),
    "sip_address": F.host("public SIP address of the node", required=True),
    "ami_host": F.host("AMI address", required=True),
    "ami_port": F.integer(1, 65535),
    "ami_username": F.pattern(USERNAME, "letters, digits, . _ -", required=True),
    "ami_secret": F.password("AMI secret", required=True, min_len=12),
    "ari_url": F.url("ARI base URL, e.g. http://10.0.0.5:8088", required=True),
    "ari_username": F.pattern(USERNAME, "letters, digits, . _ -", required=True),
    "ari_password": F.password("ARI password", required=True, min_len=12),
    "status": F.choice(STATUSES),
}


class OperatorOnly(Resource):
    """Platform infrastructure: no dealer owns it, only the operator sees or changes it."""

    what = "this"

    def _operator_only(self, p: Principal) -> None:
        require_operator(p, f"{self.what} are managed by the platform operator only")

    async def get(self, conn: asyncpg.Connection, p: Principal, key: int, *,
                  lock: bool = False) -> asyncpg.Record | None:
        self._operator_only(p)
        return await super().get(conn, p, key, lock=lock)

    async def list(self, conn: asyncpg.Connection, p: Principal,
                   query: dict[str, str]) -> RawJson:
        self._operator_only(p)
        return await super().list(conn, p, query)

    async def before_create(self, conn: asyncpg.Connection, p: Principal,
                            data: dict[str, Any]) -> dict[str, Any]:
        self._operator_only(p)
        return data


class Nodes(OperatorOnly):
    name = "nodes"
    entity = "node"
    what = "nodes"
    table = "nodes"
    alias = "n"
    tag = "nodes"
    select_sql = ("SELECT n.*, op.path AS owner_path FROM nodes n,"
                  " dealers op WHERE op.level = 'operator' AND $1::bigint IS NOT NULL")
    create_schema = F.Schema("node_create", NODE_FIELDS)
    update_schema = F.Schema("node_update", NODE_FIELDS)
    filters = (text_filter("status", "n.status::text = ${}", "node status", choices=STATUSES),)
    columns = frozenset(NODE_FIELDS)
    hidden = frozenset({"ami_secret", "ari_password"})

    async def before_delete(self, conn: asyncpg.Connection, p: Principal,
                            current: asyncpg.Record) -> None:
        if await conn.fetchval("SELECT 1 FROM dealers WHERE node_id = $1 UNION ALL"
                               " SELECT 1 FROM tenants WHERE node_id = $1 UNION ALL"
                               " SELECT 1 FROM carriers WHERE node_id = $1 LIMIT 1",
                               current["id"]):
            raise conflict("dealers, tenants or carriers are still assigned to this node")


NODES = Nodes()


def register(routes: RouteTable) -> None:
    register_crud(routes, NODES)
