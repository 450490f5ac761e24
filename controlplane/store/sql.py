"""Small helpers to write INSERT/UPDATE statements from validated fields.

Column names come only from the store's own whitelist; values are always parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import asyncpg


def dealer_chain_active(alias: str) -> str:
    """SQL true when the dealer `alias` (a dealers row) and every dealer above it are active:
    deactivating a dealer stops its whole subtree (migration 0017)."""
    return f"NOT EXISTS (SELECT 1 FROM dealers a WHERE a.id = ANY ({alias}.path) AND NOT a.active)"


def insert(table: str, values: Mapping[str, Any], allowed: Iterable[str],
           returning: str = "*") -> tuple[str, list[Any]]:
    cols = [c for c in values if c in set(allowed)]
    placeholders = ", ".join(f"${i}" for i in range(1, len(cols) + 1))
    sql = (f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({placeholders}) "
           f"RETURNING {returning}")
    return sql, [values[c] for c in cols]


def update(table: str, key: int, values: Mapping[str, Any], allowed: Iterable[str],
           returning: str = "*") -> tuple[str, list[Any]]:
    cols = [c for c in values if c in set(allowed)]
    if not cols:
        return f"SELECT {returning} FROM {table} WHERE id = $1", [key]
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(cols, start=2))
    return (f"UPDATE {table} SET {sets} WHERE id = $1 RETURNING {returning}",
            [key, *(values[c] for c in cols)])


def record(row: asyncpg.Record | None, hidden: Iterable[str] = ()) -> dict[str, Any] | None:
    if row is None:
        return None
    drop = set(hidden)
    return {k: v for k, v in row.items() if k not in drop}


def json_default(value: Any) -> Any:
    """JSON fallback for values PostgreSQL returns: times, decimals, addresses."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None
    return str(value)
