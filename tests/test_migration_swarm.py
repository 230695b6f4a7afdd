"""A chat moves between gateways on the real swarm (protocol.md §2.3): gateways A and B are
``farmesh-ws serve`` processes sharing one Redis and one PostgreSQL ledger. After A is
SIGKILLed or drained (SIGTERM), the chat resumes on B, its next greedy reply equals the one of a
conversation that never moved (on a gateway in this process), and the ledger holds the whole
session: A's turns and B's, whose replay of the history is credited to the servers, not
billed."""

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from farmesh_ws.home import farmesh_home
from farmesh_ws.transport.ws import GatewayServer
from tests.helpers import open_chat, receive, run_turn, send, start_gateway, ws_url
from tests.ledger.conftest import _fresh_postgres_database
from tests.test_cli import Command

REDIS = "redis://127.0.0.1:6379/0"
LEASE_S = 2.0
TURNS = ["Name three colours.", "Which of them is the warmest?", "And which is the coolest?"]
SAMPLING = {"temperature": 0, "max_new_tokens": 20}


@pytest.fixture
async def reference(backend: Any) -> AsyncIterator[GatewayServer]:
    """A gateway of its own, for the conversation that never moves."""
    server = await start_gateway(backend)
    yield server
    await server.shutdown()


@pytest.fixture
async def ledger_url() -> AsyncIterator[str]:
    async for url in _fresh_postgres_database():
        yield url.replace("postgresql+asyncpg://", "postgresql://")


def _serve(swarm: Any, tmp_path: Path, name: str, ledger_url: str) -> Command:
    home = tmp_path / name
    home.mkdir()
    (home / "models").symlink_to(farmesh_home() / "models")
    return Command(
        ["serve", "--port", "0", "--bootstrap", ",".join(swarm.initial_peers)],
        home,
        FARMESH_HOME=str(home),
        REDIS_URL=REDIS,
        POSTGRES_URL=ledger_url,
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
    """The turn's reply, its ``done`` and the ``seq`` of its last frame (its contribution)."""
    tokens, done, contribution = await run_turn(ws, request_id, text)
    assert done["finish_reason"] in ("stop", "length"), done
    return "".join(t["token"] for t in tokens), done, contribution["seq"]


async def _ledger_turns(ledger_url: str, session_id: str) -> dict[str, tuple[int, int]]:
    """Each recorded turn of the session: its prompt tokens, and the tokens its servers
    replayed (not billed), summed over its contributions."""
    db = await asyncpg.connect(ledger_url)
    try:
        rows = await db.fetch(
            """SELECT t.request_id, t.prompt_tokens, COALESCE(SUM(c.replayed_tokens), 0)
               FROM turns t LEFT JOIN node_contributions c
                 ON c.session_id = t.session_id AND c.request_id = t.request_id
               WHERE t.session_id = $1 GROUP BY t.request_id, t.prompt_tokens""",
            session_id,
        )
    finally:
        await db.close()
    return {row[0]: (row[1], row[2]) for row in rows}


async def _recorded(ledger_url: str, session_id: str, request_ids: set[str]) -> None:
    """Wait until the ledger holds these turns (its writer stores them off the hot path)."""
    deadline = time.monotonic() + 30
    while not request_ids <= set(await _ledger_turns(ledger_url, session_id)):
        assert time.monotonic() < deadline, f"{request_ids} never reached the ledger"
        await asyncio.sleep(0.1)


async def _drain(command: Command) -> None:
    """SIGTERM, as a redeploy does: the gateway flushes its ledger and exits 0."""
    command.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(command.process.wait, 60) == 0


async def _reference(server: GatewayServer) -> list[str]:
    async with connect(ws_url(server)) as ws:
        await open_chat(ws, sampling=SAMPLING)
        return [(await _text(ws, f"r{i}", turn))[0] for i, turn in enumerate(TURNS)]


async def _resume_when_free(url: str, resume: dict[str, Any]) -> Any:
    """Resume on the gateway at ``url``, retrying while the old gateway still holds the session
    (as the Python client does); the open connection and the ``resumed`` frame."""
    deadline = time.monotonic() + 60
    while True:
        ws = await connect(url)
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


@dataclass
class Pair:
    """Gateways A and B (``serve`` processes) on one Redis and one ledger, and their URLs."""

    a: Command
    b: Command
    url_a: str
    url_b: str


@pytest.fixture
async def pair(swarm: Any, ledger_url: str, tmp_path: Path) -> AsyncIterator[Pair]:
    a = _serve(swarm, tmp_path, "a", ledger_url)
    b = _serve(swarm, tmp_path, "b", ledger_url)
    try:
        url_a, url_b = await asyncio.gather(_ready(a), _ready(b))
        yield Pair(a, b, url_a, url_b)
    finally:
        _stop(a)
        _stop(b)


async def test_a_chat_resumes_on_b_after_a_is_killed_with_the_same_greedy_reply(
    pair: Pair, reference: GatewayServer, ledger_url: str
) -> None:
    expected = await _reference(reference)
    async with connect(pair.url_a) as ws:
        opened = await open_chat(ws, sampling=SAMPLING)
        texts, held = [], 0
        for i in range(2):
            text, done, last_seq = await _text(ws, f"a{i}", TURNS[i])
            texts.append(text)
            held = done["position"]
        await _recorded(ledger_url, opened["session_id"], {"a0", "a1"})
        os.killpg(pair.a.process.pid, signal.SIGKILL)
        pair.a.process.wait()
        await _until_closed(ws)
    assert texts == expected[:2]
    ws, resumed = await _resume_when_free(pair.url_b, _resume(opened, last_seq))
    async with ws:
        assert resumed["moved"] is True
        assert resumed["last_seq"] == last_seq
        text, done, _ = await _text(ws, "b2", TURNS[2])
    await _drain(pair.b)
    assert text == expected[2]
    # the history was replayed into B's mesh session, not sent again nor billed
    assert done["usage"]["cached_tokens"] == held
    turns = await _ledger_turns(ledger_url, opened["session_id"])
    assert set(turns) == {"a0", "a1", "b2"}
    assert turns["b2"][0] == done["usage"]["prompt_tokens"]
    assert turns["b2"][1] >= held  # each server replayed the history it holds a span of


async def test_a_drained_gateways_chat_resumes_on_b_with_the_same_greedy_reply(
    pair: Pair, reference: GatewayServer, ledger_url: str
) -> None:
    expected = await _reference(reference)
    async with connect(pair.url_a) as ws:
        opened = await open_chat(ws, sampling=SAMPLING)
        text, _, last_seq = await _text(ws, "a0", TURNS[0])
        draining = asyncio.create_task(_drain(pair.a))
        frames = await _until_closed(ws)
        assert ws.close_code == 1001
        await draining
    ws, resumed = await _resume_when_free(pair.url_b, _resume(opened, last_seq))
    async with ws:
        assert resumed["moved"] is True
        texts = [(await _text(ws, f"b{i}", TURNS[i]))[0] for i in (1, 2)]
    await _drain(pair.b)
    assert text == expected[0]
    assert [f["type"] for f in frames] == ["going_away"]
    assert texts == expected[1:]
    assert set(await _ledger_turns(ledger_url, opened["session_id"])) == {"a0", "b1", "b2"}
