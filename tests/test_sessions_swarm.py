"""Sessions that outlive their connection, and going back in a chat, on the real swarm: a
dropped turn resumes with every token once, and rewind/regenerate answer as a fresh session
fed the shortened history (protocol.md §2.2, §3.8, §3.9)."""

from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from farmesh_ws.transport.ws import GatewayServer
from tests.helpers import open_chat, receive, run_turn, send, start_gateway, ws_url

GREEDY = {"temperature": 0, "max_new_tokens": 16}


@pytest.fixture(scope="module")
async def server(backend: Any) -> AsyncIterator[GatewayServer]:
    gateway = await start_gateway(backend, requests_burst=500)
    yield gateway
    await gateway.shutdown()


async def reply(ws: ClientConnection, request_id: str, text: str) -> tuple[str, dict[str, Any]]:
    tokens, done, _ = await run_turn(ws, request_id, text, **GREEDY)
    return "".join(t["token"] for t in tokens), done


async def test_a_dropped_turn_resumes_with_every_token_once(server: GatewayServer) -> None:
    question = "Tell me about the sea."
    async with connect(ws_url(server)) as ws:
        await open_chat(ws)
        uninterrupted, _ = await reply(ws, "t", question)
    async with connect(ws_url(server)) as ws:
        opened = await open_chat(ws)
        await send(ws, {"type": "turn", "request_id": "t", "text": question, **GREEDY})
        before = [await receive(ws) for _ in range(3)]
        ws.transport.abort()  # the network drops mid-turn
    async with connect(ws_url(server)) as ws:
        await send(
            ws,
            {
                "type": "resume",
                "session_id": opened["session_id"],
                "resume_token": opened["resume_token"],
                "last_seq": before[-1]["seq"],
            },
        )
        assert (await receive(ws))["type"] == "resumed"
        after = []
        while not after or after[-1]["type"] != "contribution":
            after.append(await receive(ws))
        frames = before + after
        assert [f["seq"] for f in frames] == list(range(2, 2 + len(frames)))
        tokens = [f for f in frames if f["type"] == "token"]
        assert [t["tokens_generated"] for t in tokens] == list(range(1, len(tokens) + 1))
        assert "".join(t["token"] for t in tokens) == uninterrupted
        _, done = await reply(ws, "t2", "And about rivers?")
    assert done["usage"]["cached_tokens"] > 0  # the history stayed on the servers


async def test_rewind_and_regenerate_answer_as_a_fresh_session_with_that_history(
    server: GatewayServer,
) -> None:
    async with connect(ws_url(server)) as ws:
        await open_chat(ws)
        await reply(ws, "1", "Name a colour.")
        fresh_second, fresh_done = await reply(ws, "4", "Name an animal.")
    async with connect(ws_url(server)) as ws:
        await open_chat(ws)
        await reply(ws, "1", "Name a colour.")
        await reply(ws, "2", "Name a fruit.")
        await reply(ws, "3", "Name a city.")
        await send(ws, {"type": "rewind", "turns": 2})
        rewound = await receive(ws)
        assert (rewound["type"], rewound["method"]) == ("rewound", "replay")
        second, done = await reply(ws, "4", "Name an animal.")
        assert second == fresh_second
        assert done["usage"]["cached_tokens"] == fresh_done["usage"]["cached_tokens"]
        await send(ws, {"type": "regenerate", "request_id": "5", **GREEDY})
        frames = []
        while not frames or frames[-1]["type"] != "contribution":
            frames.append(await receive(ws))
    again = "".join(f["token"] for f in frames if f["type"] == "token")
    (regenerated,) = [f for f in frames if f["type"] == "done"]
    assert again == fresh_second  # greedy: the same reply
    assert regenerated["rewound"] == "replay"
    nodes = frames[-1]["nodes"]
    assert all(node["replayed_tokens"] > 0 for node in nodes)  # the history was replayed
