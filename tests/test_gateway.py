"""The composition root joining an existing mesh, and connection-level timeouts."""

from dataclasses import replace
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from farmesh_ws.config import Settings
from farmesh_ws.gateway import running_gateway
from tests.helpers import open_chat, receive, run_turn, start_gateway, ws_url


async def test_with_a_bootstrap_it_joins_that_mesh_and_starts_no_swarm(swarm: Any) -> None:
    settings = replace(Settings(port=0), dht_bootstrap=tuple(swarm.initial_peers))
    async with running_gateway(settings, progress=False) as gateway:
        assert gateway.swarm is None
        assert gateway.status.get(settings.default_model_id).status == "online"
        async with connect(ws_url(gateway.server)) as ws:
            await open_chat(ws)
            tokens, done, contribution = await run_turn(ws, "1", "Hi!", max_new_tokens=4)
    assert tokens
    assert done["usage"]["completion_tokens"] == len(tokens)
    swarm_peers = {node.peer_id for node in swarm.servers if node.alive}
    assert {node["peer_id"] for node in contribution["nodes"]} <= swarm_peers


async def test_an_idle_connection_is_closed_with_1000(backend: Any) -> None:
    server = await start_gateway(backend, idle_timeout_s=0.5)
    try:
        async with connect(ws_url(server)) as ws:
            await open_chat(ws)
            with pytest.raises(ConnectionClosed) as closed:
                await receive(ws)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "idle timeout")
    finally:
        await server.shutdown()


async def test_a_running_turn_is_not_idle(backend: Any) -> None:
    server = await start_gateway(backend, idle_timeout_s=0.3)
    try:
        async with connect(ws_url(server)) as ws:
            await open_chat(ws)
            _, done, _ = await run_turn(ws, "long", "Write a story about rain.", max_new_tokens=40)
        assert done["finish_reason"] in {"stop", "length"}
        assert done["duration_ms"] > 300
    finally:
        await server.shutdown()
