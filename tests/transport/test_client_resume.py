"""The Python client resumes its chat by itself when the network drops (protocol.md §2.2)."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from farmesh_ws.client import ConnectionLost, DoneEvent, FarmeshClient, TokenEvent
from farmesh_ws.ledger.keys import KeyPrincipal
from farmesh_ws.mesh.fake import FakeBackend
from farmesh_ws.transport.ws import GatewayServer
from tests.engine.support import release
from tests.transport.proxy import CuttableProxy
from tests.transport.support import fake_gateway

KEY = "fmk_alice"
KEYS = {KEY: KeyPrincipal(key_id="fk_alice", wallet="0x" + "a" * 40, name=None)}
REPLY = "A reply that survives a network change."


@pytest.fixture
async def gate() -> asyncio.Semaphore:
    return asyncio.Semaphore(0)


@pytest.fixture
async def proxied(gate: asyncio.Semaphore) -> AsyncIterator[tuple[GatewayServer, CuttableProxy]]:
    server = await fake_gateway(FakeBackend(reply=REPLY, gate=gate), keys=KEYS, auth="required")
    proxy = CuttableProxy(server.port)
    await proxy.start()
    yield server, proxy
    await proxy.aclose()
    await server.shutdown()


async def test_a_dropped_network_mid_turn_loses_and_repeats_nothing(
    proxied: tuple[GatewayServer, CuttableProxy], gate: asyncio.Semaphore
) -> None:
    _, proxy = proxied
    url = f"ws://127.0.0.1:{proxy.port}/ws"
    async with FarmeshClient.connect(url, token=KEY, timeout=10) as client:
        chat = await client.open_chat()
        stream = chat.send("hi")
        events = []
        release(gate, 4)
        async for event in stream:
            events.append(event)
            if len(events) == 4:
                proxy.cut()
                release(gate, len(REPLY) + 4)
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        assert "".join(t.text for t in tokens) == REPLY
        assert [t.tokens_generated for t in tokens] == list(range(1, len(tokens) + 1))
        assert proxy.accepted == 2  # one new connection held the session from then on
        assert stream.done is not None
        assert stream.done.finish_reason == "stop"
        release(gate, len(REPLY) + 4)
        again = await chat.ask("again")
    assert again.done.usage.cached_tokens >= stream.done.position


async def test_with_resuming_off_the_stream_fails_with_connection_lost(
    proxied: tuple[GatewayServer, CuttableProxy], gate: asyncio.Semaphore
) -> None:
    _, proxy = proxied
    url = f"ws://127.0.0.1:{proxy.port}/ws"
    async with FarmeshClient.connect(url, token=KEY, timeout=10, resume_within_s=0) as client:
        chat = await client.open_chat()
        release(gate, 2)

        async def read_until_cut() -> None:
            async for event in chat.send("hi"):
                if isinstance(event, TokenEvent):
                    proxy.cut()
                assert not isinstance(event, DoneEvent)

        with pytest.raises(ConnectionLost):
            await read_until_cut()
    release(gate, len(REPLY) + 4)  # the detached turn ends (else shutdown waits its grace)
