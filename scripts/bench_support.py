"""Helpers of ``scripts/bench_mesh.py``: peak-memory sampling of the swarm's process groups, a
watchdog that stops a hung run, and the per-step breakdown tables. Memory figures are MiB
(2**20 bytes) read with psutil; times are milliseconds unless named otherwise."""

import os
import resource
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from farmesh_ws.core.types import ChatMessage
from farmesh_ws.mesh import hop_breakdown, hop_trace
from farmesh_ws.swarm import LocalSwarm

MIB = 2**20


def _safe(call: Any, default: Any) -> Any:
    """A psutil call on a process that may exit between listing and reading."""
    try:
        return call()
    except psutil.Error:
        return default


class MemorySampler:
    """Background thread keeping the peak RSS (and PSS, every 4th sample) of process groups:
    ``client`` (this process), ``client_helpers`` (its other children), each swarm node."""

    def __init__(self, swarm: LocalSwarm, interval_s: float = 0.5) -> None:
        self._swarm, self._interval_s, self._me = swarm, interval_s, psutil.Process()
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._peaks: dict[str, dict[str, float]] = {}
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {name: dict(peak) for name, peak in self._peaks.items()}

    def _run(self) -> None:
        count = 0
        while not self._stop.is_set():
            for name, processes in self._groups().items():
                self._record(name, processes, with_pss=count % 4 == 0)
            count += 1
            self._stop.wait(self._interval_s)

    def _groups(self) -> dict[str, list[psutil.Process]]:
        nodes = [*self._swarm.servers, *([self._swarm.dht_node] if self._swarm.dht_node else [])]
        names = {node.process.pid: node.name for node in nodes}
        groups: dict[str, list[psutil.Process]] = {"client": [self._me], "client_helpers": []}
        for child in _safe(self._me.children, []):
            tree = [child, *_safe(lambda c=child: c.children(recursive=True), [])]
            if child.pid in names:
                groups[names[child.pid]] = tree
            elif "farmesh_ws.swarm_node" not in " ".join(_safe(child.cmdline, [])):
                groups["client_helpers"].extend(tree)  # (a node not yet listed is skipped)
        return groups

    def _record(self, name: str, processes: list[psutil.Process], *, with_pss: bool) -> None:
        rss = sum(_safe(lambda p=p: p.memory_info().rss, 0) for p in processes)
        pss = (
            sum(_safe(lambda p=p: p.memory_full_info().pss, 0) for p in processes)
            if with_pss
            else 0
        )
        with self._lock:
            peak = self._peaks.setdefault(name, {"rss_mib": 0.0, "pss_mib": 0.0, "procs": 0})
            peak["rss_mib"] = max(peak["rss_mib"], round(rss / MIB, 1))
            peak["pss_mib"] = max(peak["pss_mib"], round(pss / MIB, 1))
            peak["procs"] = max(peak["procs"], len(processes))


def arm_watchdog(swarm: LocalSwarm, timeout_s: float) -> threading.Timer:
    """If the run hangs (a deadlocked Petals client cannot be closed from inside), stop the
    swarm, kill this process's remaining children and exit with status 3."""

    def fire() -> None:
        print(f"bench_mesh: no progress after {timeout_s:.0f} s; stopping", file=sys.stderr)
        try:
            swarm.stop()
        finally:
            for child in _safe(lambda: psutil.Process().children(recursive=True), []):
                _safe(child.kill, None)
            os._exit(3)

    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    timer.start()
    return timer


def ru_maxrss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def probe_cost_us(count: int = 2000) -> float:
    """Mean cost of one trace event in this process, in microseconds (``count`` events)."""
    started = time.perf_counter()
    for _ in range(count):
        hop_trace.emit("probe_cost")
    return round((time.perf_counter() - started) / count * 1e6, 1)


def build_breakdown(
    mesh_steps: list[list[tuple[str, float]]],
    local_steps: list[list[tuple[str, float]]],
    probe_us: float,
) -> dict[str, Any]:
    """The breakdown section of the report: mesh and local decode steps cut into parts
    (ms, mean and median), the servers' compute over the local model body, probe cost."""
    mesh = hop_breakdown.summarise(mesh_steps)
    local = hop_breakdown.summarise(local_steps)
    compute = next((row for row in mesh if row.label == "  of which servers' compute"), None)
    body = next((row for row in local if row.label.startswith("model body")), None)
    hops = sum(row.label.endswith(": server compute") for row in mesh)
    return {
        "mesh_steps": len(mesh_steps),
        "local_steps": len(local_steps),
        "mesh": [asdict(row) for row in mesh],
        "local": [asdict(row) for row in local if not row.label.startswith("  of which")],
        "servers_compute_over_local_body": round(compute.mean_ms / body.mean_ms, 3)
        if compute and body
        else None,
        "probe_us_per_event": probe_us,
        "events_per_mesh_step": 7 + 11 * hops,  # 7 client events + 4 client, 7 server per hop
    }


def print_breakdown(breakdown: dict[str, Any]) -> None:
    """Print the per-step tables of :func:`build_breakdown`."""
    line = "  {:<66} {:>8} {:>8}"
    for title, key, count in (
        ("Mesh decode step", "mesh", "mesh_steps"),
        ("Local decode step, same weights in this process", "local", "local_steps"),
    ):
        print(f"\n{title}, ms over {breakdown[count]} steps of the timed runs (parts add by mean)")
        print(line.format("", "mean", "median"))
        for row in breakdown[key]:
            print(line.format(row["label"], row["mean_ms"], row["median_ms"]))
    print(
        f"\nservers' compute / local model body (means): "
        f"{breakdown['servers_compute_over_local_body']}; probes: "
        f"{breakdown['events_per_mesh_step']} events per mesh step at "
        f"{breakdown['probe_us_per_event']} us each (client-side cost, included above)"
    )


class LocalBaseline:
    """The same weights with plain transformers in this process: greedy, KV cache, one token
    per forward; each decode step's model body and LM head are timed apart (seconds)."""

    def __init__(self, model_path: Path, prompt: list[ChatMessage], warmup_tokens: int) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM

        from farmesh_ws.mesh.chat_turns import ChatTurns

        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.prompt_ids = ChatTurns(tokenizer).first_turn_ids(prompt)
        started = time.perf_counter()
        self._model = LlamaForCausalLM.from_pretrained(str(model_path), torch_dtype=torch.float32)
        self._model.eval()
        self.load_s = time.perf_counter() - started
        self.parts: list[list[tuple[str, float]]] = []
        self.decode(warmup_tokens)
        self.parts.clear()

    def decode(self, count: int) -> tuple[list[int], list[float]]:
        """Greedy ids and their arrival times; adds each decode step's parts to ``parts``."""
        import torch

        model = self._model
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([self.prompt_ids]), use_cache=True)
            ids, stamps = [int(torch.argmax(out.logits[0, -1]).item())], [time.perf_counter()]
            past = out.past_key_values
            while len(ids) < count:
                started = time.perf_counter()
                body = model.model(
                    input_ids=torch.tensor([[ids[-1]]]), past_key_values=past, use_cache=True
                )
                body_end = time.perf_counter()
                ids.append(int(torch.argmax(model.lm_head(body.last_hidden_state)[0, -1]).item()))
                stamps.append(time.perf_counter())
                past = body.past_key_values
                self.parts.append(
                    [
                        ("model body (30 blocks + final norm)", body_end - started),
                        ("LM head + argmax", stamps[-1] - body_end),
                        ("loop between steps", started - stamps[-2]),
                    ]
                )
        return ids, stamps
