"""What a call costs under one rate, and how long a call an amount pays for.

A rate bills like Brazilian carriers do: a call shorter than `free_seconds` costs nothing
(e.g. under 3 s); any longer call pays the connection fee and at least `first_increment`
seconds (e.g. 30), then whole blocks of `next_increment` seconds (e.g. 6), at
`price_per_minute`.

Arithmetic is exact (fractions); a price is rounded once, half-up, to 4 decimal places (the
precision balances are kept in). A reservation (`interval_cost`) rounds up instead, so
what is reserved interval by interval never falls short of the final price.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

PLACES = 4
_SCALE = 10**PLACES
# The longest call `max_seconds_for` grants when the rate is free per minute.
MAX_CALL_SECONDS = 86_400
Seconds = int | float | Decimal | Fraction


@dataclass(frozen=True)
class Rate:
    """One row of a rate table."""

    prefix: str
    price_per_minute: Decimal
    connection_fee: Decimal = Decimal(0)
    first_increment: int = 30
    next_increment: int = 6
    free_seconds: int = 0
    description: str = ""
    call_class: str | None = None
    id: int | None = None

    def __post_init__(self) -> None:
        if self.price_per_minute < 0 or self.connection_fee < 0:
            raise ValueError("prices cannot be negative")
        if self.first_increment < 1 or self.next_increment < 1:
            raise ValueError("increments are at least 1 second")
        if self.free_seconds < 0:
            raise ValueError("free_seconds cannot be negative")

    @property
    def increments(self) -> str:
        """'30/6', as the trade writes it."""
        return f"{self.first_increment}/{self.next_increment}"


def _exact(seconds: Seconds) -> Fraction:
    value = Fraction(seconds)
    if value < 0:
        raise ValueError("a duration cannot be negative")
    return value


def billable_seconds(seconds: Seconds, rate: Rate) -> int:
    """The seconds a call of this duration is billed for (0 when it is free).

    A call of 0 seconds was never connected and is never billed, whatever the threshold.
    """
    exact = _exact(seconds)
    if exact == 0 or exact < rate.free_seconds:
        return 0
    whole = math.ceil(exact)
    if whole <= rate.first_increment:
        return rate.first_increment
    blocks = math.ceil(Fraction(whole - rate.first_increment, rate.next_increment))
    return rate.first_increment + blocks * rate.next_increment


def _cost(billed: int, rate: Rate) -> Fraction:
    """Exact cost of `billed` seconds (connection fee included when anything is billed)."""
    if billed == 0:
        return Fraction(0)
    return Fraction(rate.connection_fee) + Fraction(rate.price_per_minute) * billed / 60


def _round_half_up(value: Fraction) -> Decimal:
    units = math.floor(value * _SCALE + Fraction(1, 2))
    return Decimal(units).scaleb(-PLACES)


def _round_up(value: Fraction) -> Decimal:
    return Decimal(math.ceil(value * _SCALE)).scaleb(-PLACES)


def price(seconds: Seconds, rate: Rate) -> Decimal:
    """What a call of `seconds` costs, rounded once to 4 places, half-up."""
    return _round_half_up(_cost(billable_seconds(seconds, rate), rate))


def interval_cost(rate: Rate, first: bool) -> Decimal:
    """What to reserve for the next interval of a call: the first one carries the
    connection fee and lasts `first_increment`, the others `next_increment`. Rounded up."""
    if first:
        return _round_up(_cost(rate.first_increment, rate))
    return _round_up(Fraction(rate.price_per_minute) * rate.next_increment / 60)


def interval_seconds(rate: Rate, first: bool) -> int:
    """How long the interval `interval_cost` pays for lasts."""
    return rate.first_increment if first else rate.next_increment


def max_seconds_for(amount: Decimal, rate: Rate, cap: int = MAX_CALL_SECONDS) -> int:
    """The longest call whose `price` does not exceed `amount`, at most `cap` seconds.

    Given a balance, this is how many seconds can be granted. Calls shorter than the free
    threshold cost nothing, so even an empty balance grants `free_seconds - 1`.
    """
    free = max(0, rate.free_seconds - 1)
    # price(s) <= amount  <=>  exact cost < (amount floored to 4 places) + half a unit
    ceiling = Fraction(math.floor(Fraction(amount) * _SCALE), _SCALE) + Fraction(1, 2 * _SCALE)
    budget = ceiling - Fraction(rate.connection_fee)
    if budget <= 0:
        return min(cap, free)
    if rate.price_per_minute == 0:
        return cap
    # the largest billed time first + k * next whose cost stays below the ceiling
    affordable = budget * 60 / Fraction(rate.price_per_minute)
    k = math.ceil((affordable - rate.first_increment) / rate.next_increment) - 1
    if k < 0:
        return min(cap, free)
    return min(cap, max(free, rate.first_increment + k * rate.next_increment))
