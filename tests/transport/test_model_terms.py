"""Each served model has its own price and limits (FARMESH_MODELS_FILE), applied by the engine
and so on every surface: /ws (protocol v1), the OpenAI HTTP API, /api/v2/generate, /models and
/mesh/status. Real sockets, scripted mesh serving two models."""

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from websockets.asyncio.client import ClientConnection, connect

from farmesh_ws.mesh.fake import FAKE_MODEL_ID, FakeBackend
from farmesh_ws.models.catalog import ModelTerms
from farmesh_ws.transport.ws import GatewayServer
from tests.transport.support import NO_KEY, fake_gateway, openai_client

OTHER = "other-model"
OTHER_PRICE = Decimal("0.00002")
OTHER_PROMPT_PRICE = Decimal("0.000001")
OTHER_MAX_NEW_TOKENS = 5
OTHER_MAX_LENGTH = 300
REPLY = "one two three"
TERMS = (
    ModelTerms(FAKE_MODEL_ID, "fake"),
    ModelTerms(
        OTHER,
        "other",
        path=Path("/unused"),
        price_per_token_far=OTHER_PRICE,
        price_per_prompt_token_far=OTHER_PROMPT_PRICE,
        max_length_limit=OTHER_MAX_LENGTH,
        max_new_tokens_limit=OTHER_MAX_NEW_TOKENS,
    ),
)


@pytest.fixture
async def server() -> AsyncIterator[GatewayServer]:
    backend = FakeBackend(
        reply=REPLY, model_ids=[FAKE_MODEL_ID, OTHER], announced_elsewhere=("far-away-model",)
    )
    gateway = await fake_gateway(backend, models=TERMS)
    yield gateway
    await gateway.shutdown()


async def _recv(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return message


async def _until(ws: ClientConnection, kind: str) -> dict[str, Any]:
    while (message := await _recv(ws))["type"] != kind:
        pass
    return message


def _get_now(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


async def _get(server: GatewayServer, path: str) -> Any:
    return await asyncio.to_thread(_get_now, f"http://127.0.0.1:{server.port}{path}")


async def test_v1_opens_each_model_at_its_own_price_and_limits(server: GatewayServer) -> None:
    async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
        await ws.send(json.dumps({"type": "open", "model": OTHER}))
        opened = await _recv(ws)
        assert opened["model"] == OTHER
        assert Decimal(opened["price_per_token_far"]) == OTHER_PRICE
        assert Decimal(opened["price_per_prompt_token_far"]) == OTHER_PROMPT_PRICE
        assert opened["max_length"] == OTHER_MAX_LENGTH  # the model's default length

        too_many = OTHER_MAX_NEW_TOKENS + 1
        turn = {"type": "turn", "text": "hi", "request_id": "r1"}
        await ws.send(json.dumps({**turn, "max_new_tokens": too_many}))
        error = await _recv(ws)
        assert error["type"] == "error"
        assert error["code"] == "invalid_request"
        assert str(OTHER_MAX_NEW_TOKENS) in error["message"]

        await ws.send(json.dumps({**turn, "request_id": "r2"}))
        done = await _until(ws, "done")
        usage = done["usage"]
        assert usage["completion_tokens"] <= OTHER_MAX_NEW_TOKENS  # the model's default
        contribution = await _until(ws, "contribution")
        expected = OTHER_PRICE * usage["completion_tokens"]
        expected += OTHER_PROMPT_PRICE * usage["prompt_tokens"]
        assert Decimal(contribution["cost_far"]) == expected

    async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
        too_long = OTHER_MAX_LENGTH + 1
        await ws.send(json.dumps({"type": "open", "model": OTHER, "max_length": too_long}))
        error = await _recv(ws)
        assert error["code"] == "invalid_request"
        assert str(OTHER_MAX_LENGTH) in error["message"]


async def test_the_openai_api_bills_and_limits_per_model(server: GatewayServer) -> None:
    user = [{"role": "user", "content": "Hi"}]
    async with openai_client(server, None) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model=OTHER,
                messages=user,
                max_tokens=OTHER_MAX_NEW_TOKENS + 1,
                extra_headers=NO_KEY,
            )
        assert str(OTHER_MAX_NEW_TOKENS) in refused.value.message
        reply = await client.chat.completions.create(
            model=OTHER, messages=user, extra_headers=NO_KEY
        )
        default = await client.chat.completions.create(
            model=FAKE_MODEL_ID, messages=user, extra_headers=NO_KEY
        )
    usage = reply.usage
    assert usage is not None
    assert reply.model_extra is not None
    assert usage.completion_tokens <= OTHER_MAX_NEW_TOKENS
    expected = OTHER_PRICE * usage.completion_tokens + OTHER_PROMPT_PRICE * usage.prompt_tokens
    assert Decimal(reply.model_extra["farmesh"]["cost_far"]) == expected
    assert default.usage is not None
    assert default.model_extra is not None
    default_cost = Decimal("0.0001") * default.usage.completion_tokens
    assert Decimal(default.model_extra["farmesh"]["cost_far"]) == default_cost


async def test_the_petals_v2_api_limits_steps_per_model(server: GatewayServer) -> None:
    url = f"ws://127.0.0.1:{server.port}/api/v2/generate"
    async with connect(url) as ws:
        await ws.send(
            json.dumps({"type": "open_inference_session", "model": OTHER, "max_length": 64})
        )
        assert await _recv(ws) == {"ok": True}
        generate = {"type": "generate", "inputs": "hi", "max_new_tokens": 6}
        await ws.send(json.dumps(generate))
        reply = await _recv(ws)
        assert reply["ok"] is False
        assert str(OTHER_MAX_NEW_TOKENS) in reply["traceback"]


async def test_models_and_mesh_status_list_each_model_with_its_terms(
    server: GatewayServer,
) -> None:
    models = {m["model_id"]: m for m in (await _get(server, "/models"))["models"]}
    assert set(models) == {FAKE_MODEL_ID, OTHER, "far-away-model"}
    elsewhere = models["far-away-model"]
    assert elsewhere["servable"] is False
    assert "FARMESH_MODELS_FILE" in elsewhere["reason"]
    other = models[OTHER]
    assert other["servable"] is True
    assert Decimal(other["price_per_token_far"]) == OTHER_PRICE
    assert Decimal(other["price_per_prompt_token_far"]) == OTHER_PROMPT_PRICE
    assert other["max_length"] == OTHER_MAX_LENGTH
    assert other["max_new_tokens"] == OTHER_MAX_NEW_TOKENS
    assert Decimal(models[FAKE_MODEL_ID]["price_per_token_far"]) == Decimal("0.0001")

    status = await _get(server, "/mesh/status")
    assert status["model_id"] == FAKE_MODEL_ID  # the default model's fields stay on top
    listed = {m["model_id"]: m for m in status["models"]}
    assert Decimal(listed[OTHER]["price_per_token_far"]) == OTHER_PRICE
    assert listed[OTHER]["status"] == "online"
