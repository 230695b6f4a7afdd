"""Benchmark the Far Mesh on the bundled model (SmolLM2-135M-Instruct) against plain transformers.

Run: ``.venv/bin/python scripts/bench_mesh.py [--turns 10] [--tokens 32] [--spans 0:15,15:30]
[--json-only]``

One run starts a local swarm (a DHT node plus Petals servers over ``--spans``; by default 2
servers splitting the 30 blocks evenly) and measures, side by side:

1. Start-up: ``prepare_bundled_model`` wall time (a no-op when the converted folder is current)
   and ``LocalSwarm.start`` wall time (until the DHT lists every block as served).
2. Decode throughput, greedy: one turn through the mesh (a fresh session per repeat) versus the
   same weights in this process with ``transformers.LlamaForCausalLM`` (float32, KV cache, one
   token per forward), alternating mesh run / local run so both see the same machine load. Only
   decode steps are timed, on both sides: from the first generated token (which ends the
   prefill) to the last one, i.e. ``(n - 1) / (t_last - t_first)``. Prefill, opening the remote
   session and the first token are excluded. Each local run decodes exactly as many tokens as
   the mesh run before it (ignoring EOS); median over ``--repeats``. These runs come after the
   multi-turn part, so the client memory figures are taken before the local model loads.
3. Multi-turn: ``--turns`` distinct short user messages (greedy, at most ``--tokens`` new tokens
   each). (a) reuse: one session, each turn sends only its new messages, the servers' attention
   caches hold the history; (b) replay baseline: turn k runs in a fresh session that is sent the
   whole conversation so far (the replies of (a) as assistant messages). TTFT (turn call to
   first token event; turn 1 includes opening the remote session in both) and turn time are
   client wall times. Reuse should keep TTFT flat while the replay baseline grows.
4. Peak memory, sampled every 0.5 s by a background thread: this process (RSS; ``ru_maxrss``),
   its helper children (the client's hivemind DHT process and p2pd, and the swarm's coverage
   DHT), and every swarm node's process tree (RSS sum, and PSS sum since forks share pages).
5. Where a decode step's time goes: the client and every server record timestamps around each
   part of a step (``farmesh_ws.mesh.hop_trace``, on for the whole run); the decode steps of
   the timed runs of 2. are cut into parts (``farmesh_ws.mesh.hop_breakdown``): client embed,
   farmesh bookkeeping, Petals client code, per hop request / hand-offs / server compute /
   response, LM head, sampling. The local runs of 2. time the model body (30 blocks) and the
   final norm + LM head + argmax separately. The probes' own cost is measured too.

A warm-up turn (4 tokens) runs before any timing on each side. The machine has 2 cores shared by
the client, both servers and the local baseline, so absolute figures are noisy; the ratios are
measured in the same run under the same conditions. The last stdout line is ``BENCH_JSON {...}``.
"""

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_support import (
    LocalBaseline,
    MemorySampler,
    arm_watchdog,
    build_breakdown,
    print_breakdown,
    probe_cost_us,
    ru_maxrss_mib,
)

from farmesh_ws.core.types import ChatMessage, SamplingParams, TokenEvent, TurnDone
from farmesh_ws.home import farmesh_home
from farmesh_ws.mesh import hop_breakdown, hop_trace
from farmesh_ws.models import BUNDLED_MODEL_ID, dht_prefix_for
from farmesh_ws.models.bundled import prepare_bundled_model, read_marker
from farmesh_ws.swarm import LocalSwarm, SwarmConfig, read_num_blocks

MAX_LENGTH = 2048
WARMUP_TOKENS = 4
# Issue 13: >= 0.6 on this 2-core machine; >= 0.8 once the per-hop overhead is gone.
TARGETS = {
    "throughput_ratio": 0.6,
    "throughput_stretch_ratio": 0.8,
    "reuse_ttft_ratio": 1.2,
    "client_peak_mib": 1536.0,
}
THROUGHPUT_PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds an old map in the attic. "
    "Describe every room of the lighthouse."
)
USER_MESSAGES = (
    "Hi! What is the capital of France?",
    "Name three primary colors.",
    "Why is the sky blue?",
    "Give me a tip for learning to cook.",
    "What is 12 times 7?",
    "Suggest a name for a grey cat.",
    "How many legs does a spider have?",
    "What does a bee make?",
    "Recommend a short book for a train ride.",
    "Say goodbye in Spanish.",
)


def user_message(index: int) -> str:
    base, rounds = USER_MESSAGES[index % len(USER_MESSAGES)], index // len(USER_MESSAGES)
    return base if rounds == 0 else f"{base} (asked again, round {rounds + 1})"


@dataclass(slots=True)
class TurnResult:
    """One turn seen from the client: token ids, their arrival times and the done event."""

    done: TurnDone
    token_ids: list[int]
    arrivals: list[float]
    started: float
    ended: float

    def row(self) -> dict[str, Any]:
        first = self.arrivals[0] if self.arrivals else self.ended
        return {
            "ttft_s": round(first - self.started, 4),
            "turn_s": round(self.ended - self.started, 4),
            "prompt_tokens": self.done.prompt_tokens,
            "cached_tokens": self.done.cached_tokens,
            "completion_tokens": self.done.completion_tokens,
            "finish": self.done.finish_reason,
        }


def decode_rate(stamps: list[float]) -> float:
    """Tokens/s over decode steps only: tokens 2..n over the time since token 1."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return float("nan")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


async def collect(
    session: Any, messages: list[ChatMessage], sampling: SamplingParams
) -> TurnResult:
    started = time.perf_counter()
    token_ids: list[int] = []
    arrivals: list[float] = []
    async for event in session.run_tokens(session.encode_turn(messages), sampling):
        now = time.perf_counter()
        if isinstance(event, TokenEvent):
            token_ids.append(event.token_id)
            arrivals.append(now)
        elif isinstance(event, TurnDone):
            if event.error is not None:
                raise RuntimeError(f"mesh turn failed: {event.error.code}: {event.error}")
            return TurnResult(event, token_ids, arrivals, started, now)
    raise RuntimeError("the turn ended without a TurnDone event")


async def fresh_turn(backend: Any, messages: list[ChatMessage], tokens: int) -> TurnResult:
    session = await backend.open_session(BUNDLED_MODEL_ID, max_length=MAX_LENGTH)
    try:
        return await collect(session, messages, SamplingParams(max_new_tokens=tokens))
    finally:
        await session.aclose()


async def run_mesh(
    args: argparse.Namespace, swarm: LocalSwarm, model_path: Path, sampler: MemorySampler
) -> dict[str, Any]:
    """Multi-turn first (client memory is snapshotted before the local model loads), then the
    throughput runs, mesh and local alternating so both see the same machine load."""
    from farmesh_ws.mesh.petals import ModelSpec, PetalsBackend, PetalsBackendConfig

    spec = ModelSpec(BUNDLED_MODEL_ID, model_path, swarm.config.dht_prefix)
    started = time.perf_counter()
    backend = await PetalsBackend.start(
        PetalsBackendConfig(initial_peers=tuple(swarm.initial_peers), models=(spec,))
    )
    backend_start_s = time.perf_counter() - started
    hop_trace.install_from_env()
    try:
        prompt = [ChatMessage(role="user", content=THROUGHPUT_PROMPT)]
        await fresh_turn(backend, prompt, WARMUP_TOKENS)
        reuse: list[TurnResult] = []
        history: list[ChatMessage] = []
        session = await backend.open_session(BUNDLED_MODEL_ID, max_length=MAX_LENGTH)
        try:
            for index in range(args.turns):
                user = ChatMessage(role="user", content=user_message(index))
                reuse.append(
                    await collect(session, [user], SamplingParams(max_new_tokens=args.tokens))
                )
                history += [user, ChatMessage(role="assistant", content=reuse[-1].done.text)]
        finally:
            await session.aclose()
        replay = [
            await fresh_turn(backend, history[: 2 * index + 1], args.tokens)
            for index in range(args.turns)
        ]
        mesh_memory = (sampler.snapshot(), ru_maxrss_mib())
        local = LocalBaseline(model_path, prompt, WARMUP_TOKENS)
        runs: list[TurnResult] = []
        local_runs: list[tuple[list[int], list[float]]] = []
        for _ in range(args.repeats):
            runs.append(await fresh_turn(backend, prompt, args.tokens))
            local_runs.append(local.decode(len(runs[-1].token_ids)))
    finally:
        await backend.aclose()
    return {
        "backend_start_s": backend_start_s,
        "runs": runs,
        "reuse": reuse,
        "replay": replay,
        "mesh_memory": mesh_memory,
        "local": {
            "load_s": local.load_s,
            "token_ids": local_runs[0][0],
            "rates": [decode_rate(stamps) for _, stamps in local_runs],
            "parts": local.parts,
        },
    }


def leading_matches(left: list[int], right: list[int]) -> int:
    pairs = zip(left, right, strict=False)
    return next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(left), len(right)))


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator > 0 else float("nan")


def print_report(report: dict[str, Any]) -> None:
    tp, mt, mem = report["throughput"], report["multi_turn"], report["memory"]
    print(f"\nFar Mesh benchmark: {report['model']}, {report['swarm']}\nNOTE: {report['note']}")
    print(f"Decode throughput measures: {tp['measured']}\n")
    sent = f"{mt['reuse_prompt_tokens']} / {mt['replay_prompt_tokens']}"
    rows: list[tuple[str, Any]] = [
        (
            "prepare bundled model s (was cached)",
            f"{report['prepare_s']} ({report['prepare_cached']})",
        ),
        ("swarm start s, until all blocks served", report["swarm_start_s"]),
        ("mesh client start s (PetalsBackend.start)", report["backend_start_s"]),
        ("local model load s (transformers)", report["local_load_s"]),
        ("mesh decode tokens/s, median of runs", f"{tp['mesh_tokens_per_s']} {tp['mesh_runs']}"),
        ("local decode tokens/s, median of runs", f"{tp['local_tokens_per_s']} {tp['local_runs']}"),
        ("ratio mesh / local (target >= 0.6; 0.8)", tp["ratio_mesh_over_local"]),
        ("greedy tokens identical, mesh vs local", tp["greedy_match"]),
        ("TTFT turn N / turn 1, reuse (target <= 1.2)", mt["reuse_ttft_ratio"]),
        ("TTFT turn N / turn 1, replay baseline", mt["replay_ttft_ratio"]),
        ("prompt tokens sent, reuse / replay", sent),
        ("replay replies identical to reuse replies", mt["replies_identical"]),
        ("client ru_maxrss MiB, mesh phases (<= 1536)", mem["client_maxrss_mesh_mib"]),
        ("client ru_maxrss MiB, incl. local baseline", mem["client_maxrss_total_mib"]),
    ]
    for name, peak in mem["groups"].items():
        rows.append((f"peak RSS / PSS MiB, {name}", f"{peak['rss_mib']} / {peak['pss_mib']}"))
    for label, value in rows:
        print(f"  {label:<47} {value}")
    print("\nMulti-turn (client wall times; prompt = new tokens sent, cached = held by the mesh)")
    line = "  {:>4} | {:>8} {:>7} {:>6} {:>6} | {:>8} {:>7} {:>6}"
    print(line.format("", "reuse:", "", "", "", "replay:", "", ""))
    print(line.format("turn", "ttft s", "turn s", "prompt", "cached", "ttft s", "turn s", "prompt"))
    for index, (a, b) in enumerate(zip(mt["reuse"], mt["replay"], strict=True), start=1):
        cells = [a["ttft_s"], a["turn_s"], a["prompt_tokens"], a["cached_tokens"]]
        cells += [b["ttft_s"], b["turn_s"], b["prompt_tokens"]]
        print(line.format(index, *(f"{c:.3f}" if isinstance(c, float) else c for c in cells)))
    print_breakdown(report["breakdown"])
    marks = {name: "met" if met else "missed" for name, met in report["targets"].items()}
    print(f"\nTargets: {marks}; total run {report['total_s']} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=10, help="multi-turn conversation length")
    parser.add_argument("--tokens", type=int, default=32, help="max new tokens per turn/run")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs (median)")
    parser.add_argument("--spans", default="", help="server spans, e.g. 0:30 (default: 2 even)")
    parser.add_argument("--timeout", type=float, default=900.0, help="watchdog seconds")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    run_started = time.perf_counter()

    home = farmesh_home()
    cached = read_marker(home / "models" / BUNDLED_MODEL_ID) is not None
    started = time.perf_counter()
    model_path = prepare_bundled_model(home, progress=not args.json_only)
    prepare_s = time.perf_counter() - started

    log_dir = Path(tempfile.mkdtemp(prefix="farmesh-bench-logs-"))
    config = SwarmConfig(
        model_path=model_path,
        dht_prefix=dht_prefix_for(BUNDLED_MODEL_ID),
        num_blocks=read_num_blocks(model_path),
        log_dir=log_dir,
        spans=tuple(span for span in args.spans.split(",") if span),
    )
    trace_dir = log_dir / "hop-trace"
    os.environ[hop_trace.ENV_VAR] = str(trace_dir)  # inherited by the servers
    swarm = LocalSwarm(config)
    sampler = MemorySampler(swarm)
    watchdog = arm_watchdog(swarm, args.timeout)
    sampler.start()
    finished = False
    try:
        started = time.perf_counter()
        swarm.start()
        swarm_start_s = time.perf_counter() - started
        mesh = asyncio.run(run_mesh(args, swarm, model_path, sampler))
        mesh_memory, client_maxrss_mesh = mesh["mesh_memory"]
        local = mesh["local"]
        probe_us = probe_cost_us()
        hop_trace.stop()
        windows = [(run.started, run.ended) for run in mesh["runs"]]
        mesh_steps = hop_breakdown.decode_steps(hop_breakdown.load_events(trace_dir), windows)
        finished = True
    finally:
        sampler.stop()
        swarm.stop()
        watchdog.cancel()
        if finished:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            print(f"swarm logs kept in {log_dir}", file=sys.stderr)

    runs: list[TurnResult] = mesh["runs"]
    mesh_rate = statistics.median(decode_rate(run.arrivals) for run in runs)
    local_rate = statistics.median(local["rates"])
    reuse, replay = [r.row() for r in mesh["reuse"]], [r.row() for r in mesh["replay"]]
    pairs = zip(mesh["reuse"], mesh["replay"], strict=True)
    identical = sum(a.done.text == b.done.text for a, b in pairs)
    memory = sampler.snapshot()
    memory["client_incl_local_baseline"] = memory["client"]
    memory["client"] = mesh_memory["client"]  # the local baseline's weights are not the client's
    mesh_tokens = len(runs[0].token_ids)
    report: dict[str, Any] = {
        "model": BUNDLED_MODEL_ID,
        "swarm": f"{len(config.server_spans())} servers, spans {config.server_spans()}",
        "note": f"noisy {os.cpu_count()}-core machine shared by client, servers and local "
        "baseline; ratios are from the same run; one 4-token warm-up turn on each side before "
        "timing",
        "prepare_s": round(prepare_s, 3),
        "prepare_cached": cached,
        "swarm_start_s": round(swarm_start_s, 3),
        "backend_start_s": round(mesh["backend_start_s"], 3),
        "local_load_s": round(local["load_s"], 3),
        "throughput": {
            "measured": f"greedy decode steps only: tokens 2..{mesh_tokens} of one turn after a "
            f"{runs[0].done.prompt_tokens}-token prompt (prefill and first token excluded)",
            "tokens": mesh_tokens,
            "mesh_tokens_per_s": round(mesh_rate, 2),
            "local_tokens_per_s": round(local_rate, 2),
            "mesh_runs": [round(decode_rate(run.arrivals), 2) for run in runs],
            "local_runs": [round(rate, 2) for rate in local["rates"]],
            "ratio_mesh_over_local": ratio(mesh_rate, local_rate),
            "greedy_match": f"{leading_matches(runs[0].token_ids, local['token_ids'])}"
            f"/{mesh_tokens} leading tokens",
        },
        "multi_turn": {
            "turns": args.turns,
            "max_new_tokens": args.tokens,
            "reuse_ttft_ratio": ratio(reuse[-1]["ttft_s"], reuse[0]["ttft_s"]),
            "replay_ttft_ratio": ratio(replay[-1]["ttft_s"], replay[0]["ttft_s"]),
            "reuse_prompt_tokens": sum(row["prompt_tokens"] for row in reuse),
            "replay_prompt_tokens": sum(row["prompt_tokens"] for row in replay),
            "replies_identical": f"{identical}/{args.turns}",
            "reuse": reuse,
            "replay": replay,
        },
        "memory": {
            "groups": memory,
            "client_maxrss_mesh_mib": client_maxrss_mesh,
            "client_maxrss_total_mib": ru_maxrss_mib(),
        },
        "breakdown": build_breakdown(mesh_steps, local["parts"], probe_us),
    }
    tp, mt = report["throughput"], report["multi_turn"]
    report["targets"] = {
        "throughput": tp["ratio_mesh_over_local"] >= TARGETS["throughput_ratio"],
        "throughput_stretch": tp["ratio_mesh_over_local"] >= TARGETS["throughput_stretch_ratio"],
        "reuse_ttft": mt["reuse_ttft_ratio"] <= TARGETS["reuse_ttft_ratio"],
        "replay_grows": mt["replay_ttft_ratio"] > mt["reuse_ttft_ratio"],
        "client_memory": max(client_maxrss_mesh, memory["client"]["rss_mib"])
        <= TARGETS["client_peak_mib"],
    }
    report["total_s"] = round(time.perf_counter() - run_started, 1)
    if not args.json_only:
        print_report(report)
    print("BENCH_JSON " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
