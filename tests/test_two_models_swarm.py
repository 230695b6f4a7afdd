"""Two models served side by side by one swarm and one gateway: the bundled SmolLM2 and the
tiny built model, each routed to its own servers, at its own price (FARMESH_MODELS_FILE's
terms); a gateway without the tiny model's folder lists it as announced but not servable."""

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from farmesh_ws.config import Settings
from farmesh_ws.core.types import SamplingParams
from farmesh_ws.discovered_models import adopt_announced_models
from farmesh_ws.mesh.petals import ModelSpec, PetalsBackend
from farmesh_ws.models import BUNDLED_MODEL_ID, dht_prefix_for
from farmesh_ws.models.catalog import BUNDLED_TERMS, ModelTerms, load_catalog
from farmesh_ws.models.tiny import TINY_MODEL_ID
from farmesh_ws.swarm_command import MODELS_FILE, tiny_swarm_model
from farmesh_ws.swarm_layout import SwarmModel
from tests.helpers import (
    PRICE,
    PROMPT_PRICE,
    open_chat,
    run_turn,
    start_gateway,
    swarm_backend_config,
    ws_url,
)

TINY_PRICE = Decimal("0.000003")
TINY_TERMS = ModelTerms(
    TINY_MODEL_ID, dht_prefix_for(TINY_MODEL_ID), Path("/set-below"), TINY_PRICE, Decimal(0)
)


@pytest.fixture(scope="module")
def tiny(swarm: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SwarmModel, Any]]:
    """The tiny model on one more server of the shared swarm, stopped after this module."""
    model = tiny_swarm_model(tmp_path_factory.mktemp("tiny-swarm"))
    node = swarm.add_server(f"0:{model.num_blocks}", model=model)
    yield model, node
    swarm.stop_server(node.name)


@pytest.fixture(scope="module")
async def both(
    swarm: Any, bundled_model_path: Path, tiny: tuple[SwarmModel, Any]
) -> AsyncIterator[PetalsBackend]:
    model, _ = tiny
    config = swarm_backend_config(swarm, bundled_model_path)
    tiny_spec = ModelSpec(TINY_MODEL_ID, model.model_path, model.dht_prefix)
    backend = await PetalsBackend.start(replace(config, models=(*config.models, tiny_spec)))
    yield backend
    await backend.aclose()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


async def test_each_model_runs_on_its_own_servers_at_its_own_price(
    swarm: Any, tiny: tuple[SwarmModel, Any], both: PetalsBackend
) -> None:
    model, tiny_node = tiny
    terms = (BUNDLED_TERMS, replace(TINY_TERMS, path=model.model_path))
    server = await start_gateway(both, models=terms)
    try:
        async with connect(ws_url(server)) as ws:
            opened = await open_chat(ws, model=TINY_MODEL_ID)
            assert Decimal(opened["price_per_token_far"]) == TINY_PRICE
            _, done, contribution = await run_turn(ws, "t1", "Hello!", max_new_tokens=8)
        async with connect(ws_url(server)) as ws:
            opened = await open_chat(ws)
            assert opened["model"] == BUNDLED_MODEL_ID
            _, bundled_done, bundled = await run_turn(ws, "b1", "Hello!", max_new_tokens=4)
        models = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/models")
    finally:
        await server.shutdown()

    assert done["finish_reason"] in ("stop", "length")
    assert [node["peer_id"] for node in contribution["nodes"]] == [tiny_node.peer_id]
    (node,) = contribution["nodes"]
    assert (node["start_block"], node["end_block"]) == (0, model.num_blocks)
    expected = TINY_PRICE * done["usage"]["completion_tokens"]
    assert Decimal(contribution["cost_far"]) == expected
    bundled_peers = {node["peer_id"] for node in bundled["nodes"]}
    assert tiny_node.peer_id not in bundled_peers
    usage = bundled_done["usage"]
    bundled_cost = PRICE * usage["completion_tokens"] + PROMPT_PRICE * usage["prompt_tokens"]
    assert Decimal(bundled["cost_far"]) == bundled_cost

    listed = {entry["model_id"]: entry for entry in models["models"]}
    assert listed[TINY_MODEL_ID]["num_blocks"] == model.num_blocks
    assert listed[TINY_MODEL_ID]["status"] == "online"
    assert listed[BUNDLED_MODEL_ID]["num_blocks"] == 30
    assert all(entry["servable"] for entry in listed.values())


async def test_a_gateway_without_the_tiny_folder_lists_it_as_not_servable(
    backend: Any, tiny: tuple[SwarmModel, Any]
) -> None:
    model, _ = tiny
    server = await start_gateway(backend, discover=True)
    try:
        models = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/models")
    finally:
        await server.shutdown()
    listed = {entry["model_id"]: entry for entry in models["models"]}
    assert listed[BUNDLED_MODEL_ID]["servable"] is True
    announced = listed[model.dht_prefix]
    assert announced["servable"] is False
    assert "FARMESH_MODELS_FILE" in announced["reason"]
    assert announced["num_blocks"] == model.num_blocks
    assert announced["active_nodes"] == 1


def test_the_swarm_writes_a_models_file_a_gateway_loads(tmp_path: Path) -> None:
    model = tiny_swarm_model(tmp_path)
    bundled, tiny_terms = load_catalog(tmp_path / MODELS_FILE)
    assert bundled == BUNDLED_TERMS
    assert (tiny_terms.model_id, tiny_terms.path) == (TINY_MODEL_ID, model.model_path)
    assert tiny_terms.dht_prefix == model.dht_prefix


async def test_an_announced_model_with_a_local_folder_is_served_too(
    swarm: Any, bundled_model_path: Path, tiny: tuple[SwarmModel, Any], tmp_path: Path
) -> None:
    model, _ = tiny
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / TINY_MODEL_ID).symlink_to(model.model_path, target_is_directory=True)
    backend = await PetalsBackend.start(swarm_backend_config(swarm, bundled_model_path))
    try:
        settings, adopted = await adopt_announced_models(backend, Settings(), models_dir)
        assert adopted == {TINY_MODEL_ID: models_dir / TINY_MODEL_ID}
        assert [terms.model_id for terms in settings.models] == [BUNDLED_MODEL_ID, TINY_MODEL_ID]
        assert settings.prices_for(TINY_MODEL_ID) == Settings().prices
        session = await backend.open_session(TINY_MODEL_ID, max_length=64)
        try:
            events = [
                e async for e in session.run_tokens([1, 2, 3], SamplingParams(max_new_tokens=2))
            ]
        finally:
            await session.aclose()
    finally:
        await backend.aclose()
    done = events[-1]
    assert done.error is None
    assert done.completion_tokens == 2
