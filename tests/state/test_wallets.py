"""Per-wallet counters, on both stores: exact integers, 10⁻⁸ $FAR units."""

import asyncio

import pytest

from farmesh_ws.state import WalletUsage
from tests.state.support import Harness


async def test_unknown_wallet_has_no_usage(harness: Harness) -> None:
    assert await harness.store.wallet_usage("0xnew") == WalletUsage(tokens=0, cost_far_e8=0)


async def test_usage_adds_up_exactly(harness: Harness) -> None:
    store = harness.store
    big = 3 * 10**17  # 3e9 $FAR: far past a float's exact integers
    await store.add_wallet_usage("0xabc", tokens=12, cost_far_e8=big + 1)
    await store.add_wallet_usage("0xabc", tokens=30, cost_far_e8=big + 2)
    await store.add_wallet_usage("0xdef", tokens=1, cost_far_e8=10_000)
    assert await store.wallet_usage("0xabc") == WalletUsage(tokens=42, cost_far_e8=2 * big + 3)
    assert await store.wallet_usage("0xdef") == WalletUsage(tokens=1, cost_far_e8=10_000)


async def test_concurrent_adds_are_not_lost(harness: Harness) -> None:
    store = harness.store
    await asyncio.gather(
        *(store.add_wallet_usage("0xabc", tokens=1, cost_far_e8=7) for _ in range(100))
    )
    assert await store.wallet_usage("0xabc") == WalletUsage(tokens=100, cost_far_e8=700)


async def test_usage_must_not_be_negative(harness: Harness) -> None:
    with pytest.raises(ValueError, match="negative"):
        await harness.store.add_wallet_usage("0xabc", tokens=-1, cost_far_e8=0)
    with pytest.raises(ValueError, match="negative"):
        await harness.store.add_wallet_usage("0xabc", tokens=0, cost_far_e8=-1)
    assert await harness.store.wallet_usage("0xabc") == WalletUsage()
