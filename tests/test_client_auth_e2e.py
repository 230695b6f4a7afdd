"""The client's credentials against the real gateway (transport, auth, engine) over the scripted
mesh (protocol.md §2.1): an API key in the handshake or in an ``auth`` message, refusals as
their exception classes, anonymous use on a loopback gateway."""

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from farmesh_ws.client import (
    FarmeshClient,
    Identity,
    QuotaExceeded,
    Unauthorized,
    WalletMismatch,
)
from farmesh_ws.engine.events import Observer, RequestEvent, RequestStarted
from farmesh_ws.ledger.keys import KeyPrincipal
from farmesh_ws.mesh.fake import FakeBackend
from farmesh_ws.transport.ws import GatewayServer
from tests.transport.support import fake_gateway

ALICE_KEY = "fmk_fk_a11ce0000000a11ce_" + "A" * 43
ALICE_WALLET = "0xAb5801a7D398351b8bE11C439e05C5B3259aeC9B"
KEYS = {ALICE_KEY: KeyPrincipal(key_id="fk_a11ce0000000a11ce", wallet=ALICE_WALLET, name=None)}


class Billed(Observer):
    """The wallet and principal of every request the engine starts."""

    def __init__(self) -> None:
        self.started: list[tuple[str | None, str]] = []

    def notify(self, event: RequestEvent) -> None:
        if isinstance(event, RequestStarted):
            self.started.append((event.context.wallet, event.context.principal_id))


@contextlib.asynccontextmanager
async def gateway(mode: str, **overrides: Any) -> AsyncIterator[tuple[str, Billed]]:
    billed = Billed()
    server: GatewayServer = await fake_gateway(
        FakeBackend(reply="ok"), keys=KEYS, observers=[billed], auth=mode, **overrides
    )
    try:
        yield f"ws://127.0.0.1:{server.port}/ws", billed
    finally:
        await server.shutdown()


async def test_a_key_in_the_handshake() -> None:
    async with gateway("required") as (url, billed):
        async with FarmeshClient.connect(url, token=ALICE_KEY) as client:
            chat = await client.open_chat()
            assert (await chat.ask("hi")).text == "ok"
        with pytest.raises(Unauthorized) as refused:
            await FarmeshClient.connect(url, token=ALICE_KEY[:-1] + "B")
    assert billed.started == [(ALICE_WALLET, "key:fk_a11ce0000000a11ce")]
    assert refused.value.message.endswith(f"(HTTP 401 from {url})")
    assert "A" * 10 not in str(refused.value)


async def test_a_key_in_an_auth_message() -> None:
    async with gateway("required") as (url, billed), FarmeshClient.connect(url) as client:
        with pytest.raises(Unauthorized):
            await client.open_chat()  # credentials first
        with pytest.raises(Unauthorized):
            await client.authenticate("fmk_fk_0000000000000000_" + "x" * 43)
        identity = await client.authenticate(ALICE_KEY)
        assert identity == Identity("key:fk_a11ce0000000a11ce", ALICE_WALLET)
        with pytest.raises(WalletMismatch):
            await client.open_chat(user_wallet="0xvictim")
        chat = await client.open_chat(user_wallet=ALICE_WALLET.lower())
        assert (await chat.ask("hi")).text == "ok"
    assert billed.started == [(ALICE_WALLET, "key:fk_a11ce0000000a11ce")]


async def test_anonymous_use_and_its_refusals() -> None:
    """A loopback gateway's default: no credentials needed, no wallet billed; a spent free
    quota says when it comes back, too many connections are a quota too."""
    settings = {"anonymous_tokens_per_day": 1, "anonymous_max_connections": 1}
    async with gateway("optional", **settings) as (url, billed), FarmeshClient.connect(url) as c:
        chat = await c.open_chat()
        with pytest.raises(WalletMismatch):
            await c.generate("hi", user_wallet=ALICE_WALLET)
        with pytest.raises(QuotaExceeded) as spent:
            await chat.ask("hi")
        with pytest.raises(QuotaExceeded) as crowded:
            await FarmeshClient.connect(url)
    assert spent.value.retryable is True
    assert spent.value.retry_after_s is not None
    assert 0 < spent.value.retry_after_s <= 86400
    assert "free quota" in spent.value.message
    assert crowded.value.message.endswith(f"(HTTP 429 from {url})")
    assert billed.started == []
