"""max_cost_far: a request or a session stops at its budget with finish reason "budget"."""

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from websockets.asyncio.client import connect

from farmesh_ws.transport.ws import GatewayServer
from tests.helpers import PRICE, open_chat, receive, send, start_gateway, ws_url


@pytest.fixture(scope="module")
async def completion_priced_gateway(backend: Any) -> AsyncIterator[GatewayServer]:
    server = await start_gateway(backend, price_per_prompt_token_far=Decimal(0))
    yield server
    await server.shutdown()


async def _turn_frames(ws: Any, request_id: str, text: str, **fields: Any) -> list[dict[str, Any]]:
    await send(ws, {"type": "turn", "request_id": request_id, "text": text, **fields})
    frames = []
    while True:
        frame = await receive(ws)
        frames.append(frame)
        if frame["type"] == "contribution" or (frame["type"] == "error" and not frames[:-1]):
            return frames


async def test_a_turn_stops_at_its_budget(completion_priced_gateway: GatewayServer) -> None:
    async with connect(ws_url(completion_priced_gateway)) as ws:
        await open_chat(ws)
        frames = await _turn_frames(
            ws,
            "b1",
            "Write a long story about a dragon.",
            max_new_tokens=100,
            max_cost_far="0.0003",
        )
    tokens = [f for f in frames if f["type"] == "token"]
    error = next(f for f in frames if f["type"] == "error")
    done = next(f for f in frames if f["type"] == "done")
    contribution = frames[-1]
    assert len(tokens) == 3
    assert Decimal(tokens[-1]["cost_far"]) == 3 * PRICE
    assert (error["code"], error["request_id"]) == ("budget_exceeded", "b1")
    assert done["finish_reason"] == "budget"
    assert done["usage"]["completion_tokens"] == 3
    assert Decimal(done["usage"]["cost_far"]) == Decimal("0.0003")
    assert sum(Decimal(node["share_far"]) for node in contribution["nodes"]) == Decimal("0.0003")


async def test_a_session_budget_spans_turns_then_refuses(
    completion_priced_gateway: GatewayServer,
) -> None:
    async with connect(ws_url(completion_priced_gateway)) as ws:
        await open_chat(ws, max_cost_far="0.0005")
        first = await _turn_frames(ws, "s1", "Say hello.", max_new_tokens=3)
        first_done = next(f for f in first if f["type"] == "done")
        assert first_done["finish_reason"] in {"length", "stop"}
        spent = Decimal(first_done["usage"]["cost_far"])

        second = await _turn_frames(ws, "s2", "Write a long poem.", max_new_tokens=100)
        second_done = next(f for f in second if f["type"] == "done")
        assert second_done["finish_reason"] == "budget"
        assert spent + Decimal(second_done["usage"]["cost_far"]) == Decimal("0.0005")

        refused = await _turn_frames(ws, "s3", "More, please.")
    assert len(refused) == 1
    assert (refused[0]["type"], refused[0]["code"]) == ("error", "budget_exceeded")


async def test_a_budget_must_be_a_decimal_string(completion_priced_gateway: GatewayServer) -> None:
    async with connect(ws_url(completion_priced_gateway)) as ws:
        await send(ws, {"type": "open", "max_cost_far": 0.5})
        error = await receive(ws)
    assert (error["type"], error["code"]) == ("error", "invalid_message")
