"""Exact $FAR arithmetic: costs, wire strings, and shares that always sum to the cost."""

import random
from decimal import Decimal

import pytest

from farmesh_ws.core.money import FAR_QUANTUM, far_text, split_by_work, turn_cost


def test_turn_cost_is_exact() -> None:
    assert turn_cost(Decimal("0.0001"), 49) == Decimal("0.0049")
    assert turn_cost(Decimal("0.1"), 3) == Decimal("0.3")  # 0.1 * 3 != 0.3 in binary floats


@pytest.mark.parametrize(
    ("amount", "text"),
    [("0.00490000", "0.0049"), ("0", "0"), ("12", "12"), ("1E-8", "0.00000001"), ("5.10", "5.1")],
)
def test_wire_text_has_no_exponent_and_no_trailing_zeros(amount: str, text: str) -> None:
    assert far_text(Decimal(amount)) == text


def test_shares_sum_exactly_for_random_splits() -> None:
    generator = random.Random(1234)
    for _ in range(2000):
        total = Decimal(generator.randint(0, 10**9)) * FAR_QUANTUM
        works = [generator.randint(0, 10**6) for _ in range(generator.randint(1, 6))]
        shares = split_by_work(total, works)
        assert sum(shares) == total
        assert all(share >= 0 for share in shares)
        if sum(works):
            for share, work in zip(shares, works, strict=True):
                assert abs(share - total * work / sum(works)) <= FAR_QUANTUM


def test_equal_work_splits_evenly_and_the_remainder_goes_to_the_first() -> None:
    assert split_by_work(Decimal("0.00000001"), [5, 5]) == [Decimal("0.00000001"), Decimal("0")]
    assert split_by_work(Decimal("0.0049"), [345, 345]) == [Decimal("0.00245")] * 2


def test_no_work_gives_everything_to_the_first_node() -> None:
    assert split_by_work(Decimal("1"), [0, 0]) == [Decimal("1"), Decimal("0")]
    assert split_by_work(Decimal("1"), []) == []


def test_negative_work_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        split_by_work(Decimal("1"), [1, -1])
