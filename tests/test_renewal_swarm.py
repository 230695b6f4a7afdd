"""A user who pauses longer than the servers' ``--step_timeout`` loses the servers' session;
the next turn reopens it and replays the history transparently (issue: renewal), on a
one-server swarm of its own whose step timeout is short."""

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from farmesh_ws.transport.ws import GatewayServer
from tests.helpers import open_chat, run_turn, start_gateway, swarm_backend_config, ws_url

STEP_TIMEOUT_S = 2.0
GREEDY = {"temperature": 0, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def short_swarm(
    bundled_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from farmesh_ws.models import BUNDLED_MODEL_ID, dht_prefix_for
    from farmesh_ws.swarm import LocalSwarm, SwarmConfig, read_num_blocks

    config = SwarmConfig(
        model_path=bundled_model_path,
        dht_prefix=dht_prefix_for(BUNDLED_MODEL_ID),
        num_blocks=read_num_blocks(bundled_model_path),
        log_dir=tmp_path_factory.mktemp("short-swarm-logs"),
        num_servers=1,
        step_timeout_s=STEP_TIMEOUT_S,
        update_period_s=5.0,
        expiration_s=20.0,
    )
    with LocalSwarm(config) as local_swarm:
        yield local_swarm


@pytest.fixture(scope="module")
async def gateway(short_swarm: Any, bundled_model_path: Path) -> AsyncIterator[GatewayServer]:
    from farmesh_ws.mesh.petals import PetalsBackend

    backend = await PetalsBackend.start(swarm_backend_config(short_swarm, bundled_model_path))
    server = await start_gateway(backend)
    yield server
    await server.shutdown()
    await backend.aclose()


async def test_a_turn_after_the_servers_dropped_the_session_replays_the_history(
    gateway: GatewayServer,
) -> None:
    async with connect(ws_url(gateway)) as ws:
        await open_chat(ws)
        await run_turn(ws, "1", "Name a colour.", **GREEDY)
        tokens, reference, _ = await run_turn(ws, "2", "Name another one.", **GREEDY)
    uninterrupted = "".join(t["token"] for t in tokens)
    async with connect(ws_url(gateway)) as ws:
        await open_chat(ws)
        await run_turn(ws, "1", "Name a colour.", **GREEDY)
        # The user pauses: no step reaches the server for twice its step timeout, so the
        # server drops the session (the pause is the scenario, not a synchronisation).
        await asyncio.sleep(2 * STEP_TIMEOUT_S)
        tokens, done, contribution = await run_turn(ws, "2", "Name another one.", **GREEDY)
    assert done["finish_reason"] == reference["finish_reason"]  # no error: renewed in place
    assert "".join(t["token"] for t in tokens) == uninterrupted
    assert all(node["replayed_tokens"] > 0 for node in contribution["nodes"])
