"""Reuse of the mesh's caches through the OpenAI endpoints (http.md §5), with the official
`openai` SDK over real sockets and the scripted mesh."""

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from farmesh_ws.ledger.keys import KeyPrincipal
from farmesh_ws.mesh.fake import FAKE_MODEL_ID, FakeBackend
from farmesh_ws.transport.ws import GatewayServer
from tests.transport.support import fake_gateway, openai_client

ALICE, BOB = "fmk_alice", "fmk_bob"
KEYS = {
    ALICE: KeyPrincipal(key_id="fk_alice", wallet="0x" + "a" * 40, name=None),
    BOB: KeyPrincipal(key_id="fk_bob", wallet="0x" + "b" * 40, name=None),
}


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Any]]:
    servers: list[GatewayServer] = []

    async def start(**overrides: Any) -> tuple[GatewayServer, FakeBackend]:
        backend = FakeBackend(reply="Sure.")
        server = await fake_gateway(backend, keys=KEYS, auth="required", **overrides)
        servers.append(server)
        return server, backend

    yield start
    for server in servers:
        await server.shutdown()


def kept_sessions(server: GatewayServer) -> float:
    """``farmesh_reuse_sessions_kept`` as /metrics reports it."""
    url = f"http://127.0.0.1:{server.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text: str = reply.read().decode()
    (line,) = [
        line for line in text.splitlines() if line.startswith("farmesh_reuse_sessions_kept ")
    ]
    return float(line.split()[1])


def cached(usage: Any) -> int:
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    return int(usage.prompt_tokens_details.cached_tokens or 0)


async def test_a_streamed_second_turn_reports_its_cached_tokens(make: Any) -> None:
    server, backend = await make()
    history: list[dict[str, str]] = [{"role": "user", "content": "Hi"}]
    async with openai_client(server, ALICE) as client:
        first = await client.chat.completions.create(model=FAKE_MODEL_ID, messages=history)
        history += [
            {"role": "assistant", "content": first.choices[0].message.content or ""},
            {"role": "user", "content": "Again"},
        ]
        stream = await client.chat.completions.create(
            model=FAKE_MODEL_ID,
            messages=history,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert cached(first.usage) == 0
    usage = chunks[-1].usage
    assert cached(usage) > 0
    assert usage is not None
    (mesh,) = {session for session in backend.sessions if session.tokens_sent}
    # one mesh session holds both turns; the second sent only what followed its transcript
    assert mesh.tokens_sent == usage.prompt_tokens + usage.completion_tokens - 1
    assert await asyncio.to_thread(kept_sessions, server) == 1


async def test_a_completion_that_extends_the_last_prompt_and_reply_reuses_them(make: Any) -> None:
    server, _ = await make()
    async with openai_client(server, ALICE) as client:
        first = await client.completions.create(model=FAKE_MODEL_ID, prompt="Once upon")
        prompt = "Once upon" + first.choices[0].text + " and then"
        second = await client.completions.create(model=FAKE_MODEL_ID, prompt=prompt)
    assert cached(first.usage) == 0
    assert cached(second.usage) == len("Once upon" + first.choices[0].text)


async def test_another_key_with_the_same_history_gets_nothing_cached(make: Any) -> None:
    server, _ = await make()
    history: list[dict[str, str]] = [{"role": "user", "content": "Hi"}]
    async with openai_client(server, ALICE) as alice:
        first = await alice.chat.completions.create(model=FAKE_MODEL_ID, messages=history)
    history += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "Again"},
    ]
    async with openai_client(server, BOB) as bob:
        answer = await bob.chat.completions.create(model=FAKE_MODEL_ID, messages=history)
    assert cached(answer.usage) == 0
    async with openai_client(server, ALICE) as alice:
        answer = await alice.chat.completions.create(model=FAKE_MODEL_ID, messages=history)
    assert cached(answer.usage) > 0


async def test_reuse_can_be_turned_off(make: Any) -> None:
    server, backend = await make(reuse_sessions_per_principal=0)
    history: list[dict[str, str]] = [{"role": "user", "content": "Hi"}]
    async with openai_client(server, ALICE) as client:
        first = await client.chat.completions.create(model=FAKE_MODEL_ID, messages=history)
        history += [
            {"role": "assistant", "content": first.choices[0].message.content or ""},
            {"role": "user", "content": "Again"},
        ]
        second = await client.chat.completions.create(model=FAKE_MODEL_ID, messages=history)
    assert cached(second.usage) == 0
    assert all(session.closed for session in backend.sessions)
