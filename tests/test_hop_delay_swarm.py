"""The per-hop delay hook on a real swarm of the tiny model: every hop of every step waits at
least the configured delay, in the server, between receiving the step and computing it.

Only lower bounds are asserted (a loaded machine makes steps slower, never faster than the
delays they contain). A module-scoped swarm of the tiny model (2 servers of 3 blocks, one
handler each) starts in a few seconds, with hop tracing on so each server's stamps show where
the delay sits.
"""

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from farmesh_ws.core.types import ChatMessage, SamplingParams, TokenEvent, TurnDone
from farmesh_ws.home import farmesh_home
from farmesh_ws.mesh import hop_breakdown, hop_delay, hop_trace
from farmesh_ws.models import dht_prefix_for
from farmesh_ws.models.tiny import TINY_MODEL_ID, prepare_tiny_model

DELAY_MS = 250.0
SLACK_MS = 2.0
"""The handlers' event loop (uvloop, libuv) keeps time in whole milliseconds: a sleep may end
up to 1 ms early as ``perf_counter`` sees it."""
DELAYED_S = (DELAY_MS - SLACK_MS) / 1000
SPANS = ("0:3", "3:6")
TOKENS = 6


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hop-delay-trace")


@pytest.fixture(scope="module")
def delayed_swarm(tmp_path_factory: pytest.TempPathFactory, trace_dir: Path) -> Iterator[Any]:
    from farmesh_ws.swarm import LocalSwarm, SwarmConfig, read_num_blocks

    model_path = prepare_tiny_model(farmesh_home())
    config = SwarmConfig(
        model_path=model_path,
        dht_prefix=dht_prefix_for(TINY_MODEL_ID) + "-delay-test",
        num_blocks=read_num_blocks(model_path),
        log_dir=tmp_path_factory.mktemp("hop-delay-swarm"),
        spans=SPANS,
        num_handlers=1,
        inference_max_length=256,
        update_period_s=5.0,
        expiration_s=20.0,
        step_delay_ms=DELAY_MS,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(hop_trace.ENV_VAR, str(trace_dir))  # inherited by the servers only
        swarm = LocalSwarm(config)
        swarm.start()
    try:
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
async def delayed_backend(delayed_swarm: Any) -> AsyncIterator[Any]:
    from farmesh_ws.mesh.petals import ModelSpec, PetalsBackend, PetalsBackendConfig

    spec = ModelSpec(
        TINY_MODEL_ID, delayed_swarm.config.model_path, delayed_swarm.config.dht_prefix
    )
    mesh = await PetalsBackend.start(
        PetalsBackendConfig(initial_peers=tuple(delayed_swarm.initial_peers), models=(spec,))
    )
    yield mesh
    await mesh.aclose()


async def _turn_arrivals(backend: Any, text: str) -> list[float]:
    """One greedy turn of TOKENS tokens in a new session: each token's arrival time."""
    session = await backend.open_session(TINY_MODEL_ID, max_length=256)
    arrivals: list[float] = []
    try:
        ids = session.encode_turn([ChatMessage(role="user", content=text)])
        async for event in session.run_tokens(ids, SamplingParams(max_new_tokens=TOKENS)):
            if isinstance(event, TokenEvent):
                arrivals.append(time.perf_counter())
            elif isinstance(event, TurnDone):
                assert event.error is None
    finally:
        await session.aclose()
    return arrivals


async def test_each_step_waits_the_delay_at_every_hop(
    delayed_backend: Any, trace_dir: Path
) -> None:
    started = time.perf_counter()
    arrivals = await _turn_arrivals(delayed_backend, "Count to ten.")

    assert len(arrivals) == TOKENS
    steps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    # a decode step crosses both servers one after the other, each waiting DELAY_MS first
    assert min(steps) >= len(SPANS) * DELAYED_S

    events = [
        e
        for e in hop_breakdown.load_events(trace_dir)
        if e["e"] in ("srv_recv", "srv_submit") and e["t"] >= started
    ]
    waits: dict[str, list[float]] = {}
    received: dict[int, float] = {}
    for event in events:
        if event["e"] == "srv_recv":
            received[event["pid"]] = event["t"]
        elif event["pid"] in received:
            waits.setdefault(event["node"], []).append(event["t"] - received.pop(event["pid"]))
    assert len(waits) == len(SPANS)
    for node_waits in waits.values():
        assert len(node_waits) >= TOKENS  # the prefill and every decode step
        assert min(node_waits) >= DELAYED_S


async def test_the_delay_does_not_hold_up_other_sessions(
    delayed_backend: Any, trace_dir: Path
) -> None:
    """Two sessions at once: their delay windows on a server overlap in time, which a delay
    that blocked the handler's event loop (one step at a time) could not do. Both turns start
    together and step at the same pace, so their windows of DELAY_MS coincide on some hop."""
    started = time.perf_counter()
    turns = [_turn_arrivals(delayed_backend, f"Count to {n}.") for n in (10, 20)]
    assert [len(arrivals) for arrivals in await asyncio.gather(*turns)] == [TOKENS, TOKENS]

    windows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    opened: dict[tuple[str, str], float] = {}
    for event in hop_breakdown.load_events(trace_dir):
        if event["t"] < started or event["e"] not in ("delay_start", "delay_end"):
            continue
        key = (event["node"], event["session"])
        if event["e"] == "delay_start":
            opened[key] = event["t"]
        else:
            windows.setdefault(key, []).append((opened.pop(key), event["t"]))
    assert len(windows) == 2 * len(SPANS)  # two sessions on each server
    assert all(end - start >= DELAYED_S for spans in windows.values() for start, end in spans)
    overlapping = {
        node
        for (node, session), spans in windows.items()
        for (other_node, other), other_spans in windows.items()
        if node == other_node
        and session != other
        and any(s < oe and os_ < e for s, e in spans for os_, oe in other_spans)
    }
    assert overlapping


def test_a_delay_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        hop_delay.install(0)
