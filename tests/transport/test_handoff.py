"""Sessions that move between gateways sharing a state store (protocol.md §2.3): two real
gateways on real sockets over the scripted mesh, one state store (the real Redis one has its
own tests; tests/test_migration_swarm.py moves sessions between processes on the real swarm)."""

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from farmesh_ws.client import FarmeshClient
from farmesh_ws.core.tasks import cancel_and_wait
from farmesh_ws.mesh.fake import FakeBackend
from farmesh_ws.state.memory import MemoryStateStore
from farmesh_ws.transport.ws import GatewayServer
from tests.engine.support import release
from tests.transport.proxy import CuttableProxy
from tests.transport.support import fake_gateway
from tests.transport.test_resume import KEYS, dial, receive, send, until, wait_until

REPLY = "Moved sessions carry on."
LEASE_S = 1.0


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Any]]:
    """Gateways over one shared state store; shut down at the end (twice is harmless)."""
    store = MemoryStateStore()
    servers: list[GatewayServer] = []

    async def start(backend: FakeBackend | None = None, **overrides: Any) -> GatewayServer:
        overrides.setdefault("coordinator_lease_s", LEASE_S)
        server = await fake_gateway(
            backend or FakeBackend(reply=REPLY),
            keys=KEYS,
            auth="required",
            store=store,
            **overrides,
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.shutdown()


async def opened_with_a_turn(ws: Any, budget: str = "1") -> tuple[dict[str, Any], dict[str, Any]]:
    await send(ws, {"type": "open", "system_prompt": "Be brief.", "max_cost_far": budget})
    opened = await receive(ws)
    await send(ws, {"type": "turn", "request_id": "t1", "text": "Hello there"})
    done = await until(ws, "done", [])
    await until(ws, "contribution", [])
    return opened, done


async def opened_only(ws: Any) -> dict[str, Any]:
    await send(ws, {"type": "open"})
    opened = await receive(ws)
    assert opened["type"] == "opened"
    return opened


async def lapse_lease(gateway: GatewayServer) -> None:
    """As if the gateway hung: its lease is neither renewed nor in the store any more."""
    registry = gateway.registry
    await cancel_and_wait(registry._lease)
    await registry.store.take_value("process-lease:" + registry.process_id)


def resume_frame(opened: dict[str, Any], last_seq: int, token: str | None = None) -> dict[str, Any]:
    return {
        "type": "resume",
        "session_id": opened["session_id"],
        "resume_token": token or opened["resume_token"],
        "last_seq": last_seq,
    }


async def test_a_drained_gateways_session_moves_and_goes_on_without_resending_history(
    make: Any,
) -> None:
    first = await make()
    second_backend = FakeBackend(reply=REPLY)
    second = await make(second_backend)
    async with dial(first) as ws:
        opened, done = await opened_with_a_turn(ws)
        await first.shutdown()
        going = [await receive(ws)]
        with pytest.raises(ConnectionClosed):
            await receive(ws)
    assert going[0]["type"] == "going_away"
    last_seq = done["seq"] + 1  # the contribution frame
    async with dial(second) as ws:
        await send(ws, resume_frame(opened, last_seq))
        resumed = await receive(ws)
        assert resumed["type"] == "resumed"
        assert resumed["moved"] is True
        assert resumed["last_seq"] == last_seq
        await send(ws, {"type": "turn", "request_id": "t2", "text": "Again"})
        seen: list[dict[str, Any]] = []
        moved_done = await until(ws, "done", seen)
    # The transcript went into the new mesh session (not re-sent by the client): the turn is
    # counted and billed exactly as the same turn on a session that never moved.
    assert second_backend.sessions[-1].restored == done["position"]
    async with dial(second) as ws:
        await opened_with_a_turn(ws)
        await send(ws, {"type": "turn", "request_id": "t2", "text": "Again"})
        unmoved_done = await until(ws, "done", [])
    assert moved_done["usage"] == unmoved_done["usage"]
    assert moved_done["usage"]["cached_tokens"] == done["position"] > 0
    assert moved_done["position"] == unmoved_done["position"]
    assert [f["seq"] for f in seen] == list(range(last_seq + 1, last_seq + 1 + len(seen)))
    assert "".join(f["token"] for f in seen if f["type"] == "token") == REPLY


async def test_a_wrong_token_is_denied_and_leaves_the_session_movable(make: Any) -> None:
    first = await make()
    second = await make()
    async with dial(first) as ws:
        opened, done = await opened_with_a_turn(ws)
        await first.shutdown()
    async with dial(second) as ws:
        await send(ws, resume_frame(opened, done["seq"] + 1, token="x" * 43))
        assert (await receive(ws))["code"] == "resume_denied"
        async with dial(second, "fmk_bob") as other:
            await send(other, resume_frame(opened, done["seq"] + 1))
            assert (await receive(other))["code"] == "resume_denied"
        await send(ws, resume_frame(opened, done["seq"] + 1))
        assert (await receive(ws))["type"] == "resumed"


async def test_a_session_waiting_on_a_live_gateway_is_let_go_when_another_asks(
    make: Any,
) -> None:
    first = await make()
    second = await make()
    proxy = CuttableProxy(first.port)
    await proxy.start()
    try:
        async with connect(
            f"ws://127.0.0.1:{proxy.port}/ws",
            additional_headers={"Authorization": "Bearer fmk_alice"},
        ) as ws:
            opened, done = await opened_with_a_turn(ws)
            proxy.cut()
            with pytest.raises(ConnectionClosed):
                await receive(ws)
        last_seq = done["seq"] + 1
        async with dial(second) as ws:
            await send(ws, resume_frame(opened, last_seq))
            refused = await receive(ws)
            assert refused["code"] == "session_elsewhere"
            assert refused["retryable"] is True
            assert 0 < refused["retry_after_s"] <= LEASE_S
            for _ in range(20):  # as a client does: retry after the time the server gave
                await asyncio.sleep(refused["retry_after_s"])
                await send(ws, resume_frame(opened, last_seq))
                refused = await receive(ws)
                if refused["type"] != "error":
                    break
            assert refused["type"] == "resumed"
            assert refused["moved"] is True
            await send(ws, {"type": "turn", "request_id": "t2", "text": "Again"})
            assert (await until(ws, "done", []))["finish_reason"] == "stop"
        assert first.active_sessions == 0
    finally:
        await proxy.aclose()


async def test_a_session_with_a_connection_does_not_move(make: Any) -> None:
    first = await make()
    second = await make()
    async with dial(first) as ws:
        opened, done = await opened_with_a_turn(ws)
        async with dial(second) as other:
            await send(other, resume_frame(opened, done["seq"] + 1))
            assert (await receive(other))["code"] == "session_elsewhere"
        await send(ws, {"type": "turn", "request_id": "t2", "text": "Still here"})
        assert (await until(ws, "done", []))["finish_reason"] == "stop"


async def test_the_python_client_follows_a_drain_to_the_next_gateway(make: Any) -> None:
    """A redeploy behind one URL: the gateway drains, the balancer sends new connections to
    the other one, and the client's chat carries on there by itself (§2.3)."""
    first = await make()
    second = await make()
    balancer = CuttableProxy(first.port)
    await balancer.start()
    try:
        url = f"ws://127.0.0.1:{balancer.port}/ws"
        async with FarmeshClient.connect(url, token="fmk_alice", timeout=10) as client:
            chat = await client.open_chat(system_prompt="Be brief.")
            before = await chat.ask("Hello there")
            balancer.target_port = second.port
            await first.shutdown()
            after = await chat.ask("Again")
        assert balancer.accepted == 2
        assert after.text == REPLY
        assert after.done.usage.cached_tokens == before.done.position
        assert second.active_sessions == 0  # the client closed it there
    finally:
        await balancer.aclose()


async def test_frames_numbered_after_the_last_snapshot_move_with_a_released_session(
    make: Any,
) -> None:
    """An error frame after a turn is numbered but writes no snapshot: the released session
    still knows it, so the frames go on from there, none twice and none missed."""
    first = await make()
    second = await make()
    async with dial(first) as ws:
        opened, _ = await opened_with_a_turn(ws)
        await send(ws, {"type": "cancel", "request_id": "nothing-runs"})
        refused = await receive(ws)
        assert refused["code"] == "unknown_request"
        await first.shutdown()
    async with dial(second) as ws:
        await send(ws, resume_frame(opened, refused["seq"] - 1))  # it missed the error frame
        resumed = await receive(ws)
        assert resumed["last_seq"] == refused["seq"]
        assert await receive(ws) == refused  # sent again, with its seq
        await send(ws, {"type": "turn", "request_id": "t2", "text": "Again"})
        seen: list[dict[str, Any]] = []
        await until(ws, "done", seen)
    assert [f["seq"] for f in seen] == list(
        range(refused["seq"] + 1, refused["seq"] + 1 + len(seen))
    )


async def test_a_gateway_whose_lease_lapsed_loses_the_session_and_its_request_ends(
    make: Any,
) -> None:
    """A gateway that stopped renewing its lease (hung, cut off) counts as dead: another one
    takes the session, the request that was running there ends with ``coordinator_lost`` and
    a ``done``, and the first gateway, when it renews again, ends its copy."""
    gate = asyncio.Semaphore(0)
    first = await make(FakeBackend(reply=REPLY, gate=gate), resume_grace_s=3.0)
    second = await make(resume_grace_s=3.0)
    async with dial(first) as ws:
        opened = await opened_only(ws)
        await send(ws, {"type": "generate", "request_id": "g1", "prompt": "Hi", "max_tokens": 40})
        release(gate, 2)
        token = await receive(ws)
        assert token["type"] == "token"
        await lapse_lease(first)
        async with dial(second) as other:
            await send(other, resume_frame(opened, token["seq"]))
            assert (await receive(other))["moved"] is True
            lost = await receive(other)
            assert (lost["code"], lost["request_id"], lost["retryable"]) == (
                "coordinator_lost",
                "g1",
                True,
            )
            done = await receive(other)
            assert (done["type"], done["request_id"], done["finish_reason"]) == (
                "done",
                "g1",
                "error",
            )
            release(gate, 100)
            await wait_until(lambda: first.active_sessions == 0, "the first gateway lets go")
            await send(other, {"type": "turn", "request_id": "t2", "text": "Again"})
            assert (await until(other, "done", []))["finish_reason"] == "stop"


async def test_a_close_during_a_drain_ends_the_session_instead_of_releasing_it(
    make: Any,
) -> None:
    gate = asyncio.Semaphore(0)
    first = await make(FakeBackend(reply=REPLY, gate=gate))
    second = await make()
    async with dial(first) as ws:
        opened = await opened_only(ws)
        await send(ws, {"type": "turn", "request_id": "t1", "text": "Hello"})
        release(gate, 1)
        assert (await receive(ws))["type"] == "token"
        draining = asyncio.create_task(first.shutdown())
        assert (await receive(ws))["type"] == "going_away"
        await send(ws, {"type": "close"})
        seen: list[dict[str, Any]] = []
        closed = await until(ws, "closed", seen)
        assert closed["session_id"] == opened["session_id"]
        await draining
    async with dial(second) as ws:
        await send(ws, resume_frame(opened, closed["seq"]))
        assert (await receive(ws))["code"] == "session_expired"
