"""Every kind of bad input gets a typed error (or a 1008/1009 close) and hurts nobody else."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from farmesh_ws.transport.ws import GatewayServer
from tests.helpers import open_chat, receive, run_turn, send, start_gateway, ws_url

OPEN = {"type": "open"}
TURN = {"type": "turn", "request_id": "x", "text": "hi"}

# (case id, frames sent first to set the state up, the bad frame, the expected error code)
CASES: list[tuple[str, list[dict[str, Any]], str | bytes, str]] = [
    ("invalid json", [], "{nope", "invalid_json"),
    ("binary frame", [], b"\x00\x01binary", "invalid_message"),
    ("not an object", [], "[1, 2]", "invalid_message"),
    ("unknown type", [], json.dumps({"type": "dance"}), "invalid_message"),
    ("missing type", [], json.dumps({"text": "hi"}), "invalid_message"),
    ("missing field", [OPEN], json.dumps({"type": "turn", "text": "hi"}), "invalid_message"),
    ("extra field", [], json.dumps({"type": "ping", "extra": 1}), "invalid_message"),
    ("wrong type", [OPEN], json.dumps({**TURN, "request_id": 5}), "invalid_message"),
    ("negative max tokens", [OPEN], json.dumps({**TURN, "max_new_tokens": -3}), "invalid_message"),
    ("huge max tokens", [OPEN], json.dumps({**TURN, "max_new_tokens": 10**9}), "invalid_request"),
    ("temperature 1e9", [OPEN], json.dumps({**TURN, "temperature": 1e9}), "invalid_message"),
    ("top_p zero", [OPEN], json.dumps({**TURN, "top_p": 0}), "invalid_message"),
    ("empty text", [OPEN], json.dumps({**TURN, "text": ""}), "invalid_message"),
    ("text too long", [OPEN], json.dumps({**TURN, "text": "a" * 3000}), "invalid_request"),
    ("max_length too big", [], json.dumps({**OPEN, "max_length": 10**6}), "invalid_request"),
    ("max_length zero", [], json.dumps({**OPEN, "max_length": 0}), "invalid_message"),
    ("unknown model", [], json.dumps({**OPEN, "model": "no-such-model"}), "model_not_found"),
    ("bad wallet", [], json.dumps({**OPEN, "user_wallet": "x y"}), "invalid_message"),
    ("turn before open", [], json.dumps(TURN), "no_session"),
    ("second open", [OPEN], json.dumps(OPEN), "already_open"),
    (
        "cancel unknown id",
        [OPEN],
        json.dumps({"type": "cancel", "request_id": "zz"}),
        "unknown_request",
    ),
    ("too many stops", [OPEN], json.dumps({**TURN, "stop": ["a"] * 20}), "invalid_message"),
    # ~1000 levels deep, an unknown field before "type": once a RecursionError and a 1011 close
    ("deep nesting", [], '{"x":' + "[" * 1000 + "]" * 1000 + ',"type":"ping"}', "invalid_json"),
    # "$" matches before a final newline: "w\n" once became a second ledger wallet
    (
        "wallet ending in a newline",
        [],
        json.dumps({**OPEN, "user_wallet": "w\n"}),
        "invalid_message",
    ),
]


@pytest.fixture(scope="module")
async def strict_gateway(backend: Any) -> AsyncIterator[GatewayServer]:
    server = await start_gateway(
        backend, max_text_chars=2000, max_frame_bytes=8192, max_consecutive_errors=30
    )
    yield server
    await server.shutdown()


async def _expect_error(ws: ClientConnection, code: str) -> dict[str, Any]:
    message = await receive(ws)
    assert message["type"] == "error", message
    assert message["code"] == code, message
    assert message["message"]
    assert "Traceback" not in message["message"]
    return message


@pytest.mark.parametrize(
    ("setup", "frame", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_bad_frame_gets_a_typed_error_and_the_connection_stays_usable(
    strict_gateway: GatewayServer, setup: list[dict[str, Any]], frame: str | bytes, code: str
) -> None:
    async with connect(ws_url(strict_gateway)) as ws:
        for message in setup:
            await send(ws, message)
            assert (await receive(ws))["type"] == "opened"
        await ws.send(frame)
        await _expect_error(ws, code)
        await send(ws, {"type": "ping", "data": "still here"})
        assert await receive(ws) == {"type": "pong", "data": "still here"}


async def test_oversize_frame_closes_1009(strict_gateway: GatewayServer) -> None:
    async with connect(ws_url(strict_gateway), max_size=None) as ws:
        await send(ws, {"type": "ping", "data": "x" * 10000})
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009


async def test_too_many_invalid_messages_in_a_row_close_1008(strict_gateway: GatewayServer) -> None:
    async with connect(ws_url(strict_gateway)) as ws:
        for _ in range(29):
            await ws.send("{nope")
            await _expect_error(ws, "invalid_json")
        await send(ws, {"type": "ping"})
        assert (await receive(ws))["type"] == "pong"
        for _ in range(30):
            await ws.send("{nope")
            await _expect_error(ws, "invalid_json")
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008


async def test_a_flood_of_bad_frames_does_not_disturb_another_session(
    strict_gateway: GatewayServer, golden: dict[str, Any]
) -> None:
    conversation = golden["conversations"][0][0]

    async def good_chat() -> str:
        async with connect(ws_url(strict_gateway)) as ws:
            await open_chat(ws)
            tokens, done, _ = await run_turn(ws, "good", conversation["new_messages"][0]["content"])
            assert done["finish_reason"] == "stop"
            return "".join(t["token"] for t in tokens)

    async def abuser() -> int:
        errors = 0
        async with connect(ws_url(strict_gateway)) as ws:
            for _, setup, frame, code in CASES:
                if setup:
                    continue
                await ws.send(frame)
                await _expect_error(ws, code)
                errors += 1
        return errors

    text, errors = await asyncio.gather(good_chat(), abuser())
    assert text + "<|im_end|>" == conversation["greedy_48_text"]
    assert errors >= 10
