"""Prices of calls under Brazilian-style rates, every expected value worked out by hand."""

from decimal import Decimal as D
from fractions import Fraction

import pytest

from controlplane.rating.tariff import (
    Rate,
    billable_seconds,
    interval_cost,
    interval_seconds,
    max_seconds_for,
    price,
)

# 30/6 at R$ 0.12 a minute (R$ 0.002 a second), calls under 3 s free
A = Rate("55", D("0.12"), first_increment=30, next_increment=6, free_seconds=3)
# the same with a R$ 0.05 connection fee
B = Rate("55", D("0.12"), D("0.05"), 30, 6, 3)
# 60/60 at R$ 0.50, no free threshold
C = Rate("55", D("0.50"), first_increment=60, next_increment=60)
# 1/1 at R$ 0.09 (R$ 0.0015 a second) with a R$ 0.10 connection fee
E = Rate("55", D("0.09"), D("0.10"), 1, 1)

DURATIONS = (0, 2, 3, 29, 30, 31, 36, 37, 60, 61, 3600)
# (rate, [(billable seconds, price) for each of DURATIONS])
EXPECTED = {
    "30/6": (A, [(0, "0"), (0, "0"), (30, "0.06"), (30, "0.06"), (30, "0.06"), (36, "0.072"),
                 (36, "0.072"), (42, "0.084"), (60, "0.12"), (66, "0.132"),
                 (3600, "7.20")]),
    "30/6+fee": (B, [(0, "0"), (0, "0"), (30, "0.11"), (30, "0.11"), (30, "0.11"),
                     (36, "0.122"), (36, "0.122"), (42, "0.134"), (60, "0.17"), (66, "0.182"),
                     (3600, "7.25")]),
    "60/60": (C, [(0, "0"), (60, "0.50"), (60, "0.50"), (60, "0.50"), (60, "0.50"),
                  (60, "0.50"), (60, "0.50"), (60, "0.50"), (60, "0.50"), (120, "1.00"),
                  (3600, "30.00")]),
    "1/1+fee": (E, [(0, "0"), (2, "0.103"), (3, "0.1045"), (29, "0.1435"), (30, "0.145"),
                    (31, "0.1465"), (36, "0.154"), (37, "0.1555"), (60, "0.19"),
                    (61, "0.1915"), (3600, "5.50")]),
}
CASES = [(name, rate, seconds, billed, D(cost))
         for name, (rate, rows) in EXPECTED.items()
         for seconds, (billed, cost) in zip(DURATIONS, rows, strict=True)]


@pytest.mark.parametrize(("name", "rate", "seconds", "billed", "cost"), CASES,
                         ids=[f"{c[0]}-{c[2]}s" for c in CASES])
def test_price_table(name, rate, seconds, billed, cost):
    assert billable_seconds(seconds, rate) == billed
    got = price(seconds, rate)
    assert got == cost
    assert got.as_tuple().exponent == -4  # always 4 decimal places


def test_the_free_threshold_is_strict_and_compares_the_real_duration():
    assert price(D("2.999"), A) == 0
    assert price(3, A) == D("0.06")
    # a fraction of a second past a block opens the next block
    assert billable_seconds(D("30.2"), A) == 36
    assert billable_seconds(Fraction(61, 2), A) == 36


def test_rounding_is_half_up_once_at_the_end():
    tiny = Rate("1", D("0.003"), first_increment=1, next_increment=1)
    assert price(1, tiny) == D("0.0001")   # exactly 0.00005: half-up
    assert price(3, tiny) == D("0.0002")   # exactly 0.00015: half-up, not half-even
    seventh = Rate("1", D("0.1"), first_increment=1, next_increment=1)
    assert price(7, seventh) == D("0.0117")  # 0.011666...
    # rounding per second would lose everything: 60 x 0.0000167 -> 0
    milli = Rate("1", D("0.001"), first_increment=1, next_increment=1)
    assert price(60, milli) == D("0.0010")


@pytest.mark.parametrize(("rate", "amount", "seconds"), [
    (A, "0", 2), (A, "0.0599", 2), (A, "0.06", 30), (A, "0.0719", 30), (A, "0.072", 36),
    (A, "1.00", 498), (A, "7.20", 3600), (A, "-5", 2),
    (B, "0.10", 2), (B, "0.11", 30), (B, "0.122", 36),
    (C, "0.49", 0), (C, "0.50", 60), (C, "0.99", 60), (C, "1.00", 120),
    (E, "0.10", 0), (E, "0.1015", 1), (E, "0.19", 60), (E, "5.50", 3600),
    # rounding slack: 2 s cost 0.0001 (0.0001 exact), 3 s cost 0.0002 (0.00015 half-up)
    (Rate("1", D("0.003"), first_increment=1, next_increment=1), "0.0001", 2),
    # more than 4 places in the amount: what is below a unit does not buy time
    (A, "0.05999999", 2),
])
def test_max_seconds_for(rate, amount, seconds):
    assert max_seconds_for(D(amount), rate) == seconds


def test_max_seconds_for_is_the_longest_affordable_call():
    """Brute force: the answer is affordable and one second more is not."""
    rates = [A, B, C, E, Rate("1", D("0.07"), D("0.013"), 30, 6, 5),
             Rate("1", D("1.234567"), first_increment=45, next_increment=15, free_seconds=50)]
    for rate in rates:
        for cents in range(0, 300, 7):
            amount = D(cents) / 100
            limit = max_seconds_for(amount, rate, cap=5000)
            assert price(limit, rate) <= amount, (rate, amount, limit)
            assert price(limit + 1, rate) > amount, (rate, amount, limit)


def test_a_rate_free_per_minute_grants_the_cap():
    free = Rate("1", D(0), first_increment=30, next_increment=6)
    assert max_seconds_for(D(0), free) == 86_400
    assert max_seconds_for(D(0), free, cap=600) == 600
    fee_only = Rate("1", D(0), D("0.5"))
    assert max_seconds_for(D("0.49"), fee_only) == 0
    assert max_seconds_for(D("0.50"), fee_only, cap=120) == 120
    assert max_seconds_for(D("100"), A, cap=90) == 90


def test_interval_costs_for_reservations():
    assert (interval_cost(A, first=True), interval_seconds(A, first=True)) == (D("0.06"), 30)
    assert (interval_cost(A, first=False), interval_seconds(A, first=False)) == (D("0.012"), 6)
    assert interval_cost(B, first=True) == D("0.11")
    assert interval_cost(B, first=False) == D("0.012")
    # reservations round up, never short of the final price
    odd = Rate("1", D("0.1"), first_increment=1, next_increment=1)
    assert interval_cost(odd, first=False) == D("0.0017")  # 0.001666...
    assert interval_cost(Rate("1", D("0.0001"), first_increment=1, next_increment=1),
                         first=False) == D("0.0001")
    for seconds in range(1, 200):
        reserved = interval_cost(odd, True) + (seconds - 1) * interval_cost(odd, False)
        assert reserved >= price(seconds, odd)


@pytest.mark.parametrize("changes", [
    {"price_per_minute": D("-0.01")}, {"connection_fee": D("-1")}, {"first_increment": 0},
    {"next_increment": 0}, {"free_seconds": -1},
])
def test_impossible_rates_are_refused(changes):
    values = {"prefix": "55", "price_per_minute": D("0.1"), **changes}
    with pytest.raises(ValueError):
        Rate(**values)


def test_negative_durations_are_refused():
    with pytest.raises(ValueError):
        price(-1, A)
    assert A.increments == "30/6"
