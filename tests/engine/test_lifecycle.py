"""A started request always ends with its last frames, whatever happens around its end."""

import asyncio

from farmesh_ws.engine.events import RequestStarted
from farmesh_ws.mesh.fake import FakeBackend
from tests.engine.support import harness


def _kinds(frames: list[dict[str, object]]) -> list[object]:
    return [(frame["type"], frame.get("request_id")) for frame in frames]


async def test_close_while_a_one_shot_closes_its_mesh_session_still_gets_done() -> None:
    close_gate = asyncio.Event()
    h = harness(FakeBackend(reply="ab", close_gate=close_gate))
    await h.send({"type": "generate", "request_id": "g", "prompt": "hi"})
    await h.recorder.settled.wait()  # settled; its mesh session is closing
    closing = asyncio.create_task(h.send({"type": "close"}))
    close_gate.set()
    await closing
    assert _kinds(h.frames)[-3:] == [("contribution", "g"), ("done", "g"), ("closed", None)]


async def test_a_request_sent_while_the_previous_one_sends_its_last_frames_waits() -> None:
    close_gate = asyncio.Event()
    h = harness(FakeBackend(reply="ab", close_gate=close_gate))
    await h.send({"type": "generate", "request_id": "g1", "prompt": "hi"})
    await h.recorder.settled.wait()
    second = asyncio.create_task(h.send({"type": "generate", "request_id": "g2", "prompt": "hi"}))
    close_gate.set()
    await second
    await h.finish_running()
    kinds = _kinds(h.frames)
    assert ("error", "g2") not in kinds  # not busy: g1 had ended
    assert kinds.index(("done", "g1")) < kinds.index(("token", "g2"))


async def test_after_the_grace_period_running_requests_are_cancelled_and_end_with_done() -> None:
    h = harness(FakeBackend(reply="abc", gate=asyncio.Semaphore(0)))
    await h.send({"type": "open"})
    await h.send({"type": "turn", "request_id": "t", "text": "hi"})
    await h.engine.drain(grace_s=0.01)
    assert _kinds(h.frames)[-2:] == [("done", "t"), ("contribution", "t")]
    assert h.of_type("done")[0]["finish_reason"] == "cancelled"


async def test_shutdown_during_admission_refuses_the_request() -> None:
    open_gate = asyncio.Event()
    h = harness(FakeBackend(open_gate=open_gate))
    generating = asyncio.create_task(
        h.send({"type": "generate", "request_id": "g", "prompt": "hi"})
    )
    await h.backend.open_started.wait()  # admission is waiting for its mesh session
    await h.engine.drain(grace_s=30)  # nothing running yet: returns at once
    open_gate.set()
    await generating
    assert h.of_type("error")[0]["code"] == "shutting_down"
    assert h.recorder.of(RequestStarted) == []
    assert all(session.closed for session in h.backend.sessions)
