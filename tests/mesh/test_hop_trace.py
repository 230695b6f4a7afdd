"""The benchmark's timing probes: greedy output unchanged, events recorded, RPCs still register."""

from pathlib import Path
from typing import Any

from farmesh_ws.core.types import ChatMessage, SamplingParams, TokenEvent, TurnDone
from farmesh_ws.mesh import hop_breakdown, hop_trace
from farmesh_ws.models import BUNDLED_MODEL_ID

GREEDY_48 = SamplingParams(max_new_tokens=48)


async def _greedy_ids(backend: Any, messages: list[ChatMessage]) -> list[int]:
    session = await backend.open_session(BUNDLED_MODEL_ID, max_length=512)
    try:
        ids: list[int] = []
        async for event in session.run_tokens(session.encode_turn(messages), GREEDY_48):
            if isinstance(event, TokenEvent):
                ids.append(event.token_id)
            elif isinstance(event, TurnDone):
                assert event.error is None
        return ids
    finally:
        await session.aclose()


async def test_probes_record_every_step_and_leave_greedy_output_unchanged(
    backend: Any, golden: dict[str, Any], tmp_path: Path
) -> None:
    first = golden["conversations"][0][0]
    messages = [ChatMessage(role=m["role"], content=m["content"]) for m in first["new_messages"]]
    plain = await _greedy_ids(backend, messages)

    hop_trace.install_client_probes()
    hop_trace.start(tmp_path)
    try:
        traced = await _greedy_ids(backend, messages)
    finally:
        hop_trace.stop()
    recorded = hop_breakdown.load_events(tmp_path)
    await _greedy_ids(backend, messages)

    assert traced == plain == first["greedy_48_ids"]
    events = hop_breakdown.load_events(tmp_path)
    assert events == recorded  # stopped: the untraced turn wrote nothing
    names = [event["e"] for event in events]
    assert names.count("emb_start") == names.count("accept") == len(traced)
    assert names.count("cli_step") == names.count("cli_done") == 2 * len(traced)  # 2 servers
    assert {e["blocks"] for e in events if e["e"] == "cli_step"} == {"0:15", "15:30"}


def test_server_probes_keep_rpc_inference_registrable() -> None:
    hop_trace.install_server_probes()  # applies the compat fixes Petals needs to import
    from hivemind.proto import runtime_pb2
    from petals.server.handler import TransformerConnectionHandler

    fresh = type("ProbedHandler", (TransformerConnectionHandler,), {"_rpc_handlers": None})
    fresh._collect_rpc_handlers()

    handlers = {handler.method_name: handler for handler in fresh._rpc_handlers}
    inference = handlers["rpc_inference"]
    assert inference.request_type is runtime_pb2.ExpertRequest
    assert inference.stream_input
    assert inference.stream_output
    assert getattr(TransformerConnectionHandler.rpc_inference, "_farmesh_hop_trace", False)


def test_tracing_is_off_without_the_environment_variable(monkeypatch: Any) -> None:
    monkeypatch.delenv(hop_trace.ENV_VAR, raising=False)
    assert hop_trace.install_from_env() is False
    assert hop_trace.trace_dir() is None


def test_task_pool_probes_record_the_hand_off_and_pass_tasks_through(tmp_path: Path) -> None:
    hop_trace.install_server_probes()
    import torch
    from petals.server.task_pool import PrioritizedTaskPool

    pool = PrioritizedTaskPool(lambda *args: args, max_batch_size=16, name="probe_pool")
    pool.start()
    hop_trace.start(tmp_path, node="n0")
    try:
        future = pool.submit_task(torch.ones(1, 1, 4))
        _, batch = pool.load_batch_to_runtime()
        # In a server the runtime answers from another process; here the origin sets it.
        future.set_result([batch[0] * 2])
    finally:
        hop_trace.stop()
        pool.shutdown()
        pool.join()

    assert torch.equal(future.result()[0], torch.full((1, 1, 4), 2.0))
    events = hop_breakdown.load_events(tmp_path)
    assert [e["e"] for e in events] == ["srv_submit", "rt_load", "srv_result"]
    assert {e["node"] for e in events} == {"n0"}
