"""Stateless requests that continue a kept mesh session (engine/reuse.py), on the scripted mesh."""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest

from farmesh_ws.config import Settings
from farmesh_ws.core.principal import Principal, PrincipalKind
from farmesh_ws.core.settlement import Settlement
from farmesh_ws.core.types import ChatMessage, SamplingOverrides, TokenEvent
from farmesh_ws.engine.conversation import Client
from farmesh_ws.engine.engine import Engine
from farmesh_ws.engine.quotas import MeshCapacity
from farmesh_ws.engine.request import ActiveRequest
from farmesh_ws.engine.reuse import KeptSession
from farmesh_ws.engine.runner import RequestSpec
from farmesh_ws.errors import BudgetExceeded, QuotaExceeded
from farmesh_ws.mesh.fake import FAKE_MODEL_ID, FakeBackend, FakeSession
from farmesh_ws.state import MemoryStateStore
from farmesh_ws.state.registry import SessionRegistry
from tests.engine.support import Recorder

ALICE = Principal(PrincipalKind.KEY, "fk_alice", "0x" + "a" * 40, "addr-a")
BOB = Principal(PrincipalKind.KEY, "fk_bob", "0x" + "b" * 40, "addr-b")


@dataclass
class Answer:
    text: str
    settlement: Settlement
    mesh: FakeSession


class _Sink:
    def __init__(self) -> None:
        self.text = ""
        self.settlement: Settlement | None = None

    async def token(self, active: ActiveRequest, event: TokenEvent) -> None:
        self.text += event.text

    async def finished(self, active: ActiveRequest, settlement: Settlement) -> None:
        self.settlement = settlement


def make_engine(
    backend: FakeBackend | None = None,
    capacity: Callable[[str], MeshCapacity] | None = None,
    **overrides: Any,
) -> Engine:
    settings = Settings(default_model_id=FAKE_MODEL_ID, price_per_token_far=Decimal("0.0001"))
    return Engine(
        settings=settings.with_overrides(**overrides),
        backend=backend or FakeBackend(reply="ok"),
        registry=SessionRegistry(MemoryStateStore()),
        observer=Recorder(),
        capacity=capacity,
    )


def spec(messages: list[ChatMessage], request_id: str, **fields: Any) -> RequestSpec:
    return RequestSpec(
        request_id=request_id,
        kind="chat_completion",
        text="",
        sampling=SamplingOverrides(max_new_tokens=8),
        messages=tuple(messages),
        reuse=True,
        **fields,
    )


async def ask(
    engine: Engine, messages: list[ChatMessage], principal: Principal = ALICE, **fields: Any
) -> Answer:
    request_id = f"r{len(engine.backend.sessions)}"  # type: ignore[attr-defined]
    active = await engine.runner.admit(
        Client(request_id, principal), spec(messages, request_id, **fields)
    )
    sink = _Sink()
    engine.runner.launch(active, sink)
    assert active.task is not None
    await active.task
    assert sink.settlement is not None
    mesh = active.mesh
    assert isinstance(mesh, FakeSession)
    return Answer(sink.text, sink.settlement, mesh)


def user(text: str) -> ChatMessage:
    return ChatMessage("user", text)


def assistant(text: str) -> ChatMessage:
    return ChatMessage("assistant", text)


def prompt_length(messages: list[ChatMessage]) -> int:
    """The templated prompt's token ids, as a fresh fake session counts them."""
    return len(FakeSession(FakeBackend(), FAKE_MODEL_ID, 2048).encode_turn(messages))


async def test_each_turn_sends_only_its_new_tokens_and_reports_the_rest_cached() -> None:
    engine = make_engine()
    history: list[ChatMessage] = []
    meshes = set()
    for turn in range(5):
        history.append(user(f"question {turn}"))
        sent_before = sum(s.tokens_sent for s in engine.backend.sessions)  # type: ignore[attr-defined]
        answer = await ask(engine, history)
        sent = sum(s.tokens_sent for s in engine.backend.sessions) - sent_before  # type: ignore[attr-defined]
        full = prompt_length(history)
        s = answer.settlement
        assert s.prompt_tokens + s.cached_tokens == full  # OpenAI's prompt_tokens is the whole
        if turn == 0:
            assert s.cached_tokens == 0
        else:
            assert s.cached_tokens > 0
            # the mesh received the prompt after what it holds and each generated token but
            # the last (pending, never sent): nothing of the history again
            assert sent == s.prompt_tokens + s.completion_tokens - 1
        assert s.cost_far == Decimal("0.0001") * s.completion_tokens
        meshes.add(answer.mesh)
        history.append(assistant(answer.text))
    assert len(meshes) == 1  # one mesh session carried the whole conversation
    assert len(engine.reuse) == 1
    # every other session was opened to tokenize a prompt and closed without a step
    probes = [s for s in engine.backend.sessions if s not in meshes]  # type: ignore[attr-defined]
    assert len(probes) == 4
    assert all(p.closed and p.tokens_sent == 0 for p in probes)


async def test_an_edited_history_opens_a_fresh_session_and_keeps_the_other_branch() -> None:
    engine = make_engine()
    first = await ask(engine, [user("hello")])
    edited = await ask(engine, [user("hello!"), assistant(first.text), user("next")])
    assert edited.mesh is not first.mesh
    assert edited.settlement.cached_tokens == 0
    assert len(engine.reuse) == 2
    branch = await ask(engine, [user("hello"), assistant(first.text), user("other")])
    assert branch.mesh is first.mesh
    assert branch.settlement.cached_tokens > 0


async def test_a_reply_edited_by_the_client_continues_only_from_what_still_matches() -> None:
    engine = make_engine()
    first = await ask(engine, [user("hello")])
    assert first.text == "ok"
    rewritten = await ask(engine, [user("hello"), assistant("OK"), user("x")])
    assert rewritten.mesh is not first.mesh
    assert rewritten.settlement.cached_tokens == 0
    # text added after the reply still extends what the mesh holds: its caches stay valid
    extended = await ask(engine, [user("hello"), assistant("ok, and more"), user("x")])
    assert extended.mesh is first.mesh
    assert extended.settlement.cached_tokens == prompt_length([user("hello")]) + len("ok")


async def test_sessions_are_never_shared_across_principals_or_wallets() -> None:
    engine = make_engine()
    first = await ask(engine, [user("hello")])
    history = [user("hello"), assistant(first.text), user("more")]
    assert (await ask(engine, history, principal=BOB)).mesh is not first.mesh
    open_principal = Principal(PrincipalKind.OPEN, "", None, "addr-o")
    claimed = await ask(engine, [user("hi")], principal=open_principal, wallet="0x" + "1" * 40)
    other = await ask(
        engine,
        [user("hi"), assistant(claimed.text), user("more")],
        principal=open_principal,
        wallet="0x" + "2" * 40,
    )
    assert other.mesh is not claimed.mesh
    assert other.settlement.cached_tokens == 0
    assert (await ask(engine, history)).mesh is first.mesh


async def test_a_refused_request_leaves_the_kept_session_untouched() -> None:
    engine = make_engine()
    first = await ask(engine, [user("hello")])
    transcript = list(first.mesh.transcript)
    history = [user("hello"), assistant(first.text), user("more")]
    with pytest.raises(BudgetExceeded):
        await ask(engine, history, max_cost_far=Decimal("0.00001"))
    assert first.mesh.transcript == transcript
    assert not first.mesh.closed
    assert (await ask(engine, history)).mesh is first.mesh


async def test_a_session_in_use_is_not_given_to_a_second_request() -> None:
    gate = asyncio.Semaphore(0)
    engine = make_engine(FakeBackend(reply="ok", gate=gate))
    for _ in range(3):
        gate.release()
    first = await ask(engine, [user("hello")])
    history = [user("hello"), assistant(first.text), user("more")]
    running = await engine.runner.admit(Client("a", ALICE), spec(history, "a"))
    second = await engine.runner.admit(Client("b", ALICE), spec(history, "b"))
    assert running.mesh is first.mesh
    assert second.mesh is not first.mesh
    for active in (running, second):
        engine.runner.launch(active, _Sink())
    for _ in range(6):
        gate.release()
    await asyncio.gather(*(a.task for a in (running, second) if a.task is not None))


async def test_a_failed_request_closes_its_session() -> None:
    backend = FakeBackend(reply="ok")
    engine = make_engine(backend)
    first = await ask(engine, [user("hello")])
    backend.fail_after = 0
    failed = await ask(engine, [user("hello"), assistant(first.text), user("more")])
    assert failed.mesh is first.mesh
    assert failed.settlement.finish_reason == "error"
    assert first.mesh.closed
    assert len(engine.reuse) == 0


async def test_a_session_without_room_for_the_next_request_is_not_used() -> None:
    engine = make_engine(reuse_max_length=80)
    first = await ask(engine, [user("hello")])
    needed = prompt_length([user("hello")]) + 8
    assert first.mesh.max_length == 2 * needed  # room to grow: twice what it needed
    long = [user("hello"), assistant(first.text), user("x" * 2 * needed)]
    second = await ask(engine, long)
    assert second.mesh is not first.mesh
    assert second.settlement.cached_tokens == 0


async def test_at_most_the_configured_sessions_per_principal_are_kept() -> None:
    engine = make_engine(reuse_sessions_per_principal=2)
    answers = [await ask(engine, [user(f"conversation {n}")]) for n in range(3)]
    assert answers[0].mesh.closed
    assert not answers[2].mesh.closed
    assert len(engine.reuse) == 2
    assert engine.quotas.totals.reserved[FAKE_MODEL_ID] == 2 * 1024


async def test_kept_sessions_give_way_to_their_principals_next_reservation() -> None:
    engine = make_engine(max_reserved_tokens_per_principal=2048)
    first = await ask(engine, [user("one")])
    second = await ask(engine, [user("two")])
    assert len(engine.reuse) == 2
    conversation = await engine.sessions.open(kind="chat", principal=ALICE, max_length=1024)
    assert first.mesh.closed  # the least recently used went
    assert not second.mesh.closed
    await engine.sessions.close(conversation)


async def test_a_refused_reservation_closes_no_kept_session() -> None:
    engine = make_engine(max_reserved_tokens_per_principal=1500)
    first = await ask(engine, [user("one")])
    with pytest.raises(QuotaExceeded):  # more than the cap even with the kept session gone
        await engine.sessions.open(kind="chat", principal=ALICE, max_length=1600)
    assert not first.mesh.closed
    assert len(engine.reuse) == 1


async def test_with_reuse_off_every_request_closes_its_session() -> None:
    engine = make_engine(reuse_sessions_per_principal=0)
    first = await ask(engine, [user("hello")])
    second = await ask(engine, [user("hello"), assistant(first.text), user("more")])
    assert first.mesh.closed
    assert second.mesh.closed
    assert second.settlement.cached_tokens == 0
    assert first.mesh.max_length == first.settlement.prompt_tokens + 8
    assert engine.quotas.totals.reserved[FAKE_MODEL_ID] == 0


async def test_kept_sessions_hold_at_most_their_share_of_the_mesh() -> None:
    # this gateway could hold 16,384 tokens: 10 % of it is room for one kept 1,024-token session
    capacity = MeshCapacity(cache_tokens_left=16384, checked_at=0.0)
    engine = make_engine(reuse_max_cache_share=0.1, capacity=lambda model_id: capacity)
    answers = [await ask(engine, [user(f"conversation {n}")]) for n in range(3)]
    kept = [a for a in answers if not a.mesh.closed]
    assert len(kept) == 1
    assert kept[0] is answers[-1]


async def test_a_kept_session_expires_after_its_ttl() -> None:
    engine = make_engine(reuse_ttl_s=0.01)
    first = await ask(engine, [user("hello")])
    closed = asyncio.Event()
    close = first.mesh.aclose

    async def aclose() -> None:
        await close()
        closed.set()

    first.mesh.aclose = aclose  # type: ignore[method-assign]
    await asyncio.wait_for(closed.wait(), 5)
    assert len(engine.reuse) == 0
    assert engine.quotas.totals.reserved[FAKE_MODEL_ID] == 0


async def test_shutdown_closes_every_kept_session() -> None:
    engine = make_engine()
    answers = [await ask(engine, [user(f"conversation {n}")]) for n in range(2)]
    await engine.aclose()
    assert all(a.mesh.closed for a in answers)
    assert engine.quotas.totals.reserved[FAKE_MODEL_ID] == 0


async def test_no_room_for_the_larger_reservation_reserves_only_what_is_needed() -> None:
    engine = make_engine(max_reserved_tokens_per_principal=1000)
    first = await ask(engine, [user("hello")])
    assert first.settlement.finish_reason == "stop"
    assert first.mesh.max_length == prompt_length([user("hello")]) + 8


async def test_room_to_grow_never_costs_a_principal_its_running_requests() -> None:
    """Every request of the default per-principal cap runs at once, reuse on or off."""
    gate = asyncio.Semaphore(0)
    engine = make_engine(FakeBackend(reply="ok", gate=gate))
    requests = engine.settings.max_requests_per_principal
    running = [
        await engine.runner.admit(Client(f"c{n}", ALICE), spec([user(f"topic {n}")], f"r{n}"))
        for n in range(requests)
    ]
    assert len(running) == requests
    for active in running:
        engine.runner.launch(active, _Sink())
    for _ in range(requests * 3):
        gate.release()
    await asyncio.gather(*(a.task for a in running if a.task is not None))


async def test_a_full_mesh_closes_idle_kept_sessions_for_a_later_retry() -> None:
    capacity = MeshCapacity(cache_tokens_left=3072, checked_at=0.0)
    engine = make_engine(reuse_max_cache_share=1.0, capacity=lambda model_id: capacity)
    kept = [await ask(engine, [user(f"conversation {n}")]) for n in range(2)]
    with pytest.raises(QuotaExceeded, match="attention cache"):  # 1,024 left
        await engine.sessions.open(kind="chat", principal=BOB, max_length=2048)
    assert len(engine.reuse) == 0  # enough of them, least recently used first, gave way
    assert engine.quotas.totals.reserved[FAKE_MODEL_ID] == 0
    await engine.aclose()  # waits for their mesh sessions to close
    assert all(answer.mesh.closed for answer in kept)


async def test_a_cancelled_admission_puts_the_kept_session_back() -> None:
    backend = FakeBackend(reply="ok")
    engine = make_engine(backend)
    first = await ask(engine, [user("hello")])
    backend.close_gate = asyncio.Event()  # the probe session's close waits
    taken = asyncio.Event()
    take = engine.reuse.take

    def recording_take(*args: Any) -> KeptSession | None:
        kept = take(*args)
        taken.set()
        return kept

    engine.reuse.take = recording_take  # type: ignore[method-assign]
    history = [user("hello"), assistant(first.text), user("more")]
    admitting = asyncio.create_task(engine.runner.admit(Client("c", ALICE), spec(history, "x")))
    await taken.wait()  # the request holds the kept session and waits for the probe's close
    assert len(engine.reuse) == 0
    admitting.cancel()
    backend.close_gate.set()
    with pytest.raises(asyncio.CancelledError):
        await admitting
    assert len(engine.reuse) == 1
    assert (await ask(engine, history)).mesh is first.mesh
    assert engine.quotas.totals.requests == 0


async def test_over_its_share_a_model_evicts_only_its_own_kept_sessions() -> None:
    capacity = MeshCapacity(cache_tokens_left=16384, checked_at=0.0)
    backend = FakeBackend(reply="ok", model_ids=[FAKE_MODEL_ID, "other"])
    engine = make_engine(backend, reuse_max_cache_share=0.1, capacity=lambda model_id: capacity)
    other = await ask(engine, [user("b")], principal=BOB, model_id="other")
    first = await ask(engine, [user("a1")])
    second = await ask(engine, [user("a2")])
    assert first.mesh.closed
    assert not second.mesh.closed
    assert not other.mesh.closed


async def test_a_session_handed_back_after_shutdown_is_closed() -> None:
    gate = asyncio.Semaphore(0)
    engine = make_engine(FakeBackend(reply="ok", gate=gate))
    active = await engine.runner.admit(Client("c", ALICE), spec([user("hi")], "r"))
    engine.runner.launch(active, _Sink())
    await engine.aclose()
    for _ in range(3):
        gate.release()
    assert active.task is not None
    await active.task
    assert len(engine.reuse) == 0
    assert engine.quotas.totals.reserved[FAKE_MODEL_ID] == 0


async def test_the_per_principal_bound_counts_the_principal_whatever_wallets_it_names() -> None:
    engine = make_engine(reuse_sessions_per_principal=1)
    proxy = Principal(PrincipalKind.OPEN, "", None, "addr-proxy")
    for n in range(3):
        await ask(engine, [user("hi")], principal=proxy, wallet="0x" + str(n) * 40)
    assert len(engine.reuse) == 1
