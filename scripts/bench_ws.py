"""Benchmark the WebSocket gateway itself: streaming load against a bare-websockets baseline,
idle sessions' memory, and an end-to-end row on the real local swarm.

Run: ``.venv/bin/python scripts/bench_ws.py [--clients 1000] [--tokens 50] [--rate 20]
[--idle 10000] [--skip-e2e]``

Setup: each server under test runs alone in a child process (multiprocessing spawn, stock
asyncio, as in production); this process runs every client (``websockets`` asyncio client), so
server and clients get one of the 2 cores each, identically for the gateway and the baseline.
Everything is on 127.0.0.1; clients negotiate ``--compression`` (default permessage-deflate, as
browsers do). CPU% columns are % of one core; "others" is the rest of the machine meanwhile.

1. Streaming, gateway: GatewayServer + SyntheticBackend (farmesh_ws/mesh/synthetic.py, for
   benchmarks only; ``--tokens`` tokens per turn at ``--rate`` tokens/s). ``--clients``
   connections send ``open`` (at most 100 handshakes in flight); once all are ``opened``, each
   waits a random offset in [0, ``--stagger``) (default 1/rate, so every turn streams at once
   but ticks are not all on the same instant), notes t0 and sends one ``turn``. Token k
   (1-based) is due at t0 + k/rate; **frame delay** = client receive time - due time (so it
   includes the turn frame's trip and both the server's and the client's lateness); **jitter**
   = the same with the schedule anchored at the turn's first token instead of t0 (streaming
   regularity without the start-up latency). Frames/s = token frames received / (last token
   frame - release of the turns). A round during which other processes used more than 20% of
   a core is run again (at most 3 tries); before each, the script waits (``--quiet-wait``) for
   the shared machine to be idle. The gateway child tunes its GC as `farmesh-ws serve` does
   (gateway.tune_gc_for_serving); ``--server-gc`` sets the bare server's thresholds.
2. Baseline: a bare ``websockets`` server in this file sends pre-encoded frames recorded from
   one gateway turn (V1Session + engine + SyntheticBackend), i.e. the same opened / token / done /
   contribution frames, token k at turn start + k/rate. Same clients, same measures.
   Gateway and baseline alternate for ``--rounds`` rounds (rotating the order); medians.
   Identity and admission, side by side in the same rounds: "gateway" is the production setup
   (every client presents an API key checked in a SQLite ledger, caps and the per-principal
   rate limit apply, and each turn takes a prepaid hold on the key's wallet in that ledger
   before its first token); "gateway_noholds" the same without balances; "gateway_noauth" the
   gateway with ``auth = off`` and no balances. auth_ratio = gateway_noholds / gateway_noauth
   frames/s (identity and admission), prepaid_ratio = gateway / gateway_noauth (with holds).
3. Idle sessions: the gateway in a child process; ``--idle`` clients connect and ``open``, in
   steps of ``--idle-step``; server RSS (psutil) after a 20-session warm-up and after each
   step. RLIMIT_NOFILE is raised to the hard limit; if a step fails, the largest number of
   sessions reached and the first error are reported.
4. End to end (unless ``--skip-e2e``): the real local swarm (2 Petals servers) and the real
   PetalsBackend behind a GatewayServer in this process. The same greedy turn of
   ``--e2e-tokens`` tokens runs over WebSocket and through ``session.run_tokens`` directly,
   interleaved A/B ``--e2e-pairs`` times on fresh sessions after one full-length warm-up turn
   on each path. tokens/s = completion tokens / (done - turn sent); "decode" = tokens 2..n /
   (last - first token). Medians.

``--kinds`` picks the servers (default all four); ratios are taken round by round between
servers that ran side by side (median, min, max); "CPU us/fr" is the server's CPU time per token
frame delivered; bytes per token frame are computed from the recorded frames with the gateway's
and websockets' default deflate settings. ``--gateway-compression``,
``--gateway-deflate-window-bits``, ``--gateway-deflate-mem-level`` and ``--gateway-setting
NAME=VALUE`` change the gateway's settings (ws_bench_support.py). Targets (issue 13): frames/s
≥ 0.95x and p99 ≤ 2x the bare server's, 10,000 idle sessions ≤ 400 MiB above the base.

Prints a table and, last, one ``BENCH_JSON {...}`` line.
"""

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode
from ws_bench_support import (
    DONE_PREFIX,
    HANDSHAKES_IN_FLIGHT,
    MIB,
    OPEN,
    TOKEN_PREFIX,
    CpuMeter,
    ServerChild,
    add_client_options,
    add_gateway_options,
    arm_watchdog,
    close_all,
    gateway_frames,
    gateway_overrides,
    open_session,
    quiet_machine,
    raise_fd_limit,
    turn_frame,
)

from farmesh_ws.config import Settings
from farmesh_ws.mesh.status import MeshStatusCache
from farmesh_ws.metrics import Metrics
from farmesh_ws.transport.ws import GatewayServer

MAX_OTHERS_CPU_PCT = 20.0
E2E_PROMPT = "Write a long story about a lighthouse keeper."
TARGETS = {  # issue 13 items 4 and 5; the auth and e2e rows from issues 9 and 1
    "frames_ratio": 0.95,
    "p99_ratio": 2.0,
    "auth_ratio": 0.98,
    "idle_10k_mib": 400.0,
    "e2e_ratio": 0.97,
}


# --- clients (this process) --------------------------------------------------------------------


async def one_turn(
    ws: ClientConnection, offset: float, args: argparse.Namespace
) -> tuple[list[float], float, bool]:
    """Send the turn after ``offset`` s. Returns (each token frame's delay, the last token
    frame's arrival, whether a done frame and then a contribution with nodes arrived)."""
    await asyncio.sleep(offset)
    t0 = time.perf_counter()
    await ws.send(turn_frame(args.tokens))
    delays: list[float] = []
    last = t0
    while True:
        frame = await ws.recv()
        now = time.perf_counter()
        if isinstance(frame, str) and frame.startswith(TOKEN_PREFIX):
            delays.append(now - t0 - (len(delays) + 1) / args.rate)
            last = now
        elif isinstance(frame, str) and frame.startswith(DONE_PREFIX):
            report = json.loads(await ws.recv())
            return delays, last, report["type"] == "contribution" and bool(report["nodes"])
        else:
            raise RuntimeError(f"unexpected frame {frame!r}")


def quantile_ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(1000 * ordered[max(0, math.ceil(q * len(ordered)) - 1)], 2)


def wire_bytes(frames: list[str], extension: PerMessageDeflate | None) -> float:
    """Mean payload bytes of the token frames ``frames[1:-2]`` once ``extension`` compressed
    them in order on one connection (after the ``opened`` frame), as the server sends them."""
    sizes = []
    for index, text in enumerate(frames[:-2]):
        frame = Frame(Opcode.TEXT, text.encode())
        size = len(frame.data if extension is None else extension.encode(frame).data)
        if index:
            sizes.append(size)
    return round(statistics.mean(sizes), 1)


async def token_frame_bytes(args: argparse.Namespace) -> dict[str, float]:
    """Bytes on the wire per token frame: uncompressed, as the gateway's settings compress
    them, and as the bare server (websockets' default deflate) does."""
    frames = await gateway_frames(args.tokens)
    settings = replace(Settings(), **gateway_overrides(args))
    stateless = settings.ws_compression == "stateless"
    bits = settings.ws_deflate_window_bits
    mem = {"memLevel": settings.ws_deflate_mem_level}
    gateway = (
        None
        if settings.ws_compression == "off"
        else PerMessageDeflate(True, stateless, bits, bits, mem)
    )
    return {
        "uncompressed": wire_bytes(frames, None),
        "gateway": wire_bytes(frames, gateway),
        "bare": wire_bytes(frames, PerMessageDeflate(False, False, 12, 12, {"memLevel": 5})),
    }


async def streaming(kind: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    busy_before = await quiet_machine(args.quiet_wait)
    server = ServerChild(kind, args)
    sockets: list[ClientConnection] = []
    try:
        gate = asyncio.Semaphore(HANDSHAKES_IN_FLIGHT)
        opens = [open_session(server, gate, args) for _ in range(args.clients)]
        sockets = await asyncio.wait_for(asyncio.gather(*opens), 300)
        rng = random.Random(seed)
        cpu, released = CpuMeter(server.ps), time.perf_counter()
        turns = [one_turn(ws, rng.uniform(0, args.stagger), args) for ws in sockets]
        results = await asyncio.wait_for(asyncio.gather(*turns), 60 + 4 * args.tokens / args.rate)
        wall = max(last for _, last, _ in results) - released
        cpu_pct = cpu.percent(wall)
    finally:
        await close_all(sockets)
        server.close()
    delays = [delay for turn, _, _ in results for delay in turn]
    jitter = [delay - turn[0] for turn, _, _ in results for delay in turn]
    return {
        "frames_per_s": round(len(delays) / wall, 1),
        "p50_ms": quantile_ms(delays, 0.50),
        "p99_ms": quantile_ms(delays, 0.99),
        "max_ms": quantile_ms(delays, 1.0),
        "jitter_p99_ms": quantile_ms(jitter, 0.99),
        "complete": sum(len(turn) == args.tokens and ok for turn, _, ok in results),
        "server_cpu_us_per_frame": round(1e6 * cpu_pct.pop("server_cpu_s") / len(delays), 1),
        **cpu_pct,
        "machine_busy_before_pct": busy_before,
    }


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    summary = {key: round(statistics.median(r[key] for r in rounds), 2) for key in rounds[0]}
    summary["rounds"] = {key: [r[key] for r in rounds] for key in ("frames_per_s", "p99_ms")}
    return summary


async def idle_sessions(args: argparse.Namespace) -> dict[str, Any]:
    server = ServerChild("gateway", args)
    gate = asyncio.Semaphore(HANDSHAKES_IN_FLIGHT)
    sockets: list[ClientConnection] = []
    steps: list[tuple[int, float]] = []
    error: str | None = None
    try:
        warm_up = [open_session(server, gate, args) for _ in range(20)]
        await close_all(await asyncio.gather(*warm_up))
        await asyncio.sleep(1.0)
        base = server.ps.memory_info().rss / MIB
        started = time.perf_counter()
        while len(sockets) < args.idle and error is None:
            batch = min(args.idle_step, args.idle - len(sockets))
            opens = [open_session(server, gate, args) for _ in range(batch)]
            results = await asyncio.wait_for(asyncio.gather(*opens, return_exceptions=True), 300)
            sockets += [ws for ws in results if isinstance(ws, ClientConnection)]
            failures = [exc for exc in results if isinstance(exc, BaseException)]
            if failures:
                error = f"{len(failures)} of {batch} failed, first: {failures[0]!r}"
            await asyncio.sleep(0.5)
            steps.append((len(sockets), round(server.ps.memory_info().rss / MIB, 1)))
        open_s = time.perf_counter() - started
    finally:
        await close_all(sockets)
        server.close()
    grown = steps[-1][1] - base if steps else 0.0
    return {
        "requested": args.idle,
        "reached": len(sockets),
        "error": error,
        "base_rss_mib": round(base, 1),
        "increase_mib": round(grown, 1),
        "per_1000_mib": round(grown * 1000 / len(sockets), 1) if sockets else None,
        "open_s": round(open_s, 1),
        "steps": steps,
    }


# --- end to end (real swarm, real backend) -----------------------------------------------------


def rates(tokens: int, t0: float, arrivals: list[float]) -> tuple[int, float, float]:
    """(tokens, tokens per second of the whole turn, decode tokens per second)."""
    end, first, last = time.perf_counter(), arrivals[0], arrivals[-1]
    return tokens, tokens / (end - t0), (len(arrivals) - 1) / (last - first)


async def ws_turn(url: str, tokens: int, index: int) -> tuple[int, float, float]:
    """One greedy turn over WebSocket on a fresh connection and session."""
    async with connect(url, proxy=None) as ws:
        await ws.send(OPEN)
        await asyncio.wait_for(ws.recv(), 60)
        t0, arrivals = time.perf_counter(), []
        await ws.send(turn_frame(tokens, f"e{index}", E2E_PROMPT))
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 120))
            if frame["type"] == "token":
                arrivals.append(time.perf_counter())
            elif frame["type"] == "done":
                return rates(frame["usage"]["completion_tokens"], t0, arrivals)
            else:
                raise RuntimeError(f"unexpected frame {frame}")


async def mesh_turn(backend: Any, tokens: int) -> tuple[int, float, float]:
    """The same turn through ``session.run_tokens`` in this process, on a fresh session."""
    from farmesh_ws.core.types import ChatMessage, SamplingParams, TokenEvent

    session = await backend.open_session(backend.model_ids[0], max_length=2048)
    try:
        t0, arrivals = time.perf_counter(), []
        messages = [ChatMessage(role="user", content=E2E_PROMPT)]
        token_ids = session.encode_turn(messages)
        turn = session.run_tokens(token_ids, SamplingParams(max_new_tokens=tokens)).__aiter__()
        while True:
            event = await asyncio.wait_for(turn.__anext__(), 120)
            if isinstance(event, TokenEvent):
                arrivals.append(time.perf_counter())
            elif event.error is not None:
                raise RuntimeError(f"mesh turn failed: {event.error.code}")
            else:
                return rates(event.completion_tokens, t0, arrivals)
    finally:
        await session.aclose()


async def end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    from farmesh_ws.home import farmesh_home
    from farmesh_ws.mesh.petals import ModelSpec, PetalsBackend, PetalsBackendConfig
    from farmesh_ws.models import BUNDLED_MODEL_ID, dht_prefix_for
    from farmesh_ws.models.bundled import prepare_bundled_model
    from farmesh_ws.swarm import LocalSwarm, SwarmConfig, read_num_blocks

    logging.getLogger("websockets").setLevel(logging.WARNING)  # hivemind turns INFO on
    await quiet_machine(args.quiet_wait)
    model_path = await asyncio.to_thread(prepare_bundled_model, farmesh_home(), progress=False)
    log_dir = Path(tempfile.mkdtemp(prefix="farmesh-bench-ws-"))
    prefix = dht_prefix_for(BUNDLED_MODEL_ID)
    swarm = LocalSwarm(SwarmConfig(model_path, prefix, read_num_blocks(model_path), log_dir))
    runs: dict[str, list[tuple[int, float, float]]] = {"ws": [], "mesh": []}
    async with contextlib.AsyncExitStack() as cleanup:  # runs in reverse order, always
        cleanup.callback(shutil.rmtree, log_dir, ignore_errors=True)
        cleanup.push_async_callback(asyncio.to_thread, swarm.stop)
        await asyncio.to_thread(swarm.start)
        spec = ModelSpec(BUNDLED_MODEL_ID, model_path, prefix)
        config = PetalsBackendConfig(initial_peers=tuple(swarm.initial_peers), models=(spec,))
        backend = await PetalsBackend.start(config)
        cleanup.push_async_callback(backend.aclose)
        status = MeshStatusCache(backend.model_ids, backend.coverage, refresh_s=60.0)
        await status.refresh()
        settings = replace(Settings(port=0), idle_timeout_s=600.0)
        gateway = GatewayServer(settings, backend, status, Metrics())
        await gateway.start()
        cleanup.push_async_callback(gateway.shutdown)
        url = f"ws://127.0.0.1:{gateway.port}/ws"
        await ws_turn(url, args.e2e_tokens, -1)  # full-length warm-up, both paths
        await mesh_turn(backend, args.e2e_tokens)
        for pair in range(args.e2e_pairs):
            for side in ("ws", "mesh") if pair % 2 == 0 else ("mesh", "ws"):
                if side == "ws":
                    runs[side].append(await ws_turn(url, args.e2e_tokens, pair))
                else:
                    runs[side].append(await mesh_turn(backend, args.e2e_tokens))
    report: dict[str, Any] = {"tokens": [r[0] for r in runs["ws"] + runs["mesh"]]}
    for side, rows in runs.items():
        report[f"{side}_tokens_per_s"] = round(statistics.median(r[1] for r in rows), 2)
        report[f"{side}_decode_tokens_per_s"] = round(statistics.median(r[2] for r in rows), 2)
        report[f"{side}_runs"] = [round(r[1], 2) for r in rows]
    report["ratio"] = round(report["ws_tokens_per_s"] / report["mesh_tokens_per_s"], 3)
    decode = report["ws_decode_tokens_per_s"] / report["mesh_decode_tokens_per_s"]
    report["decode_ratio"] = round(decode, 3)
    return report


# --- main ----------------------------------------------------------------------------------------


def paired(
    rounds: dict[str, list[dict[str, Any]]], top: str, bottom: str, key: str
) -> dict[str, Any] | None:
    """``top`` ÷ ``bottom`` of ``key`` round by round (the two ran side by side): median,
    lowest, highest and each round's; None unless both ran."""
    if not rounds.get(top) or not rounds.get(bottom):
        return None
    each = [round(a[key] / b[key], 3) for a, b in zip(rounds[top], rounds[bottom], strict=True)]
    return {
        "median": round(statistics.median(each), 3),
        "min": min(each),
        "max": max(each),
        "rounds": each,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    kinds = args.kinds
    rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for index in range(args.rounds):
        shift = index % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            for attempt in range(1, 4):  # a round other processes disturbed is run again
                result = {**await streaming(kind, args, seed=index), "attempts": attempt}
                if result["others_cpu_pct"] <= MAX_OTHERS_CPU_PCT:
                    break
            rounds[kind].append(result)
    report: dict[str, Any] = {kind: medians(rounds[kind]) for kind in kinds}
    for name, top, bottom, key in (
        ("frames_ratio", "gateway", "bare", "frames_per_s"),
        ("p99_ratio", "gateway", "bare", "p99_ms"),
        ("noauth_frames_ratio", "gateway_noauth", "bare", "frames_per_s"),
        ("noauth_p99_ratio", "gateway_noauth", "bare", "p99_ms"),
        ("cpu_per_frame_ratio", "gateway", "bare", "server_cpu_us_per_frame"),
        ("auth_ratio", "gateway_noholds", "gateway_noauth", "frames_per_s"),
        ("prepaid_ratio", "gateway", "gateway_noauth", "frames_per_s"),
    ):
        report[name] = paired(rounds, top, bottom, key)
    report["token_frame_bytes"] = await token_frame_bytes(args)
    report["idle"] = await idle_sessions(args) if args.idle > 0 else None
    report["e2e"] = None if args.skip_e2e else await end_to_end(args)
    return report


def print_table(report: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\nSetup: {report['setup']}")
    print(
        f"\nStreaming: {args.clients} clients x {args.tokens} tokens at {args.rate:g} tokens/s "
        f"(offered {args.clients * args.rate:.0f} frames/s); medians of {args.rounds} rounds"
    )
    line = "{:<15}{:>10}{:>9}{:>9}{:>9}{:>12}{:>10}{:>12}  {}"
    titles = ("frames/s", "p50 ms", "p99 ms", "max ms", "jitter p99", "complete", "CPU us/fr")
    print(line.format("server", *titles, "CPU% server/client/others"))
    for name in args.kinds:
        row = report[name]
        keys = ("frames_per_s", "p50_ms", "p99_ms", "max_ms", "jitter_p99_ms", "complete")
        cpu = "/".join(f"{row[k + '_cpu_pct']:.0f}" for k in ("server", "client", "others"))
        print(line.format(name, *(row[k] for k in keys), row["server_cpu_us_per_frame"], cpu))
    print("ratios side by side, per round (median [min-max]):")
    for name in (
        "frames_ratio",
        "p99_ratio",
        "cpu_per_frame_ratio",
        "noauth_frames_ratio",
        "noauth_p99_ratio",
        "auth_ratio",
        "prepaid_ratio",
    ):
        if ratio := report[name]:
            print(f"  {name:<22} {ratio['median']} [{ratio['min']}-{ratio['max']}]")
    wire = report["token_frame_bytes"]
    print(
        f"bytes per token frame: {wire['uncompressed']} uncompressed, {wire['gateway']} "
        f"gateway's settings, {wire['bare']} websockets' default deflate (bare)"
    )
    if idle := report["idle"]:
        print(
            f"\nIdle sessions: {idle['reached']}/{idle['requested']} opened in {idle['open_s']} s;"
            f" server RSS {idle['base_rss_mib']} + {idle['increase_mib']} MiB"
            f" = {idle['per_1000_mib']} MiB per 1000 sessions; error: {idle['error']}"
        )
        print("  sessions: RSS MiB  " + ", ".join(f"{n}: {rss}" for n, rss in idle["steps"]))
    if e2e := report["e2e"]:
        print(f"\nEnd to end, {args.e2e_tokens} greedy tokens, {args.e2e_pairs} A/B pairs:")
        for side, name in (("ws", "WebSocket"), ("mesh", "in-process")):
            rate, decode = e2e[f"{side}_tokens_per_s"], e2e[f"{side}_decode_tokens_per_s"]
            print(f"  {name:<11} {rate} tokens/s (decode {decode}); runs {e2e[side + '_runs']}")
        print(f"  ratio WebSocket/in-process {e2e['ratio']} (decode {e2e['decode_ratio']})")
    print(f"\nTargets {TARGETS}\nmet: {report['targets']}; total {report['total_s']} s")
    if "gateway" in report and "bare" in report and report["targets"]["p99_ratio"] is False:
        gateway, bare = report["gateway"], report["bare"]
        busy = gateway["server_cpu_pct"] >= 90
        print(
            f"where the time goes: the gateway's server used {gateway['server_cpu_pct']:.0f} % "
            f"of a core at {gateway['server_cpu_us_per_frame']} us CPU per frame against the "
            f"bare server's {bare['server_cpu_us_per_frame']} us: "
            + (
                "CPU-bound, frames queue behind the work"
                if busy
                else "not CPU-bound: look for loop stalls (GC pauses, long callbacks)"
            )
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000, help="streaming clients")
    parser.add_argument("--tokens", type=int, default=50, help="tokens per streamed turn")
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s of each turn")
    parser.add_argument("--stagger", type=float, help="turn start spread, s (default 1/rate)")
    parser.add_argument("--rounds", type=int, default=3, help="gateway/bare alternations")
    parser.add_argument("--idle", type=int, default=10_000, help="idle sessions (0: skip)")
    parser.add_argument("--idle-step", type=int, default=1000, help="read RSS every N sessions")
    add_client_options(parser)
    add_gateway_options(parser)
    parser.add_argument(
        "--kinds",
        type=lambda text: tuple(text.split(",")),
        default=("gateway", "gateway_noholds", "gateway_noauth", "bare"),
        help="servers to run side by side, comma-separated",
    )
    parser.add_argument("--skip-e2e", action="store_true", help="skip the real-swarm row")
    parser.add_argument("--e2e-tokens", type=int, default=64)
    parser.add_argument("--e2e-pairs", type=int, default=4)
    parser.add_argument("--quiet-wait", type=float, default=120.0, help="see quiet_machine")
    parser.add_argument(
        "--server-gc",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        default=(),
        help="gc.set_threshold in the bare server, e.g. 50000,20,100 (default: Python's)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="watchdog, s")
    args = parser.parse_args()
    args.stagger = 1 / args.rate if args.stagger is None else args.stagger
    started = time.perf_counter()
    fd_limit = raise_fd_limit()
    watchdog = arm_watchdog(args.timeout)
    try:
        report = asyncio.run(run(args))
    finally:
        watchdog.cancel()
    report["setup"] = (
        f"servers in a child process, clients in this one; {os.cpu_count()} cores; stock "
        f"asyncio; loopback; clients offer compression={args.compression}; gateway "
        f"{gateway_overrides(args) or 'defaults'}; fd limit {fd_limit}; "
        f"server gc thresholds {args.server_gc or gc.get_threshold()}; load average before "
        f"{os.getloadavg()[0]:.2f} (1 min), after the run see total_s"
    )
    idle, e2e = report["idle"], report["e2e"]

    def met(name: str, higher: bool) -> bool | None:
        ratio = report[name]
        if ratio is None:
            return None
        return ratio["median"] >= TARGETS[name] if higher else ratio["median"] <= TARGETS[name]

    report["targets"] = {
        "frames_ratio": met("frames_ratio", True),
        "p99_ratio": met("p99_ratio", False),
        "auth_ratio": met("auth_ratio", True),
        "idle_10k": None
        if not idle or idle["error"] or idle["reached"] < 10_000
        else idle["increase_mib"] <= TARGETS["idle_10k_mib"],
        "e2e_ratio": None if not e2e else e2e["ratio"] >= TARGETS["e2e_ratio"],
    }
    report["total_s"] = round(time.perf_counter() - started, 1)
    print_table(report, args)
    print("BENCH_JSON " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
