"""Request validation: what may reach an Asterisk node and what may not."""

from decimal import Decimal

import pytest

from controlplane.api import fields as F


@pytest.mark.parametrize("value", ["Acme", "São Paulo Telecom", "O'Brien & Co.", "a/b:c-d_e@f+g"])
def test_safe_text_accepts_ordinary_names(value):
    assert F.text().parse(value) == value


@pytest.mark.parametrize("value", [
    "new\nline", "semi;colon", "[section]", "comma,arg", "${VAR}", "back\\slash", 'quote"',
    "tab\there", "nul\x00", " padded", "(paren)", "<tag>", "a=b",
])
def test_safe_text_refuses_what_could_break_asterisk_configuration(value):
    with pytest.raises(F.FieldError):
        F.text().parse(value)


@pytest.mark.parametrize(("value", "ok"), [
    ("203.0.113.10", True), ("2001:db8::1", True), ("sip.reseller.example.com", True),
    ("localhost", True), ("bad_host.example.com", False), ("a..b", False), ("1.2.3", False),
    ("sip.example.com;transport=tcp", False), ("-x.example.com", False),
    ("fe80::1%x\n[evil];", False), ("fe80::1%eth0", False),
])
def test_registration_address_is_an_ip_or_hostname(value, ok):
    if ok:
        assert F.host().parse(value)
    else:
        with pytest.raises(F.FieldError):
            F.host().parse(value)


def test_integers_refuse_booleans_and_out_of_range():
    field = F.integer(0, 10)
    assert field.parse(10) == 10
    for bad in (True, 11, -1, 1.5, "3", 2**70):
        with pytest.raises(F.FieldError):
            field.parse(bad)


def test_money_keeps_exact_decimals():
    field = F.money(Decimal(0))
    assert field.parse("19.90") == Decimal("19.90")
    assert field.parse(3) == Decimal(3)
    for bad in ("1.00001", "NaN", "Infinity", "-1", "1e400", True, [1]):
        with pytest.raises(F.FieldError):
            field.parse(bad)


def test_cidr_list_requires_network_addresses():
    field = F.cidr_list()
    assert field.parse(["192.0.2.0/24", "2001:db8::/32"]) == ["192.0.2.0/24", "2001:db8::/32"]
    for bad in ([], ["192.0.2.1/24"], ["nope"], "192.0.2.0/24", [1]):
        with pytest.raises(F.FieldError):
            field.parse(bad)


def test_schema_reports_every_bad_field_and_unknown_ones():
    schema = F.Schema("s", {"name": F.text(required=True), "n": F.integer()})
    with pytest.raises(F.ValidationFailed) as exc:
        schema.validate({"n": "x", "extra": 1})
    pointers = sorted(p for p, _ in exc.value.errors)
    assert pointers == ["/extra", "/n", "/name"]


def test_partial_schema_needs_at_least_one_field():
    schema = F.Schema("s", {"name": F.text(required=True)})
    with pytest.raises(F.ValidationFailed):
        schema.validate({}, partial=True)
    assert schema.validate({"name": "x"}, partial=True) == {"name": "x"}


@pytest.mark.parametrize(("value", "ok"), [
    ("https://portal.example.com/login", True), ("http://10.0.0.1:8080", True),
    ("javascript:alert(1)", False), ("https://exa mple.com", False), ("ftp://x.example", False),
    ("https://x.example.com:99999", False), ("https://x.example.com/<script>", False),
])
def test_portal_url(value, ok):
    if ok:
        assert F.url().parse(value) == value
    else:
        with pytest.raises(F.FieldError):
            F.url().parse(value)
