"""The cached mesh view lists the models the DHT announces that this gateway cannot serve."""

import asyncio

from farmesh_ws.mesh.discovery import ModelCoverage, ServerSpan
from farmesh_ws.mesh.status import MeshStatusCache


def _coverage(prefix: str) -> ModelCoverage:
    span = ServerSpan("QmPeer", "node", 0, 4, "ONLINE", 1.0, 1000)
    return ModelCoverage(prefix, 4, (span,), ())


async def test_announced_models_without_a_client_half_are_unservable() -> None:
    async def probe(model_id: str) -> ModelCoverage:
        return _coverage("served")

    async def discover(skip: frozenset[str]) -> list[ModelCoverage]:
        return [
            c for c in (_coverage("served"), _coverage("elsewhere")) if c.dht_prefix not in skip
        ]

    cache = MeshStatusCache(
        ["m"], probe, refresh_s=1.0, discover=discover, served_prefixes=frozenset({"served"})
    )
    assert cache.unservable == ()
    await cache.refresh()
    assert [model.dht_prefix for model in cache.unservable] == ["elsewhere"]
    assert cache.get("m").status == "online"


async def test_a_failed_discovery_keeps_the_last_list() -> None:
    answers = [[_coverage("elsewhere")]]

    async def probe(model_id: str) -> ModelCoverage:
        return _coverage("served")

    async def discover(skip: frozenset[str]) -> list[ModelCoverage]:
        if not answers:
            raise TimeoutError("the DHT did not answer")
        return answers.pop()

    cache = MeshStatusCache(["m"], probe, refresh_s=1.0, discover=discover)
    await cache.refresh()
    await cache.refresh()
    assert [model.dht_prefix for model in cache.unservable] == ["elsewhere"]


async def test_a_slow_discovery_is_not_started_twice() -> None:
    started: list[int] = []
    release = asyncio.Event()

    async def probe(model_id: str) -> ModelCoverage:
        return _coverage("served")

    async def discover(skip: frozenset[str]) -> list[ModelCoverage]:
        started.append(1)
        await release.wait()
        return [_coverage("elsewhere")]

    cache = MeshStatusCache(["m"], probe, refresh_s=0.01, discover=discover)
    await cache.refresh()  # gives up waiting after 2 × refresh_s; the discovery goes on
    await cache.refresh()
    assert started == [1]
    assert cache.unservable == ()
    release.set()
    await cache.refresh()
    assert [model.dht_prefix for model in cache.unservable] == ["elsewhere"]
    await cache.aclose()
