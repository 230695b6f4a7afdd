"""Benchmark: decode speed with spot checks at the default rate ÷ without (issue 12).

One local swarm, every span with two replicas (``--spans``, ``--replicas``), so every node can
be checked; one Petals backend with the default :class:`SpotCheckPolicy`. First a warm-up
until every node on the routes has passed its compulsory checks, then ``--pairs`` pairs of the
same greedy turn (a fresh session each, ``--tokens`` tokens), with and without spot checks in
alternating order (``IntegrityMonitor.paused`` switches the sampling off), so both sides share
the machine's load. Decode tokens/s: tokens after the first ÷ time from the first to the last.

Prints a table and, last, one ``BENCH_JSON {...}`` line.
Reproduce: ``.venv/bin/python scripts/bench_spot_checks.py`` (about 5 minutes).
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from farmesh_ws.core.types import ChatMessage, SamplingParams, TokenEvent
from farmesh_ws.home import farmesh_home
from farmesh_ws.mesh.petals import ModelSpec, PetalsBackend, PetalsBackendConfig
from farmesh_ws.mesh.spot_check import SpotCheckPolicy
from farmesh_ws.models import BUNDLED_MODEL_ID, dht_prefix_for
from farmesh_ws.models.bundled import prepare_bundled_model
from farmesh_ws.swarm import LocalSwarm, SwarmConfig, read_num_blocks

PROMPT = [ChatMessage(role="user", content="Write a short story about a lighthouse keeper.")]


async def decode_rate(backend: PetalsBackend, tokens: int) -> float:
    """One greedy turn in a fresh session; decode tokens per second."""
    session = await backend.open_session(BUNDLED_MODEL_ID, max_length=512)
    stamps: list[float] = []
    try:
        sampling = SamplingParams(max_new_tokens=tokens)
        async for event in session.run_tokens(session.encode_turn(PROMPT), sampling):
            if isinstance(event, TokenEvent):
                stamps.append(time.perf_counter())
    finally:
        await session.aclose()
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


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
    policy = SpotCheckPolicy()
    with LocalSwarm(config) as swarm:
        backend = await PetalsBackend.start(
            PetalsBackendConfig(
                initial_peers=tuple(swarm.initial_peers),
                models=(ModelSpec(BUNDLED_MODEL_ID, model_path, config.dht_prefix),),
                spot_checks=policy,
            )
        )
        try:
            await decode_rate(backend, args.tokens)  # warm-up: compulsory checks
            rates: dict[str, list[float]] = {"with": [], "without": []}
            for pair in range(args.pairs):
                order = ("with", "without") if pair % 2 == 0 else ("without", "with")
                for side in order:
                    backend.integrity.paused = side == "without"
                    rates[side].append(await decode_rate(backend, args.tokens))
            counters = backend.integrity.counters
        finally:
            await backend.aclose()
    with_checks, without = statistics.median(rates["with"]), statistics.median(rates["without"])
    return {
        "bench": "spot_checks",
        "rate": policy.rate,
        "detection_bound_steps": policy.detection_bound_steps,
        "servers": len(config.server_spans()),
        "pairs": args.pairs,
        "tokens": args.tokens,
        "with_tokens_per_s": round(with_checks, 2),
        "without_tokens_per_s": round(without, 2),
        "ratio": round(with_checks / without, 3),
        "with_runs": [round(r, 2) for r in rates["with"]],
        "without_runs": [round(r, 2) for r in rates["without"]],
        "checks": dict(counters.checks),
        "check_work_token_blocks": counters.check_work,
        "check_seconds": round(counters.check_seconds, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", default="0:15,15:30")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    report = asyncio.run(run(args))
    rows = [
        ("decode tokens/s with spot checks (median)", report["with_tokens_per_s"]),
        ("decode tokens/s without (median)", report["without_tokens_per_s"]),
        ("ratio (target >= 0.9)", report["ratio"]),
        ("checks by result", report["checks"]),
        (
            "check cost: token-blocks / seconds",
            (report["check_work_token_blocks"], report["check_seconds"]),
        ),
    ]
    for name, value in rows:
        sys.stdout.write(f"{name:<45} {value}\n")
    sys.stdout.write("BENCH_JSON " + json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
