"""Classification of dialled numbers: known Brazilian and foreign numbers, their classes."""

import pytest

from controlplane.rating.classify import (
    AREA_CODES,
    CallClass,
    classify,
    country_code,
    permitted,
)

L, N, INTL = CallClass.LOCAL, CallClass.NATIONAL, CallClass.INTERNATIONAL
VC1, VC2, VC3 = CallClass.MOBILE_VC1, CallClass.MOBILE_VC2, CallClass.MOBILE_VC3
FREE, SOS, SPECIAL, BAD = (CallClass.TOLLFREE, CallClass.EMERGENCY, CallClass.SPECIAL,
                           CallClass.INVALID)

# (dialled, caller's DDD, class, E.164, callee DDD, carrier)
KNOWN = [
    # local fixed: 8 digits starting 2 to 5
    ("32345678", "11", L, "+551132345678", "11", None),
    ("2345-6789", "21", L, "+552123456789", "21", None),
    ("55551234", "51", L, "+555155551234", "51", None),
    ("43214321", "61", L, "+556143214321", "61", None),
    # local mobile: VC1
    ("987654321", "11", VC1, "+5511987654321", "11", None),
    ("9 8765-4321", "85", VC1, "+5585987654321", "85", None),
    ("011987654321", "11", VC1, "+5511987654321", "11", None),
    ("01511987654321", "11", VC1, "+5511987654321", "11", "15"),
    # VC2: another DDD with the same first digit
    ("01519987654321", "11", VC2, "+5519987654321", "19", "15"),
    ("02112991234567", "11", VC2, "+5512991234567", "12", "21"),
    ("04122999998888", "21", VC2, "+5522999998888", "22", "41"),
    ("+5519987654321", "11", VC2, "+5519987654321", "19", None),
    ("19987654321", "11", VC2, "+5519987654321", "19", None),
    # 55 + DDD + number: E.164 without its "+", as trunks and click-to-dial send it
    ("5511998765432", "11", VC1, "+5511998765432", "11", None),
    (" 551132345678", "21", N, "+551132345678", "11", None),
    # VC3: a different first digit
    ("02121987654321", "11", VC3, "+5521987654321", "21", "21"),
    ("01485999887766", "11", VC3, "+5585999887766", "85", "14"),
    ("+5511987654321", "21", VC3, "+5511987654321", "11", None),
    ("021987654321", "11", VC3, "+5521987654321", "21", None),
    # national fixed (LDN)
    ("0211132345678", "21", N, "+551132345678", "11", "21"),
    ("0152133334444", "11", N, "+552133334444", "21", "15"),
    ("0411233334444", "11", N, "+551233334444", "12", "41"),
    ("02133334444", "11", N, "+552133334444", "21", None),
    ("+55 (21) 3333-4444", "11", N, "+552133334444", "21", None),
    # the caller's own DDD with a carrier is still local
    ("0211132345678", "11", L, "+551132345678", "11", "21"),
    ("+551132345678", "11", L, "+551132345678", "11", None),
    # international (LDI): 00 + carrier + country
    ("0021 1 212 555 1234", "11", INTL, "+12125551234", None, "21"),
    ("0015351912345678", "11", INTL, "+351912345678", None, "15"),
    ("00144930123456", "11", INTL, "+4930123456", None, "14"),
    ("+12125551234", "11", INTL, "+12125551234", None, None),
    ("+351 912 345 678", "11", INTL, "+351912345678", None, None),
    ("+44 20 7946 0958", "11", INTL, "+442079460958", None, None),
    # 00 + carrier + 55: a Brazilian number dialled the international way
    ("00215521987654321", "11", VC3, "+5521987654321", "21", "21"),
    # toll free, emergency, special
    ("08001234567", "11", FREE, "+558001234567", None, None),
    ("0800 123 4567", "31", FREE, "+558001234567", None, None),
    ("0800123456", "11", FREE, "+55800123456", None, None),
    ("+558001234567", "11", FREE, "+558001234567", None, None),
    ("190", "11", SOS, None, None, None),
    ("192", "11", SOS, None, None, None),
    ("193", "99", SOS, None, None, None),
    ("199", "11", SOS, None, None, None),
    ("153", "11", SOS, None, None, None),  # municipal guard
    ("185", "21", SOS, None, None, None),  # sea rescue (Navy)
    ("112", "11", SOS, None, None, None),
    ("188", "11", FREE, None, None, None),
    ("03001234567", "11", SPECIAL, "+553001234567", None, None),
    ("09001234567", "11", SPECIAL, "+559001234567", None, None),
    ("40041234", "11", SPECIAL, "+5540041234", None, None),
    ("4003-1234", "21", SPECIAL, "+5540031234", None, None),
    ("102", "11", SPECIAL, None, None, None),
    ("10315", "11", SPECIAL, None, None, None),
    # four digits from 10 stay invalid: extension numbers such as 1001 must not reach a carrier
    ("1058", "11", BAD, None, None, None),
    ("909032345678", "11", SPECIAL, None, None, None),
    # invalid: area codes that do not exist, bad lengths, bad characters
    ("02120987654321", "11", BAD, None, None, None),
    ("0212332345678", "11", BAD, None, None, None),
    ("2087654321", "11", BAD, None, None, None),
    ("+552023456789", "11", BAD, None, None, None),
    ("1234567", "11", BAD, None, None, None),
    ("1234", "11", BAD, None, None, None),
    ("123456789012", "11", BAD, None, None, None),
    ("12345678", "11", BAD, None, None, None),
    ("887654321", "11", BAD, None, None, None),
    ("68765432", "11", BAD, None, None, None),
    ("", "11", BAD, None, None, None),
    ("*98", "11", BAD, None, None, None),
    ("11 9876 5432 1#", "11", BAD, None, None, None),
    ("+1234567890123456", "11", BAD, None, None, None),
    ("+2801234567", "11", BAD, None, None, None),
    ("+12", "11", BAD, None, None, None),
    ("+55119876543", "11", BAD, None, None, None),
    ("000112125551234", "11", BAD, None, None, None),
    ("0091", "11", BAD, None, None, None),
]


@pytest.mark.parametrize(("dialled", "caller", "kind", "e164", "area", "carrier"), KNOWN,
                         ids=[f"{k[0] or 'empty'}@{k[1]}" for k in KNOWN])
def test_known_numbers(dialled, caller, kind, e164, area, carrier):
    c = classify(dialled, caller)
    assert c.call_class is kind, c
    assert (c.e164, c.area, c.carrier) == (e164, area, carrier), c
    assert c.dialled == dialled
    if kind is BAD:
        assert c.reason


def test_the_table_is_big_enough():
    assert len(KNOWN) >= 40


@pytest.mark.parametrize(("dialled", "needs"), [
    ("0211132345678", False), ("02133334444", True), ("+552133334444", True),
    ("02121987654321", False), ("021987654321", True), ("+12125551234", True),
    ("0021 1 212 555 1234", False), ("987654321", False), ("32345678", False),
    ("011987654321", False), ("190", False), ("08001234567", False),
])
def test_long_distance_without_a_carrier_code_keeps_its_class_and_says_so(dialled, needs):
    c = classify(dialled, "11")
    assert c.needs_carrier is needs
    assert c.as_dict()["needs_carrier"] is needs


def test_area_codes_are_anatels_67():
    assert len(AREA_CODES) == 67
    assert {"20", "23", "25", "26", "29", "30", "36", "39", "40", "50", "52", "56", "57",
            "58", "59", "60", "70", "72", "76", "78", "80", "90"}.isdisjoint(AREA_CODES)
    assert {"11", "19", "21", "22", "24", "27", "28", "37", "38", "46", "49", "53", "55",
            "69", "77", "79", "89", "99"} <= AREA_CODES


@pytest.mark.parametrize(("digits", "code"), [
    ("12125551234", "1"), ("79161234567", "7"), ("5511987654321", "55"),
    ("351912345678", "351"), ("442079460958", "44"), ("8613800138000", "86"),
    ("2801234567", None), ("", None),
])
def test_country_codes_are_prefix_free_and_in_service(digits, code):
    assert country_code(digits) == code


def test_an_unknown_caller_area_or_country_is_a_configuration_error():
    with pytest.raises(ValueError):
        classify("32345678", "20")
    with pytest.raises(ValueError):
        classify("+5511987654321", "20")
    with pytest.raises(ValueError):
        classify("1\u0662\u0663", "20")  # digits, but not 0-9
    with pytest.raises(ValueError):
        classify("32345678", "11", country="28")


def test_emergency_and_utility_codes_need_no_caller_area():
    """They do not depend on it: a tenant whose area code is wrong still reaches them."""
    for area in ("20", ""):
        assert classify("190", area).call_class == SOS
        assert classify("1 9 3", area).call_class == SOS
        assert classify("188", area).call_class == FREE
        assert classify("102", area).call_class == SPECIAL


def test_outside_brazil_only_e164_is_understood():
    assert classify("+351912345678", "", country="351").call_class is N
    assert classify("+5511987654321", "", country="351").call_class is INTL
    assert classify("912345678", "", country="351").call_class is BAD


@pytest.mark.parametrize(("dialled", "allowed"), [
    ("32345678", True), ("987654321", True), ("19987654321", False), ("+12125551234", False),
    ("190", True), ("08001234567", True), ("40041234", True), ("1234", False),
])
def test_permissions_follow_the_class(dialled, allowed):
    flags = {"allow_local": True, "allow_national": True, "allow_international": False,
             "allow_vc1": True, "allow_vc2": False, "allow_vc3": False}
    assert permitted(classify(dialled, "11"), flags) is allowed
    # emergency and toll free calls are never blocked
    closed = dict.fromkeys(flags, False)
    assert permitted(classify("190", "11"), closed)
    assert permitted(classify("08001234567", "11"), closed)


@pytest.mark.parametrize(("dialled", "rated_as", "digits"), [
    ("102", "+55102", "102"),            # a short service code: priced as +55 and the code
    ("103 15", "+5510315", "10315"),
    ("909032345678", None, "909032345678"),  # a collect call: its callee pays
    ("0800 123 4567", None, "08001234567"),  # toll free
    ("190", None, "190"),
    ("32345678", "+551132345678", "32345678"),
    ("12", None, "12"),                   # invalid: never priced
])
def test_what_rate_tables_price_a_call_by(dialled, rated_as, digits):
    c = classify(dialled, "11")
    assert (c.rated_as, c.digits) == (rated_as, digits)
    assert c.as_dict()["rated_as"] == rated_as
