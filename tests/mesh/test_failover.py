"""A session survives a crashed server (replica present), and recovers after an outage.

These tests SIGKILL servers of the shared swarm, so they run last (marker ``disruptive``).
"""

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from farmesh_ws.core.types import ChatMessage, SamplingParams, TokenEvent, TurnDone
from farmesh_ws.mesh.petals import PetalsBackend
from farmesh_ws.models import BUNDLED_MODEL_ID
from tests.helpers import swarm_backend_config

pytestmark = pytest.mark.disruptive
GREEDY_48 = SamplingParams(max_new_tokens=48)


@pytest.fixture(autouse=True)
async def _forget_crashed_servers(swarm: Any, backend: Any) -> AsyncIterator[None]:
    """After each test, wait until the servers it killed are no longer announced and refresh
    the shared client's routes: the next test starts from a swarm of live servers only (a
    crashed server's record outlives it by up to ``expiration_s``)."""
    yield
    await asyncio.to_thread(swarm.wait_until_forgotten)
    await backend.refresh_routes(BUNDLED_MODEL_ID)


def _messages(raw: list[dict[str, str]]) -> list[ChatMessage]:
    return [ChatMessage(role=m["role"], content=m["content"]) for m in raw]  # type: ignore[arg-type]


async def _run(session: Any, messages: list[ChatMessage]) -> tuple[list[int], TurnDone]:
    ids: list[int] = []
    async for event in session.run_tokens(session.encode_turn(messages), GREEDY_48):
        if isinstance(event, TokenEvent):
            ids.append(event.token_id)
        else:
            return ids, event
    raise AssertionError("no done event")


def _node_serving(swarm: Any, peer_id: str) -> Any:
    return next(node for node in swarm.servers if node.peer_id == peer_id)


async def test_turn_after_a_crash_reroutes_to_the_replica_and_credits_its_replay(
    backend: Any, swarm: Any, golden: dict[str, Any]
) -> None:
    swarm.add_server("15:30")
    # The replica must be in the client's routing table before the crash, not only in the DHT.
    await backend.refresh_routes(BUNDLED_MODEL_ID)
    turn1, turn2 = golden["conversations"][0][:2]
    session = await backend.open_session(BUNDLED_MODEL_ID, max_length=512)
    try:
        _, done1 = await _run(session, _messages(turn1["new_messages"]))
        tail_peer = done1.routes[-1][-1].peer_id
        victim = _node_serving(swarm, tail_peer)
        survivor = next(n for n in swarm.servers if n.span == "15:30" and n is not victim)
        swarm.kill_server(victim.name)

        ids2, done2 = await _run(session, _messages(turn2["new_messages"]))
    finally:
        await session.aclose()

    assert done2.finish_reason == "stop", done2.error
    assert ids2 == turn2["greedy_48_ids"]
    assert session.remote_sessions_opened == 1  # Petals rerouted inside the same session
    credited = {c.peer_id: c for c in done2.contributions}
    assert victim.peer_id not in credited
    assert credited[survivor.peer_id].replayed_tokens == done1.position
    head = next(c for c in done2.contributions if c.start_block == 0)
    assert head.replayed_tokens == 0
    for route in done2.routes:
        assert [b for hop in route for b in range(hop.start_block, hop.end_block)] == list(
            range(30)
        )


async def test_a_server_killed_mid_turn_hands_the_turn_to_the_replica_unchanged(
    backend: Any, swarm: Any, golden: dict[str, Any]
) -> None:
    swarm.add_server("15:30")
    await backend.refresh_routes(BUNDLED_MODEL_ID)
    turn1, turn2 = golden["conversations"][1][:2]  # the longer reply: 13 tokens
    session = await backend.open_session(BUNDLED_MODEL_ID, max_length=512)
    ids2: list[int] = []
    after_kill = 0
    try:
        _, done1 = await _run(session, _messages(turn1["new_messages"]))
        victim = _node_serving(swarm, done1.routes[-1][-1].peer_id)
        stream = session.run_tokens(
            session.encode_turn(_messages(turn2["new_messages"])), GREEDY_48
        )
        async for event in stream:
            if not isinstance(event, TokenEvent):
                done2 = event
                break
            ids2.append(event.token_id)
            if len(ids2) == 2:
                swarm.kill_server(victim.name)  # the turn's next steps find it dead
            elif len(ids2) > 2:
                after_kill += 1
    finally:
        await session.aclose()

    assert done2.finish_reason == "stop", done2.error
    assert after_kill >= 3
    assert ids2 == turn2["greedy_48_ids"]
    # the turn began on the victim and ended without it: the kill landed mid-turn
    assert victim.peer_id in {hop.peer_id for hop in done2.routes[0]}
    assert victim.peer_id not in {hop.peer_id for hop in done2.routes[-1]}


async def test_a_replica_unknown_to_the_routes_takes_over_a_crash(
    swarm: Any, bundled_model_path: Path, golden: dict[str, Any]
) -> None:
    """The replica joins after the client's last routing update (a client of its own whose
    periodic update never comes during the test): when the crash leaves no known server for the
    blocks, the client looks the routes up again (Petals' on_request_failure triggers it and
    make_sequence waits for it) instead of failing with the blocks missing."""
    config = swarm_backend_config(swarm, bundled_model_path, update_period_s=3600.0)
    stale = await PetalsBackend.start(config)
    turn1, turn2 = golden["conversations"][0][:2]
    try:
        session = await stale.open_session(BUNDLED_MODEL_ID, max_length=512)
        _, done1 = await _run(session, _messages(turn1["new_messages"]))
        victim = _node_serving(swarm, done1.routes[-1][-1].peer_id)
        replica = swarm.add_server(victim.span)
        swarm.kill_server(victim.name)
        ids2, done2 = await _run(session, _messages(turn2["new_messages"]))
        await session.aclose()
    finally:
        await stale.aclose()

    assert done2.finish_reason == "stop", done2.error
    assert ids2 == turn2["greedy_48_ids"]
    assert replica.peer_id in {hop.peer_id for hop in done2.routes[-1]}


async def test_missing_span_is_a_fast_retryable_error_then_the_session_recovers(
    backend: Any, swarm: Any, golden: dict[str, Any]
) -> None:
    turn1, turn2 = golden["conversations"][0][:2]
    session = await backend.open_session(BUNDLED_MODEL_ID, max_length=512)
    try:
        _, done1 = await _run(session, _messages(turn1["new_messages"]))
        assert done1.finish_reason == "stop", done1.error
        for node in swarm.servers:
            if node.alive and node.span == "15:30":
                swarm.kill_server(node.name)

        started = time.monotonic()
        _, failed = await _run(session, _messages(turn2["new_messages"]))
        elapsed = time.monotonic() - started
        assert failed.finish_reason == "error"
        assert failed.error is not None
        assert failed.error.code == "mesh_unavailable"
        assert failed.error.retryable
        assert elapsed < 10

        fresh = swarm.add_server("15:30")
        ids2, done2 = await _run(session, _messages(turn2["new_messages"]))
    finally:
        await session.aclose()

    assert done2.finish_reason == "stop", done2.error
    assert ids2 == turn2["greedy_48_ids"]
    credited = {c.peer_id: c for c in done2.contributions}
    assert fresh.peer_id in credited
    assert credited[fresh.peer_id].replayed_tokens == done1.position
