"""Many more turns at once than the old worker pool (8 threads) on the real swarm: none waits
for a free worker, none deadlocks, every reply is the golden one; closing sessions in the
middle of their turns stops each turn after its current step."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from farmesh_ws.core.types import ChatMessage, SamplingParams, TokenEvent, TurnDone
from farmesh_ws.mesh.petals import PetalsBackend
from farmesh_ws.models import BUNDLED_MODEL_ID
from tests.helpers import swarm_backend_config

SESSIONS = 32
OLD_POOL = 8
MAX_NEW_TOKENS = 48


@pytest.fixture
async def mesh(swarm: Any, bundled_model_path: Path) -> AsyncIterator[PetalsBackend]:
    """A backend of its own, so its busy-worker peak counts only this test's turns."""
    backend = await PetalsBackend.start(swarm_backend_config(swarm, bundled_model_path))
    yield backend
    await backend.aclose()


def _first_turn(golden: dict[str, Any]) -> tuple[list[ChatMessage], list[int]]:
    turn = golden["conversations"][0][0]
    messages = [ChatMessage(role=m["role"], content=m["content"]) for m in turn["new_messages"]]
    return messages, turn["greedy_48_ids"]


async def _drain(turn: Any) -> tuple[list[int], TurnDone]:
    ids: list[int] = []
    async for event in turn:
        if isinstance(event, TokenEvent):
            ids.append(event.token_id)
        else:
            return ids, event
    raise AssertionError("no done event")


async def test_32_turns_run_at_once_and_each_reply_is_golden(
    mesh: PetalsBackend, golden: dict[str, Any]
) -> None:
    messages, golden_ids = _first_turn(golden)
    tokens = 6
    assert len(golden_ids) > tokens
    sessions = [await mesh.open_session(BUNDLED_MODEL_ID, max_length=128) for _ in range(SESSIONS)]
    try:
        turns = [
            s.run_tokens(s.encode_turn(messages), SamplingParams(max_new_tokens=tokens))
            for s in sessions
        ]
        results = await asyncio.gather(*(_drain(t) for t in turns))
    finally:
        await asyncio.gather(*(s.aclose() for s in sessions))

    for ids, done in results:
        assert done.finish_reason == "length", done.error
        assert ids == golden_ids[:tokens]
    assert mesh.peak_busy_workers > 2 * OLD_POOL


async def _close_at_first_token(
    session: Any, messages: list[ChatMessage]
) -> tuple[list[int], TurnDone]:
    """Run a turn; close the session as soon as the first token arrives."""
    turn = session.run_tokens(
        session.encode_turn(messages), SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    )
    closing: asyncio.Task[None] | None = None
    ids: list[int] = []
    async for event in turn:
        if isinstance(event, TokenEvent):
            ids.append(event.token_id)
            closing = closing or asyncio.create_task(session.aclose())
        else:
            assert closing is not None
            await closing
            return ids, event
    raise AssertionError("no done event")


async def test_closing_sessions_mid_turn_stops_every_turn_after_its_step(
    mesh: PetalsBackend,
) -> None:
    # A reply far longer than the few steps a close may take to land.
    messages = [ChatMessage(role="user", content="Count from 1 to 200, separated by commas.")]
    sessions = [await mesh.open_session(BUNDLED_MODEL_ID, max_length=128) for _ in range(SESSIONS)]
    results = await asyncio.gather(*(_close_at_first_token(s, messages) for s in sessions))

    # Without the stop at close, each close would wait for its turn's 48 tokens.
    for ids, done in results:
        assert done.finish_reason == "cancelled", done.error
        assert len(ids) < MAX_NEW_TOKENS
    assert mesh.peak_busy_workers > 2 * OLD_POOL
