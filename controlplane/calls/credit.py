"""How much talk time to grant and how much credit that holds.

Credit is reserved before it is used: a call is granted whole billing increments ahead
(about `AHEAD_SECONDS` at a time) and the amount reserved for a grant is what the call
would cost if it lasted exactly that long, rounded up, so the final price (rounded half-up,
at most the granted time) never exceeds what was held.
"""

from __future__ import annotations

import functools
import math
from decimal import Decimal
from fractions import Fraction

from controlplane.rating.tariff import PLACES, Rate, billable_seconds

AHEAD_SECONDS = 60
_SCALE = 10**PLACES


def cost_up(seconds: int, rate: Rate) -> Decimal:
    """What a call of exactly `seconds` costs, rounded up to the balance's precision."""
    billed = billable_seconds(seconds, rate)
    if billed == 0:
        return Decimal(0)
    exact = Fraction(rate.connection_fee) + Fraction(rate.price_per_minute) * billed / 60
    return Decimal(math.ceil(exact * _SCALE)).scaleb(-PLACES)


def is_free(rate: Rate) -> bool:
    return rate.price_per_minute == 0 and rate.connection_fee == 0


def grant_options(rate: Rate, granted: int, reserved: Decimal,
                  ahead: int = AHEAD_SECONDS) -> list[tuple[int, Decimal]]:
    """Candidate new totals of granted seconds, the longest first, each with the extra
    credit it needs beyond `reserved`. The first grant starts with the first increment;
    later ones add whole next increments."""
    if granted == 0:
        extra_blocks = max(0, math.ceil((ahead - rate.first_increment) / rate.next_increment))
        totals = [rate.first_increment + n * rate.next_increment
                  for n in range(extra_blocks, -1, -1)]
    else:
        blocks = max(1, math.ceil(ahead / rate.next_increment))
        totals = [granted + m * rate.next_increment for m in range(blocks, 0, -1)]
    return [(total, max(Decimal(0), cost_up(total, rate) - reserved)) for total in totals]


@functools.lru_cache(maxsize=4096)
def first_grant_options(rate: Rate, ahead: int = AHEAD_SECONDS) -> tuple[tuple[int, Decimal], ...]:
    """`grant_options` of a call not yet granted anything: the same for every call at one
    rate, so computed once per rate (exact fractions cost more than the rest of a
    decision's Python)."""
    return tuple(grant_options(rate, 0, Decimal(0), ahead))


def best_grant(options: list[tuple[int, Decimal]],
               available: Decimal) -> tuple[int, Decimal] | None:
    """The longest option the available credit pays for, or None."""
    for total, extra in options:
        if extra <= available:
            return total, extra
    return None
