"""The OpenAI-compatible HTTP API on the real swarm: a greedy chat completion equals the
protocol v1 WebSocket reply to the same single user message."""

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from websockets.asyncio.client import connect

from farmesh_ws.config import Settings
from farmesh_ws.mesh.status import MeshStatusCache
from farmesh_ws.metrics import Metrics
from farmesh_ws.models import BUNDLED_MODEL_ID
from farmesh_ws.transport.ws import GatewayServer
from tests.helpers import PRICE, open_chat, run_turn, ws_url
from tests.transport.support import NO_KEY, openai_client


@pytest.fixture(scope="module")
async def server(backend: Any) -> AsyncIterator[GatewayServer]:
    status = MeshStatusCache(backend.model_ids, backend.coverage, refresh_s=60)
    await status.refresh()
    settings = replace(Settings(port=0, price_per_token_far=PRICE), requests_burst=500)
    gateway = GatewayServer(settings, backend, status, Metrics())
    await gateway.start()
    yield gateway
    await gateway.shutdown()


async def test_a_greedy_chat_completion_equals_the_websocket_reply(server: GatewayServer) -> None:
    question = "What is the capital of France?"
    async with connect(ws_url(server)) as ws:
        await open_chat(ws)
        tokens, done, _ = await run_turn(ws, "t", question, max_new_tokens=12, temperature=0)
    over_ws = "".join(frame["token"] for frame in tokens)
    async with openai_client(server, None) as client:
        answer = await client.chat.completions.create(
            model=BUNDLED_MODEL_ID,
            messages=[{"role": "user", "content": question}],
            max_tokens=12,
            temperature=0,
            extra_headers=NO_KEY,
        )
        stream = await client.chat.completions.create(
            model=BUNDLED_MODEL_ID,
            messages=[{"role": "user", "content": question}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=NO_KEY,
        )
        chunks = [chunk async for chunk in stream]
    assert over_ws
    assert answer.choices[0].message.content == over_ws
    assert answer.choices[0].finish_reason == done["finish_reason"]
    usage = answer.usage
    assert usage is not None
    assert usage.prompt_tokens == done["usage"]["prompt_tokens"]
    assert usage.completion_tokens == done["usage"]["completion_tokens"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == over_ws
    assert (answer.model_extra or {})["farmesh"]["cost_far"] == done["usage"]["cost_far"]
