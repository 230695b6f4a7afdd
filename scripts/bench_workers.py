"""Benchmark what a large mesh worker pool costs (issue "Mesh scale and speed", item 2).

Run: ``.venv/bin/python scripts/bench_workers.py [--sessions 32] [--tokens 16] [--rounds 3]
[--parked 256]``

A turn on the Petals backend runs in one worker thread (Petals' client is blocking), so the
pool size (``max_concurrent_turns``) caps the turns a coordinator runs at once. This measures
whether a pool far larger than the CPU count costs anything:

1. Memory of parked workers: ``--parked`` threads of a pool each run a small torch step (an
   embedding lookup and a 576×576 matmul, the bundled model's width) and then wait, as a
   worker waits on the network; the process RSS before and after, per thread (KiB), and the
   CPU the parked threads use over 2 s.
2. Throughput side by side on the local swarm (2 Petals servers, the bundled model): two
   backends in this process, one with the old pool of 8 workers and one with the new default
   (256), take turns (alternating per round) running ``--sessions`` sessions at once, one
   greedy turn of ``--tokens`` tokens each. Aggregate tokens/s (median over rounds), the peak
   of busy workers. On this 2-core machine the servers' compute is the bottleneck, so the
   large pool cannot win here; it must not lose (target: large ÷ small ≥ 0.95). Where steps
   wait on a network instead, ``scripts/bench_scale.py`` shows what the small pool costs.

Prints a table and, last, one ``BENCH_JSON {...}`` line.
"""

import argparse
import asyncio
import concurrent.futures
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from farmesh_ws.core.types import ChatMessage, SamplingParams, TokenEvent
from farmesh_ws.home import farmesh_home
from farmesh_ws.mesh.petals import ModelSpec, PetalsBackend, PetalsBackendConfig
from farmesh_ws.models import BUNDLED_MODEL_ID, dht_prefix_for
from farmesh_ws.models.bundled import prepare_bundled_model
from farmesh_ws.swarm import LocalSwarm, SwarmConfig, read_num_blocks

SMALL_POOL, LARGE_POOL = 8, 256
THROUGHPUT_TARGET = 0.95
PARKED_TARGET_MIB = 32.0
"""All parked workers of the default pool: under 10 % of the 400 MiB that 10,000 idle sessions
may take (README "The socket layer")."""
KIB = 1024


def parked_cost(count: int) -> dict[str, float]:
    """RSS (KiB) per parked worker after one small torch step, and the CPU seconds all of
    them use while parked for 2 s."""
    import torch

    embedding = torch.nn.Embedding(49152, 576)
    weight = torch.randn(576, 576)
    release = threading.Event()
    ready = threading.Barrier(count + 1)

    def work() -> None:
        with torch.inference_mode():
            (embedding(torch.tensor([[1, 2, 3]])) @ weight).sum()
        ready.wait()
        release.wait()

    me = psutil.Process()
    before = me.memory_info().rss
    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(work) for _ in range(count)]
        ready.wait()
        after = me.memory_info().rss
        cpu_start = me.cpu_times()
        time.sleep(2.0)  # measuring idle CPU over a fixed window, not synchronising
        cpu_end = me.cpu_times()
        release.set()
        for future in futures:
            future.result()
    cpu_s = (cpu_end.user + cpu_end.system) - (cpu_start.user + cpu_start.system)
    return {
        "threads": count,
        "rss_per_thread_kib": (after - before) / KIB / count,
        "parked_cpu_s_per_2s": cpu_s,
    }


async def one_round(backend: PetalsBackend, sessions: int, tokens: int) -> float:
    """Open ``sessions`` sessions, run one greedy turn in each at once; aggregate tokens/s."""
    messages = [ChatMessage(role="user", content="Count from 1 to 200, separated by commas.")]
    opened = [await backend.open_session(BUNDLED_MODEL_ID, max_length=256) for _ in range(sessions)]

    async def turn(session: Any) -> int:
        count = 0
        sampling = SamplingParams(max_new_tokens=tokens)
        async for event in session.run_tokens(session.encode_turn(messages), sampling):
            if isinstance(event, TokenEvent):
                count += 1
            elif event.error is not None:
                raise RuntimeError(f"turn failed: {event.error.code}")
        return count

    try:
        started = time.perf_counter()
        generated = await asyncio.gather(*(turn(s) for s in opened))
        elapsed = time.perf_counter() - started
    finally:
        await asyncio.gather(*(s.aclose() for s in opened))
    return sum(generated) / elapsed


async def throughput(args: argparse.Namespace) -> dict[str, Any]:
    model_path = await asyncio.to_thread(prepare_bundled_model, farmesh_home(), progress=False)
    log_dir = Path(tempfile.mkdtemp(prefix="farmesh-bench-workers-"))
    prefix = dht_prefix_for(BUNDLED_MODEL_ID)
    swarm = LocalSwarm(SwarmConfig(model_path, prefix, read_num_blocks(model_path), log_dir))
    backends: dict[int, PetalsBackend] = {}
    try:
        await asyncio.to_thread(swarm.start)
        spec = ModelSpec(BUNDLED_MODEL_ID, model_path, prefix)
        for pool in (SMALL_POOL, LARGE_POOL):
            config = PetalsBackendConfig(
                initial_peers=tuple(swarm.initial_peers), models=(spec,), max_concurrent_turns=pool
            )
            backends[pool] = await PetalsBackend.start(config)
        for backend in backends.values():  # warm-up: first sessions, routes, torch kernels
            await one_round(backend, 2, 4)
        rates: dict[int, list[float]] = {pool: [] for pool in backends}
        for index in range(args.rounds):
            order = (SMALL_POOL, LARGE_POOL) if index % 2 == 0 else (LARGE_POOL, SMALL_POOL)
            for pool in order:
                rates[pool].append(await one_round(backends[pool], args.sessions, args.tokens))
        return {
            str(pool): {
                "tokens_per_s": statistics.median(rates[pool]),
                "rounds": rates[pool],
                "peak_busy_workers": backends[pool].peak_busy_workers,
            }
            for pool in backends
        }
    finally:
        for backend in backends.values():
            await backend.aclose()
        await asyncio.to_thread(swarm.stop)
        shutil.rmtree(log_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parked", type=int, default=LARGE_POOL)
    args = parser.parse_args()

    parked = parked_cost(args.parked)
    pools = asyncio.run(throughput(args))
    ratio = pools[str(LARGE_POOL)]["tokens_per_s"] / pools[str(SMALL_POOL)]["tokens_per_s"]
    parked_mib = parked["rss_per_thread_kib"] * parked["threads"] / KIB
    memory_met = parked_mib <= PARKED_TARGET_MIB
    ratio_met = ratio >= THROUGHPUT_TARGET

    print(f"parked workers: {parked['threads']}")
    print(f"  RSS per parked worker      {parked['rss_per_thread_kib']:8.1f} KiB")
    print(f"  RSS of all parked workers  {parked_mib:8.1f} MiB")
    print(f"  CPU of all parked, per 2 s {parked['parked_cpu_s_per_2s']:8.3f} s")
    print(f"{args.sessions} sessions at once, {args.tokens} tokens each, {args.rounds} rounds:")
    print(f"  {'pool':>6} {'tokens/s':>10} {'peak busy':>10}")
    for pool, row in pools.items():
        print(f"  {pool:>6} {row['tokens_per_s']:10.1f} {row['peak_busy_workers']:10d}")
    print(
        f"  {LARGE_POOL} ÷ {SMALL_POOL}: {ratio:.3f} (target ≥ {THROUGHPUT_TARGET}: "
        f"{'met' if ratio_met else 'missed'}); "
        f"parked ≤ {PARKED_TARGET_MIB:.0f} MiB: {'met' if memory_met else 'missed'}"
    )
    report = {
        "bench": "workers",
        "sessions": args.sessions,
        "tokens": args.tokens,
        "parked": parked,
        "pools": pools,
        "ratio_large_to_small": ratio,
        "ratio_target": THROUGHPUT_TARGET,
        "ratio_met": ratio_met,
        "parked_mib": parked_mib,
        "parked_target_mib": PARKED_TARGET_MIB,
        "parked_met": memory_met,
    }
    print("BENCH_JSON " + json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
