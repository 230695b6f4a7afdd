"""/models announces the sampling the prepared model folder recommends, while a request that
names no sampling stays greedy (the protocol's default)."""

import asyncio
import json
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from farmesh_ws.config import Settings
from farmesh_ws.gateway import running_gateway
from farmesh_ws.models import BUNDLED_MODEL_ID
from farmesh_ws.models.generation import recommended_sampling
from farmesh_ws.transport.ws import GatewayServer
from tests.helpers import open_chat, record_sampling, run_turn, start_gateway, ws_url


def models(server: GatewayServer) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/models", timeout=10) as reply:
        body: list[dict[str, Any]] = json.load(reply)["models"]
    return body


async def test_serve_announces_the_prepared_folders_sampling(
    swarm: Any, bundled_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The composition root reads the folder it prepared (joining the test swarm here)."""
    settings = replace(Settings(port=0), dht_bootstrap=tuple(swarm.initial_peers))
    seen = record_sampling(monkeypatch)
    async with running_gateway(settings, progress=False) as gateway:
        (model,) = await asyncio.to_thread(models, gateway.server)
        async with connect(ws_url(gateway.server)) as ws:
            await open_chat(ws)
            await run_turn(ws, "1", "Hi!", max_new_tokens=2)
    assert model["model_id"] == BUNDLED_MODEL_ID
    assert model["generation"] == recommended_sampling(bundled_model_path)
    # The model card's usage example: temperature 0.2, top_p 0.9 (transformers' top_k 50).
    assert model["generation"] == {"temperature": 0.2, "top_p": 0.9, "top_k": 50}
    # The protocol's default is unchanged: a turn without sampling is greedy.
    assert [(used.temperature, used.top_p, used.top_k) for used in seen] == [(0.0, 1.0, 0)]


async def test_models_generation_is_empty_without_a_recommendation(backend: Any) -> None:
    server = await start_gateway(backend, generation={})
    try:
        (model,) = await asyncio.to_thread(models, server)
    finally:
        await server.shutdown()
    assert model["generation"] == {}
