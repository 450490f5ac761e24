"""Who is calling, and which part of the dealer tree the call may reach."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    """An authenticated dealer, possibly acting as one of its descendants."""

    actor_id: int
    # The dealer whose subtree this request may reach (the impersonated one, if any).
    scope_id: int
    scope_level: str
    scope_path: tuple[int, ...]
    client_id: str
    impersonating: bool
    source_ip: str

    @property
    def is_operator(self) -> bool:
        return self.scope_level == "operator"

    @property
    def acting_as_id(self) -> int | None:
        return self.scope_id if self.impersonating else None
