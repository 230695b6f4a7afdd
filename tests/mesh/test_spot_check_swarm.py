"""Spot checks on the real swarm: an honest replica gives no false alarm over hundreds of
checked steps; a byzantine server next to honest replicas is caught at its first step (a
compulsory check), excluded, paid nothing, and the user's greedy output stays golden.

These tests add servers to the shared swarm (a replica of 15:30, then a byzantine one), so they
run last. They do not depend on which 15:30 server routing picks: the honest test checks every
step of whichever one serves it against another, and the byzantine test pins the route's 15:30
hop onto the liar while it is routable (routing alone would not choose it reliably: a server
that just joined has no measured ping and costs more than the throughput it claims saves).
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from farmesh_ws.byzantine import ByzantineSpec
from farmesh_ws.core.types import ChatMessage, SamplingParams, TokenEvent, TurnDone
from farmesh_ws.ledger.integrity import IntegrityRecorder, node_flags
from farmesh_ws.ledger.payees import payee_earnings
from farmesh_ws.ledger.records import ContributionRecord, TurnRecord
from farmesh_ws.ledger.store import Ledger
from farmesh_ws.mesh.petals import PetalsBackend
from farmesh_ws.mesh.spot_check import IntegrityEvent, SpotCheckPolicy
from farmesh_ws.metrics import Metrics
from farmesh_ws.models import BUNDLED_MODEL_ID
from tests.helpers import swarm_backend_config

pytestmark = pytest.mark.disruptive
GREEDY_48 = SamplingParams(max_new_tokens=48)


async def _backend(swarm: Any, model_path: Path, policy: SpotCheckPolicy) -> PetalsBackend:
    return await PetalsBackend.start(swarm_backend_config(swarm, model_path, spot_checks=policy))


def _routed_span(manager: Any, node: Any) -> Any:
    """``node``'s span in the routing table of ``manager``, or None (not there, or excluded)."""
    first = int(node.span.split(":")[0])
    with manager.lock_changes:
        spans = manager.state.sequence_info.spans_containing_block[first]
        return next((s for s in spans if s.peer_id.to_base58() == node.peer_id), None)


def _pin_route_through(manager: Any, node: Any, pinned: list[str]) -> Any:
    """A ``make_sequence`` for ``manager`` (its routes loaded) whose hop over ``node``'s span
    is ``node`` while the routing table holds it (once it is excluded, Petals' own choice);
    each pinned route is appended to ``pinned``."""
    from petals.data_structures import RemoteSpanInfo

    original = manager.make_sequence
    first = int(node.span.split(":")[0])

    def make_sequence(start_index: int = 0, end_index: int | None = None, **kwargs: Any) -> Any:
        end = len(manager) if end_index is None else end_index
        span = _routed_span(manager, node)
        if span is None or not start_index <= first < end <= span.end:
            return original(start_index, end_index, **kwargs)
        route = original(start_index, first, **kwargs) if start_index < first else []
        route.append(RemoteSpanInfo(span.peer_id, first, end, span.server_info))
        pinned.append(" => ".join(f"{s.start}:{s.end} via {s.peer_id.to_base58()}" for s in route))
        return route

    return make_sequence


async def _conversation(backend: PetalsBackend, turns: list[dict[str, Any]]) -> list[TurnDone]:
    """Run the golden turns in one session; assert each reply is the golden one."""
    session = await backend.open_session(BUNDLED_MODEL_ID, max_length=512)
    dones = []
    try:
        for turn in turns:
            messages = [ChatMessage(**m) for m in turn["new_messages"]]
            ids: list[int] = []
            async for event in session.run_tokens(session.encode_turn(messages), GREEDY_48):
                if isinstance(event, TokenEvent):
                    ids.append(event.token_id)
                else:
                    dones.append(event)
            assert dones[-1].finish_reason == "stop", dones[-1].error
            assert ids == turn["greedy_48_ids"]
    finally:
        await session.aclose()
    return dones


def _record(done: TurnDone, request_id: str) -> TurnRecord:
    """The ledger row of a turn, each node's share 1e-8 $FAR per token-block of work."""
    now = time.time()
    return TurnRecord(
        session_id="s1",
        request_id=request_id,
        kind="turn",
        wallet=None,
        model_id=BUNDLED_MODEL_ID,
        started_at=now - done.duration_s,
        ended_at=now,
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        cached_tokens=done.cached_tokens,
        finish_reason=done.finish_reason,
        cost_far_e8=sum(c.work for c in done.contributions),
        ttft_ms=None,
        duration_ms=None,
        contributions=tuple(
            ContributionRecord(
                c.peer_id,
                c.public_name,
                c.start_block,
                c.end_block,
                c.tokens,
                c.replayed_tokens,
                c.work,
                c.work,
            )
            for c in done.contributions
        ),
    )


@pytest.fixture(scope="module")
async def replica(swarm: Any, backend: PetalsBackend) -> AsyncIterator[Any]:
    """An honest second server for blocks 15:30, stopped after this module's tests. The module
    starts from live servers only (earlier disruptive tests may have crashed some) and leaves
    the swarm as it found it: every block served, its servers stopped, the shared backend's
    routes refreshed."""
    await asyncio.to_thread(swarm.wait_until_forgotten)
    node = await asyncio.to_thread(swarm.add_server, "15:30")
    yield node
    await asyncio.to_thread(swarm.stop_server, node.name)
    await asyncio.to_thread(swarm.wait_until_served)
    await asyncio.to_thread(swarm.wait_until_forgotten)
    await backend.refresh_routes(BUNDLED_MODEL_ID)


@pytest.fixture
async def checked(swarm: Any, bundled_model_path: Path) -> AsyncIterator[PetalsBackend]:
    """A backend checking every step and waiting for each check (every step compulsory):
    sampled checks at rate 1 would mostly be skipped at ``max_background``."""
    policy = SpotCheckPolicy(rate=1.0, first_steps=1_000_000)
    backend = await _backend(swarm, bundled_model_path, policy)
    yield backend
    await backend.aclose()


@pytest.mark.timeout(900)
async def test_honest_replicas_raise_no_false_alarm_over_hundreds_of_checked_steps(
    replica: Any, checked: PetalsBackend, golden: dict[str, Any]
) -> None:
    heard: list[IntegrityEvent] = []
    checked.integrity.subscribe(heard.append)
    for _ in range(8):  # about 40 checked steps per round
        for conversation in golden["conversations"]:
            await _conversation(checked, conversation)
    await checked.wait_for_checks()

    passes = [e for e in heard if e.result == "pass"]
    assert len(passes) >= 300, checked.integrity.counters
    assert [e for e in heard if e.result in ("mismatch", "error") or e.flag is not None] == []
    tolerance = checked.config.spot_checks.tolerance_for("float32")
    assert max(e.difference for e in passes) < tolerance / 100
    assert sum(e.work for e in passes) == checked.integrity.counters.check_work


async def test_a_byzantine_server_is_caught_at_once_excluded_and_paid_nothing(
    replica: Any,
    swarm: Any,
    bundled_model_path: Path,
    golden: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    honest = [n for n in swarm.servers if n.alive and n.span == "15:30"]
    assert len(honest) >= 2  # a checker and a third opinion besides the liar
    liar = await asyncio.to_thread(
        swarm.add_server,
        "15:30",
        byzantine=ByzantineSpec(scale=0.01, claimed_inference_rps=3000.0),
    )
    policy = SpotCheckPolicy()  # the default rate
    pinned: list[str] = []
    metrics = Metrics()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(asyncio.to_thread, swarm.stop_server, liar.name)
        ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
        await ledger.connect()
        stack.push_async_callback(ledger.aclose)
        backend = await _backend(swarm, bundled_model_path, policy)
        stack.push_async_callback(backend.aclose)
        await backend.refresh_routes(BUNDLED_MODEL_ID)  # the table pinning reads
        manager = backend._model(BUNDLED_MODEL_ID).sequence_manager
        assert _routed_span(manager, liar) is not None
        monkeypatch.setattr(manager, "make_sequence", _pin_route_through(manager, liar, pinned))
        recorder = IntegrityRecorder(ledger, asyncio.get_running_loop())
        backend.integrity.subscribe(recorder.listener)
        backend.integrity.subscribe(metrics.observe_integrity)
        dones = []
        for conversation in golden["conversations"]:
            dones += await _conversation(backend, conversation)
        await backend.wait_for_checks()
        await recorder.flush()
        for index, done in enumerate(dones):
            await ledger.record_turn(_record(done, f"r{index}"))
        flags = await node_flags(ledger)
        payees = {p.payee: p for p in await payee_earnings(ledger)}

    assert len(pinned) == 1, pinned  # the liar served the first step, and never again
    assert [(f["peer_id"], f["kind"]) for f in flags] == [(liar.peer_id, "tampered_output")]
    assert flags[0]["step"] <= policy.first_steps  # caught by a compulsory check
    assert backend.integrity.excluded == {liar.peer_id}
    assert all(c.peer_id != liar.peer_id for d in dones for c in d.contributions)
    assert payees[liar.peer_id].earned_far == 0
    assert payees[liar.peer_id].flags == ("tampered_output",)
    assert backend.integrity.counters.mismatches == {"checked": 1}  # the third opinion agreed
    text = metrics.render().decode()
    assert 'farmesh_spot_check_mismatches_total{verdict="checked"} 1.0' in text
    assert 'farmesh_node_flags_total{kind="tampered_output"} 1.0' in text
