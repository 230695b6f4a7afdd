"""Short-lived values (sign-in nonces, session tokens) on both stores: put, get, take, expiry."""

import asyncio

import pytest

from tests.state.support import Harness, eventually


async def test_put_get_take(harness: Harness) -> None:
    store = harness.store
    assert await store.get_value("k") is None
    await store.put_value("k", "v1", 60)
    assert await store.get_value("k") == "v1"
    assert await store.get_value("k") == "v1"  # reading does not use it up
    await store.put_value("k", "v2", 60)
    assert await store.take_value("k") == "v2"
    assert await store.take_value("k") is None
    assert await store.get_value("k") is None


async def test_keys_are_independent(harness: Harness) -> None:
    await harness.store.put_value("a", "1", 60)
    await harness.store.put_value("b", "2", 60)
    assert await harness.store.take_value("a") == "1"
    assert await harness.store.get_value("b") == "2"


async def test_concurrent_takers_get_a_value_once(harness: Harness) -> None:
    store = harness.store
    for round_ in range(20):
        await store.put_value(f"nonce-{round_}", "issued", 60)
    takes = [store.take_value(f"nonce-{round_}") for round_ in range(20) for _ in range(5)]
    results = await asyncio.gather(*takes)
    assert sorted(r for r in results if r is not None) == ["issued"] * 20


async def test_values_expire(harness: Harness) -> None:
    store = harness.store
    await store.put_value("short", "x", 0.05)
    await store.put_value("long", "y", 60)
    harness.pass_time(0.06)

    async def gone() -> bool:
        return await store.get_value("short") is None

    await eventually(gone)
    assert await store.take_value("short") is None
    assert await store.get_value("long") == "y"


@pytest.mark.parametrize("ttl_s", [0.0, -1.0, float("nan")])
async def test_value_ttl_must_be_positive(harness: Harness, ttl_s: float) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        await harness.store.put_value("k", "v", ttl_s)


async def test_swap_changes_a_value_only_from_what_was_expected(harness: Harness) -> None:
    store = harness.store
    assert await store.swap_value("k", None, "mine", 60)  # nothing there: created
    assert not await store.swap_value("k", None, "theirs", 60)  # something there now
    assert not await store.swap_value("k", "other", "theirs", 60)
    assert await store.get_value("k") == "mine"
    assert await store.swap_value("k", "mine", "mine again", 60)
    assert not await store.swap_value("k", "mine", None, 60)  # stale: it changed meanwhile
    assert await store.swap_value("k", "mine again", None, 60)  # deleted
    assert await store.get_value("k") is None


async def test_of_concurrent_swaps_from_one_value_one_wins(harness: Harness) -> None:
    store = harness.store
    await store.put_value("k", "v0", 60)
    swaps = [store.swap_value("k", "v0", f"taker-{n}", 60) for n in range(10)]
    won = [n for n, done in enumerate(await asyncio.gather(*swaps)) if done]
    assert len(won) == 1
    assert await store.get_value("k") == f"taker-{won[0]}"
