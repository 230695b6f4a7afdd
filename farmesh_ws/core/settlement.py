"""Settlement: a finished request's usage, cost and per-node shares, computed once.

The ``done`` and ``contribution`` frames, the ledger row, wallet counters and metrics all read
the same :class:`Settlement`, so they cannot disagree. Cost rules: :class:`~.money.Prices`
(protocol.md §7); shares: :func:`~.money.split_by_work` (they sum to the cost exactly).
"""

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from farmesh_ws.core.money import Prices, split_by_work
from farmesh_ws.core.types import Contribution, TurnDone
from farmesh_ws.errors import FarmeshError

SettledReason = Literal["stop", "length", "cancelled", "error", "budget"]


@dataclass(frozen=True, slots=True)
class NodeShare:
    """One server's part of a request: its contribution and its share of the cost ($FAR)."""

    contribution: Contribution
    share_far: Decimal


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a request is billed. ``completion_tokens`` counts delivered tokens only (a token
    held back by a budget is not billed); ``error`` is set when ``finish_reason`` is ``error``
    or ``budget``."""

    finish_reason: SettledReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_far: Decimal
    nodes: tuple[NodeShare, ...]
    error: FarmeshError | None


def settle(
    done: TurnDone,
    prices: Prices,
    *,
    finish_reason: SettledReason,
    completion_tokens: int,
    error: FarmeshError | None,
) -> Settlement:
    """Price ``done`` (``completion_tokens`` as billed) and split the cost over its nodes."""
    cost = prices.cost(done.prompt_tokens, completion_tokens)
    shares = split_by_work(cost, [part.work for part in done.contributions])
    return Settlement(
        finish_reason=finish_reason,
        prompt_tokens=done.prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=done.cached_tokens,
        cost_far=cost,
        nodes=tuple(
            NodeShare(part, share) for part, share in zip(done.contributions, shares, strict=True)
        ),
        error=error,
    )
