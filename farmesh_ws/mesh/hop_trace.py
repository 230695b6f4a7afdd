"""Timestamps on both sides of every mesh hop, for the benchmark's per-step breakdown.

Off unless started: :func:`install_from_env` starts it in a process when the environment names
a directory in ``FARMESH_HOP_TRACE_DIR`` (the benchmark sets it before starting the swarm, so
``farmesh_ws.swarm_node`` starts it in every server, whose forked connection handlers inherit
it). Each process then appends one JSON line per event to ``<dir>/<pid>.jsonl``. Times are
``time.perf_counter()`` seconds: ``CLOCK_MONOTONIC`` on Linux, so comparable between processes
of one machine. The probes wrap methods and return their results untouched.

Events of one decode step, in order (``node`` is the server's public name):

* client thread: ``emb_start``/``emb_end`` (:meth:`LoadedModel.embed`), ``ses_start``/
  ``ses_end`` (Petals' ``InferenceSession.step``), per server ``cli_step`` (its
  ``_ServerInferenceSession.step`` entered), ``cli_put`` (request serialised, on hivemind's
  event-loop thread), ``cli_got`` (response read from the stream), ``cli_done`` (outputs
  deserialised); then ``head_start``/``head_end`` (:meth:`LoadedModel.logits`) and ``accept``
  (the sampled token reaches :meth:`TurnState.accept`).
* connection handler: ``srv_recv`` (request reached ``rpc_inference``'s step loop),
  ``srv_submit`` (task handed to the task pool), ``srv_result`` (result back in the handler
  process, on its future thread), ``srv_send`` (serialised response leaves ``rpc_inference``).
* server main process: ``rt_load`` (the runtime's prefetch thread took the task from the pool),
  ``rt_start``/``rt_end`` (the blocks' compute, runtime thread).
"""

import functools
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from farmesh_ws.mesh import compat

ENV_VAR = "FARMESH_HOP_TRACE_DIR"
_PATCHED = "_farmesh_hop_trace"
_lock = threading.Lock()
_files: dict[int, Any] = {}
_state: dict[str, Any] = {"dir": None, "node": None}


def trace_dir() -> Path | None:
    """The directory named by ``FARMESH_HOP_TRACE_DIR``, or None when tracing is off."""
    value = os.environ.get(ENV_VAR)
    return Path(value) if value else None


def start(directory: Path, *, node: str | None = None) -> None:
    """Record this process's events into ``directory``; ``node`` names a server's events."""
    directory.mkdir(parents=True, exist_ok=True)
    with _lock:
        _state["dir"], _state["node"] = directory, node


def stop() -> None:
    """Stop recording and close this process's trace files (the probes stay, idle)."""
    with _lock:
        _state["dir"] = None
        for handle in _files.values():
            handle.close()
        _files.clear()


def emit(event: str, **fields: Any) -> None:
    """Append one event of this process; a no-op while tracing is off."""
    if _state["dir"] is None:
        return
    stamp = time.perf_counter()
    pid = os.getpid()
    with _lock:
        directory = _state["dir"]
        if directory is None:
            return
        handle = _files.get(pid)
        if handle is None:
            handle = _files[pid] = (directory / f"{pid}.jsonl").open("a", buffering=1)
        if _state["node"] is not None:
            fields["node"] = _state["node"]
        handle.write(json.dumps({"e": event, "t": stamp, "pid": pid, **fields}) + "\n")


def install_from_env(*, server_node: str | None = None) -> bool:
    """If ``FARMESH_HOP_TRACE_DIR`` is set, install the client probes (or, with
    ``server_node``, a server's) and start recording; returns whether it did."""
    directory = trace_dir()
    if directory is None:
        return False
    if server_node is None:
        install_client_probes()
    else:
        install_server_probes()
    start(directory, node=server_node)
    return True


def _wrap(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    """Replace ``owner.name`` by ``make(original)`` once."""
    original = getattr(owner, name)
    if getattr(original, _PATCHED, False):
        return
    wrapped = functools.wraps(original)(make(original))
    setattr(wrapped, _PATCHED, True)
    setattr(owner, name, wrapped)


def _bracket(before: str, after: str, original: Any) -> Any:
    """A sync method emitting ``before`` and ``after`` around ``original``."""

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        emit(before)
        result = original(self, *args, **kwargs)
        emit(after)
        return result

    return method


def install_client_probes() -> None:
    """Wrap the client-side methods of a decode step (idempotent)."""
    compat.apply()
    from petals.client.inference_session import InferenceSession, _ServerInferenceSession

    from farmesh_ws.mesh.petals_model import LoadedModel
    from farmesh_ws.mesh.petals_turn import TurnState

    def session_step(original: Any) -> Any:
        def step(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            emit("ses_start", tokens=int(inputs.shape[1]))
            outputs = original(self, inputs, *args, **kwargs)
            emit("ses_end")
            return outputs

        return step

    def server_step(original: Any) -> Any:
        def step(self: Any, *args: Any, **kwargs: Any) -> Any:
            span = self.span
            node = getattr(span.server_info, "public_name", None)
            emit("cli_step", node=node, blocks=f"{span.start}:{span.end}")
            outputs = original(self, *args, **kwargs)
            emit("cli_done", node=node)
            return outputs

        return step

    def server_io(original: Any) -> Any:
        async def _step(self: Any, request: Any) -> Any:
            emit("cli_put", request_bytes=request.ByteSize())
            response = await original(self, request)
            emit("cli_got", response_bytes=response.ByteSize())
            return response

        return _step

    def accept(original: Any) -> Any:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            emit("accept")
            return original(self, *args, **kwargs)

        return method

    _wrap(LoadedModel, "embed", functools.partial(_bracket, "emb_start", "emb_end"))
    _wrap(LoadedModel, "logits", functools.partial(_bracket, "head_start", "head_end"))
    _wrap(InferenceSession, "step", session_step)
    _wrap(_ServerInferenceSession, "step", server_step)
    _wrap(_ServerInferenceSession, "_step", server_io)
    _wrap(TurnState, "accept", accept)


def install_server_probes() -> None:
    """Wrap a Petals server's handler and runtime methods (idempotent). Call before the
    server forks its connection handlers."""
    compat.apply()
    from hivemind.moe.server.runtime import Runtime
    from petals.server.handler import TransformerConnectionHandler
    from petals.server.task_pool import PrioritizedTaskPool

    def steps(original: Any) -> Any:
        async def _iterate_inference_steps(self: Any, *args: Any, **kwargs: Any) -> Any:
            async for request, metadata in original(self, *args, **kwargs):
                emit("srv_recv", pushed=bool(metadata.get("pushed")))
                yield request, metadata

        return _iterate_inference_steps

    def inference(original: Any) -> Any:
        # hivemind registers an RPC by its positional parameters: keep (self, requests, context).
        async def rpc_inference(self: Any, requests: Any, context: Any) -> Any:
            async for response in original(self, requests, context):
                emit("srv_send")
                yield response

        return rpc_inference

    def process(original: Any) -> Any:
        def process_batch(self: Any, pool: Any, *args: Any) -> Any:
            emit("rt_start", pool=pool.name)
            result = original(self, pool, *args)
            emit("rt_end", pool=pool.name)
            return result

        return process_batch

    def submit(original: Any) -> Any:
        def submit_task(self: Any, *args: Any, **kwargs: Any) -> Any:
            emit("srv_submit", pool=self.name)
            future = original(self, *args, **kwargs)
            future.add_done_callback(lambda _: emit("srv_result", pool=self.name))
            return future

        return submit_task

    def load(original: Any) -> Any:
        def load_batch_to_runtime(self: Any, *args: Any, **kwargs: Any) -> Any:
            batch = original(self, *args, **kwargs)
            emit("rt_load", pool=self.name)
            return batch

        return load_batch_to_runtime

    _wrap(TransformerConnectionHandler, "_iterate_inference_steps", steps)
    _wrap(TransformerConnectionHandler, "rpc_inference", inference)
    _wrap(Runtime, "process_batch", process)
    _wrap(PrioritizedTaskPool, "submit_task", submit)
    _wrap(PrioritizedTaskPool, "load_batch_to_runtime", load)
