"""Calling plans: named records extensions reference. A dealer's plans are offered to its
whole subtree, read-only below it."""

from __future__ import annotations

from typing import Any

import asyncpg

from controlplane.api import fields as F
from controlplane.api.problems import conflict, forbidden, invalid
from controlplane.api.resource import Resource, register_crud, subtree_filter, text_filter
from controlplane.api.routes import RouteTable
from controlplane.model.principal import Principal

PLAN_FIELDS = {
    "dealer_id": F.reference("owning dealer; defaults to the caller"),
    "name": F.text(100, required=True),
    "kind": F.choice(("national", "international")),
    "description": F.text(300, min_len=0),
}


class Plans(Resource):
    name = "plans"
    entity = "plan"
    table = "plans"
    alias = "pl"
    tag = "plans"
    # Own subtree's plans, plus those the caller's ancestors offer to it.
    select_sql = ("SELECT pl.*, d.path AS owner_path FROM plans pl"
                  " JOIN dealers d ON d.id = pl.dealer_id"
                  " WHERE (d.path @> ARRAY[$1]::bigint[]"
                  "        OR pl.dealer_id = ANY ("
                  "            (SELECT path FROM dealers WHERE id = $1)::bigint[]))")
    create_schema = F.Schema("plan_create", PLAN_FIELDS)
    update_schema = F.Schema("plan_update", PLAN_FIELDS).without("dealer_id", "kind")
    filters = (subtree_filter("d.path"),
               text_filter("kind", "pl.kind = ${}", "plan kind",
                           choices=("national", "international")))
    columns = frozenset(PLAN_FIELDS)

    async def before_create(self, conn: asyncpg.Connection, p: Principal,
                            data: dict[str, Any]) -> dict[str, Any]:
        owner = data.setdefault("dealer_id", p.scope_id)
        if not await conn.fetchval("SELECT 1 FROM dealers WHERE id = $1 AND"
                                   " path @> ARRAY[$2]::bigint[]", owner, p.scope_id):
            raise invalid([("/dealer_id", "is not a dealer you manage")])
        return data

    def _own(self, p: Principal, current: asyncpg.Record) -> None:
        if p.scope_id not in current["owner_path"]:
            raise forbidden("this plan is offered by a parent dealer and is read-only here")

    async def before_update(self, conn: asyncpg.Connection, p: Principal,
                            current: asyncpg.Record, data: dict[str, Any]) -> dict[str, Any]:
        self._own(p, current)
        return data

    async def before_delete(self, conn: asyncpg.Connection, p: Principal,
                            current: asyncpg.Record) -> None:
        self._own(p, current)
        if await conn.fetchval("SELECT 1 FROM extensions WHERE plan_id = $1 OR intl_plan_id = $1"
                               " LIMIT 1", current["id"]):
            raise conflict("extensions still use this plan")


PLANS = Plans()


def register(routes: RouteTable) -> None:
    register_crud(routes, PLANS)
