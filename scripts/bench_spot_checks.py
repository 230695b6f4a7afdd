"""Benchmark: decode speed with spot checks at the default rate ÷ without (issue 12).

One local swarm, every span with two replicas (``--spans``, ``--replicas``), so every node can
be checked; one Petals backend with the default :class:`SpotCheckPolicy`. First warm-up turns
until the nodes routing chooses have passed their compulsory checks (those are waited for,
once per node and gateway: a steady-state cost of zero), then ``--pairs`` pairs of the same
greedy turn (a fresh session each, ``--tokens`` tokens), with and without spot checks in
alternating order (``IntegrityMonitor.paused`` switches the sampling off), so both sides share
the machine's load. After each turn the benchmark waits until that turn's checks have finished
(they run when a turn ends), so no turn pays for another's checks. Routing may still move a
later turn onto a replica not yet proven; such a pair is counted and reported apart.

Measures, per side, medians over the turns:

* decode tokens/s: tokens after the first ÷ time from the first to the last (what a user sees);
* tokens/s including the turn's checks: the same tokens ÷ the time from the first token until
  the turn's checks finished (the verification's cost to a machine that runs both).

The target (≥ 0.9) is on the first ratio, over the pairs whose turn with checks met proven
nodes only (every pair if none did); every ratio is printed. Prints a table and, last, one
``BENCH_JSON {...}`` line. Reproduce: ``.venv/bin/python scripts/bench_spot_checks.py``
(about 5 minutes).
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from farmesh_ws.core.types import ChatMessage, SamplingParams, TokenEvent, TurnDone
from farmesh_ws.home import farmesh_home
from farmesh_ws.mesh.petals import ModelSpec, PetalsBackend, PetalsBackendConfig
from farmesh_ws.mesh.spot_check import SpotCheckPolicy
from farmesh_ws.models import BUNDLED_MODEL_ID, dht_prefix_for
from farmesh_ws.models.bundled import prepare_bundled_model
from farmesh_ws.swarm import LocalSwarm, SwarmConfig, read_num_blocks

PROMPT = [ChatMessage(role="user", content="Write a short story about a lighthouse keeper.")]
TARGET = 0.9
MAX_WARM_UP_TURNS = 8


@dataclass(frozen=True, slots=True)
class Run:
    decode_rate: float
    """Tokens after the first ÷ first-to-last-token time."""
    rate_with_checks: float
    """The same tokens ÷ time from the first token until the turn's checks finished."""
    peers: frozenset[str]
    met_unproven: bool
    """The turn met a node still in its compulsory checks (they block the turn)."""


async def one_turn(backend: PetalsBackend, tokens: int, servers: list[str]) -> Run:
    """One greedy turn in a fresh session, then wait for its spot checks."""
    first = backend.integrity.policy.first_steps
    passed_before = {p: backend.integrity.record(p).passed for p in servers}
    session = await backend.open_session(BUNDLED_MODEL_ID, max_length=512)
    stamps: list[float] = []
    done: TurnDone | None = None
    try:
        sampling = SamplingParams(max_new_tokens=tokens)
        async for event in session.run_tokens(session.encode_turn(PROMPT), sampling):
            if isinstance(event, TokenEvent):
                stamps.append(time.perf_counter())
            else:
                done = event
    finally:
        await session.aclose()
    await backend.wait_for_checks()
    checked = time.perf_counter()
    if done is None or done.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"the turn failed: {done}")
    peers = frozenset(hop.peer_id for route in done.routes for hop in route)
    generated = len(stamps) - 1
    return Run(
        generated / (stamps[-1] - stamps[0]),
        generated / (checked - stamps[0]),
        peers,
        any(passed_before.get(p, 0) < first for p in peers),
    )


def proven(backend: PetalsBackend, peers: list[str]) -> bool:
    first = backend.integrity.policy.first_steps
    return all(backend.integrity.record(p).passed >= first for p in peers)


async def measure(
    backend: PetalsBackend, servers: list[str], args: argparse.Namespace
) -> dict[str, object]:
    warm_ups, quiet = 0, 0  # quiet: warm-up turns in a row that met only proven nodes
    while warm_ups < MAX_WARM_UP_TURNS and quiet < 2 and not proven(backend, servers):
        warm_ups += 1
        quiet = 0 if (await one_turn(backend, args.tokens, servers)).met_unproven else quiet + 1
    pairs: list[tuple[Run, Run]] = []
    before = dict(backend.integrity.counters.checks)
    for pair in range(args.pairs):
        order = ("with", "without") if pair % 2 == 0 else ("without", "with")
        turns = {}
        for side in order:
            backend.integrity.paused = side == "without"
            turns[side] = await one_turn(backend, args.tokens, servers)
        pairs.append((turns["with"], turns["without"]))
    counters = backend.integrity.counters
    measured = {k: v - before.get(k, 0) for k, v in counters.checks.items()}
    steady = [(w, o) for w, o in pairs if not w.met_unproven] or pairs

    def median(chosen: list[tuple[Run, Run]], side: int, attr: str) -> float:
        return statistics.median(float(getattr(p[side], attr)) for p in chosen)

    def ratio(chosen: list[tuple[Run, Run]], attr: str = "decode_rate") -> float:
        return median(chosen, 0, attr) / median(chosen, 1, attr)

    decode_ratio = ratio(steady)
    return {
        "bench": "spot_checks",
        "rate": backend.integrity.policy.rate,
        "first_steps": backend.integrity.policy.first_steps,
        "window": backend.integrity.policy.window,
        "detection_bound_steps": backend.integrity.policy.detection_bound_steps,
        "warm_up_turns": warm_ups,
        "pairs": args.pairs,
        "tokens": args.tokens,
        "steady_pairs": len(steady),
        "with_tokens_per_s": round(median(steady, 0, "decode_rate"), 2),
        "without_tokens_per_s": round(median(steady, 1, "decode_rate"), 2),
        "ratio": round(decode_ratio, 3),
        "ratio_median_of_pairs": round(
            statistics.median(w.decode_rate / o.decode_rate for w, o in steady), 3
        ),
        "ratio_all_pairs": round(ratio(pairs), 3),
        "with_including_checks_tokens_per_s": round(median(steady, 0, "rate_with_checks"), 2),
        "ratio_including_checks": round(ratio(steady, "rate_with_checks"), 3),
        "target": TARGET,
        "target_met": decode_ratio >= TARGET,
        "with_runs": [round(w.decode_rate, 2) for w, _ in pairs],
        "without_runs": [round(o.decode_rate, 2) for _, o in pairs],
        "with_turns_meeting_unproven_nodes": sum(w.met_unproven for w, _ in pairs),
        "checks_while_measured": measured,
        "check_work_token_blocks": counters.check_work,
        "check_seconds": round(counters.check_seconds, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, object]:
    model_path = prepare_bundled_model(farmesh_home(), progress=False)
    config = SwarmConfig(
        model_path=model_path,
        dht_prefix=dht_prefix_for(BUNDLED_MODEL_ID),
        num_blocks=read_num_blocks(model_path),
        log_dir=Path(tempfile.mkdtemp(prefix="bench-spot-checks-")),
        spans=tuple(args.spans.split(",")),
        replicas=args.replicas,
    )
    with LocalSwarm(config) as swarm:
        servers = [node.peer_id for node in swarm.servers]
        backend = await PetalsBackend.start(
            PetalsBackendConfig(
                initial_peers=tuple(swarm.initial_peers),
                models=(ModelSpec(BUNDLED_MODEL_ID, model_path, config.dht_prefix),),
                spot_checks=SpotCheckPolicy(),
            )
        )
        try:
            report = await measure(backend, servers, args)
        finally:
            await backend.aclose()
    return {"servers": len(config.server_spans()), **report}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", default="0:15,15:30")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    report = asyncio.run(run(args))
    verdict = "met" if report["target_met"] else "missed"
    rows = [
        (
            "rate / window W / first steps",
            (report["rate"], report["window"], report["first_steps"]),
        ),
        ("detection bound after the first steps", f"{report['detection_bound_steps']} steps"),
        ("pairs measured / with proven nodes only", (report["pairs"], report["steady_pairs"])),
        ("decode tokens/s with spot checks (median)", report["with_tokens_per_s"]),
        ("decode tokens/s without (median)", report["without_tokens_per_s"]),
        (f"ratio (target >= {TARGET})", f"{report['ratio']} ({verdict})"),
        ("ratio, median of the pairs' ratios", report["ratio_median_of_pairs"]),
        ("ratio over every pair", report["ratio_all_pairs"]),
        ("tokens/s with, the turn's checks included", report["with_including_checks_tokens_per_s"]),
        ("ratio with the turn's checks included", report["ratio_including_checks"]),
        ("checks while measured, by result", report["checks_while_measured"]),
        ("measured turns meeting unproven nodes", report["with_turns_meeting_unproven_nodes"]),
        (
            "check cost: token-blocks / seconds (all)",
            (report["check_work_token_blocks"], report["check_seconds"]),
        ),
    ]
    for name, value in rows:
        sys.stdout.write(f"{name:<45} {value}\n")
    sys.stdout.write("BENCH_JSON " + json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
