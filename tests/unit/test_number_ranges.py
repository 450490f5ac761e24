"""Number ranges meet when they hold a number in common, whatever their country/area split."""

import random

import pytest

from controlplane.api.resources.numbering import numbers_meet


def numbers(prefix: str, first: int, last: int) -> set[str]:
    return {prefix + str(n) for n in range(first, last + 1)}


@pytest.mark.parametrize("a,b,meet", [
    (("5511", 31000000, 31000999), ("55113", 1000000, 1000999), True),
    (("5511", 31000000, 31000999), ("55113", 2000000, 2000999), False),
    (("5511", 31000000, 31000999), ("5511", 31000999, 31001000), True),
    (("5511", 31000000, 31000999), ("5511", 31001000, 31001999), False),
    (("5511", 30, 39), ("55113", 0, 9), True),    # 551130 is 55113 0
    (("5511", 1, 9), ("55110", 0, 9), False),     # no local number starts with 0
    (("55", 0, 99999), ("4411", 0, 99999), False),
])
def test_known_pairs(a, b, meet):
    assert numbers_meet(*a, *b) is meet
    assert numbers_meet(*b, *a) is meet
    assert bool(numbers(*a) & numbers(*b)) is meet


def test_agrees_with_listing_every_number():
    rng = random.Random(4)
    prefixes = ["5", "55", "551", "5511", "55110", "55113", "5512", "1"]
    for _ in range(3000):
        sides = []
        for _ in range(2):
            first = rng.choice([0, 1, 5, 9, 10, 30, 99, 100, 105, 999, 1000])
            first += rng.randrange(0, 50)
            sides.append((rng.choice(prefixes), first, first + rng.randrange(0, 1200)))
        expected = bool(numbers(*sides[0]) & numbers(*sides[1]))
        assert numbers_meet(*sides[0], *sides[1]) is expected, sides
