"""Objects a dealer offers to its whole subtree: calling plans and rate tables.

A dealer sees the objects of its own subtree and those its ancestors own. It may change only
those of its own subtree: an object offered from above is read-only there (403, not 404: the
caller can see it).
"""

from __future__ import annotations

from typing import Any

import asyncpg

from controlplane.api.problems import conflict, forbidden
from controlplane.api.resource import Resource, managed_owner
from controlplane.model.principal import Principal


def offered_select(table: str, alias: str) -> str:
    """Own subtree's rows of `table`, plus those the caller's ancestors offer to it."""
    return (f"SELECT {alias}.*, d.path AS owner_path FROM {table} {alias}"
            f" JOIN dealers d ON d.id = {alias}.dealer_id"
            " WHERE (d.path @> ARRAY[$1]::bigint[]"
            f"        OR {alias}.dealer_id = ANY ("
            "            (SELECT path FROM dealers WHERE id = $1)::bigint[]))")


class OfferedResource(Resource):
    """An object owned by a dealer (`dealer_id`) and offered, read-only, to its subtree."""

    label: str = ""        # what it is called in messages, e.g. "plan"
    in_use_sql: str = ""   # SELECT 1 ... = $1 (the object's id): still in use, not deletable
    in_use: str = ""       # the refusal when in_use_sql finds a row

    async def before_create(self, conn: asyncpg.Connection, p: Principal,
                            data: dict[str, Any]) -> dict[str, Any]:
        await managed_owner(conn, p, data)
        return data

    def own(self, p: Principal, current: asyncpg.Record) -> None:
        """Refuse changes to an object an ancestor offers (visible, but not the caller's)."""
        if p.scope_id not in current["owner_path"]:
            raise forbidden(f"this {self.label} is offered by a parent dealer and is"
                            " read-only here")

    async def before_update(self, conn: asyncpg.Connection, p: Principal,
                            current: asyncpg.Record, data: dict[str, Any]) -> dict[str, Any]:
        self.own(p, current)
        return data

    async def before_delete(self, conn: asyncpg.Connection, p: Principal,
                            current: asyncpg.Record) -> None:
        self.own(p, current)
        if self.in_use_sql and await conn.fetchval(self.in_use_sql, current["id"]):
            raise conflict(self.in_use)
