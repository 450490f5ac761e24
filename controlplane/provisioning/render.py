"""Desired state -> Asterisk: the PJSIP objects of an extension (pushed one by one through
ARI), a tenant's dialplan and a node's transports (files, reloaded when they change).

Values were validated by the API; `conf` checks again, so a value that could end a line,
start a comment or open a section never reaches a node even if a writer bypassed the API.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

TEMPLATES = Path(os.environ.get("PBX_TEMPLATES",
                                Path(__file__).resolve().parents[2] / "dialplan_templates"))
_UNSAFE = re.compile(r"[\x00-\x1f\x7f;\[\]\\]")
CODECS = "ulaw,alaw,gsm"


class UnsafeValue(ValueError):
    """A value that could break out of its place in an Asterisk configuration."""


def conf(value: object) -> str:
    text = str(value)
    if _UNSAFE.search(text) or text != text.strip():
        # the value itself is never shown: it may be a password
        raise UnsafeValue("a value with a line break, comment or section mark, or blanks "
                          "around it, cannot go into Asterisk configuration")
    return text


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=False,
                             trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["conf"] = conf
    return env


ENV = _environment()


@dataclass(frozen=True)
class ExtensionState:
    """What one active extension should look like on its node."""

    account_code: str
    tenant_id: int
    number: str
    name: str
    sip_password: str
    max_calls: int | None
    transport: str | None = None

    def objects(self) -> list[tuple[str, str, list[tuple[str, str]]]]:
        """(type, id, fields) in creation order: auth, aor, endpoint."""
        code = self.account_code
        display = self.name or self.number
        endpoint = [
            ("context", f"t{self.tenant_id}-internal"),
            ("aors", code),
            ("auth", code),
            ("disallow", "all"),
            ("allow", CODECS),
            ("direct_media", "no"),
            ("rtp_symmetric", "yes"),
            ("force_rport", "yes"),
            ("rewrite_contact", "yes"),
            ("callerid", f'"{display}" <{self.number}>'),
            ("accountcode", code),
            # no transfers (README, "Transfers are not offered"): a REFER gets 603, and an
            # INVITE with Replaces too (asterisk-patches/)
            ("allow_transfer", "no"),
            ("set_var", f"PBX_TENANT={self.tenant_id}"),
            ("set_var", f"PBX_EXTEN={self.number}"),
        ]
        if self.max_calls is not None:
            endpoint.append(("device_state_busy_at", str(self.max_calls)))
        if self.transport:
            endpoint.append(("transport", self.transport))
        return [
            ("auth", code, [("auth_type", "digest"), ("username", code),
                            ("password", self.sip_password)]),
            ("aor", code, [("max_contacts", "3"), ("remove_existing", "yes"),
                           ("minimum_expiration", "60"), ("default_expiration", "300")]),
            ("endpoint", code, endpoint),
        ]

    @property
    def fingerprint(self) -> str:
        data = json.dumps(self.objects(), separators=(",", ":"))
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    @property
    def marker(self) -> str:
        """What the node keeps beside the objects (astdb pbx-fp/<code>): enough to undo them."""
        return f"{self.fingerprint}:{self.tenant_id}:{self.number}"

    def check(self) -> None:
        """UnsafeValue, naming the field, when any value of the objects could break out of
        its place (the API never lets one through; a writer bypassing it might)."""
        for object_type, _, fields in self.objects():
            for key, value in fields:
                try:
                    conf(value)
                except UnsafeValue as exc:
                    raise UnsafeValue(f"{object_type} {key}: {exc}") from None
        for key, value in (("number", self.number), ("tenant", self.tenant_id)):
            if not str(value).isdigit():
                raise UnsafeValue(f"{key}: not digits")

    def render(self, *, reveal: bool = False) -> str:
        objects = [(t, i, [(k, v if reveal or k != "password" else "********") for k, v in f])
                   for t, i, f in self.objects()]
        self.check()
        return ENV.get_template("extension_pjsip.conf.j2").render(ext=self, objects=objects)


@dataclass(frozen=True)
class TenantState:
    id: int
    name: str


def render_tenant_dialplan(tenant: TenantState) -> str:
    conf(tenant.name or "tenant")
    return ENV.get_template("tenant_dialplan.conf.j2").render(tenant=tenant)


@dataclass(frozen=True)
class Transport:
    name: str
    address: str
    port: int = 5060


def transport_name(address: str) -> str:
    return "reg-" + re.sub(r"[^0-9a-f]", "-", address.lower())


def transports_for(addresses: list[str], port: int = 5060) -> list[Transport]:
    """A transport per registration address that is an IP address (names resolve elsewhere)."""
    out = []
    for raw in sorted(set(addresses)):
        try:
            ip = ipaddress.ip_address(raw)
        except ValueError:
            continue
        if ip.version == 4:
            out.append(Transport(transport_name(str(ip)), str(ip), port))
    return out


def render_transports(transports: list[Transport]) -> str:
    return ENV.get_template("node_transports.conf.j2").render(transports=transports)
