"""The agent client (farmesh_ws.client) against the real gateway on the local swarm, plus a
scripted fake server for what the real one cannot be made to do on demand (message types
from a later protocol, a dropped connection, silence, a malformed frame)."""

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from farmesh_ws.client import (
    ConnectFailed,
    ConnectionLost,
    ContributionEvent,
    DoneEvent,
    Event,
    FarmeshClient,
    FarmeshClientError,
    ReplyStream,
    RequestTimeout,
    TokenEvent,
    connect,
)
from farmesh_ws.transport.ws import GatewayServer
from tests.helpers import PRICE, PROMPT_PRICE, start_gateway, ws_url

REPO = Path(__file__).resolve().parents[1]
END_OF_TURN = "<|im_end|>"


def expected_cost(done: DoneEvent) -> Decimal:
    return PRICE * done.usage.completion_tokens + PROMPT_PRICE * done.usage.prompt_tokens


def assert_contribution_splits(contribution: ContributionEvent, cost: Decimal) -> None:
    assert contribution.cost_far == cost
    assert sum((node.share_far for node in contribution.nodes), Decimal(0)) == cost
    assert all(isinstance(node.share_far, Decimal) for node in contribution.nodes)
    assert sorted((node.start_block, node.end_block) for node in contribution.nodes) == [
        (0, 15),
        (15, 30),
    ]


async def test_two_turn_chat_matches_golden(gateway: GatewayServer, golden: dict[str, Any]) -> None:
    turn1, turn2 = golden["conversations"][0][:2]
    async with FarmeshClient.connect(ws_url(gateway)) as client:
        chat = await client.open_chat(max_length=512, user_wallet="client-test")
        assert chat.model == "SmolLM2-135M-Instruct"
        assert chat.max_length == 512
        assert chat.info.price_per_token_far == PRICE
        assert chat.info.price_per_prompt_token_far == PROMPT_PRICE
        assert chat.info.protocol_version == 1

        events: list[Event] = [
            event async for event in chat.send(turn1["new_messages"][0]["content"], temperature=0.0)
        ]
        reply2 = await chat.ask(turn2["new_messages"][0]["content"])

    tokens = [event for event in events if isinstance(event, TokenEvent)]
    assert [type(event) for event in events[len(tokens) :]] == [DoneEvent, ContributionEvent]
    done1, contribution1 = events[-2], events[-1]
    assert isinstance(done1, DoneEvent)
    assert isinstance(contribution1, ContributionEvent)
    assert "".join(t.text for t in tokens) + END_OF_TURN == turn1["greedy_48_text"]
    assert [t.tokens_generated for t in tokens] == list(range(1, len(tokens) + 1))
    assert reply2.text + END_OF_TURN == turn2["greedy_48_text"]

    assert done1.finish_reason == reply2.done.finish_reason == "stop"
    assert done1.usage.prompt_tokens == len(turn1["prompt_ids"])
    assert done1.usage.cached_tokens == 0
    history = len(turn1["prompt_ids"]) + len(turn1["greedy_48_ids"])
    usage2 = reply2.usage
    assert usage2.prompt_tokens == len(turn2["prompt_ids"]) - history  # only the new turn
    assert usage2.cached_tokens == history - 1 > 0
    assert usage2.completion_tokens == len(turn2["greedy_48_ids"])

    for done, contribution, last_token_cost in (
        (done1, contribution1, tokens[-1].cost_far),
        (reply2.done, reply2.contribution, None),
    ):
        cost = expected_cost(done)
        assert isinstance(done.usage.cost_far, Decimal)
        assert done.usage.cost_far == cost
        assert last_token_cost in (None, cost)
        assert_contribution_splits(contribution, cost)
    assert chat.position == reply2.done.position
    assert chat.total_cost_far == done1.usage.cost_far + reply2.cost_far
    assert client.closed


async def test_cancel_mid_turn_then_another_turn(gateway: GatewayServer) -> None:
    async with FarmeshClient.connect(ws_url(gateway)) as client:
        chat = await client.open_chat()
        stream = chat.send("Write a long story about a lighthouse.", max_new_tokens=300)
        events: list[Event] = []
        async for event in stream:
            events.append(event)
            if len(events) == 1:
                assert isinstance(event, TokenEvent)
                await chat.cancel()
        assert stream.finished
        done, contribution = events[-2], events[-1]
        assert isinstance(done, DoneEvent)
        assert isinstance(contribution, ContributionEvent)
        assert done.finish_reason == "cancelled"
        assert 1 <= done.usage.completion_tokens < 300
        assert stream.text == "".join(e.text for e in events if isinstance(e, TokenEvent))
        assert_contribution_splits(contribution, expected_cost(done))

        reply = await chat.ask("Say hi.", max_new_tokens=8)
        assert reply.done.finish_reason in {"stop", "length"}
        assert reply.usage.cached_tokens > 0  # the cancelled reply stayed in the history


async def test_server_errors_raise_with_code_and_retryable(gateway: GatewayServer) -> None:
    async with FarmeshClient.connect(ws_url(gateway)) as client:
        with pytest.raises(FarmeshClientError) as too_long:
            await client.open_chat(max_length=10**6)
        assert (too_long.value.code, too_long.value.retryable) == ("invalid_request", False)
        assert too_long.value.request_id is None
        with pytest.raises(FarmeshClientError) as unknown_model:
            await client.open_chat(model="no-such-model")
        assert unknown_model.value.code == "model_not_found"

        chat = await client.open_chat()  # the refused opens left the connection usable
        with pytest.raises(FarmeshClientError) as again:
            await client.open_chat()
        assert again.value.code == "already_open"

        with pytest.raises(FarmeshClientError) as too_many:
            async for _ in chat.send("Hello", request_id="too-many", max_new_tokens=10**9):
                pass
        assert (too_many.value.code, too_many.value.retryable) == ("invalid_request", False)
        assert too_many.value.request_id == "too-many"
        assert "1000000000" in too_many.value.message
        assert too_many.value.done is None  # refused: nothing ran, nothing billed

        with pytest.raises(FarmeshClientError) as duplicate:
            await chat.ask("Hello", request_id="too-many")
        assert duplicate.value.code == "duplicate_request_id"

        # The protocol's static limits are checked before anything is sent.
        with pytest.raises(FarmeshClientError) as hot:
            chat.send("Hello", temperature=5.0)
        assert hot.value.code == "invalid_message"
        assert "temperature" in hot.value.message

        reply = await chat.ask("Say hi.", max_new_tokens=4)  # the session survived it all
        assert reply.usage.completion_tokens >= 1


async def test_a_second_request_while_one_runs_is_busy(gateway: GatewayServer) -> None:
    async with FarmeshClient.connect(ws_url(gateway)) as client:
        chat = await client.open_chat()
        async with chat.send("Count to fifty.", max_new_tokens=100) as first:
            assert isinstance(await anext(first), TokenEvent)
            with pytest.raises(FarmeshClientError) as busy:
                await chat.ask("Hello")
            assert (busy.value.code, busy.value.retryable) == ("busy", False)
            await chat.cancel()
            events = [event async for event in first]
        assert isinstance(events[-2], DoneEvent)
        assert events[-2].finish_reason == "cancelled"
        assert (await chat.ask("Say hi.", max_new_tokens=4)).done.finish_reason in {
            "stop",
            "length",
        }


async def read_into(stream: ReplyStream, events: list[Event]) -> None:
    async for event in stream:
        events.append(event)


async def test_budget_stop_raises_with_its_done_and_contribution(
    gateway: GatewayServer, golden: dict[str, Any]
) -> None:
    turn1 = golden["conversations"][0][0]
    budget = PRICE * 3 + PROMPT_PRICE * len(turn1["prompt_ids"])  # exactly three tokens
    async with connect(ws_url(gateway)) as client:
        chat = await client.open_chat()
        stream = chat.send(turn1["new_messages"][0]["content"], max_cost_far=budget)
        tokens: list[Event] = []
        with pytest.raises(FarmeshClientError) as stopped:
            await read_into(stream, tokens)
        error = stopped.value
        assert (error.code, error.retryable, error.request_id) == (
            "budget_exceeded",
            False,
            stream.request_id,
        )
        assert [t.tokens_generated for t in tokens if isinstance(t, TokenEvent)] == [1, 2, 3]
        assert error.done is not None
        assert error.contribution is not None
        assert error.done.finish_reason == "budget"
        assert error.done.usage.completion_tokens == 3
        assert error.done.usage.cost_far == budget
        assert_contribution_splits(error.contribution, budget)
        assert chat.total_cost_far == budget
        assert (await chat.ask("Say hi.", max_new_tokens=4)).usage.cached_tokens > 0


async def test_generate_one_shot_and_ping(gateway: GatewayServer, golden: dict[str, Any]) -> None:
    turn1 = golden["conversations"][0][0]
    client = await FarmeshClient.connect(ws_url(gateway))
    try:
        assert 0 < await client.ping() < 5
        events = [e async for e in client.generate(turn1["new_messages"][0]["content"])]
        # protocol.md §3.3: a generate ends with its contribution, then its done.
        assert [type(e) for e in events[-2:]] == [ContributionEvent, DoneEvent]
        text = "".join(e.text for e in events if isinstance(e, TokenEvent))
        assert text + END_OF_TURN == turn1["greedy_48_text"]
        reply = await client.generate("Name a prime number.", max_new_tokens=4)
        assert reply.done.finish_reason in {"stop", "length"}
        assert reply.usage.completion_tokens <= 4
        assert_contribution_splits(reply.contribution, expected_cost(reply.done))
    finally:
        await client.aclose()
    with pytest.raises(ConnectionLost, match="closed by this client"):
        await client.ping()


async def test_agent_example_runs(backend: Any) -> None:
    """As README says to run it: anonymously, on a gateway in its default loopback mode."""
    server = await start_gateway(backend, auth="")
    try:
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, str(REPO / "docs" / "agent_example.py"), ws_url(server)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
            env={k: v for k, v in os.environ.items() if k != "FARMESH_API_KEY"},
        )
    finally:
        await server.shutdown()
    assert result.returncode == 0, result.stderr
    output = result.stdout
    assert "> What is the capital of France?\nThe capital of France is Paris.\n" in output
    assert "> Name one famous landmark in Paris.\n" in output
    assert re.search(r"prompt \d+ \(\+[1-9]\d* cached\)", output), output
    assert "total: 0." in output


# A scripted server ---------------------------------------------------------------------------

Script = Callable[[ServerConnection, dict[str, Any]], Awaitable[None]]

OPENED = {
    "type": "opened",
    "session_id": "s1",
    "model": "fake",
    "max_length": 64,
    "price_per_token_far": "0.0001",
    "price_per_prompt_token_far": "0",
    "protocol_version": 1,
}


def done_frame(request_id: str, tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "done",
        "request_id": request_id,
        "finish_reason": "stop",
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": tokens,
            "cached_tokens": 0,
            "cost_far": str(PRICE * tokens),
        },
        "position": 5 + tokens,
        "max_length": 64,
        "duration_ms": 10.0,
        **extra,
    }


@contextlib.asynccontextmanager
async def scripted_server(on_turn: Script) -> AsyncIterator[str]:
    """A WebSocket server answering open and ping like farmesh_ws, and turns with ``on_turn``."""

    async def handle(ws: ServerConnection) -> None:
        async for frame in ws:
            message = json.loads(frame)
            if message["type"] == "open":
                await ws.send(json.dumps(OPENED))
            elif message["type"] == "ping":
                await ws.send(json.dumps({"type": "pong", "data": message.get("data")}))
            elif message["type"] == "turn":
                await on_turn(ws, message)

    async with serve(handle, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws"


async def test_unknown_message_types_and_fields_are_ignored() -> None:
    async def on_turn(ws: ServerConnection, message: dict[str, Any]) -> None:
        rid = message["request_id"]
        frames = [
            {"type": "announcement", "text": "from protocol 1.1"},
            {
                "type": "token",
                "request_id": rid,
                "token": "Hi",
                "tokens_generated": 1,
                "cost_far": "0.0001",
                "logprob": -0.1,
            },
            {"type": "progress", "request_id": rid, "percent": 50},
            done_frame(rid, 1, new_field={"x": 1}),
            {"type": "contribution", "request_id": rid, "cost_far": "0.0001", "nodes": []},
        ]
        for frame in frames:
            await ws.send(json.dumps(frame))

    async with scripted_server(on_turn) as url, FarmeshClient.connect(url) as client:
        chat = await client.open_chat()
        reply = await chat.ask("Hello")
    assert reply.text == "Hi"
    assert reply.cost_far == Decimal("0.0001")
    assert reply.contribution.nodes == ()


async def test_a_dropped_connection_raises_connection_lost() -> None:
    async def on_turn(ws: ServerConnection, message: dict[str, Any]) -> None:
        rid = message["request_id"]
        await ws.send(
            json.dumps(
                {
                    "type": "token",
                    "request_id": rid,
                    "token": "Hi",
                    "tokens_generated": 1,
                    "cost_far": "0.0001",
                }
            )
        )
        await ws.close(1011, "internal error")

    async with scripted_server(on_turn) as url, FarmeshClient.connect(url) as client:
        chat = await client.open_chat()
        stream = chat.send("Hello")
        with pytest.raises(ConnectionLost) as lost:
            async for _ in stream:
                pass
        assert lost.value.code == "connection_lost"
        assert lost.value.close_code == 1011
        assert "1011 internal error" in lost.value.message
        assert stream.text == "Hi"
        await client.wait_closed()
        with pytest.raises(ConnectionLost):
            await chat.ask("Again?")


async def test_silence_times_out_and_malformed_frames_are_errors() -> None:
    async def on_turn(ws: ServerConnection, message: dict[str, Any]) -> None:
        if message["text"] == "malformed":
            frame = done_frame(message["request_id"], 1)
            frame["usage"]["cost_far"] = "a lot"
            await ws.send(json.dumps(frame))

    async with scripted_server(on_turn) as url, FarmeshClient.connect(url, timeout=0.5) as client:
        chat = await client.open_chat()
        with pytest.raises(RequestTimeout) as silent:
            await chat.ask("Hello")
        assert (silent.value.code, silent.value.retryable) == ("timeout", True)
        with pytest.raises(FarmeshClientError) as malformed:
            await chat.ask("malformed")
        assert malformed.value.code == "protocol_error"


async def test_connect_failure() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectFailed) as failed:
        await FarmeshClient.connect(f"ws://127.0.0.1:{port}/ws", timeout=5)
    assert (failed.value.code, failed.value.retryable) == ("connect_failed", True)
