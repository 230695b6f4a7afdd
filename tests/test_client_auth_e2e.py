"""The client's credentials against the real gateway (transport, auth, engine) over the scripted
mesh (protocol.md §2.1): an API key in the handshake or in an ``auth`` message, Sign-In with
Ethereum with a test-made eth-account key, refusals as their exception classes, anonymous use on
a loopback gateway."""

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from farmesh_ws.auth.siwe import STATEMENT
from farmesh_ws.client import (
    FarmeshClient,
    FarmeshClientError,
    Identity,
    QuotaExceeded,
    Unauthorized,
    WalletMismatch,
    wire,
)
from farmesh_ws.engine.events import Observer, RequestEvent, RequestStarted
from farmesh_ws.ledger.keys import KeyPrincipal
from farmesh_ws.mesh.fake import FakeBackend
from farmesh_ws.protocol import ClientMessage
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
async def siwe_gateway(
    mode: str, *, reply: str = "ok", **overrides: Any
) -> AsyncIterator[tuple[GatewayServer, Billed]]:
    """The real gateway over the scripted mesh, with :data:`KEYS` and the real Sign-In with
    Ethereum (:class:`farmesh_ws.auth.siwe.SiweAuth` over its state store)."""
    billed = Billed()
    server = await fake_gateway(
        FakeBackend(reply=reply), observers=[billed], keys=KEYS, siwe=True, auth=mode, **overrides
    )
    try:
        yield server, billed
    finally:
        await server.shutdown()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every frame the Python client sends, as the gateway receives it."""
    frames: list[dict[str, Any]] = []
    encode = wire.encode

    def recording(message: ClientMessage) -> str:
        frame = encode(message)
        frames.append(json.loads(frame))
        return frame

    monkeypatch.setattr(wire, "encode", recording)
    return frames


@contextlib.asynccontextmanager
async def gateway(mode: str, **overrides: Any) -> AsyncIterator[tuple[str, Billed]]:
    async with siwe_gateway(mode, **overrides) as (server, billed):
        yield f"ws://127.0.0.1:{server.port}/ws", billed


@pytest.fixture
def account() -> LocalAccount:
    """A throwaway wallet key, made for this test."""
    made: LocalAccount = Account.create()
    return made


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


async def test_sign_in_with_ethereum_then_the_session_token(
    account: LocalAccount, sent: list[dict[str, Any]]
) -> None:
    async with siwe_gateway("required") as (server, billed):
        url = f"ws://127.0.0.1:{server.port}/ws"
        domain = f"127.0.0.1:{server.port}"
        async with FarmeshClient.connect(url) as client:
            identity = await client.sign_in_with_ethereum(account)
            assert (await (await client.open_chat()).ask("hi")).text == "ok"
        assert identity.principal == f"wallet:{account.address}"
        assert identity.wallet == account.address
        assert identity.token is not None
        assert identity.token.startswith("fms_")
        assert identity.expires_at == pytest.approx(time.time() + 3600, abs=60)
        auth = sent[0]  # the connection's first frame
        assert auth["type"] == "auth"
        assert auth.get("token") is None
        # The message the gateway verified: its domain and URI, the gateway's statement.
        assert auth["siwe"]["message"].startswith(
            f"{domain} wants you to sign in with your Ethereum account:\n{account.address}\n\n"
            f"{STATEMENT}\n\nURI: http://{domain}/\nVersion: 1\nChain ID: 1\nNonce: "
        )

        # The token serves later connections, in the handshake or as the auth message.
        async with FarmeshClient.connect(url, token=identity.token) as client:
            assert (await (await client.open_chat()).ask("hi")).text == "ok"
        async with FarmeshClient.connect(url) as client:
            assert await client.authenticate(identity.token) == Identity(
                f"wallet:{account.address}", account.address
            )
            # A second sign-in on an authenticated connection is refused by the gateway.
            with pytest.raises(FarmeshClientError) as again:
                await client.sign_in_with_ethereum(account)
            assert again.value.code == "invalid_request"
    assert [wallet for wallet, _ in billed.started] == [account.address] * 2
