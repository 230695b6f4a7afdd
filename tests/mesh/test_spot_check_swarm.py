"""Spot checks on the real swarm: an honest replica gives no false alarm over hundreds of
checked steps; a byzantine server next to honest replicas is caught at its first step (a
compulsory check), excluded, paid nothing, and the user's greedy output stays golden.

These tests add servers to the shared swarm (a replica of 15:30, then a byzantine one that
announces a throughput it does not have, so routing prefers it), so they run last.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from farmesh_ws.byzantine import ByzantineSpec
from farmesh_ws.core.types import ChatMessage, SamplingParams, TokenEvent, TurnDone
from farmesh_ws.ledger.integrity import IntegrityRecorder, node_flags
from farmesh_ws.ledger.payees import payee_earnings
from farmesh_ws.ledger.records import ContributionRecord, TurnRecord
from farmesh_ws.ledger.store import Ledger
from farmesh_ws.mesh.petals import ModelSpec, PetalsBackend, PetalsBackendConfig
from farmesh_ws.mesh.spot_check import IntegrityEvent, SpotCheckPolicy
from farmesh_ws.metrics import Metrics
from farmesh_ws.models import BUNDLED_MODEL_ID

pytestmark = pytest.mark.disruptive
GREEDY_48 = SamplingParams(max_new_tokens=48)


async def _backend(swarm: Any, model_path: Path, policy: SpotCheckPolicy) -> PetalsBackend:
    return await PetalsBackend.start(
        PetalsBackendConfig(
            initial_peers=tuple(swarm.initial_peers),
            models=(ModelSpec(BUNDLED_MODEL_ID, model_path, swarm.config.dht_prefix),),
            update_period_s=5.0,
            ban_timeout_s=5.0,
            spot_checks=policy,
        )
    )


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
def replica(swarm: Any) -> Iterator[Any]:
    """An honest second server for blocks 15:30, stopped after this module's tests."""
    node = swarm.add_server("15:30")
    yield node
    swarm.stop_server(node.name)


@pytest.fixture
async def checked(swarm: Any, bundled_model_path: Path) -> AsyncIterator[PetalsBackend]:
    """A backend checking every step and waiting for each check (every step compulsory):
    sampled checks at rate 1 would queue on the replica faster than it serves them."""
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
    replica: Any, swarm: Any, bundled_model_path: Path, golden: dict[str, Any], tmp_path: Path
) -> None:
    liar = swarm.add_server(
        "15:30", byzantine=ByzantineSpec(scale=0.01, claimed_inference_rps=3000.0)
    )
    policy = SpotCheckPolicy()  # the default rate
    backend = await _backend(swarm, bundled_model_path, policy)
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    await ledger.connect()
    recorder = IntegrityRecorder(ledger, asyncio.get_running_loop())
    metrics = Metrics()
    backend.integrity.subscribe(recorder.listener)
    backend.integrity.subscribe(metrics.observe_integrity)
    try:
        dones = []
        for conversation in golden["conversations"]:
            dones += await _conversation(backend, conversation)
        await backend.wait_for_checks()
        await recorder.flush()
        for index, done in enumerate(dones):
            await ledger.record_turn(_record(done, f"r{index}"))
        flags = await node_flags(ledger)
        payees = {p.payee: p for p in await payee_earnings(ledger)}
    finally:
        await ledger.aclose()
        await backend.aclose()
        await asyncio.to_thread(swarm.stop_server, liar.name)

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
