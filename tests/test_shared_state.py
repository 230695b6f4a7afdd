"""Gateways sharing Redis: sessions counted across processes, wallet totals, degraded mode."""

import asyncio
import json
import socket
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from websockets.asyncio.client import connect

from farmesh_ws.state import StateStore, open_state_store
from farmesh_ws.state.registry import SessionRegistry
from farmesh_ws.state.wallet_observer import WalletUsageObserver
from farmesh_ws.transport.ws import GatewayServer
from tests.helpers import open_chat, run_turn, ws_url

REDIS = "redis://127.0.0.1:6379/0"


async def _gateway(backend: Any, store: StateStore) -> GatewayServer:

    from farmesh_ws.config import Settings
    from farmesh_ws.mesh.status import MeshStatusCache
    from farmesh_ws.metrics import Metrics

    status = MeshStatusCache(backend.model_ids, backend.coverage, refresh_s=60)
    await status.refresh()
    server = GatewayServer(
        Settings(port=0, auth="off"),
        backend,
        status,
        Metrics(),
        observers=[WalletUsageObserver(store)],
        registry=SessionRegistry(store, ttl_s=30),
    )
    await server.start()
    return server


def _get_json(server: GatewayServer, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as reply:
        body: dict[str, Any] = json.loads(reply.read())
    return body


async def _eventually_equal(read: Any, expected: object, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while (value := await read()) != expected:
        assert time.monotonic() < deadline, f"{value!r} never became {expected!r}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def two_stores() -> AsyncIterator[tuple[StateStore, StateStore]]:
    prefix = f"farmesh-test-{uuid.uuid4().hex[:8]}:"
    first = await open_state_store(REDIS, key_prefix=prefix)
    second = await open_state_store(REDIS, key_prefix=prefix)
    yield first, second
    await first.aclose()
    await second.aclose()
    client = redis.asyncio.Redis.from_url(REDIS)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def test_two_gateways_sharing_redis_count_each_others_sessions(
    backend: Any, two_stores: tuple[StateStore, StateStore]
) -> None:
    servers = [await _gateway(backend, store) for store in two_stores]
    try:
        async with connect(ws_url(servers[0])) as a, connect(ws_url(servers[1])) as b:
            await open_chat(a, user_wallet="wallet-shared")
            await open_chat(b, user_wallet="wallet-shared")

            async def sessions_seen_by_each() -> list[int]:
                replies = [
                    await asyncio.to_thread(_get_json, server, "/mesh/status") for server in servers
                ]
                return [reply["active_sessions"] for reply in replies]

            await _eventually_equal(sessions_seen_by_each, [2, 2])
            _, done, _ = await run_turn(a, "w1", "Say hi.", max_new_tokens=3)

            async def wallet_tokens() -> int:
                return (await two_stores[1].wallet_usage("wallet-shared")).tokens

            await _eventually_equal(
                wallet_tokens,
                done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"],
            )

        async def sessions_after_close() -> int:
            return int(
                (await asyncio.to_thread(_get_json, servers[0], "/mesh/status"))["active_sessions"]
            )

        await _eventually_equal(sessions_after_close, 0)
    finally:
        for server in servers:
            await server.shutdown()


async def test_without_redis_the_gateway_serves_and_says_it_is_degraded(backend: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    store = await open_state_store(f"redis://127.0.0.1:{dead_port}/0", timeout_s=0.3)
    server = await _gateway(backend, store)
    try:
        health = await asyncio.to_thread(_get_json, server, "/health")
        assert health["status"] == "degraded"
        assert health["components"]["state"].startswith("degraded: redis")
        assert str(dead_port) not in json.dumps(health)
        async with connect(ws_url(server)) as ws:
            await open_chat(ws)
            tokens, done, _ = await run_turn(ws, "d1", "Say hi.", max_new_tokens=3)
        assert tokens
        assert done["finish_reason"] in {"stop", "length"}

        async def local_sessions() -> int:
            status = await asyncio.to_thread(_get_json, server, "/mesh/status")
            return int(status["active_sessions"])

        await _eventually_equal(local_sessions, 0)
    finally:
        await server.shutdown()
        await store.aclose()
