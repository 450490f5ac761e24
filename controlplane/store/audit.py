"""The audit log: who changed what, when, as whom, with the object before and after."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from controlplane.model.principal import Principal


async def record(conn: asyncpg.Connection, p: Principal, action: str, entity: str,
                 entity_id: int | str, scope_path: Sequence[int],
                 before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
    """Append one entry, in the caller's transaction, so no change goes unrecorded."""
    await conn.execute(
        "INSERT INTO audit_log (actor_id, acting_as_id, client_id, source_ip, action, entity,"
        " entity_id, scope_path, before, after)"
        " VALUES ($1, $2, $3, $4::inet, $5, $6, $7, $8, $9, $10)",
        p.actor_id, p.acting_as_id, p.client_id, p.source_ip or None, action, entity,
        str(entity_id), list(scope_path), before, after,
    )
