"""The WebSocket gateway through real sockets (port 0) on the real local swarm."""

import asyncio
import json
import urllib.request
from decimal import Decimal
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from farmesh_ws import __version__
from farmesh_ws.transport.ws import GatewayServer
from tests.helpers import (
    PRICE,
    PROMPT_PRICE,
    open_chat,
    receive,
    run_turn,
    send,
    start_gateway,
    ws_url,
)


def http_get(server: GatewayServer, path: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as reply:
        return reply.status, reply.headers["Content-Type"], reply.read()


async def test_two_turn_chat_reuses_the_session(
    gateway: GatewayServer, golden: dict[str, Any]
) -> None:
    turn1, turn2 = golden["conversations"][0][:2]
    async with connect(ws_url(gateway)) as ws:
        opened = await open_chat(ws, max_length=512, user_wallet="wallet-1")
        assert opened["price_per_token_far"] == "0.0001"
        assert opened["price_per_prompt_token_far"] == "0.00002"
        assert opened["max_length"] == 512

        tokens1, done1, contribution1 = await run_turn(
            ws, "t1", turn1["new_messages"][0]["content"]
        )
        tokens2, done2, contribution2 = await run_turn(
            ws, "t2", turn2["new_messages"][0]["content"]
        )

    assert "".join(t["token"] for t in tokens1) + "<|im_end|>" == turn1["greedy_48_text"]
    assert "".join(t["token"] for t in tokens2) + "<|im_end|>" == turn2["greedy_48_text"]
    assert [t["tokens_generated"] for t in tokens2] == list(range(1, len(tokens2) + 1))

    usage1, usage2 = done1["usage"], done2["usage"]
    assert usage1["prompt_tokens"] == len(turn1["prompt_ids"])
    assert usage1["cached_tokens"] == 0
    history = len(turn1["prompt_ids"]) + len(turn1["greedy_48_ids"])
    assert usage2["prompt_tokens"] == len(turn2["prompt_ids"]) - history
    assert usage2["cached_tokens"] == history - 1
    assert done2["finish_reason"] == "stop"

    for tokens, done, contribution in (
        (tokens1, done1, contribution1),
        (tokens2, done2, contribution2),
    ):
        usage = done["usage"]
        expected = PRICE * usage["completion_tokens"] + PROMPT_PRICE * usage["prompt_tokens"]
        assert Decimal(usage["cost_far"]) == expected
        assert Decimal(tokens[-1]["cost_far"]) == expected
        assert Decimal(contribution["cost_far"]) == expected
        assert sum(Decimal(node["share_far"]) for node in contribution["nodes"]) == expected
        assert len(contribution["nodes"]) == 2
        assert sorted((n["start_block"], n["end_block"]) for n in contribution["nodes"]) == [
            (0, 15),
            (15, 30),
        ]


async def test_four_concurrent_sessions_interleave(
    gateway: GatewayServer, golden: dict[str, Any]
) -> None:
    questions = [
        (
            golden["conversations"][0][0]["new_messages"][-1]["content"],
            golden["conversations"][0][0],
        ),
        (
            golden["conversations"][1][0]["new_messages"][-1]["content"],
            golden["conversations"][1][0],
        ),
    ]

    async def chat(index: int) -> tuple[int, str, int]:
        question, _ = questions[index % 2]
        system = None
        if index % 2 == 1:
            system = golden["conversations"][1][0]["new_messages"][0]["content"]
        async with connect(ws_url(gateway)) as ws:
            fields = {"system_prompt": system} if system else {}
            await open_chat(ws, **fields)
            tokens, done, _ = await run_turn(ws, f"r{index}", question)
            return index, "".join(t["token"] for t in tokens), done["usage"]["completion_tokens"]

    results = await asyncio.gather(*(chat(i) for i in range(4)))
    for index, text, completion_tokens in results:
        expected = questions[index % 2][1]
        assert text + "<|im_end|>" == expected["greedy_48_text"]
        assert completion_tokens == len(expected["greedy_48_ids"])


async def test_cancel_mid_turn_then_another_turn(gateway: GatewayServer) -> None:
    async with connect(ws_url(gateway)) as ws:
        await open_chat(ws)
        await send(
            ws,
            {
                "type": "turn",
                "request_id": "long",
                "text": "Write a long story about a lighthouse.",
                "max_new_tokens": 300,
            },
        )
        first = await receive(ws)
        assert first["type"] == "token"
        await send(ws, {"type": "cancel", "request_id": "long"})
        while True:
            message = await receive(ws)
            if message["type"] == "done":
                break
            assert message["type"] == "token"
        assert message["finish_reason"] == "cancelled"
        assert message["usage"]["completion_tokens"] < 300
        contribution = await receive(ws)
        assert contribution["type"] == "contribution"

        _, done, _ = await run_turn(ws, "after", "Say hi.", max_new_tokens=8)
        assert done["finish_reason"] in {"stop", "length"}
        assert done["usage"]["cached_tokens"] > 0


async def test_a_second_turn_while_busy_gets_busy(gateway: GatewayServer) -> None:
    async with connect(ws_url(gateway)) as ws:
        await open_chat(ws)
        await send(
            ws,
            {"type": "turn", "request_id": "a", "text": "Count to fifty.", "max_new_tokens": 100},
        )
        await send(ws, {"type": "turn", "request_id": "b", "text": "Hello"})
        busy = None
        while True:
            message = await receive(ws)
            if message["type"] == "error":
                busy = message
                await send(ws, {"type": "cancel", "request_id": "a"})
            if message["type"] == "contribution":
                break
        assert busy is not None
        assert busy["code"] == "busy"
        assert busy["request_id"] == "b"


async def test_http_endpoints(gateway: GatewayServer) -> None:
    status, content_type, body = await asyncio.to_thread(http_get, gateway, "/health")
    health = json.loads(body)
    assert (status, content_type) == (200, "application/json")
    assert health["status"] == "healthy"  # the seed's health shape, plus our fields
    assert health["service"] == "farmesh-ws"
    assert health["version"] == __version__
    assert health["protocol_version"] == 1

    _, _, body = await asyncio.to_thread(http_get, gateway, "/mesh/status")
    mesh = json.loads(body)
    assert set(mesh) >= {
        "model_id",
        "active_nodes",
        "active_sessions",
        "price_per_token_far",
        "status",
    }
    assert mesh["model_id"] == "SmolLM2-135M-Instruct"
    assert mesh["active_nodes"] >= 2
    assert mesh["status"] == "online"
    assert mesh["price_per_token_far"] == "0.0001"

    _, _, body = await asyncio.to_thread(http_get, gateway, "/models")
    models = json.loads(body)["models"]
    assert [m["model_id"] for m in models] == ["SmolLM2-135M-Instruct"]
    assert set(models[0]) >= {"active_nodes", "price_per_token_far", "status"}

    with pytest.raises(urllib.error.HTTPError) as missing:
        await asyncio.to_thread(http_get, gateway, "/nope")
    assert missing.value.code == 404
    missing.value.close()


def _sample(metrics_text: str, name: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_metrics_change_after_a_turn(gateway: GatewayServer) -> None:
    _, content_type, before = await asyncio.to_thread(http_get, gateway, "/metrics")
    assert content_type.startswith("text/plain")
    async with connect(ws_url(gateway)) as ws:
        await open_chat(ws)
        _, done, _ = await run_turn(ws, "m1", "Say hi.", max_new_tokens=4)
    _, _, after = await asyncio.to_thread(http_get, gateway, "/metrics")
    b, a = before.decode(), after.decode()
    assert _sample(a, "farmesh_turns_total") == _sample(b, "farmesh_turns_total") + 1
    assert (
        _sample(a, "farmesh_completion_tokens_total")
        == _sample(b, "farmesh_completion_tokens_total") + done["usage"]["completion_tokens"]
    )
    assert (
        _sample(a, "farmesh_time_to_first_token_seconds_count")
        == _sample(b, "farmesh_time_to_first_token_seconds_count") + 1
    )
    assert _sample(a, "farmesh_connections_total") >= _sample(b, "farmesh_connections_total") + 1
    assert 'farmesh_mesh_nodes{model="SmolLM2-135M-Instruct"}' in a or "farmesh_mesh_nodes" in a


async def test_graceful_shutdown_finishes_the_running_turn_then_closes_1001(backend: Any) -> None:
    server = await start_gateway(backend, shutdown_grace_s=60)
    url = ws_url(server)
    async with connect(url) as ws:
        await open_chat(ws)
        await send(
            ws, {"type": "turn", "request_id": "g", "text": "Say hello.", "max_new_tokens": 12}
        )
        first = await receive(ws)
        assert first["type"] == "token"
        shutdown = asyncio.create_task(server.shutdown())
        frames = [first]
        closed = await _collect_until_closed(ws, frames)
        await shutdown
    kinds = [frame["type"] for frame in frames]
    assert "done" in kinds
    assert kinds[-1] == "contribution"
    assert closed.rcvd is not None
    assert closed.rcvd.code == 1001
    with pytest.raises(ConnectionRefusedError):
        async with connect(url, open_timeout=5):
            pass


async def _collect_until_closed(
    ws: ClientConnection, frames: list[dict[str, Any]]
) -> ConnectionClosed:
    while True:
        try:
            frames.append(await receive(ws))
        except ConnectionClosed as closed:
            return closed


async def test_requests_beyond_the_rate_limit_get_a_retryable_error(backend: Any) -> None:
    server = await start_gateway(backend, requests_per_minute=1, requests_burst=2)
    try:
        async with connect(ws_url(server)) as ws:
            refused = []
            for index in range(3):  # refused requests leave no trace: not even a rate token
                await send(ws, {"type": "turn", "request_id": f"n{index}", "text": "hi"})
                refused.append((await receive(ws))["code"])
            assert refused == ["no_session"] * 3
            await open_chat(ws)
            for index in range(2):
                _, done, _ = await run_turn(ws, f"q{index}", "hi", max_new_tokens=1)
                assert done["finish_reason"] == "length"
            await send(ws, {"type": "turn", "request_id": "q2", "text": "hi"})
            error = await receive(ws)
        assert (error["code"], error["retryable"], error["request_id"]) == (
            "rate_limited",
            True,
            "q2",
        )
    finally:
        await server.shutdown()
