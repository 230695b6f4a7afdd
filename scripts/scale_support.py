"""Helpers of ``scripts/bench_scale.py``: the coordinator (a gateway over a PetalsBackend for
the tiny model) in a child process, the WebSocket clients of one phase, and the figures of a
phase. Times are seconds unless named ``_ms``; memory is MiB (2**20 bytes, psutil)."""

import asyncio
import contextlib
import json
import logging
import multiprocessing
import statistics
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import ClientConnection, connect
from ws_bench_support import gateway_settings

from farmesh_ws.models.tiny import TINY_MODEL_ID

MIB = 2**20
OPENS_IN_FLIGHT = 32


@dataclass(frozen=True, slots=True)
class CoordinatorSpec:
    """What the coordinator child serves: the tiny model folder and its swarm, ``pool``
    mesh worker threads (``max_concurrent_turns``), sessions of at most ``max_length``."""

    model_path: Path
    dht_prefix: str
    initial_peers: tuple[str, ...]
    pool: int
    max_length: int
    tokens: int


async def _coordinate(spec: CoordinatorSpec, pipe: Connection) -> None:
    from farmesh_ws.gateway import tune_gc_for_serving
    from farmesh_ws.mesh.petals import ModelSpec, PetalsBackend, PetalsBackendConfig
    from farmesh_ws.mesh.status import MeshStatusCache
    from farmesh_ws.metrics import Metrics
    from farmesh_ws.models.generation import recommended_sampling
    from farmesh_ws.transport.ws import GatewayServer

    stop = asyncio.Event()
    asyncio.get_running_loop().add_reader(pipe.fileno(), stop.set)
    model = ModelSpec(TINY_MODEL_ID, spec.model_path, spec.dht_prefix)
    config = PetalsBackendConfig(
        initial_peers=spec.initial_peers,
        models=(model,),
        max_concurrent_turns=spec.pool,
        max_session_length=spec.max_length,
    )
    async with contextlib.AsyncExitStack() as stack:
        backend = await PetalsBackend.start(config)
        stack.push_async_callback(backend.aclose)
        logging.getLogger().setLevel(logging.WARNING)  # hivemind set INFO on the root logger
        status = MeshStatusCache(backend.model_ids, backend.coverage, refresh_s=60.0)
        await status.refresh()
        settings = replace(
            gateway_settings(spec.tokens, auth=False),
            default_model_id=TINY_MODEL_ID,
            default_max_length=spec.max_length,
            max_length_limit=spec.max_length,
        )
        generation = {TINY_MODEL_ID: recommended_sampling(spec.model_path)}
        gateway = GatewayServer(settings, backend, status, Metrics(), generation=generation)
        await gateway.start()
        stack.push_async_callback(gateway.shutdown)
        tune_gc_for_serving()  # as `farmesh-ws serve` does once it is up
        pipe.send(gateway.port)
        await stop.wait()


def _coordinator_main(spec: CoordinatorSpec, pipe: Connection) -> None:
    asyncio.run(_coordinate(spec, pipe))


class Coordinator:
    """The gateway + PetalsBackend in a spawned child; ``url`` once it listens."""

    def __init__(self, spec: CoordinatorSpec) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child_end = context.Pipe()
        self.process = context.Process(target=_coordinator_main, args=(spec, child_end))
        self.process.start()
        if not self._pipe.poll(240):
            self.close()
            raise RuntimeError("the coordinator did not start in 240 s")
        self.url = f"ws://127.0.0.1:{self._pipe.recv()}/ws"
        self.ps = psutil.Process(self.process.pid)

    def usage(self) -> dict[str, float]:
        """CPU seconds (user + system) of the coordinator process and of its helper
        children (hivemind's DHT process, p2pd), and the process's RSS in MiB."""
        helpers = 0.0
        for child in self.ps.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                helpers += sum(child.cpu_times()[:2])
        return {
            "cpu_s": sum(self.ps.cpu_times()[:2]),
            "helpers_cpu_s": helpers,
            "rss_mib": self.ps.memory_info().rss / MIB,
        }

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._pipe.send("stop")
        self.process.join(60)
        if self.process.is_alive():
            for child in self.ps.children(recursive=True) if self.process.pid else []:
                with contextlib.suppress(psutil.Error):
                    child.kill()
            self.process.kill()
            self.process.join(5)


def tree_cpu_s(pids: list[int]) -> dict[str, float]:
    """CPU seconds of processes and all their descendants (swarm servers' trees), as
    ``python`` (Petals' main process, connection handlers) and ``p2pd`` (libp2p daemons)."""
    total = {"python": 0.0, "p2pd": 0.0}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    kind = "p2pd" if proc.name().startswith("p2pd") else "python"
                    total[kind] += sum(proc.cpu_times()[:2])
    return total


def machine_busy_s() -> float:
    times = psutil.cpu_times()
    return float(times.user + times.nice + times.system)


@dataclass(slots=True)
class SessionResult:
    """One session's turn: token arrival times (perf_counter s) and how it ended."""

    arrivals: list[float] = field(default_factory=list)
    finish: str = ""


async def _open(url: str, gate: asyncio.Semaphore, max_length: int) -> ClientConnection:
    async with gate:
        ws = await connect(url, proxy=None, open_timeout=120, ping_interval=None)
        await ws.send(json.dumps({"type": "open", "max_length": max_length}))
        opened = json.loads(await asyncio.wait_for(ws.recv(), 120))
    if opened.get("type") != "opened":
        raise RuntimeError(f"open failed: {opened}")
    return ws


async def _turn(ws: ClientConnection, index: int, tokens: int) -> SessionResult:
    text = f"Session {index}: tell me a long story about the sea."
    await ws.send(
        json.dumps({"type": "turn", "request_id": "t1", "text": text, "max_new_tokens": tokens})
    )
    result = SessionResult()
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 300))
        if frame["type"] == "token":
            result.arrivals.append(time.perf_counter())
        elif frame["type"] == "done":
            result.finish = str(frame["finish_reason"])
            return result
        elif frame["type"] == "error":
            raise RuntimeError(f"session {index}: {frame}")


async def run_sessions(
    url: str, sessions: int, tokens: int, max_length: int
) -> tuple[float, list[SessionResult], Any]:
    """Open ``sessions`` chat sessions, then run one turn of ``tokens`` greedy tokens in each
    at once. Returns (the time the turns were sent, each session's result, a closer)."""
    gate = asyncio.Semaphore(OPENS_IN_FLIGHT)
    sockets = await asyncio.gather(*(_open(url, gate, max_length) for _ in range(sessions)))
    started = time.perf_counter()
    results = await asyncio.gather(*(_turn(ws, i, tokens) for i, ws in enumerate(sockets)))

    async def close() -> None:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)

    return started, list(results), close


def phase_figures(started: float, results: list[SessionResult]) -> dict[str, Any]:
    """Tokens, wall time (turns sent → last token), aggregate tokens/s, inter-token delays
    (ms, p50/p99 over every consecutive pair of every session) and time to first token."""
    tokens = sum(len(result.arrivals) for result in results)
    ended = max(result.arrivals[-1] for result in results if result.arrivals)
    gaps = sorted(
        (later - earlier) * 1000
        for result in results
        for earlier, later in zip(result.arrivals, result.arrivals[1:], strict=False)
    )
    firsts = sorted(result.arrivals[0] - started for result in results if result.arrivals)
    return {
        "tokens": tokens,
        "wall_s": round(ended - started, 3),
        "tokens_per_s": round(tokens / (ended - started), 2),
        "itl_p50_ms": round(_quantile(gaps, 0.5), 1),
        "itl_p99_ms": round(_quantile(gaps, 0.99), 1),
        "ttft_p50_s": round(statistics.median(firsts), 3),
        "ttft_max_s": round(firsts[-1], 3),
        "finishes": sorted({result.finish for result in results}),
    }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]
