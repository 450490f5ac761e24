"""Grants and reservations: what a call may talk for, and what that holds."""

from __future__ import annotations

from decimal import Decimal

from controlplane.calls import credit
from controlplane.calls.credit import best_grant, cost_up, grant_options
from controlplane.rating.tariff import Rate, price

SIX = Rate("551144", Decimal("6.00"), first_increment=6, next_increment=6)
BR = Rate("55", Decimal("1.20"), first_increment=30, next_increment=6, free_seconds=3)


def test_first_grant_is_about_a_minute_in_whole_increments_longest_first():
    options = grant_options(BR, 0, Decimal(0), ahead=60)
    assert [s for s, _ in options] == [60, 54, 48, 42, 36, 30]
    assert options[0][1] == Decimal("1.2000") and options[-1][1] == Decimal("0.6000")


def test_first_grant_takes_what_the_balance_pays_for():
    assert best_grant(grant_options(SIX, 0, Decimal(0)), Decimal("1.20")) == (12, Decimal("1.2"))
    assert best_grant(grant_options(SIX, 0, Decimal(0)), Decimal("0.59")) is None


def test_later_grants_add_next_increments_and_need_only_the_difference():
    options = grant_options(SIX, 12, Decimal("1.20"), ahead=12)
    assert options == [(24, Decimal("1.2000")), (18, Decimal("0.6000"))]


def test_what_is_reserved_always_covers_the_final_price():
    odd = Rate("1", Decimal("0.0777"), connection_fee=Decimal("0.0333"), first_increment=30,
               next_increment=6)
    for seconds in range(30, 600, 6):
        assert cost_up(seconds, odd) >= price(seconds, odd)
        assert cost_up(seconds, odd) - price(seconds, odd) <= Decimal("0.0001")


def test_first_grant_options_are_computed_once_per_rate_and_equal_the_general_ones():
    rate = Rate(prefix="55", price_per_minute=Decimal("0.37"), connection_fee=Decimal("0.05"),
                first_increment=30, next_increment=6)
    first = credit.first_grant_options(rate, 60)
    assert list(first) == credit.grant_options(rate, 0, Decimal(0), 60)
    assert credit.first_grant_options(rate, 60) is first
    other = Rate(prefix="55", price_per_minute=Decimal("0.38"), connection_fee=Decimal("0.05"),
                 first_increment=30, next_increment=6)
    assert credit.first_grant_options(other, 60) != first
