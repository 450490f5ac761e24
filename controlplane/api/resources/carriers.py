"""Carrier trunks of a node: where its external calls go, and whose calls to the platform's
DIDs it accepts (identified by address). Operator only, like the nodes themselves."""

from __future__ import annotations

from controlplane.api import fields as F
from controlplane.api.resource import int_filter, register_crud
from controlplane.api.resources.nodes import OperatorOnly
from controlplane.api.routes import RouteTable

CARRIER_FIELDS = {
    "node_id": F.reference("node whose calls use this carrier", required=True),
    "name": F.text(64, required=True),
    "host": F.host("the carrier's SIP address: calls go there, and calls from it are"
                   " accepted as the carrier's", required=True),
    "port": F.integer(1, 65535),
    "transport": F.choice(("udp", "tcp")),
    "tech_prefix": F.pattern(r"^[0-9#*]{0,10}$", "digits, # or *, at most 10",
                             max_len=10),
    "priority": F.integer(0, 1000, description="lowest is used first"),
    "active": F.boolean("whether calls use this carrier"),
}


class Carriers(OperatorOnly):
    name = "carriers"
    entity = "carrier"
    what = "carriers"
    table = "carriers"
    alias = "c"
    tag = "carriers"
    select_sql = ("SELECT c.*, op.path AS owner_path FROM carriers c,"
                  " dealers op WHERE op.level = 'operator' AND $1::bigint IS NOT NULL")
    create_schema = F.Schema("carrier_create", CARRIER_FIELDS)
    update_schema = F.Schema("carrier_update", CARRIER_FIELDS).without("node_id")
    filters = (int_filter("node_id", "c.node_id = ${}", "carriers of this node"),)
    columns = frozenset(CARRIER_FIELDS)


CARRIERS = Carriers()


def register(routes: RouteTable) -> None:
    register_crud(routes, CARRIERS)
