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


QUESTIONS = (
    "Name a colour.",
    "And another one?",
    "Which of the two is darker?",
    "Name a fruit of that colour.",
    "Is it sweet?",
    "Name a country.",
    "What is its capital?",
    "Name a river there.",
    "Is it long?",
    "Thank you. Say goodbye.",
)


def prompt_tokens_sent(server: GatewayServer) -> float:
    value = server.metrics.registry.get_sample_value("farmesh_prompt_tokens_total")
    return value or 0.0


async def test_ten_stateless_turns_reuse_the_mesh_caches_and_equal_the_websocket_chat(
    server: GatewayServer,
) -> None:
    """OpenAI clients re-send the whole history: from turn 2 on only the new tokens reach
    the mesh (counted by the gateway and by each server's step), the rest is cached_tokens,
    and the greedy replies are the WebSocket session's."""
    async with connect(ws_url(server)) as ws:
        await open_chat(ws)
        over_ws = []
        for index, question in enumerate(QUESTIONS):
            tokens, done, _ = await run_turn(
                ws, str(index), question, max_new_tokens=24, temperature=0
            )
            over_ws.append(("".join(frame["token"] for frame in tokens), done["usage"]))
    history: list[dict[str, str]] = []
    async with openai_client(server, None) as client:
        for index, question in enumerate(QUESTIONS):
            history.append({"role": "user", "content": question})
            sent_before = prompt_tokens_sent(server)
            answer = await client.chat.completions.create(
                model=BUNDLED_MODEL_ID,
                messages=history,
                max_tokens=24,
                temperature=0,
                extra_headers=NO_KEY,
            )
            content = answer.choices[0].message.content or ""
            reply, ws_usage = over_ws[index]
            assert content == reply, f"turn {index + 1}"
            usage = answer.usage
            assert usage is not None
            assert usage.prompt_tokens_details is not None
            cached = usage.prompt_tokens_details.cached_tokens or 0
            new = usage.prompt_tokens - cached
            assert prompt_tokens_sent(server) - sent_before == new
            nodes = (answer.model_extra or {})["farmesh"]["nodes"]
            assert nodes
            # every server stepped the new prompt tokens and each generated token but the last
            assert {node["tokens"] for node in nodes} == {new + usage.completion_tokens - 1}
            if index == 0:
                assert cached == 0
                assert new == ws_usage["prompt_tokens"]
            else:
                # the mesh held everything but the previous reply's last token (never sent),
                # which this turn sends first, as the WebSocket session does
                assert cached == ws_usage["cached_tokens"]
                assert new == ws_usage["prompt_tokens"] + 1
            history.append({"role": "assistant", "content": content})
