"""Calling plans: named records extensions reference. A dealer's plans are offered to its
whole subtree, read-only below it."""

from __future__ import annotations

from typing import Any

import asyncpg

from controlplane.api import fields as F
from controlplane.api.problems import invalid
from controlplane.api.resource import register_crud, subtree_filter, text_filter
from controlplane.api.resources.offered import OfferedResource, offered_select
from controlplane.api.routes import RouteTable
from controlplane.model.principal import Principal

PLAN_FIELDS = {
    "dealer_id": F.reference("owning dealer; defaults to the caller"),
    "name": F.text(100, required=True),
    "kind": F.choice(("national", "international")),
    "description": F.text(300, min_len=0),
    "rate_table_id": F.reference("rate table that prices the plan's calls: the owner's own or"
                                 " an ancestor's", nullable=True),
}


class Plans(OfferedResource):
    name = "plans"
    entity = "plan"
    table = "plans"
    alias = "pl"
    tag = "plans"
    label = "plan"
    select_sql = offered_select("plans", "pl")
    create_schema = F.Schema("plan_create", PLAN_FIELDS)
    update_schema = F.Schema("plan_update", PLAN_FIELDS).without("dealer_id", "kind")
    filters = (subtree_filter("d.path"),
               text_filter("kind", "pl.kind = ${}", "plan kind",
                           choices=("national", "international")))
    columns = frozenset(PLAN_FIELDS)
    in_use_sql = "SELECT 1 FROM extensions WHERE plan_id = $1 OR intl_plan_id = $1 LIMIT 1"
    in_use = "extensions still use this plan"

    async def before_create(self, conn: asyncpg.Connection, p: Principal,
                            data: dict[str, Any]) -> dict[str, Any]:
        data = await super().before_create(conn, p, data)
        await self._check_rate_table(conn, data["dealer_id"], data)
        return data

    async def before_update(self, conn: asyncpg.Connection, p: Principal,
                            current: asyncpg.Record, data: dict[str, Any]) -> dict[str, Any]:
        data = await super().before_update(conn, p, current, data)
        await self._check_rate_table(conn, current["dealer_id"], data)
        return data

    async def _check_rate_table(self, conn: asyncpg.Connection, owner: int,
                                data: dict[str, Any]) -> None:
        """The rate table must be one the plan's owner may use: its own or an ancestor's
        (a table it cannot see answers like one that does not exist)."""
        if data.get("rate_table_id") is None:
            return
        if not await conn.fetchval("SELECT 1 FROM rate_tables rt JOIN dealers d ON d.id = $2"
                                   " WHERE rt.id = $1 AND rt.dealer_id = ANY (d.path)",
                                   data["rate_table_id"], owner):
            raise invalid([("/rate_table_id", "is not a rate table offered to the plan's"
                                              " owner")])


PLANS = Plans()


def register(routes: RouteTable) -> None:
    register_crud(routes, PLANS)
