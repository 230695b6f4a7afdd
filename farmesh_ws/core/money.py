"""$FAR amounts are ``Decimal`` end to end and strings on the wire, never floats.

The ledger stores amounts as integer counts of 10⁻⁸ $FAR (``to_e8``/``from_e8``): SQLite has no
exact decimal type (its NUMERIC turns "0.0049" into a binary float), while integers are exact and
sum exactly in every SQL engine.

A turn's cost is its generated tokens times the token price, plus (optionally, default 0) its
new prompt tokens times the prompt price, rounded to :data:`FAR_QUANTUM`. Node
shares are proportional to work, rounded down to the quantum, and the leftover quanta go one
each to the largest remainders (ties: the earlier node), so shares sum to the cost exactly.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal

FAR_QUANTUM = Decimal("0.00000001")


def far(amount: Decimal) -> Decimal:
    """Round an amount to the ledger's quantum (banker's rounding)."""
    return amount.quantize(FAR_QUANTUM, rounding=ROUND_HALF_EVEN)


def far_text(amount: Decimal) -> str:
    """The wire form of an amount: fixed-point, no exponent, trailing zeros dropped."""
    text = format(far(amount), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def turn_cost(
    price_per_token: Decimal,
    completion_tokens: int,
    *,
    price_per_prompt_token: Decimal = Decimal(0),
    prompt_tokens: int = 0,
) -> Decimal:
    """Generated tokens at the token price, plus new prompt tokens at the prompt price."""
    if completion_tokens < 0 or prompt_tokens < 0:
        raise ValueError("token counts must not be negative")
    return far(price_per_token * completion_tokens + price_per_prompt_token * prompt_tokens)


@dataclass(frozen=True, slots=True)
class Prices:
    """What a request costs (protocol.md §7)."""

    per_token: Decimal
    per_prompt_token: Decimal = Decimal(0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        """Nothing is billed for a request that generated nothing."""
        if completion_tokens == 0:
            return Decimal(0)
        return turn_cost(
            self.per_token,
            completion_tokens,
            price_per_prompt_token=self.per_prompt_token,
            prompt_tokens=prompt_tokens,
        )


def split_by_work(total: Decimal, works: Sequence[int]) -> list[Decimal]:
    """Split ``total`` over nodes in proportion to ``works``; the parts sum to ``total``."""
    total = far(total)
    total_work = sum(works)
    if any(work < 0 for work in works):
        raise ValueError("work must not be negative")
    if not works:
        return []
    if total_work == 0:
        return [total, *[Decimal(0)] * (len(works) - 1)]
    quanta = int(total / FAR_QUANTUM)
    exact = [Decimal(quanta) * work / total_work for work in works]
    floors = [int(value.to_integral_value(rounding=ROUND_DOWN)) for value in exact]
    leftover = quanta - sum(floors)
    by_remainder = sorted(range(len(works)), key=lambda i: (-(exact[i] - floors[i]), i))
    for index in by_remainder[:leftover]:
        floors[index] += 1
    return [far(Decimal(count) * FAR_QUANTUM) for count in floors]


def to_e8(amount: Decimal) -> int:
    """An amount as an exact integer count of 10⁻⁸ $FAR (how the ledger stores money)."""
    return int(far(amount) / FAR_QUANTUM)


def from_e8(count: int) -> Decimal:
    return far(Decimal(count) * FAR_QUANTUM)
