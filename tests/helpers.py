"""Helpers shared by the gateway tests: start a gateway on port 0, talk to it as a client."""

import asyncio
import json
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from farmesh_ws.config import Settings
from farmesh_ws.core.types import SamplingParams
from farmesh_ws.engine.runner import RequestRunner, RequestSpec
from farmesh_ws.home import farmesh_home
from farmesh_ws.mesh.status import MeshStatusCache
from farmesh_ws.metrics import Metrics
from farmesh_ws.models import BUNDLED_MODEL_ID
from farmesh_ws.models.bundled import prepare_bundled_model
from farmesh_ws.models.generation import Sampling, recommended_sampling
from farmesh_ws.state.registry import SessionRegistry
from farmesh_ws.transport.ws import GatewayServer

PRICE = Decimal("0.0001")
PROMPT_PRICE = Decimal("0.00002")


def bundled_generation() -> dict[str, Sampling]:
    """What the gateway announces in /models: the prepared bundled folder's sampling."""
    folder = prepare_bundled_model(farmesh_home(), progress=False)
    return {BUNDLED_MODEL_ID: recommended_sampling(folder)}


async def start_gateway(
    backend: Any,
    *,
    generation: dict[str, Sampling] | None = None,
    registry: SessionRegistry | None = None,
    discover: bool = False,
    **overrides: Any,
) -> GatewayServer:
    """A gateway on ``backend``; ``generation`` defaults to :func:`bundled_generation`, as
    ``farmesh-ws serve`` passes it; ``registry``: its session registry (one over a state
    store other gateways share; a new in-process one by default); with ``discover``, /models
    also lists the models the DHT announces that ``settings.models`` lacks; ``overrides`` are
    :class:`Settings` fields (``auth`` defaults to ``off``: these tests name the wallets they
    bill; tests/test_identity.py covers the other modes)."""
    overrides.setdefault("auth", "off")
    settings = replace(
        Settings(port=0, price_per_token_far=PRICE, price_per_prompt_token_far=PROMPT_PRICE),
        **overrides,
    )
    status = MeshStatusCache(
        backend.model_ids,
        backend.coverage,
        refresh_s=60,
        discover=backend.discover if discover else None,
        served_prefixes=frozenset(terms.dht_prefix for terms in settings.models),
    )
    await status.refresh()
    if generation is None:
        generation = await asyncio.to_thread(bundled_generation)
    server = GatewayServer(
        settings, backend, status, Metrics(), generation=generation, registry=registry
    )
    await server.start()
    return server


def record_sampling(monkeypatch: pytest.MonkeyPatch) -> list[SamplingParams]:
    """Collect the sampling of every request the engine admits from now on (the session's
    defaults with the request's own fields applied): what the mesh will generate with."""
    seen: list[SamplingParams] = []
    admit = RequestRunner.admit

    async def recording_admit(self: RequestRunner, client: Any, spec: RequestSpec) -> Any:
        active = await admit(self, client, spec)
        seen.append(active.sampling)
        return active

    monkeypatch.setattr(RequestRunner, "admit", recording_admit)
    return seen


def ws_url(server: GatewayServer) -> str:
    return f"ws://127.0.0.1:{server.port}/ws"


async def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(json.dumps(message))


async def receive(ws: ClientConnection) -> dict[str, Any]:
    frame = await asyncio.wait_for(ws.recv(), 60)
    assert isinstance(frame, str)
    message: dict[str, Any] = json.loads(frame)
    return message


async def open_chat(ws: ClientConnection, **fields: Any) -> dict[str, Any]:
    await send(ws, {"type": "open", **fields})
    opened = await receive(ws)
    assert opened["type"] == "opened", opened
    return opened


async def run_turn(
    ws: ClientConnection, request_id: str, text: str, **fields: Any
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Send a turn; collect its token frames, its done frame and its contribution frame."""
    await send(ws, {"type": "turn", "request_id": request_id, "text": text, **fields})
    tokens: list[dict[str, Any]] = []
    while True:
        message = await receive(ws)
        assert message.get("request_id") == request_id, message
        if message["type"] == "token":
            tokens.append(message)
        elif message["type"] == "done":
            done = message
            contribution = await receive(ws)
            assert contribution["type"] == "contribution", contribution
            return tokens, done, contribution
        else:
            raise AssertionError(f"unexpected frame {message}")


def swarm_backend_config(swarm: Any, model_path: Path, **overrides: Any) -> Any:
    """The PetalsBackend configuration for a test swarm serving the bundled model: routes
    refreshed and failed servers banned for 5 s, unless ``overrides`` say otherwise."""
    from farmesh_ws.mesh.petals import ModelSpec, PetalsBackendConfig
    from farmesh_ws.models import BUNDLED_MODEL_ID

    spec = ModelSpec(BUNDLED_MODEL_ID, model_path, swarm.config.dht_prefix)
    fields: dict[str, Any] = {"update_period_s": 5.0, "ban_timeout_s": 5.0, **overrides}
    return PetalsBackendConfig(initial_peers=tuple(swarm.initial_peers), models=(spec,), **fields)
