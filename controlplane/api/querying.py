"""Query-string filters of the hand-written list routes (the generic ones live in
resource.py): each known parameter becomes one SQL condition on one bound parameter."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from controlplane.api.fields import FieldError
from controlplane.api.problems import invalid
from controlplane.api.resource import Filter
from controlplane.api.routes import QueryParam


def conditions(query: Mapping[str, str], filters: Iterable[Filter], args: list[Any],
               extra: Mapping[str, Filter] | None = None) -> list[str]:
    """SQL conditions for `query`, appending their values to `args`. Unknown parameters and
    bad values answer 422 naming each one. `extra` filters are parsed and bound too."""
    known = {f.name: f for f in filters}
    known.update(extra or {})
    where: list[str] = []
    errors: list[tuple[str, str]] = []
    for name, raw in query.items():
        try:
            if name not in known:
                raise FieldError("is not a known query parameter")
            args.append(known[name].parse(raw))
            where.append(known[name].condition.format(len(args)))
        except FieldError as exc:
            errors.append((f"/query/{name[:50]}", str(exc)))
    if errors:
        raise invalid(errors)
    return where


def params(filters: Iterable[Filter]) -> tuple[QueryParam, ...]:
    return tuple(QueryParam(f.name, f.schema, f.description) for f in filters)
