"""The audit log, read-only, scoped like everything else."""

from __future__ import annotations

from datetime import datetime

from controlplane.api.fields import FieldError
from controlplane.api.resource import Filter, Resource, int_filter, register_crud, text_filter
from controlplane.api.routes import RouteTable


def time_filter(name: str, condition: str, description: str) -> Filter:
    def parse(raw: str) -> datetime:
        if len(raw) > 40 or not raw.isascii():
            raise FieldError("must be an ISO 8601 date-time with offset")
        try:
            value = datetime.fromisoformat(raw)
        except ValueError as exc:
            raise FieldError("must be an ISO 8601 date-time with offset") from exc
        if value.tzinfo is None:
            raise FieldError("must include a UTC offset, e.g. 2026-01-31T00:00:00Z")
        if not 1970 <= value.year <= 9998:
            raise FieldError("must be between the years 1970 and 9998")
        return value

    return Filter(name, condition, parse, {"type": "string", "format": "date-time"}, description)


class Audit(Resource):
    name = "audit"
    entity = "audit_entry"
    table = "audit_log"
    alias = "a"
    tag = "audit"
    # A dealer sees who changed its objects; of a dealer above it (its parent acting on
    # them), not which API client it used nor from which address.
    select_sql = ("SELECT a.id, a.at, a.actor_id, a.acting_as_id,"
                  " CASE WHEN mine THEN a.client_id END AS client_id,"
                  " CASE WHEN mine THEN host(a.source_ip) END AS source_ip, a.action,"
                  " a.entity, a.entity_id, a.before, a.after, a.scope_path AS owner_path"
                  " FROM audit_log a CROSS JOIN LATERAL (SELECT coalesce((SELECT d.path @>"
                  " ARRAY[$1]::bigint[] FROM dealers d WHERE d.id = a.actor_id), false)"
                  " AS mine) m WHERE a.scope_path @> ARRAY[$1]::bigint[]")
    filters = (
        text_filter("entity", "a.entity = ${}", "object kind, e.g. tenant", max_len=40),
        text_filter("entity_id", "a.entity_id = ${}", "object id", max_len=64),
        text_filter("action", "a.action = ${}", "create, update, delete, ...", max_len=40),
        int_filter("actor_id", "a.actor_id = ${}", "dealer who acted"),
        int_filter("acting_as_id", "a.acting_as_id = ${}", "dealer impersonated"),
        time_filter("since", "a.at >= ${}", "entries at or after"),
        time_filter("until", "a.at < ${}", "entries before"),
    )
    deletable = False


AUDIT = Audit()


def register(routes: RouteTable) -> None:
    register_crud(routes, AUDIT)
