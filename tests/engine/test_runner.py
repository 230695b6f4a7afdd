"""The request engine's rules, through protocol v1 on the scripted mesh (milliseconds each)."""

import asyncio
from decimal import Decimal

from farmesh_ws.engine.events import RequestFinished, RequestStarted, TokensDelivered
from farmesh_ws.mesh.fake import FakeBackend
from tests.engine.support import PRICE, harness, release


async def test_a_turn_streams_settles_once_and_reports_to_observers() -> None:
    h = harness(FakeBackend(reply="Hi there"))
    await h.send({"type": "open", "user_wallet": "w1"})
    await h.send({"type": "turn", "request_id": "t1", "text": "hello"})
    await h.finish_running()
    kinds = [frame["type"] for frame in h.frames]
    assert kinds == ["opened"] + ["token"] * 9 + ["done", "contribution"]
    text = "".join(frame["token"] for frame in h.of_type("token"))
    assert text == "Hi there"
    done, contribution = h.of_type("done")[0], h.of_type("contribution")[0]
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 9
    assert done["usage"]["cost_far"] == str(PRICE * 9)
    shares = [Decimal(node["share_far"]) for node in contribution["nodes"]]
    assert sum(shares) == Decimal(contribution["cost_far"]) == PRICE * 9
    (finished,) = h.recorder.of(RequestFinished)
    assert finished.settlement.cost_far == PRICE * 9
    assert finished.context.wallet == "w1"
    assert len(h.recorder.of(TokensDelivered)) == 9


async def test_a_turn_that_does_not_fit_is_refused_without_a_trace() -> None:
    h = harness()
    await h.send({"type": "open", "max_length": 70})
    h.take()
    await h.send({"type": "turn", "request_id": "b", "text": "What is the capital of France?"})
    (error,) = h.take()
    assert error["type"] == "error"
    assert error["code"] == "context_overflow"
    assert error["request_id"] == "b"
    assert "Maximum length exceeded" in error["message"]
    assert h.backend.sessions[0].tokens_sent == 0
    assert h.recorder.started_or_finished == []
    # the session is unchanged and the request id was not used up
    await h.send({"type": "turn", "request_id": "b", "text": "hi", "max_new_tokens": 1})
    await h.finish_running()
    assert h.of_type("done")[0]["finish_reason"] == "length"


async def test_a_refused_first_turn_does_not_use_up_the_system_prompt() -> None:
    h = harness()
    await h.send({"type": "open", "max_length": 80, "system_prompt": "You are terse."})
    await h.send({"type": "turn", "request_id": "long", "text": "x" * 200})
    assert h.of_type("error")[0]["code"] == "context_overflow"
    await h.send({"type": "turn", "request_id": "short", "text": "hi", "max_new_tokens": 1})
    await h.finish_running()
    mesh = h.backend.sessions[0]
    assert "You are terse." in mesh.decode(mesh.sent)
    assert "scripted test assistant" not in mesh.decode(mesh.sent)  # the model's default


async def test_a_cancel_right_after_generate_always_wins() -> None:
    h = harness(FakeBackend(reply="x" * 500), requests_burst=100)
    for index in range(50):
        await h.send({"type": "generate", "request_id": f"g{index}", "prompt": "go"})
        await h.send({"type": "cancel", "request_id": f"g{index}"})
        await h.finish_running()
    dones = h.of_type("done")
    assert len(dones) == 50
    assert {done["finish_reason"] for done in dones} == {"cancelled"}
    assert max(done["usage"]["completion_tokens"] for done in dones) <= 1


async def test_a_turn_cancelled_before_its_first_step_sent_nothing() -> None:
    h = harness()
    await h.send({"type": "open"})
    await h.send({"type": "turn", "request_id": "c", "text": "hello"})
    await h.send({"type": "cancel", "request_id": "c"})
    await h.finish_running()
    done = h.of_type("done")[0]
    assert done["finish_reason"] == "cancelled"
    assert done["usage"] == {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cached_tokens": 0,
        "cost_far": "0",
    }
    assert h.backend.sessions[0].tokens_sent == 0


async def test_a_budget_below_one_token_is_refused_before_the_mesh() -> None:
    h = harness()
    await h.send({"type": "open", "max_cost_far": "0.00001"})
    h.take()
    await h.send({"type": "turn", "request_id": "t", "text": "a long prompt " * 80})
    (error,) = h.take()
    assert error["code"] == "budget_exceeded"
    assert h.backend.sessions[0].tokens_sent == 0
    assert h.recorder.started_or_finished == []


async def test_a_budget_stops_a_turn_before_the_token_that_crosses_it() -> None:
    h = harness(FakeBackend(reply="abcdefgh"))
    await h.send({"type": "open"})
    await h.send({"type": "turn", "request_id": "t", "text": "hi", "max_cost_far": "0.0003"})
    await h.finish_running()
    kinds = [frame["type"] for frame in h.frames]
    assert kinds == ["opened", "token", "token", "token", "error", "done", "contribution"]
    assert h.of_type("error")[0]["code"] == "budget_exceeded"
    done = h.of_type("done")[0]
    assert done["finish_reason"] == "budget"
    assert done["usage"]["completion_tokens"] == 3
    assert done["usage"]["cost_far"] == "0.0003"


async def test_a_mesh_failure_mid_turn_still_ends_with_done_and_contribution() -> None:
    h = harness(FakeBackend(reply="abcdef", fail_after=2))
    await h.send({"type": "open"})
    await h.send({"type": "turn", "request_id": "t", "text": "hi"})
    await h.finish_running()
    kinds = [frame["type"] for frame in h.frames]
    assert kinds == ["opened", "token", "token", "error", "done", "contribution"]
    error, done = h.of_type("error")[0], h.of_type("done")[0]
    assert (error["code"], error["retryable"]) == ("mesh_error", True)
    assert (done["finish_reason"], done["error"]) == ("error", "mesh_error")
    assert done["usage"]["completion_tokens"] == 2


async def test_busy_duplicate_and_unknown_requests_are_refused() -> None:
    gate = asyncio.Semaphore(0)
    h = harness(FakeBackend(gate=gate))
    await h.send({"type": "open"})
    await h.send({"type": "turn", "request_id": "a", "text": "hi"})
    await h.send({"type": "turn", "request_id": "b", "text": "hi"})
    await h.send({"type": "cancel", "request_id": "zzz"})
    codes = [frame["code"] for frame in h.of_type("error")]
    assert codes == ["busy", "unknown_request"]
    release(gate, 100)
    await h.finish_running()
    await h.send({"type": "turn", "request_id": "a", "text": "again"})
    assert h.of_type("error")[-1]["code"] == "duplicate_request_id"
    assert len(h.recorder.of(RequestStarted)) == 1


async def test_the_rate_limit_refuses_and_says_when_to_retry() -> None:
    h = harness(requests_burst=2, requests_per_minute=1.0)
    await h.send({"type": "open", "user_wallet": "w"})
    for index in range(3):
        await h.send({"type": "turn", "request_id": f"r{index}", "text": "hi"})
        await h.finish_running()
    error = h.of_type("error")[0]
    assert (error["code"], error["retryable"], error["request_id"]) == ("rate_limited", True, "r2")
    assert len(h.recorder.of(RequestStarted)) == 2


async def test_drain_lets_running_requests_finish_and_refuses_new_ones() -> None:
    gate = asyncio.Semaphore(0)
    h = harness(FakeBackend(reply="ab", gate=gate))
    await h.send({"type": "open"})
    await h.send({"type": "turn", "request_id": "a", "text": "hi"})
    drain = asyncio.create_task(h.engine.drain(grace_s=60))
    await asyncio.sleep(0)
    await h.send({"type": "generate", "request_id": "b", "prompt": "hi"})
    assert h.of_type("error")[-1]["code"] == "shutting_down"
    assert not drain.done()
    release(gate, 10)
    await drain
    assert h.of_type("done")[0]["finish_reason"] == "stop"


async def test_closing_cancels_the_running_request_which_still_settles() -> None:
    h = harness(FakeBackend(gate=asyncio.Semaphore(0)))
    await h.send({"type": "open"})
    await h.send({"type": "turn", "request_id": "a", "text": "hi"})
    await h.session.aclose()
    (finished,) = h.recorder.of(RequestFinished)
    assert finished.settlement.finish_reason == "cancelled"
    assert h.engine.sessions.count == 0
    assert h.backend.sessions[0].closed
