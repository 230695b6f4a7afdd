"""A chat moves between gateways on the real swarm (protocol.md §2.3): gateway A is a
``farmesh-ws serve`` process, gateway B runs here, both on one Redis. After A is SIGKILLed or
drained (SIGTERM), the chat resumes on B and its next greedy reply equals the one of a
conversation that never moved."""

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from farmesh_ws.config import Settings
from farmesh_ws.home import farmesh_home
from farmesh_ws.mesh.status import MeshStatusCache
from farmesh_ws.metrics import Metrics
from farmesh_ws.state import open_state_store
from farmesh_ws.state.registry import SessionRegistry
from farmesh_ws.transport.ws import GatewayServer
from tests.helpers import open_chat, receive, run_turn, send, ws_url
from tests.test_cli import Command

REDIS = "redis://127.0.0.1:6379/0"
LEASE_S = 2.0
TURNS = ["Name three colours.", "Which of them is the warmest?", "And which is the coolest?"]
SAMPLING = {"temperature": 0, "max_new_tokens": 20}


@pytest.fixture
async def gateway_b(backend: Any) -> AsyncIterator[GatewayServer]:
    store = await open_state_store(REDIS)
    status = MeshStatusCache(backend.model_ids, backend.coverage, refresh_s=60)
    await status.refresh()
    settings = Settings(port=0, auth="off", balances="off", coordinator_lease_s=LEASE_S)
    registry = SessionRegistry(store, lease_s=LEASE_S)
    server = GatewayServer(settings, backend, status, Metrics(), registry=registry)
    await server.start()
    yield server
    await server.shutdown()
    await store.aclose()


def _serve_a(swarm: Any, tmp_path: Path) -> Command:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(farmesh_home() / "models")
    return Command(
        ["serve", "--port", "0", "--bootstrap", ",".join(swarm.initial_peers)],
        tmp_path,
        FARMESH_HOME=str(home),
        REDIS_URL=REDIS,
        FARMESH_AUTH="off",
        FARMESH_BALANCES="off",
        FARMESH_COORDINATOR_LEASE_S=str(LEASE_S),
        FARMESH_SHUTDOWN_GRACE_S="5",
    )


def _stop(command: Command) -> None:
    if command.process.poll() is None:
        os.killpg(command.process.pid, signal.SIGKILL)
        command.process.wait()
    if command.process.stdout is not None:
        command.process.stdout.close()


async def _text(ws: Any, request_id: str, text: str) -> tuple[str, dict[str, Any], int]:
    """The turn's reply, its ``done`` and the ``seq`` of its last frame."""
    tokens, done, contribution = await run_turn(ws, request_id, text)
    assert done["finish_reason"] in ("stop", "length"), done
    return "".join(t["token"] for t in tokens), done, contribution["seq"]


async def _reference(server: GatewayServer) -> list[str]:
    async with connect(ws_url(server)) as ws:
        await open_chat(ws, sampling=SAMPLING)
        return [(await _text(ws, f"r{i}", turn))[0] for i, turn in enumerate(TURNS)]


async def _resume_when_free(server: GatewayServer, resume: dict[str, Any]) -> Any:
    """Resume on ``server``, retrying while the old gateway still holds the session (as the
    Python client does); the open connection and the ``resumed`` frame."""
    deadline = time.monotonic() + 60
    while True:
        ws = await connect(ws_url(server))
        await send(ws, resume)
        answer = await receive(ws)
        if answer["type"] == "resumed":
            return ws, answer
        await ws.close()
        assert answer["code"] == "session_elsewhere", answer
        assert time.monotonic() < deadline, "the session never moved"
        await asyncio.sleep(answer["retry_after_s"])


async def _until_closed(ws: Any) -> list[dict[str, Any]]:
    frames = []
    try:
        while True:
            frames.append(await receive(ws))
    except ConnectionClosed:
        return frames


def _resume(opened: dict[str, Any], last_seq: int) -> dict[str, Any]:
    return {
        "type": "resume",
        "session_id": opened["session_id"],
        "resume_token": opened["resume_token"],
        "last_seq": last_seq,
    }


async def _ready(command: Command) -> str:
    line = await asyncio.to_thread(command.wait_for_line, r"^farmesh-ws ready: ws://", 120)
    return line.split()[2]


async def test_a_chat_resumes_on_b_after_a_is_killed_with_the_same_greedy_reply(
    swarm: Any, gateway_b: GatewayServer, tmp_path: Path
) -> None:
    reference = await _reference(gateway_b)
    a = _serve_a(swarm, tmp_path)
    try:
        async with connect(await _ready(a)) as ws:
            opened = await open_chat(ws, sampling=SAMPLING)
            texts, held = [], 0
            for i in range(2):
                text, done, last_seq = await _text(ws, f"a{i}", TURNS[i])
                texts.append(text)
                held = done["position"]
            os.killpg(a.process.pid, signal.SIGKILL)
            a.process.wait()
            await _until_closed(ws)
    finally:
        _stop(a)
    assert texts == reference[:2]
    ws, resumed = await _resume_when_free(gateway_b, _resume(opened, last_seq))
    async with ws:
        assert resumed["moved"] is True
        assert resumed["last_seq"] == last_seq
        text, done, _ = await _text(ws, "b2", TURNS[2])
    assert text == reference[2]
    # the history was replayed into B's mesh session, not sent again nor billed
    assert done["usage"]["cached_tokens"] == held


async def test_a_drained_gateways_chat_resumes_on_b_with_the_same_greedy_reply(
    swarm: Any, gateway_b: GatewayServer, tmp_path: Path
) -> None:
    reference = await _reference(gateway_b)
    a = _serve_a(swarm, tmp_path)
    try:
        async with connect(await _ready(a)) as ws:
            opened = await open_chat(ws, sampling=SAMPLING)
            text, _, last_seq = await _text(ws, "a0", TURNS[0])
            a.process.send_signal(signal.SIGTERM)
            frames = await _until_closed(ws)
            assert ws.close_code == 1001
        assert await asyncio.to_thread(a.process.wait, 60) == 0
    finally:
        _stop(a)
    assert text == reference[0]
    assert [f["type"] for f in frames] == ["going_away"]
    ws, resumed = await _resume_when_free(gateway_b, _resume(opened, last_seq))
    async with ws:
        assert resumed["moved"] is True
        texts = [(await _text(ws, f"b{i}", TURNS[i]))[0] for i in (1, 2)]
    assert texts == reference[1:]
