"""One rule, every surface: /ws (protocol v1) and /api/v2/generate (chat.petals.dev) share the
engine, so each rule below is shown on both, through real sockets (scripted mesh)."""

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from farmesh_ws.engine.events import Observer, RequestEvent, RequestStarted
from farmesh_ws.ledger.keys import KeyPrincipal
from farmesh_ws.mesh.fake import FakeBackend
from farmesh_ws.transport.ws import GatewayServer
from tests.engine.support import release
from tests.transport.support import fake_gateway


class _Started(Observer):
    """Sets ``ready`` once ``count`` requests have passed admission."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.ready = asyncio.Event()

    def notify(self, event: RequestEvent) -> None:
        if isinstance(event, RequestStarted):
            self.count -= 1
            if self.count == 0:
                self.ready.set()


@pytest.fixture
async def backend() -> FakeBackend:
    return FakeBackend(reply="abc")


ALICE = "fmk_alice"
BOB = "fmk_bob"
KEYS = {
    ALICE: KeyPrincipal(key_id="fk_alice", wallet="w1", name=None),
    BOB: KeyPrincipal(key_id="fk_bob", wallet="w2", name=None),
}


@pytest.fixture
async def server(backend: FakeBackend) -> AsyncIterator[GatewayServer]:
    gateway = await fake_gateway(backend, keys=KEYS, requests_burst=2, requests_per_minute=1.0)
    yield gateway
    await gateway.shutdown()


async def _recv(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return message


def _bearer(key: str | None) -> dict[str, str] | None:
    return None if key is None else {"Authorization": f"Bearer {key}"}


async def _v1(
    server: GatewayServer, key: str | None = None, **open_fields: Any
) -> ClientConnection:
    ws = await connect(f"ws://127.0.0.1:{server.port}/ws", additional_headers=_bearer(key))
    await ws.send(json.dumps({"type": "open", **open_fields}))
    assert (await _recv(ws))["type"] == "opened"
    return ws


async def _v2(
    server: GatewayServer, key: str | None = None, **open_fields: Any
) -> ClientConnection:
    url = f"ws://127.0.0.1:{server.port}/api/v2/generate"
    ws = await connect(url, additional_headers=_bearer(key))
    await ws.send(json.dumps({"type": "open_inference_session", "max_length": 512, **open_fields}))
    assert await _recv(ws) == {"ok": True}
    return ws


async def _v1_turn(ws: ClientConnection, request_id: str) -> list[dict[str, Any]]:
    await ws.send(json.dumps({"type": "turn", "request_id": request_id, "text": "hi"}))
    frames = [await _recv(ws)]
    while frames[-1]["type"] not in ("contribution", "error") or (
        frames[-1]["type"] == "error" and len(frames) > 1
    ):
        frames.append(await _recv(ws))
    return frames


async def _v2_generate(ws: ClientConnection, **fields: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "generate", "inputs": "hi", "max_new_tokens": 2, **fields}))
    return await _recv(ws)


def _get(server: GatewayServer, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as reply:
        body: bytes = reply.read()
        return body


async def _http_json(server: GatewayServer, path: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(await asyncio.to_thread(_get, server, path))
    return body


async def _metric(server: GatewayServer, line_start: str) -> float:
    text = (await asyncio.to_thread(_get, server, "/metrics")).decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line starting {line_start!r}")


async def test_the_rate_limit_is_per_principal_on_both_paths(server: GatewayServer) -> None:
    ws = await _v1(server, ALICE)
    assert (await _v1_turn(ws, "a"))[-1]["type"] == "contribution"
    assert (await _v1_turn(ws, "b"))[-1]["type"] == "contribution"
    refused = await _v1_turn(ws, "c")
    assert [(f["type"], f.get("code")) for f in refused] == [("error", "rate_limited")]
    assert refused[0]["retry_after_s"] > 0
    await ws.close()

    v2 = await _v2(server, BOB)
    assert (await _v2_generate(v2))["ok"] is True
    assert (await _v2_generate(v2))["ok"] is True
    reply = await _v2_generate(v2)
    assert reply["ok"] is False
    assert reply["traceback"].startswith("rate_limited: ")
    # the key's limit is shared across paths: alice is exhausted on v2 too
    v2b = await _v2(server, ALICE)
    assert (await _v2_generate(v2b))["traceback"].startswith("rate_limited: ")


async def test_sessions_are_registered_and_counted_on_both_paths(server: GatewayServer) -> None:
    v1 = await _v1(server)
    v2 = await _v2(server)
    assert (await _http_json(server, "/mesh/status"))["active_sessions"] == 2
    assert await _metric(server, "farmesh_sessions_active ") == 2
    await v1.send(json.dumps({"type": "close"}))
    assert (await _recv(v1))["type"] == "closed"  # sent after the session is unregistered
    assert (await _http_json(server, "/mesh/status"))["active_sessions"] == 1
    assert await _metric(server, "farmesh_sessions_active ") == 1
    await v2.close()


async def test_requests_are_counted_by_kind_on_both_paths(server: GatewayServer) -> None:
    v1 = await _v1(server, user_wallet="m1")
    await _v1_turn(v1, "a")
    v2 = await _v2(server, user_wallet="m2")
    await _v2_generate(v2)
    for kind, finish_reason in (("turn", "stop"), ("petals_v2", "length")):
        assert await _metric(server, f'farmesh_turns_started_total{{kind="{kind}"}}') == 1
        line = f'farmesh_turns_total{{finish_reason="{finish_reason}",kind="{kind}"}}'
        assert await _metric(server, line) == 1


async def test_a_budget_that_cannot_pay_one_token_is_refused_on_both_paths(
    server: GatewayServer, backend: FakeBackend
) -> None:
    v1 = await _v1(server, max_cost_far="0.000001")
    refused = await _v1_turn(v1, "a")
    assert [(f["type"], f.get("code")) for f in refused] == [("error", "budget_exceeded")]
    v2 = await _v2(server, max_cost_far="0.000001")
    reply = await _v2_generate(v2)
    assert reply["traceback"].startswith("budget_exceeded: ")
    assert all(session.tokens_sent == 0 for session in backend.sessions)


async def test_shutdown_lets_running_requests_finish_on_both_paths() -> None:
    gate = asyncio.Semaphore(0)
    backend = FakeBackend(reply="abc", gate=gate)
    started = _Started(2)
    server = await fake_gateway(backend, observers=[started], shutdown_grace_s=30.0)
    v1 = await _v1(server)
    v2 = await _v2(server)
    await v1.send(json.dumps({"type": "turn", "request_id": "a", "text": "hi"}))
    await v2.send(json.dumps({"type": "generate", "inputs": "hi", "max_new_tokens": 2}))
    await asyncio.wait_for(started.ready.wait(), 10)
    shutdown = asyncio.create_task(server.shutdown())
    assert await _recv(v1) == {"type": "going_away", "time_left_s": 30.0}  # v1 only
    await v1.send(json.dumps({"type": "generate", "request_id": "new", "prompt": "hi"}))
    refused = await _recv(v1)
    assert (refused["code"], refused["retryable"]) == ("shutting_down", True)
    assert not shutdown.done()
    release(gate, 10)
    v1_frames = [await _recv(v1) for _ in range(6)]
    assert [f["type"] for f in v1_frames] == ["token"] * 4 + ["done", "contribution"]
    assert (await _recv(v2))["ok"] is True
    await shutdown
    for ws in (v1, v2):
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1001


async def test_v2_a_budget_stop_sends_what_it_bills_then_the_error(
    server: GatewayServer,
) -> None:
    v2 = await _v2(server, max_cost_far="0.0003", user_wallet="b1")  # 3 tokens at 0.0001
    first = await _v2_generate(v2, max_new_tokens=10)
    assert first == {"ok": True, "outputs": "abc", "stop": False, "token_count": 3}
    error = await _recv(v2)
    assert error["traceback"].startswith("budget_exceeded: ")


async def test_v2_a_session_that_fills_up_mid_request_says_maximum_length_exceeded(
    backend: FakeBackend,
) -> None:
    backend.reply = "x" * 500
    server = await fake_gateway(backend)
    try:
        v2 = await _v2(server, max_length=80)
        # one step per token until the stop sequence, as chat.js asks: the session fills up
        reply = await _v2_generate(v2, max_new_tokens=1, stop_sequence="never")
        steps = 0
        while reply["ok"]:
            steps += 1
            reply = await _recv(v2)
        assert steps > 1
        assert reply["traceback"].startswith("context_overflow: Maximum length exceeded")
    finally:
        await server.shutdown()
