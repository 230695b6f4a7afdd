"""Caps and reservations (protocol.md §9) on every surface: a principal cannot hold more than
its share, the mesh's free attention cache bounds every reservation, and each refusal is one
``quota_exceeded`` before any mesh work. Real sockets over the scripted mesh."""

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from farmesh_ws.core.principal import Limits
from farmesh_ws.ledger.keys import KeyPrincipal
from farmesh_ws.mesh.fake import FakeBackend
from farmesh_ws.transport.handshake import client_address
from farmesh_ws.transport.ws import GatewayServer
from tests.engine.support import release
from tests.transport.support import fake_gateway

KEY = "fmk_carol"
KEYS = {KEY: KeyPrincipal(key_id="fk_carol", wallet="w-carol", name=None)}
AUTH = {"Authorization": f"Bearer {KEY}"}


async def _recv(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return message


async def _open_v1(
    server: GatewayServer, max_length: int
) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(f"ws://127.0.0.1:{server.port}/ws", additional_headers=AUTH)
    await ws.send(json.dumps({"type": "open", "max_length": max_length}))
    return ws, await _recv(ws)


async def _open_v2(
    server: GatewayServer, max_length: int
) -> tuple[ClientConnection, dict[str, Any]]:
    url = f"ws://127.0.0.1:{server.port}/api/v2/generate"
    ws = await connect(url, additional_headers=AUTH)
    await ws.send(json.dumps({"type": "open_inference_session", "max_length": max_length}))
    return ws, await _recv(ws)


def _code(answer: dict[str, Any]) -> str:
    if "ok" in answer:
        return "ok" if answer["ok"] else str(answer["traceback"].split(":", 1)[0])
    return "ok" if answer["type"] == "opened" else str(answer["code"])


OPENERS = pytest.mark.parametrize("open_on", [_open_v1, _open_v2], ids=["v1", "v2"])


@pytest.fixture
async def backend() -> FakeBackend:
    return FakeBackend(reply="abcdef")


@pytest.fixture
async def server(backend: FakeBackend) -> AsyncIterator[GatewayServer]:
    gateway = await fake_gateway(
        backend,
        keys=KEYS,
        auth="required",
        max_sessions_per_principal=2,
        max_reserved_tokens_per_principal=1000,
        max_requests_per_principal=1,
        max_connections_per_principal=4,
    )
    yield gateway
    await gateway.shutdown()


@OPENERS
async def test_sessions_over_the_cap_are_refused_not_queued(
    open_on: Any, server: GatewayServer, backend: FakeBackend
) -> None:
    held = [await open_on(server, 100), await open_on(server, 100)]
    assert [_code(answer) for _, answer in held] == ["ok", "ok"]
    third, answer = await open_on(server, 100)
    assert _code(answer) == "quota_exceeded"
    assert len(backend.sessions) == 2  # nothing reached the mesh for the third
    for ws in (held[0][0], held[1][0], third):
        await ws.close()


async def test_a_closed_session_frees_its_slot(server: GatewayServer) -> None:
    first, _ = await _open_v1(server, 100)
    second, _ = await _open_v1(server, 100)
    await first.send(json.dumps({"type": "close"}))
    assert (await _recv(first))["type"] == "closed"
    third, answer = await _open_v1(server, 100)
    assert _code(answer) == "ok"
    for ws in (first, second, third):
        await ws.close()


@OPENERS
async def test_reserved_context_tokens_are_capped(open_on: Any, server: GatewayServer) -> None:
    first, answer = await open_on(server, 600)
    assert _code(answer) == "ok"
    second, answer = await open_on(server, 600)  # 1200 > 1000
    assert _code(answer) == "quota_exceeded"
    third, answer = await open_on(server, 400)
    assert _code(answer) == "ok"
    for ws in (first, second, third):
        await ws.close()


async def test_a_one_shot_generate_reserves_its_prompt_and_max_tokens(
    server: GatewayServer, backend: FakeBackend
) -> None:
    async with connect(f"ws://127.0.0.1:{server.port}/ws", additional_headers=AUTH) as ws:
        request = {"type": "generate", "request_id": "g", "prompt": "hi", "max_tokens": 5}
        await ws.send(json.dumps(request))
        frames = [await _recv(ws)]
        while frames[-1]["type"] != "done":
            frames.append(await _recv(ws))
    session = backend.sessions[0]
    prompt_tokens = frames[-1]["usage"]["prompt_tokens"]
    assert session.max_length == prompt_tokens + 5  # not the default 2048
    assert server.engine.quotas.totals.reserved[session.model_id] == 0  # released at the end


async def test_a_principal_runs_at_most_its_concurrent_requests(
    server: GatewayServer, backend: FakeBackend
) -> None:
    backend.gate = asyncio.Semaphore(0)
    first, _ = await _open_v1(server, 100)
    second, _ = await _open_v1(server, 100)
    await first.send(json.dumps({"type": "turn", "request_id": "a", "text": "hi"}))
    release(backend.gate, 1)
    assert (await _recv(first))["type"] == "token"  # "a" is running
    await second.send(json.dumps({"type": "turn", "request_id": "b", "text": "hi"}))
    refused = await _recv(second)
    assert (refused["code"], refused["request_id"]) == ("quota_exceeded", "b")
    release(backend.gate, 100)
    while (await _recv(first))["type"] != "contribution":
        pass
    await second.send(json.dumps({"type": "turn", "request_id": "c", "text": "hi"}))
    assert (await _recv(second))["type"] == "token"
    for ws in (first, second):
        await ws.close()


async def test_connections_over_the_principal_cap_get_429(server: GatewayServer) -> None:
    url = f"ws://127.0.0.1:{server.port}/ws"
    held = [await connect(url, additional_headers=AUTH) for _ in range(4)]
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, additional_headers=AUTH)
    assert refused.value.response.status_code == 429
    assert json.loads(refused.value.response.body)["error"] == "quota_exceeded"
    for ws in held:
        await ws.close()


async def test_unauthenticated_connections_per_address_are_capped(backend: FakeBackend) -> None:
    server = await fake_gateway(backend, keys=KEYS, auth="required", max_pending_auth_per_address=2)
    url = f"ws://127.0.0.1:{server.port}/ws"
    held = [await connect(url) for _ in range(2)]
    with pytest.raises(InvalidStatus) as refused:
        await connect(url)
    assert refused.value.response.status_code == 429
    await held[0].send(json.dumps({"type": "auth", "token": KEY}))
    assert (await _recv(held[0]))["type"] == "authenticated"  # no longer pending
    again = await connect(url)
    for ws in (*held, again):
        await ws.close()
    await server.shutdown()


async def test_connections_per_address_are_capped(backend: FakeBackend) -> None:
    server = await fake_gateway(backend, max_connections_per_address=3)
    url = f"ws://127.0.0.1:{server.port}/ws"
    held = [await connect(url) for _ in range(3)]
    with pytest.raises(InvalidStatus) as refused:
        await connect(url)
    assert refused.value.response.status_code == 429
    for ws in held:
        await ws.close()
    await server.shutdown()


@OPENERS
async def test_the_mesh_free_cache_bounds_every_reservation(open_on: Any) -> None:
    backend = FakeBackend(reply="abc", cache_tokens=1000)
    server = await fake_gateway(backend, keys=KEYS, auth="required")
    first, answer = await open_on(server, 600)
    assert _code(answer) == "ok"
    second, answer = await open_on(server, 600)  # 600 reserved, not yet stepped: 400 left
    assert _code(answer) == "quota_exceeded"
    assert len(backend.sessions) == 1
    third, answer = await open_on(server, 400)
    assert _code(answer) == "ok"
    for ws in (first, second, third):
        await ws.close()
    await server.shutdown()


def _health(server: GatewayServer) -> dict[str, Any]:
    url = f"http://127.0.0.1:{server.port}/health"
    with urllib.request.urlopen(url, timeout=10) as reply:
        body: dict[str, Any] = json.loads(reply.read())
        return body


async def test_health_reports_saturation() -> None:
    backend = FakeBackend(reply="abc", cache_tokens=1000)
    server = await fake_gateway(backend, keys=KEYS, auth="required", default_max_length=600)
    before = await asyncio.to_thread(_health, server)
    assert before["status"] == "healthy"
    assert before["saturation"]["models"] == {
        backend.model_ids[0]: {"reserved_tokens": 0, "cache_tokens_free": 1000}
    }
    ws, answer = await _open_v1(server, 600)
    assert _code(answer) == "ok"
    after = await asyncio.to_thread(_health, server)
    assert after["status"] == "degraded"
    assert after["components"]["capacity"].startswith("degraded: no attention cache left")
    assert after["saturation"]["sessions"] == 1
    assert after["saturation"]["models"][backend.model_ids[0]] == {
        "reserved_tokens": 600,
        "cache_tokens_free": 400,
    }
    await ws.close()
    await server.shutdown()


async def test_a_key_s_own_caps_replace_the_configured_ones(backend: FakeBackend) -> None:
    keys = {
        KEY: KEYS[KEY],
        "fmk_small": KeyPrincipal("fk_small", "w-small", None, Limits(max_sessions=1)),
    }
    server = await fake_gateway(backend, keys=keys, auth="required", max_sessions_per_principal=2)
    url = f"ws://127.0.0.1:{server.port}/ws"
    answers = []
    held = []
    for key in ("fmk_small", "fmk_small", KEY, KEY):
        ws = await connect(url, additional_headers={"Authorization": f"Bearer {key}"})
        held.append(ws)
        await ws.send(json.dumps({"type": "open", "max_length": 100}))
        answers.append(_code(await _recv(ws)))
    assert answers == ["ok", "quota_exceeded", "ok", "ok"]
    for ws in held:
        await ws.close()
    await server.shutdown()


async def test_a_key_s_own_rate_brings_its_own_burst(backend: FakeBackend) -> None:
    keys = {"fmk_slow": KeyPrincipal("fk_slow", "w-slow", None, Limits(requests_per_minute=1))}
    server = await fake_gateway(backend, keys=keys, auth="required", requests_burst=20)
    url = f"ws://127.0.0.1:{server.port}/ws"
    async with connect(url, additional_headers={"Authorization": "Bearer fmk_slow"}) as ws:
        codes = []
        for request_id in ("a", "b"):
            request = {"type": "generate", "request_id": request_id, "prompt": "hi"}
            await ws.send(json.dumps({**request, "max_tokens": 1}))
            while (frame := await _recv(ws))["type"] not in ("done", "error"):
                pass
            codes.append(frame.get("code", frame["type"]))
    await server.shutdown()
    assert codes == ["done", "rate_limited"]  # not 20 at once


@pytest.mark.parametrize(
    ("peer", "bucket"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # the same subscriber's /64
        ("::ffff:198.51.100.4", "198.51.100.4"),
    ],
)
def test_client_addresses_are_bucketed_as_subscribers(peer: str, bucket: str) -> None:
    class Peer:
        remote_address = (peer, 40000)

    assert client_address(Peer()) == bucket  # type: ignore[arg-type]


async def test_anonymous_use_all_together_holds_at_most_its_share_of_the_mesh() -> None:
    """However many addresses: 1000 tokens of cache, a share of 0.5 → 500 for anonymous use."""
    backend = FakeBackend(reply="abc", cache_tokens=1000)
    server = await fake_gateway(backend, keys=KEYS, auth="optional", anonymous_max_cache_share=0.5)
    url = f"ws://127.0.0.1:{server.port}/ws"
    held = []
    answers = []
    for headers in (None, None, AUTH):  # anonymous, anonymous, then a key
        ws = await connect(url, additional_headers=headers)
        held.append(ws)
        await ws.send(json.dumps({"type": "open", "max_length": 400}))
        answers.append(_code(await _recv(ws)))
    assert answers == ["ok", "quota_exceeded", "ok"]
    assert server.engine.quotas.totals.reserved_anonymous[backend.model_ids[0]] == 400
    for ws in held:
        await ws.close()
    await server.shutdown()
