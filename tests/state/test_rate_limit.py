"""Token buckets, on both stores."""

import asyncio

import pytest

from tests.state.support import Harness, eventually


async def test_burst_then_refusal_then_refill(harness: Harness) -> None:
    store = harness.store
    for _ in range(3):
        decision = await store.take_tokens("ip:1", rate_per_s=4, burst=3)
        assert decision.allowed
        assert decision.retry_after_s == 0
    refused = await store.take_tokens("ip:1", rate_per_s=4, burst=3)
    assert not refused.allowed
    assert 0 < refused.retry_after_s <= 0.25  # one token at 4 per second
    harness.pass_time(refused.retry_after_s)

    async def allowed_again() -> bool:
        return (await store.take_tokens("ip:1", rate_per_s=4, burst=3)).allowed

    await eventually(allowed_again)


async def test_cost_takes_several_tokens(harness: Harness) -> None:
    store = harness.store
    assert (await store.take_tokens("w", rate_per_s=0.001, burst=5, cost=3)).allowed
    refused = await store.take_tokens("w", rate_per_s=0.001, burst=5, cost=3)
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(1000, rel=0.01)  # 1 missing token
    assert (await store.take_tokens("w", rate_per_s=0.001, burst=5, cost=2)).allowed


async def test_buckets_are_independent(harness: Harness) -> None:
    store = harness.store
    assert (await store.take_tokens("a", rate_per_s=0.001, burst=1)).allowed
    assert not (await store.take_tokens("a", rate_per_s=0.001, burst=1)).allowed
    assert (await store.take_tokens("b", rate_per_s=0.001, burst=1)).allowed


async def test_concurrent_takes_grant_exactly_the_burst(harness: Harness) -> None:
    store = harness.store
    decisions = await asyncio.gather(
        *(store.take_tokens("hot", rate_per_s=0.001, burst=10) for _ in range(60))
    )
    assert sum(decision.allowed for decision in decisions) == 10


@pytest.mark.parametrize(
    ("rate_per_s", "burst", "cost", "message"),
    [
        (0.0, 5, 1, "rate_per_s"),
        (-1.0, 5, 1, "rate_per_s"),
        (1.0, 5, 6, "cost"),
        (1.0, 5, 0, "cost"),
        (1.0, 0, 1, "cost"),
    ],
)
async def test_impossible_buckets_are_refused(
    harness: Harness, rate_per_s: float, burst: int, cost: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        await harness.store.take_tokens("x", rate_per_s=rate_per_s, burst=burst, cost=cost)
