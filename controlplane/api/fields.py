"""Declarative request fields: one declaration validates input and documents it in OpenAPI.

Every text that may one day reach an Asterisk node is held to `SAFE_TEXT`: no control
characters, no brackets, semicolons, commas, `$`, quotes or backslashes, so nothing from the
API can open a new section, start a comment, split an argument or expand a variable.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from controlplane.rating.classify import AREA_CODES

SAFE_TEXT = re.compile(r"^[\w .@&'+/:-]*$")
HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
LOGIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{2,63}$")
NOTES_FORBIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
INT32_MAX = 2**31 - 1


class FieldError(ValueError):
    """One field's value is not acceptable; the message says why."""


def storable(value: str) -> str:
    """Refuse text PostgreSQL cannot hold (NUL) or UTF-8 cannot encode (lone surrogates)."""
    if "\x00" in value:
        raise FieldError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FieldError("must be valid Unicode text") from exc
    return value


def is_ascii_digits(raw: str) -> bool:
    """str.isdigit() also accepts '²' and '①', which int() refuses."""
    return raw.isascii() and raw.isdigit()


# No character below 0x21 nor DEL: what a host name or URL may never contain.
_BLANK_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True)
class Field:
    """A request field: its JSON Schema for the docs and a parser that checks and converts."""

    schema: Mapping[str, Any]
    parse: Callable[[Any], Any]
    required: bool = False
    nullable: bool = False
    write_only: bool = False
    description: str = ""

    def openapi(self) -> dict[str, Any]:
        out = dict(self.schema)
        if self.nullable:
            t = out.get("type")
            out["type"] = [t, "null"] if isinstance(t, str) else t
        if self.description:
            out["description"] = self.description
        if self.write_only:
            out["writeOnly"] = True
        return out

    def but(self, **changes: Any) -> Field:
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        values.update(changes)
        return Field(**values)


def _text_parser(
    min_len: int, max_len: int, pattern: re.Pattern[str] | None, what: str
) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str):
            raise FieldError("must be a string")
        if not min_len <= len(value) <= max_len:
            raise FieldError(f"must be {min_len} to {max_len} characters long")
        storable(value)
        if value != value.strip():
            raise FieldError("must not start or end with white space")
        if pattern is not None and not pattern.fullmatch(value):
            raise FieldError(f"must be {what}")
        return value

    return parse


def text(max_len: int = 100, *, min_len: int = 1, required: bool = False, description: str = "",
         nullable: bool = False) -> Field:
    """A name or other free text that may reach a node's configuration."""
    return Field(
        {"type": "string", "minLength": min_len, "maxLength": max_len,
         "pattern": SAFE_TEXT.pattern},
        _text_parser(min_len, max_len, SAFE_TEXT,
                     "letters, digits, spaces and . _ @ & ' + / : - only"),
        required=required, nullable=nullable, description=description,
    )


def notes(max_len: int = 2000, description: str = "") -> Field:
    """Free text kept in the database only (never rendered to a node); may span lines."""

    def parse(value: Any) -> str:
        if not isinstance(value, str):
            raise FieldError("must be a string")
        if len(value) > max_len:
            raise FieldError(f"must be at most {max_len} characters long")
        storable(value)
        if NOTES_FORBIDDEN.search(value):
            raise FieldError("must not contain control characters other than new lines and tabs")
        return value

    return Field({"type": "string", "maxLength": max_len}, parse, description=description)


def pattern(regex: str, what: str, *, max_len: int = 64, required: bool = False,
            nullable: bool = False, description: str = "", write_only: bool = False) -> Field:
    compiled = re.compile(regex)
    return Field(
        {"type": "string", "pattern": regex, "maxLength": max_len},
        _text_parser(1, max_len, compiled, what),
        required=required, nullable=nullable, description=description, write_only=write_only,
    )


def integer(minimum: int = 0, maximum: int = INT32_MAX, *, required: bool = False,
            nullable: bool = False, description: str = "") -> Field:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError("must be an integer")
        if not minimum <= value <= maximum:
            raise FieldError(f"must be between {minimum} and {maximum}")
        return value

    return Field({"type": "integer", "minimum": minimum, "maximum": maximum}, parse,
                 required=required, nullable=nullable, description=description)


def reference(description: str, *, required: bool = False, nullable: bool = False) -> Field:
    """The id of another object (a positive 63-bit integer)."""
    return integer(1, 2**63 - 1, required=required, nullable=nullable, description=description)


def boolean(description: str = "", *, required: bool = False) -> Field:
    def parse(value: Any) -> bool:
        if not isinstance(value, bool):
            raise FieldError("must be true or false")
        return value

    return Field({"type": "boolean"}, parse, required=required, description=description)


def choice(values: tuple[str, ...], description: str = "", *, required: bool = False) -> Field:
    def parse(value: Any) -> str:
        if value not in values:
            raise FieldError("must be one of: " + ", ".join(values))
        return str(value)

    return Field({"type": "string", "enum": list(values)}, parse, required=required,
                 description=description)


# a decimal string as the schema of money() says (no exponent, no "_", no spaces)
DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?", re.ASCII)


def money(minimum: Decimal = Decimal("-1000000000"), maximum: Decimal = Decimal("1000000000"), *,
          required: bool = False, description: str = "", places: int = 4) -> Field:
    """An amount, given as a JSON number or a decimal string, with at most `places` decimals."""

    def parse(value: Any) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise FieldError("must be a number or a decimal string")
        if isinstance(value, str) and (len(value) > 40 or not DECIMAL.fullmatch(value)):
            raise FieldError("must be a decimal number, e.g. 12.50")
        try:
            amount = Decimal(str(value))
        except InvalidOperation as exc:
            raise FieldError("must be a decimal number") from exc
        if not amount.is_finite():
            raise FieldError("must be a finite number")
        if not minimum <= amount <= maximum:
            raise FieldError(f"must be between {minimum} and {maximum}")
        if amount != amount.quantize(Decimal(1).scaleb(-places)):
            raise FieldError(f"must have at most {places} decimal places")
        return amount

    return Field({"type": ["number", "string"],
                  "pattern": rf"^-?[0-9]+(\.[0-9]{{1,{places}}})?$"}, parse,
                 required=required, description=description)


def _parse_host(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise FieldError("must be an IP address or a host name")
    if "%" in value:
        # ipaddress accepts any text as an IPv6 zone id, new lines included.
        raise FieldError("must not carry an IPv6 zone id")
    if _BLANK_OR_CONTROL.search(value) or not value.isascii():
        raise FieldError("must be an IP address or a host name in ASCII, with no blanks")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    host = value.lower().rstrip(".")
    if not HOSTNAME.fullmatch(host) or host.replace(".", "").isdigit():
        raise FieldError("must be an IP address or a fully qualified host name")
    return host


def host(description: str = "", *, required: bool = False, nullable: bool = False) -> Field:
    return Field({"type": "string", "maxLength": 253, "format": "hostname-or-ip"}, _parse_host,
                 required=required, nullable=nullable, description=description)


def domain(description: str = "", *, required: bool = False, nullable: bool = False) -> Field:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or _BLANK_OR_CONTROL.search(value) or not value.isascii():
            raise FieldError("must be a host name")
        name = value.lower().rstrip(".")
        if "." not in name or not HOSTNAME.fullmatch(name) or name.replace(".", "").isdigit():
            raise FieldError("must be a fully qualified domain name such as pbx.example.com")
        return name

    return Field({"type": "string", "format": "hostname", "maxLength": 253}, parse,
                 required=required, nullable=nullable, description=description)


def url(description: str = "", *, required: bool = False, nullable: bool = False) -> Field:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or len(value) > 500:
            raise FieldError("must be an http(s) URL of at most 500 characters")
        if _BLANK_OR_CONTROL.search(value) or not value.isascii():
            raise FieldError("must be an ASCII URL with no blanks or control characters "
                             "(percent-encode anything else)")
        scheme, sep, rest = value.partition("://")
        if scheme not in ("http", "https") or not sep:
            raise FieldError("must start with http:// or https://")
        authority, _, path = rest.partition("/")
        hostport = authority.rsplit("@", 1)[-1]
        if hostport.startswith("["):
            name, port = hostport, ""
        else:
            name, _, port = hostport.partition(":")
        if port and (not is_ascii_digits(port) or not 0 < int(port) < 65536):
            raise FieldError("has an invalid port")
        _parse_host(name.strip("[]"))
        if any(c in value for c in " \"'<>\\^`{|}") or NOTES_FORBIDDEN.search(value):
            raise FieldError("contains characters not allowed in a URL")
        return value

    return Field({"type": "string", "format": "uri", "maxLength": 500}, parse,
                 required=required, nullable=nullable, description=description)


def cidr_list(description: str = "", *, required: bool = False) -> Field:
    def parse(value: Any) -> list[str]:
        if not isinstance(value, list) or not 1 <= len(value) <= 50:
            raise FieldError("must be a list of 1 to 50 networks such as 203.0.113.7/32")
        out = []
        for item in value:
            if not isinstance(item, str) or "%" in item or not item.isascii():
                raise FieldError("every network must be a string such as 192.0.2.0/24")
            try:
                out.append(str(ipaddress.ip_network(item, strict=True)))
            except ValueError as exc:
                raise FieldError(f"{item!r} is not a network address ({exc})") from exc
        return out

    return Field({"type": "array", "items": {"type": "string", "format": "cidr"},
                  "minItems": 1, "maxItems": 50}, parse, required=required,
                 description=description)


def password(description: str = "", *, required: bool = False, min_len: int = 8) -> Field:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or not min_len <= len(value) <= 128:
            raise FieldError(f"must be a string of {min_len} to 128 characters")
        storable(value)
        if NOTES_FORBIDDEN.search(value) or "\n" in value or "\t" in value:
            raise FieldError("must not contain control characters")
        return value

    return Field({"type": "string", "minLength": min_len, "maxLength": 128,
                  "format": "password"}, parse, required=required, write_only=True,
                 description=description)


@dataclass
class ValidationFailed(Exception):
    """The request body has invalid fields: a list of (JSON pointer, detail)."""

    errors: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Schema:
    """A request body: named fields, unknown ones refused."""

    name: str
    fields: Mapping[str, Field]

    def validate(self, body: Any, *, partial: bool = False) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ValidationFailed([("", "the request body must be a JSON object")])
        errors: list[tuple[str, str]] = []
        out: dict[str, Any] = {}
        for key in body:
            if key not in self.fields:
                errors.append((f"/{_escape(key)}", "is not a known field"))
        for key, spec in self.fields.items():
            if key not in body:
                if spec.required and not partial:
                    errors.append((f"/{key}", "is required"))
                continue
            value = body[key]
            if value is None:
                if spec.nullable:
                    out[key] = None
                else:
                    errors.append((f"/{key}", "must not be null"))
                continue
            try:
                out[key] = spec.parse(value)
            except FieldError as exc:
                errors.append((f"/{key}", str(exc)))
        if partial and not body and not errors:
            errors.append(("", "names no field to change"))
        if errors:
            raise ValidationFailed(errors)
        return out

    def openapi(self, *, partial: bool = False) -> dict[str, Any]:
        required = [k for k, f in self.fields.items() if f.required and not partial]
        out: dict[str, Any] = {
            "type": "object",
            "additionalProperties": False,
            "properties": {k: f.openapi() for k, f in self.fields.items()},
        }
        if required:
            out["required"] = required
        if partial:
            out["minProperties"] = 1
        return out

    def only(self, *names: str) -> Schema:
        return Schema(self.name, {k: v for k, v in self.fields.items() if k in names})

    def without(self, *names: str) -> Schema:
        return Schema(self.name, {k: v for k, v in self.fields.items() if k not in names})


def _escape(key: str) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")[:100]


def area_code(value: Any) -> str:
    """A Brazilian area code (DDD) in service: calls are classified from it (a code none is
    would leave none of its caller's calls classifiable)."""
    if not isinstance(value, str) or value not in AREA_CODES:
        raise FieldError("must be a Brazilian area code (DDD) in service, such as 11")
    return value
