"""Sessions that outlive their connection (protocol.md §2.2): real sockets, the scripted mesh."""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from farmesh_ws.ledger.keys import KeyPrincipal
from farmesh_ws.mesh.fake import FakeBackend
from farmesh_ws.transport.ws import GatewayServer
from tests.engine.support import release
from tests.transport.support import fake_gateway

KEYS = {
    "fmk_alice": KeyPrincipal(key_id="fk_alice", wallet="0x" + "a" * 40, name=None),
    "fmk_bob": KeyPrincipal(key_id="fk_bob", wallet="0x" + "b" * 40, name=None),
}
WAIT_S = 10.0


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Any]]:
    servers: list[GatewayServer] = []

    async def start(backend: FakeBackend, **overrides: Any) -> GatewayServer:
        server = await fake_gateway(backend, keys=KEYS, auth="required", **overrides)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.shutdown()


def dial(server: GatewayServer, key: str = "fmk_alice") -> Any:
    return connect(
        f"ws://127.0.0.1:{server.port}/ws", additional_headers={"Authorization": f"Bearer {key}"}
    )


def drop(ws: ClientConnection) -> None:
    """Lose the connection as a network change does: no WebSocket close frame (1006)."""
    ws.transport.abort()


async def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(json.dumps(message))


async def receive(ws: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
    return frame


async def until(ws: ClientConnection, kind: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Frames into ``seen`` until one of type ``kind``."""
    while True:
        frame = await receive(ws)
        seen.append(frame)
        if frame["type"] == kind:
            return frame


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


async def test_a_turn_cut_by_a_dropped_socket_resumes_with_every_frame_once(make: Any) -> None:
    gate = asyncio.Semaphore(0)
    reply = "Resumed replies arrive whole."
    server = await make(FakeBackend(reply=reply, gate=gate))
    async with dial(server) as ws:
        await send(ws, {"type": "open"})
        opened = await receive(ws)
        assert opened["seq"] == 1
        await send(ws, {"type": "turn", "request_id": "t1", "text": "hi"})
        release(gate, 5)
        before = [await receive(ws) for _ in range(5)]
        drop(ws)
    assert [f["seq"] for f in before] == [2, 3, 4, 5, 6]
    release(gate, len(reply) + 5)  # the turn goes on while no connection has the session
    await wait_until(lambda: not server.engine.runner.active, "the turn ended")
    async with dial(server) as ws:
        resume = {"session_id": opened["session_id"], "resume_token": opened["resume_token"]}
        await send(ws, {"type": "resume", **resume, "last_seq": before[-1]["seq"]})
        resumed = await receive(ws)
        assert resumed["type"] == "resumed"
        after: list[dict[str, Any]] = []
        done = await until(ws, "contribution", after)
        frames = before + after
        assert [f["seq"] for f in frames] == list(range(2, 2 + len(frames)))
        tokens = [f for f in frames if f["type"] == "token"]
        assert "".join(f["token"] for f in tokens) == reply
        assert [f["tokens_generated"] for f in tokens] == list(range(1, len(tokens) + 1))
        assert done["request_id"] == "t1"
        first_done = next(f for f in frames if f["type"] == "done")
        assert first_done["finish_reason"] == "stop"
        await send(ws, {"type": "turn", "request_id": "t2", "text": "again"})
        release(gate, len(reply) + 5)
        second = await until(ws, "done", [])
    assert second["usage"]["cached_tokens"] > first_done["position"] - 1  # history kept


async def test_a_wrong_token_another_principal_or_an_unknown_session_is_refused(
    make: Any,
) -> None:
    server = await make(FakeBackend(reply="ok"))
    async with dial(server) as ws:
        await send(ws, {"type": "open"})
        opened = await receive(ws)
        drop(ws)
    session = {"session_id": opened["session_id"], "last_seq": 1}
    async with dial(server) as ws:
        await send(ws, {"type": "resume", **session, "resume_token": "x" + opened["resume_token"]})
        assert (await receive(ws))["code"] == "resume_denied"
    async with dial(server, "fmk_bob") as ws:
        await send(ws, {"type": "resume", **session, "resume_token": opened["resume_token"]})
        assert (await receive(ws))["code"] == "resume_denied"
        await send(ws, {**session, "type": "resume", "session_id": "f" * 32, "resume_token": "t"})
        assert (await receive(ws))["code"] == "session_expired"
    async with dial(server) as ws:  # the refusals left the session as it was
        await send(ws, {"type": "resume", **session, "resume_token": opened["resume_token"]})
        assert (await receive(ws))["type"] == "resumed"


async def test_a_closed_session_or_one_past_its_grace_is_expired(make: Any) -> None:
    server = await make(FakeBackend(reply="ok"), resume_grace_s=0.05)
    async with dial(server) as ws:
        await send(ws, {"type": "open"})
        opened = await receive(ws)
        await send(ws, {"type": "close"})
        assert (await receive(ws))["type"] == "closed"
    resume = {"type": "resume", "session_id": opened["session_id"], "last_seq": 2}
    async with dial(server) as ws:
        await send(ws, {**resume, "resume_token": opened["resume_token"]})
        assert (await receive(ws))["code"] == "session_expired"
        await send(ws, {"type": "open"})
        second = await receive(ws)
        drop(ws)
    await wait_until(lambda: server.engine.sessions.count == 0, "the grace period ended")
    async with dial(server) as ws:
        await send(
            ws,
            {
                **resume,
                "session_id": second["session_id"],
                "last_seq": 1,
                "resume_token": second["resume_token"],
            },
        )
        assert (await receive(ws))["code"] == "session_expired"


async def test_without_a_grace_period_closing_the_socket_cancels_and_closes(make: Any) -> None:
    gate = asyncio.Semaphore(0)
    server = await make(FakeBackend(reply="abcdef", gate=gate), resume_grace_s=0)
    async with dial(server) as ws:
        await send(ws, {"type": "open"})
        opened = await receive(ws)
        assert "resume_token" not in opened
        await send(ws, {"type": "turn", "request_id": "t", "text": "hi"})
        release(gate, 1)
        await receive(ws)
        drop(ws)
    await wait_until(lambda: server.engine.sessions.count == 0, "the session closed")
    assert not server.engine.runner.active


async def test_a_full_outbox_cancels_the_detached_turn_and_the_replay_is_complete(
    make: Any,
) -> None:
    gate = asyncio.Semaphore(0)
    server = await make(FakeBackend(reply="x" * 200, gate=gate), resume_outbox_frames=16)
    async with dial(server) as ws:
        await send(ws, {"type": "open"})
        opened = await receive(ws)
        await send(ws, {"type": "turn", "request_id": "t", "text": "hi", "max_new_tokens": 200})
        release(gate, 1)
        first = await receive(ws)
        drop(ws)
    release(gate, 200)
    await wait_until(lambda: not server.engine.runner.active, "the turn ended")
    async with dial(server) as ws:
        token = opened["resume_token"]
        await send(
            ws,
            {
                "type": "resume",
                "session_id": opened["session_id"],
                "resume_token": token,
                "last_seq": first["seq"],
            },
        )
        assert (await receive(ws))["type"] == "resumed"
        frames: list[dict[str, Any]] = []
        done = await until(ws, "done", frames)
    assert done["finish_reason"] == "cancelled"
    tokens = [f for f in frames if f["type"] == "token"]
    assert 16 - 1 <= len(tokens) + 1 <= 16 + 2  # stopped within a step of the bound
    assert [f["seq"] for f in frames] == list(range(first["seq"] + 1, done["seq"] + 1))


async def test_resuming_while_the_old_socket_is_open_takes_the_session_over(make: Any) -> None:
    server = await make(FakeBackend(reply="ok"))
    async with dial(server) as old:
        await send(old, {"type": "open"})
        opened = await receive(old)
        async with dial(server) as new:
            await send(
                new,
                {
                    "type": "resume",
                    "session_id": opened["session_id"],
                    "resume_token": opened["resume_token"],
                    "last_seq": 1,
                },
            )
            assert (await receive(new))["type"] == "resumed"
            await send(old, {"type": "turn", "request_id": "t", "text": "hi"})
            assert (await receive(old))["code"] == "session_closed"
            await send(new, {"type": "turn", "request_id": "t", "text": "hi"})
            assert (await until(new, "done", []))["finish_reason"] == "stop"


async def test_a_normal_close_ends_the_session(make: Any) -> None:
    server = await make(FakeBackend(reply="ok"))
    async with dial(server) as ws:
        await send(ws, {"type": "open"})
        opened = await receive(ws)
    await wait_until(lambda: server.engine.sessions.count == 0, "the session closed")
    async with dial(server) as ws:
        await send(
            ws,
            {
                "type": "resume",
                "session_id": opened["session_id"],
                "resume_token": opened["resume_token"],
                "last_seq": 1,
            },
        )
        assert (await receive(ws))["code"] == "session_expired"


async def test_sessions_waiting_for_a_resume_give_way_to_their_principals_new_one(
    make: Any,
) -> None:
    """A tab that keeps losing its network must not lock its user out: at the session cap, the
    oldest session waiting for a resume closes for the new one; the others stay resumable."""
    server = await make(FakeBackend(reply="ok"), max_sessions_per_principal=2)
    opened = []
    for _ in range(2):
        async with dial(server) as ws:
            await send(ws, {"type": "open"})
            opened.append(await receive(ws))
            drop(ws)
    await wait_until(lambda: len(server.resumable.waiting()) == 2, "both sessions wait")
    async with dial(server) as ws:
        await send(ws, {"type": "open"})
        assert (await receive(ws))["type"] == "opened"
    first, second = (
        {
            "type": "resume",
            "session_id": o["session_id"],
            "resume_token": o["resume_token"],
            "last_seq": o["seq"],
        }
        for o in opened
    )
    async with dial(server) as ws:
        await send(ws, first)
        assert (await receive(ws))["code"] == "session_expired"
        await send(ws, second)
        assert (await receive(ws))["type"] == "resumed"


async def test_the_outbox_keeps_no_frames_from_before_the_previous_request(make: Any) -> None:
    """What a session keeps for a resume stays about two replies long however long the chat:
    starting a request means the client had the one before's ``done``."""
    server = await make(FakeBackend(reply="ok"))
    async with dial(server) as ws:
        await send(ws, {"type": "open"})
        opened = await receive(ws)
        ends = []
        for n in range(3):
            await send(ws, {"type": "turn", "request_id": f"t{n}", "text": "hi"})
            ends.append((await until(ws, "contribution", []))["seq"])
        drop(ws)
    resume = {
        "type": "resume",
        "session_id": opened["session_id"],
        "resume_token": opened["resume_token"],
    }
    async with dial(server) as ws:
        await send(ws, {**resume, "last_seq": ends[0] - 1})  # inside t0: dropped at t2's start
        assert (await receive(ws))["code"] == "resume_denied"
        await send(ws, {**resume, "last_seq": ends[0]})  # t1 and t2 are kept
        assert (await receive(ws))["type"] == "resumed"
        replayed = [await receive(ws) for _ in range(ends[2] - ends[0])]
    assert [f["seq"] for f in replayed] == list(range(ends[0] + 1, ends[2] + 1))
