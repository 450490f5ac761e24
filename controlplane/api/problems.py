"""RFC 9457 problem details, and the translation of database refusals into them."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from aiohttp import web

from controlplane.api.fields import ValidationFailed

PROBLEM_TYPE = "https://pbx.invalid/problems/"


class ApiError(Exception):
    """An error the client can act on; rendered as application/problem+json."""

    def __init__(self, status: int, title: str, detail: str = "", *, kind: str = "",
                 errors: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.kind = kind or title.lower().replace(" ", "-")
        self.errors = errors
        self.headers = headers or {}

    def response(self) -> web.Response:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE + self.kind,
            "title": self.title,
            "status": self.status,
        }
        if self.detail:
            body["detail"] = self.detail
        if self.errors:
            body["errors"] = self.errors
        return web.Response(status=self.status, text=json.dumps(body),
                            content_type="application/problem+json", headers=self.headers)


def not_found(what: str = "object") -> ApiError:
    return ApiError(404, "Not found", f"no such {what}", kind="not-found")


def forbidden(detail: str) -> ApiError:
    return ApiError(403, "Forbidden", detail, kind="forbidden")


def conflict(detail: str, pointer: str = "") -> ApiError:
    errors = [{"pointer": f"#{pointer}", "detail": detail}] if pointer else None
    return ApiError(409, "Conflict", detail, kind="conflict", errors=errors)


def invalid(errors: list[tuple[str, str]], detail: str = "") -> ApiError:
    return ApiError(
        422, "Invalid request",
        detail or "; ".join(f"{p.lstrip('/') or 'body'} {d}" for p, d in errors),
        kind="validation",
        errors=[{"pointer": f"#{p}", "detail": d} for p, d in errors],
    )


def from_validation(exc: ValidationFailed) -> ApiError:
    return invalid(exc.errors)


# Constraint names from the migrations -> (field pointer, message).
CONSTRAINTS: dict[str, tuple[str, str]] = {
    "dealers_login_key": ("/login", "is already taken"),
    "dealers_portal_domain": ("/portal_domain", "is already used by another dealer"),
    "dealer_level_rule": ("/level", ""),
    "dealer_caps_within_parent": ("", ""),
    "dealer_caps_above_children": ("", ""),
    "dealer_caps_above_tenants": ("", ""),
    "dealer_tenant_cap": ("", "the tenant cap of this dealer or an ancestor is reached"),
    "dealer_extension_cap": ("", "the extension cap of this dealer or an ancestor is reached"),
    "dealer_balance_floor": ("/amount", "would take the balance below its floor"),
    "dealer_immutable_position": ("", ""),
    "tenants_sip_domain": ("/sip_domain", "is already used by another tenant"),
    "tenant_caps_within_dealer": ("", ""),
    "tenant_caps_above_extensions": ("/max_calls", ""),
    "tenant_extension_cap": ("", "the tenant's extension cap is reached"),
    "tenant_cancel_final": ("/status", ""),
    "extensions_tenant_id_number_key": ("/number", "is already used in this tenant"),
    "extensions_account_code_key": ("/account_code", "is already used on the platform"),
    "extension_tenant_cancelled": ("", ""),
    "extension_calls_within_tenant": ("/max_calls", ""),
    "nodes_name_key": ("/name", "is already used by another node"),
    "plans_dealer_id_name_key": ("/name", "is already used by another plan of this dealer"),
    "plan_rate_table_visible": ("/rate_table_id", "is not a rate table offered to the plan's"
                                                  " owner"),
    "rate_tables_dealer_id_name_key": ("/name", "is already used by another rate table of"
                                                " this dealer"),
    "dids_e164_key": ("/local_number", "is already a DID"),
    "dids_range_id_local_number_key": ("/local_number", "is already a DID"),
    "did_within_range": ("/local_number", ""),
    "range_order": ("/last_number", "must not be below first_number"),
    "range_size": ("/last_number", "a range holds at most 100000 numbers"),
    "range_covers_dids": ("", ""),
    "range_prefix_in_use": ("", ""),
}


# Refusals caused by the current state of other objects, not by the request itself.
STATE_CONFLICTS = {"dealer_balance_floor", "tenant_caps_above_extensions", "range_covers_dids"}


def from_database(exc: asyncpg.PostgresError) -> ApiError | None:
    """A refusal by a constraint or trigger, as the client should see it; None if unknown."""
    name = getattr(exc, "constraint_name", None) or ""
    if isinstance(exc, asyncpg.RestrictViolationError):
        return conflict("the object is still in use by other objects")
    if isinstance(exc, asyncpg.NumericValueOutOfRangeError):
        return conflict("the result would be out of the range the platform keeps")
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        if "still referenced" in (getattr(exc, "detail", None) or ""):
            return conflict("the object is still in use by other objects")
        return invalid([("", "refers to an object that does not exist")])
    if name in CONSTRAINTS:
        pointer, message = CONSTRAINTS[name]
        message = message or str(exc)
        state = name in STATE_CONFLICTS or name.endswith("_cap")
        if isinstance(exc, asyncpg.UniqueViolationError) or state or not pointer:
            return conflict(message, pointer)
        return invalid([(pointer, message)])
    if isinstance(exc, asyncpg.UniqueViolationError):
        return conflict("an object with these values already exists")
    if isinstance(exc, (asyncpg.CharacterNotInRepertoireError,
                        asyncpg.UntranslatableCharacterError)):
        return invalid([("", "holds a character the platform does not keep (such as NUL)")])
    if isinstance(exc, (asyncpg.LockNotAvailableError, asyncpg.QueryCanceledError)):
        return ApiError(503, "Service unavailable", "the database is busy; retry later",
                        kind="unavailable", headers={"Retry-After": "5"})
    return None
