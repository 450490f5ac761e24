"""What kind of call a dialled number is: the one answer both permissions and rating use.

Brazil first (caller country 55). The forms a Brazilian line dials:

* local: 8 digits (fixed, starting 2 to 5) or 9 digits (mobile, starting 9), in the caller's
  own area code (DDD);
* national: `0` + carrier code (CSP, 2 digits) + DDD + number, e.g. `0 21 11 98765 4321`;
  also `0` + DDD + number and the bare DDD + number (10 or 11 digits) that mobile phones
  and SIP trunks use, both without a carrier;
* international: `00` + CSP + country code + number; the two digits after `00` are always
  the carrier (they cannot be told apart from a country code otherwise);
* E.164: `+55...` or `+<country>...`, never with a carrier;
* non-geographic: 0800 (toll free), 0300 / 0500 / 0900, and the nationwide 8-digit numbers
  such as 4004-xxxx and 3003-xxxx; short codes: emergency (190...), other 1XX services,
  carrier services 10XYZ; collect calls (9090..., 90 + CSP...).

Classes: fixed in the caller's DDD is `local`, in another DDD `national` (LDN); a mobile is
`mobile_vc1` in the caller's DDD, `mobile_vc2` in a DDD with the same first digit,
`mobile_vc3` otherwise; anything abroad is `international` (LDI). The DDD is the finest
granularity known here: two local areas inside one DDD are treated as local.

Carrier rule: LDN, LDI, VC2 and VC3 calls need a carrier code. A number dialled without one
keeps its real class (its price and permission depend on it) and says `needs_carrier`: the
call controller then applies the trunk's default carrier or refuses the call. That is a
routing policy, not a property of the number.

Pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class CallClass(StrEnum):
    LOCAL = "local"
    NATIONAL = "national"
    INTERNATIONAL = "international"
    MOBILE_VC1 = "mobile_vc1"
    MOBILE_VC2 = "mobile_vc2"
    MOBILE_VC3 = "mobile_vc3"
    TOLLFREE = "tollfree"
    EMERGENCY = "emergency"
    SPECIAL = "special"
    INVALID = "invalid"


BRAZIL = "55"

# Anatel's 67 area codes (DDD), by state.
AREA_CODES = frozenset({
    "11", "12", "13", "14", "15", "16", "17", "18", "19",  # SP
    "21", "22", "24",  # RJ
    "27", "28",  # ES
    "31", "32", "33", "34", "35", "37", "38",  # MG
    "41", "42", "43", "44", "45", "46",  # PR
    "47", "48", "49",  # SC
    "51", "53", "54", "55",  # RS
    "61",  # DF
    "62", "64",  # GO
    "63",  # TO
    "65", "66",  # MT
    "67",  # MS
    "68",  # AC
    "69",  # RO
    "71", "73", "74", "75", "77",  # BA
    "79",  # SE
    "81", "87",  # PE
    "82",  # AL
    "83",  # PB
    "84",  # RN
    "85", "88",  # CE
    "86", "89",  # PI
    "91", "93", "94",  # PA
    "92", "97",  # AM
    "95",  # RR
    "96",  # AP
    "98", "99",  # MA
})

# ITU-T E.164 country codes in service. They are prefix-free: at most one matches.
_ONE_DIGIT = "1 7"
_TWO_DIGITS = ("20 27 30 31 32 33 34 36 39 40 41 43 44 45 46 47 48 49 51 52 53 54 55 56 57 58"
               " 60 61 62 63 64 65 66 81 82 84 86 90 91 92 93 94 95 98")
_THREE_DIGITS = (
    "211 212 213 216 218 220 221 222 223 224 225 226 227 228 229 230 231 232 233 234 235 236"
    " 237 238 239 240 241 242 243 244 245 246 247 248 249 250 251 252 253 254 255 256 257 258"
    " 260 261 262 263 264 265 266 267 268 269 290 291 297 298 299"
    " 350 351 352 353 354 355 356 357 358 359 370 371 372 373 374 375 376 377 378 379 380 381"
    " 382 383 385 386 387 389 420 421 423"
    " 500 501 502 503 504 505 506 507 508 509 590 591 592 593 594 595 596 597 598 599"
    " 670 672 673 674 675 676 677 678 679 680 681 682 683 685 686 687 688 689 690 691 692"
    " 800 808 850 852 853 855 856 870 880 881 882 883 886 888"
    " 960 961 962 963 964 965 966 967 968 970 971 972 973 974 975 976 977 979 992 993 994 995"
    " 996 998")
COUNTRY_CODES = frozenset(f"{_ONE_DIGIT} {_TWO_DIGITS} {_THREE_DIGITS}".split())

EMERGENCY = frozenset({"153", "185", "190", "191", "192", "193", "194", "197", "198",
                       "199", "128", "112", "911"})
# Public utility numbers that are free to call and must never be blocked.
FREE_UTILITY = frozenset({"100", "136", "180", "181", "188"})
# Non-geographic national numbers: 0800 + 6 or 7 digits, and the like.
NON_GEOGRAPHIC = {"800": CallClass.TOLLFREE, "300": CallClass.SPECIAL,
                  "500": CallClass.SPECIAL, "900": CallClass.SPECIAL}
# Nationwide 8-digit numbers (dialled without an area code, same number in every DDD).
NATIONWIDE = frozenset({"3003", "3004", "4000", "4001", "4002", "4003", "4004", "4020",
                        "4062", "4090"})

CARRIER_CLASSES = frozenset({CallClass.NATIONAL, CallClass.INTERNATIONAL,
                             CallClass.MOBILE_VC2, CallClass.MOBILE_VC3})
FREE_CLASSES = frozenset({CallClass.TOLLFREE, CallClass.EMERGENCY})
# The extension flag that allows each class; classes absent here are always allowed
# (emergency, toll free) or never (invalid).
PERMISSION_FLAGS = {
    CallClass.LOCAL: "allow_local", CallClass.NATIONAL: "allow_national",
    CallClass.INTERNATIONAL: "allow_international", CallClass.MOBILE_VC1: "allow_vc1",
    CallClass.MOBILE_VC2: "allow_vc2", CallClass.MOBILE_VC3: "allow_vc3",
    # 0300/0900, 4004 and 1XX services are billed like national calls
    CallClass.SPECIAL: "allow_national",
}

_SEPARATORS = re.compile(r"[\s.()/-]")
_DIALLED = re.compile(r"^\+?[0-9]{1,20}$")
_CARRIER = re.compile(r"^[1-9][0-9]$")
_DIGITS = re.compile(r"[0-9]+")
MAX_E164 = 15


@dataclass(frozen=True)
class Classification:
    """A dialled number, understood: class, E.164 form, callee country and area, carrier."""

    dialled: str
    call_class: CallClass
    e164: str | None = None      # '+5511987654321'; None for short codes, collect calls
    country: str | None = None   # callee's country code
    area: str | None = None      # callee's DDD (Brazil)
    carrier: str | None = None   # CSP dialled, if any
    reason: str = ""             # why invalid, or what a special number is

    @property
    def digits(self) -> str:
        """What was dialled, without separators: what a carrier is sent when there is no
        E.164 form (a short service code, a collect call)."""
        return _SEPARATORS.sub("", self.dialled)

    @property
    def rated_as(self) -> str | None:
        """The number rate tables price the call by: its E.164 form, or +55 and the code
        for a short service code (102, 10315: see `exact_rate`); None when the caller pays nothing
        (toll free, emergency, a collect call, which its callee pays) or for an invalid
        number."""
        if self.call_class in FREE_CLASSES or self.call_class == CallClass.INVALID:
            return None
        if self.e164 is not None:
            return self.e164
        if self.call_class == CallClass.SPECIAL and len(self.digits) <= 5:
            return f"+{BRAZIL}{self.digits}"
        return None

    @property
    def exact_rate(self) -> bool:
        """Rated by a rate of exactly its `rated_as` prefix, else by the country's: a short
        service code's +55 and code would otherwise match area codes' rates (156: 5515)."""
        return self.e164 is None and self.rated_as is not None

    @property
    def needs_carrier(self) -> bool:
        """A long-distance call dialled without a carrier code."""
        return self.call_class in CARRIER_CLASSES and self.carrier is None

    @property
    def is_mobile(self) -> bool:
        return self.call_class in (CallClass.MOBILE_VC1, CallClass.MOBILE_VC2,
                                   CallClass.MOBILE_VC3)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["call_class"] = str(self.call_class)
        out["needs_carrier"] = self.needs_carrier
        out["rated_as"] = self.rated_as
        return out


def classify(dialled: str, caller_area: str, country: str = BRAZIL) -> Classification:
    """Classify `dialled` as called from DDD `caller_area` in `country`.

    Raises ValueError when the caller's own country or area code is unknown (that is the
    platform's configuration, not the caller's input), but for short codes (emergency and
    utility services), which do not depend on it; every dialled string gets a class.
    """
    if country not in COUNTRY_CODES:
        raise ValueError(f"unknown country code {country!r}")
    cleaned = _SEPARATORS.sub("", dialled)
    if country == BRAZIL and caller_area not in AREA_CODES:
        short = _short_code(dialled, cleaned) if _DIGITS.fullmatch(cleaned) else None
        if short is None:
            raise ValueError(f"unknown Brazilian area code {caller_area!r}")
        return short
    if not _DIALLED.fullmatch(cleaned):
        return _invalid(dialled, "only digits, with an optional leading +, can be dialled")
    if cleaned.startswith("+"):
        return _from_e164(dialled, cleaned[1:], caller_area, country, None)
    if country != BRAZIL:
        return _invalid(dialled, "outside Brazil only E.164 numbers (+...) are understood")
    return _brazilian(dialled, cleaned, caller_area)


def permitted(c: Classification, flags: Mapping[str, bool]) -> bool:
    """Whether an extension with these allow_* flags may place this call."""
    if c.call_class in FREE_CLASSES:
        return True
    flag = PERMISSION_FLAGS.get(c.call_class)
    return flag is not None and bool(flags.get(flag, False))


def _invalid(dialled: str, reason: str) -> Classification:
    return Classification(dialled, CallClass.INVALID, reason=reason)


def _brazilian(dialled: str, d: str, caller_area: str) -> Classification:
    """A number as dialled on a Brazilian line (no '+')."""
    short = _short_code(dialled, d)
    if short is not None:
        return short
    if d.startswith("00"):
        return _international(dialled, d[2:], caller_area)
    if d.startswith("0"):
        return _trunk_prefixed(dialled, d, caller_area)
    if d.startswith("90") and 12 <= len(d) <= 15:
        return Classification(dialled, CallClass.SPECIAL, reason="collect call")
    if len(d) in (8, 9):
        return _national(dialled, caller_area, d, None, caller_area)
    if len(d) in (10, 11):
        return _national(dialled, d[:2], d[2:], None, caller_area)
    if len(d) in (12, 13) and d.startswith(BRAZIL) and d[2:4] in AREA_CODES:
        # 55 + DDD + number: E.164 without its "+" (trunks, click-to-dial, CRMs)
        return _brazil_e164(dialled, d[2:], caller_area, None)
    return _invalid(dialled, "a Brazilian number has 8 or 9 digits, or 10 or 11 with the"
                             " area code, or starts with 0 or 00")


def _short_code(dialled: str, d: str) -> Classification | None:
    if d in EMERGENCY:
        return Classification(dialled, CallClass.EMERGENCY, reason="emergency service")
    if d in FREE_UTILITY:
        return Classification(dialled, CallClass.TOLLFREE, reason="public utility number")
    if len(d) == 3 and d[0] == "1":
        return Classification(dialled, CallClass.SPECIAL, reason="public utility service")
    if len(d) == 5 and d.startswith("103"):  # 103 + carrier code
        return Classification(dialled, CallClass.SPECIAL, reason="carrier service code")
    return None


def _international(dialled: str, rest: str, caller_area: str) -> Classification:
    """'00' + CSP + country code + number."""
    carrier, number = rest[:2], rest[2:]
    if not _CARRIER.fullmatch(carrier):
        return _invalid(dialled, "an international call is 00 + carrier code (2 digits)"
                                 " + country code + number")
    return _from_e164(dialled, number, caller_area, BRAZIL, carrier)


def _trunk_prefixed(dialled: str, d: str, caller_area: str) -> Classification:
    """'0' + [CSP] + DDD + number, or a non-geographic 0800-style number."""
    kind = NON_GEOGRAPHIC.get(d[1:4])
    if kind is not None and len(d) in (10, 11):
        return Classification(dialled, kind, e164=f"+55{d[1:]}", country=BRAZIL,
                              reason=f"0{d[1:4]} number")
    if len(d) in (11, 12):
        return _national(dialled, d[1:3], d[3:], None, caller_area)
    if len(d) in (13, 14):
        carrier = d[1:3]
        if not _CARRIER.fullmatch(carrier):
            return _invalid(dialled, f"{carrier} is not a carrier code")
        return _national(dialled, d[3:5], d[5:], carrier, caller_area)
    return _invalid(dialled, "a national number is 0 + carrier code (2 digits) + area code"
                             " (2 digits) + 8 or 9 digits")


def _national(dialled: str, area: str, number: str, carrier: str | None,
              caller_area: str) -> Classification:
    """A Brazilian subscriber number in DDD `area`."""
    if area not in AREA_CODES:
        return _invalid(dialled, f"area code {area} does not exist in Brazil")
    if len(number) == 8 and number[:4] in NATIONWIDE:
        return Classification(dialled, CallClass.SPECIAL, e164=f"+55{number}", country=BRAZIL,
                              carrier=carrier, reason="nationwide number")
    e164 = f"+55{area}{number}"
    if len(number) == 9 and number[0] == "9":
        if area == caller_area:
            kind = CallClass.MOBILE_VC1
        elif area[0] == caller_area[0]:
            kind = CallClass.MOBILE_VC2
        else:
            kind = CallClass.MOBILE_VC3
    elif len(number) == 8 and number[0] in "2345":
        kind = CallClass.LOCAL if area == caller_area else CallClass.NATIONAL
    else:
        return _invalid(dialled, "a fixed number has 8 digits starting 2 to 5, a mobile"
                                 " number 9 digits starting 9")
    return Classification(dialled, kind, e164=e164, country=BRAZIL, area=area,
                          carrier=carrier)


def country_code(digits: str) -> str | None:
    """The country code an E.164 number (without '+') starts with, if any is in service."""
    for size in (1, 2, 3):
        if digits[:size] in COUNTRY_CODES:
            return digits[:size]
    return None


def _from_e164(dialled: str, digits: str, caller_area: str, country: str,
               carrier: str | None) -> Classification:
    """A full international number (no '+'), dialled from `country`."""
    if len(digits) > MAX_E164:
        return _invalid(dialled, f"an E.164 number has at most {MAX_E164} digits")
    cc = country_code(digits)
    if cc is None:
        return _invalid(dialled, "no country has this country code")
    national = digits[len(cc):]
    if cc == BRAZIL and country == BRAZIL:
        return _brazil_e164(dialled, national, caller_area, carrier)
    if len(national) < 4 or len(digits) < 7:
        return _invalid(dialled, "too short for an international number")
    kind = CallClass.NATIONAL if cc == country else CallClass.INTERNATIONAL
    return Classification(dialled, kind, e164=f"+{digits}", country=cc, carrier=carrier)


def _brazil_e164(dialled: str, national: str, caller_area: str,
                 carrier: str | None) -> Classification:
    """+55 followed by a national number, from a Brazilian line."""
    kind = NON_GEOGRAPHIC.get(national[:3])
    if kind is not None and len(national) in (9, 10):
        return Classification(dialled, kind, e164=f"+55{national}", country=BRAZIL,
                              carrier=carrier, reason=f"0{national[:3]} number")
    if len(national) == 8 and national[:4] in NATIONWIDE:
        return Classification(dialled, CallClass.SPECIAL, e164=f"+55{national}",
                              country=BRAZIL, carrier=carrier, reason="nationwide number")
    if len(national) not in (10, 11):
        return _invalid(dialled, "a Brazilian number is +55, the area code (2 digits) and"
                                 " 8 or 9 digits")
    return _national(dialled, national[:2], national[2:], carrier, caller_area)
