"""The Petals backend against the real local swarm (two servers, blocks 0:15 and 15:30)."""

import asyncio
from typing import Any

import pytest

from farmesh_ws.core.types import ChatMessage, SamplingParams, TokenEvent, TurnDone
from farmesh_ws.errors import ContextOverflow
from farmesh_ws.models import BUNDLED_MODEL_ID

GREEDY_48 = SamplingParams(max_new_tokens=48)


def _messages(raw: list[dict[str, str]]) -> list[ChatMessage]:
    return [ChatMessage(role=m["role"], content=m["content"]) for m in raw]  # type: ignore[arg-type]


async def _run(
    session: Any, messages: list[ChatMessage], sampling: SamplingParams
) -> tuple[list[TokenEvent], TurnDone]:
    return await _run_ids(session, session.encode_turn(messages), sampling)


async def _run_ids(
    session: Any, token_ids: list[int], sampling: SamplingParams
) -> tuple[list[TokenEvent], TurnDone]:
    tokens: list[TokenEvent] = []
    async for event in session.run_tokens(token_ids, sampling):
        if isinstance(event, TokenEvent):
            tokens.append(event)
        else:
            return tokens, event
    raise AssertionError("the turn ended without a done event")


def _assert_routes_cover_all_blocks(done: TurnDone, num_blocks: int) -> None:
    assert done.routes
    for route in done.routes:
        covered = [block for hop in route for block in range(hop.start_block, hop.end_block)]
        assert covered == list(range(num_blocks))


async def test_golden_first_turns_through_the_mesh(backend: Any, golden: dict[str, Any]) -> None:
    for conversation in golden["conversations"]:
        first = conversation[0]
        session = await backend.open_session(BUNDLED_MODEL_ID, max_length=512)
        try:
            tokens, done = await _run(session, _messages(first["new_messages"]), GREEDY_48)
        finally:
            await session.aclose()
        assert [event.token_id for event in tokens] == first["greedy_48_ids"]
        assert done.prompt_tokens == len(first["prompt_ids"])
        assert done.cached_tokens == 0
        assert done.text + "<|im_end|>" == first["greedy_48_text"]
        assert "".join(event.text for event in tokens) == done.text


async def test_second_turn_sends_only_new_tokens_and_matches_golden(
    backend: Any, swarm: Any, golden: dict[str, Any]
) -> None:
    turn1, turn2 = golden["conversations"][0][:2]
    session = await backend.open_session(BUNDLED_MODEL_ID, max_length=512)
    try:
        _, done1 = await _run(session, _messages(turn1["new_messages"]), GREEDY_48)
        tokens2, done2 = await _run(session, _messages(turn2["new_messages"]), GREEDY_48)
    finally:
        await session.aclose()

    history = len(turn1["prompt_ids"]) + len(turn1["greedy_48_ids"])
    assert done2.prompt_tokens == len(turn2["prompt_ids"]) - history
    # The mesh already holds turn 1 except its last token (EOS), sent with turn 2.
    assert done2.cached_tokens == history - 1
    assert [event.token_id for event in tokens2] == turn2["greedy_48_ids"]
    assert done2.text + "<|im_end|>" == turn2["greedy_48_text"]

    # Each server processed only turn 2's tokens plus one token per generated step.
    step_tokens = 1 + done2.prompt_tokens + (done2.completion_tokens - 1)
    assert {c.tokens for c in done2.contributions} == {step_tokens}
    assert done1.position + step_tokens == done2.position

    num_blocks = backend.num_blocks(BUNDLED_MODEL_ID)
    _assert_routes_cover_all_blocks(done1, num_blocks)
    _assert_routes_cover_all_blocks(done2, num_blocks)
    server_peers = {node.peer_id for node in swarm.servers if node.alive}
    assert {c.peer_id for c in done2.contributions} == server_peers
    for contribution in done2.contributions:
        assert contribution.work == contribution.tokens * contribution.blocks
        assert contribution.replayed_tokens == 0


async def test_cancel_stops_within_one_step_and_session_stays_usable(
    backend: Any, golden: dict[str, Any]
) -> None:
    session = await backend.open_session(BUNDLED_MODEL_ID, max_length=1024)
    try:
        story = [ChatMessage(role="user", content="Write a long story about a lighthouse keeper.")]
        turn = session.run_tokens(session.encode_turn(story), SamplingParams(max_new_tokens=200))
        seen = 0
        done: TurnDone | None = None
        async for event in turn:
            if isinstance(event, TokenEvent):
                seen = event.tokens_generated
                if seen == 3:
                    turn.cancel()
            else:
                done = event
        assert done is not None
        assert done.finish_reason == "cancelled"
        assert done.completion_tokens <= 4
        assert seen == done.completion_tokens

        question = golden["conversations"][0][0]["new_messages"]
        _, after = await _run(session, _messages(question), SamplingParams(max_new_tokens=8))
        assert after.finish_reason in {"stop", "length"}
        assert after.completion_tokens >= 1
    finally:
        await session.aclose()


async def test_a_turn_larger_than_max_length_is_a_typed_error(backend: Any) -> None:
    session = await backend.open_session(BUNDLED_MODEL_ID, max_length=48)
    try:
        long_text = "word " * 200
        _, done = await asyncio.wait_for(
            _run(session, [ChatMessage(role="user", content=long_text)], GREEDY_48), 30
        )
        assert done.finish_reason == "error"
        assert isinstance(done.error, ContextOverflow)
        assert done.error.code == "context_overflow"
        assert not done.error.retryable
        assert session.position == 0

        story = [ChatMessage(role="user", content="Tell me a long story about dragons.")]
        _, short = await _run(session, story, GREEDY_48)
        assert short.finish_reason == "length"
        assert short.position == 48
    finally:
        await session.aclose()


async def test_coverage_lists_both_servers(backend: Any, swarm: Any) -> None:
    coverage = await backend.coverage(BUNDLED_MODEL_ID)
    assert coverage.fully_served
    assert {node.peer_id for node in swarm.servers if node.alive} <= coverage.online_peer_ids()
    models = {model.dht_prefix: model for model in await backend.discover()}
    assert models[swarm.config.dht_prefix].num_blocks == 30


@pytest.mark.parametrize("max_length", [0, -5])
async def test_non_positive_max_length_is_refused(backend: Any, max_length: int) -> None:
    from farmesh_ws.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        await backend.open_session(BUNDLED_MODEL_ID, max_length=max_length)


async def test_raw_tokens_continue_the_transcript_without_a_template(
    backend: Any, golden: dict[str, Any]
) -> None:
    turn1, turn2 = golden["conversations"][0][:2]
    session = await backend.open_session(BUNDLED_MODEL_ID, max_length=512)
    try:
        ids1 = [
            e.token_id
            async for e in session.run_tokens(turn1["prompt_ids"], GREEDY_48)
            if isinstance(e, TokenEvent)
        ]
        history = len(turn1["prompt_ids"]) + len(turn1["greedy_48_ids"])
        # The pending EOS is fed first, then only the new part of turn 2's prompt.
        new_part = turn2["prompt_ids"][history:]
        ids2 = [
            e.token_id
            async for e in session.run_tokens(new_part, GREEDY_48)
            if isinstance(e, TokenEvent)
        ]
    finally:
        await session.aclose()
    assert ids1 == turn1["greedy_48_ids"]
    assert ids2 == turn2["greedy_48_ids"]
    assert session.encode("Hello, world!") == golden["tokenize"][0]["ids"]


async def test_a_reply_cut_inside_a_character_ends_without_a_replacement_character(
    backend: Any,
) -> None:
    # Raw rockets make the model continue with rockets, 3 tokens each: 40 tokens end one
    # token into the 14th rocket.
    session = await backend.open_session(BUNDLED_MODEL_ID, max_length=128)
    try:
        prompt = session.encode("🚀" * 12)
        tokens, done = await _run_ids(session, prompt, SamplingParams(max_new_tokens=40))
        raw = session.decode([event.token_id for event in tokens])
    finally:
        await session.aclose()
    assert raw == "🚀" * 13 + "\ufffd"
    assert done.finish_reason == "length"
    assert done.completion_tokens == 40
    assert done.text == "🚀" * 13
    assert "".join(event.text for event in tokens) == done.text


async def _cancelled_before_its_first_step(
    session: Any, token_ids: list[int], *, replace_last_token: int | None = None
) -> TurnDone:
    # Holding the session's lock keeps the worker from taking a step until cancel() is in.
    with session._lock:
        turn = session.run_tokens(token_ids, GREEDY_48, replace_last_token=replace_last_token)
        turn.cancel()
    events = [event async for event in turn]
    assert len(events) == 1
    done = events[0]
    assert isinstance(done, TurnDone)
    return done


async def test_a_turn_cancelled_before_its_first_step_sends_nothing(
    backend: Any, golden: dict[str, Any]
) -> None:
    turn1, turn2 = golden["conversations"][0][:2]
    session = await backend.open_session(BUNDLED_MODEL_ID, max_length=512)
    try:
        first_ids = session.encode_turn(_messages(turn1["new_messages"]))
        done = await _cancelled_before_its_first_step(session, first_ids)
        assert done.finish_reason == "cancelled"
        assert (done.prompt_tokens, done.completion_tokens, done.cached_tokens) == (0, 0, 0)
        assert done.contributions == ()
        assert done.routes == ()
        assert (session.position, session.pending_tokens) == (0, 0)
        assert session.encode_turn(_messages(turn1["new_messages"])) == first_ids

        _, done1 = await _run(session, _messages(turn1["new_messages"]), GREEDY_48)
        second_ids = session.encode_turn(_messages(turn2["new_messages"]))
        not_eos = second_ids[-1]
        done = await _cancelled_before_its_first_step(
            session, second_ids, replace_last_token=not_eos
        )
        assert done.finish_reason == "cancelled"
        assert (done.prompt_tokens, done.completion_tokens) == (0, 0)
        assert done.cached_tokens == done.position == done1.position
        assert done.contributions == ()
        assert (session.position, session.pending_tokens) == (done1.position, 1)

        # The pending end-of-turn token was not replaced: turn 2 still matches the golden.
        tokens2, done2 = await _run(session, _messages(turn2["new_messages"]), GREEDY_48)
    finally:
        await session.aclose()
    assert [event.token_id for event in tokens2] == turn2["greedy_48_ids"]
    assert done2.prompt_tokens == len(second_ids)
