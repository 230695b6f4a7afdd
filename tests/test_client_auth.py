"""The client's credentials (protocol.md §2.1) against a scripted gateway: a key or token in the
handshake or in an ``auth`` message, Sign-In with Ethereum with a real eth-account signature
checked by ``siwe``, one exception class per identity and quota error code, and no credential
in the logs. The same against the real gateway is in tests/test_client_auth_e2e.py."""

import contextlib
import json
import logging
import time
import warnings
from collections.abc import AsyncIterator
from datetime import datetime
from http import HTTPStatus
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from farmesh_ws.client import (
    AuthUnavailable,
    ConnectFailed,
    FarmeshClient,
    FarmeshClientError,
    Identity,
    InsufficientBalance,
    QuotaExceeded,
    RateLimited,
    Unauthorized,
    WalletMismatch,
)

with warnings.catch_warnings():  # siwe imports web3, which imports websockets.legacy
    warnings.simplefilter("ignore", DeprecationWarning)
    from siwe import SiweMessage

KEY = "fmk_fk_0123456789abcdef_" + "K" * 43
SESSION_TOKEN = "fms_" + "S" * 43
STATEMENT = "Sign in to the Far Mesh gateway."
OPENED = {
    "type": "opened",
    "session_id": "s1",
    "model": "fake",
    "max_length": 64,
    "price_per_token_far": "0.0001",
    "price_per_prompt_token_far": "0",
    "protocol_version": 1,
}


def error_frame(code: str, retryable: bool, **extra: Any) -> dict[str, Any]:
    frame = {"type": "error", "code": code, "message": f"scripted {code}", "retryable": retryable}
    return frame | extra


class ScriptedGateway:
    """A WebSocket server that checks credentials the way farmesh_ws does: the handshake's
    ``Authorization`` (401 for a wrong one), ``GET /auth/nonce``, an ``auth`` message with
    a key or a signed EIP-4361 message (verified by ``siwe``), then ``open``, ``ping`` and
    turns answered with the scripted ``errors``."""

    def __init__(self) -> None:
        self.port = 0
        self.authorizations: list[str | None] = []
        self.refusal: tuple[HTTPStatus, str] | None = None
        self.nonce_refusal: tuple[HTTPStatus, str] | None = None
        self.nonces: set[str] = set()
        self.signed_messages: list[SiweMessage] = []
        self.signatures: list[str] = []
        self.open_error: dict[str, Any] | None = None
        self.errors: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def domain(self) -> str:
        return f"127.0.0.1:{self.port}"

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/auth/nonce":
            if self.nonce_refusal is not None:
                return refusal(connection, *self.nonce_refusal)
            nonce = f"n{len(self.nonces):07d}abc"
            self.nonces.add(nonce)
            reply = {
                "nonce": nonce,
                "expires_at": time.time() + 300,
                "domain": self.domain,
                "uri": f"http://{self.domain}/",
                "chain_id": 1,
                "statement": STATEMENT,
            }
            return connection.respond(HTTPStatus.OK, json.dumps(reply))
        if request.path != "/ws":
            return connection.respond(HTTPStatus.NOT_FOUND, '{"error":"not_found"}')  # no message
        authorization = request.headers.get("Authorization")
        self.authorizations.append(authorization)
        if self.refusal is not None:
            return refusal(connection, *self.refusal)
        if authorization not in (None, f"Bearer {KEY}", f"Bearer {SESSION_TOKEN}"):
            return refusal(connection, HTTPStatus.UNAUTHORIZED, "unauthorized")
        return None

    async def handle(self, ws: ServerConnection) -> None:
        async for frame in ws:
            message = json.loads(frame)
            reply: dict[str, Any]
            if message["type"] == "auth":
                reply = self.authenticate(message)
            elif message["type"] == "open":
                reply = self.open_error or OPENED
            elif message["type"] == "ping":
                reply = {"type": "pong", "data": message.get("data")}
            elif message["type"] == "turn":
                reply = self.errors.pop(0) | {"request_id": message["request_id"]}
            else:
                raise AssertionError(f"unexpected {message}")
            await ws.send(json.dumps(reply))

    def authenticate(self, message: dict[str, Any]) -> dict[str, Any]:
        if message.get("token") is not None:
            if message["token"] != KEY:
                return error_frame("unauthorized", False)
            return {
                "type": "authenticated",
                "principal": "key:fk_0123456789abcdef",
                "wallet": "0xW",
            }
        proof = message["siwe"]
        signed = SiweMessage.from_message(proof["message"])
        if signed.nonce not in self.nonces:
            return error_frame("unauthorized", False)
        self.nonces.remove(signed.nonce)  # single use
        signed.verify(proof["signature"], domain=self.domain, nonce=signed.nonce)
        self.signed_messages.append(signed)
        self.signatures.append(proof["signature"])
        return {
            "type": "authenticated",
            "principal": f"wallet:{signed.address}",
            "wallet": signed.address,
            "token": SESSION_TOKEN,
            "expires_at": 1796083200,
        }


def refusal(connection: ServerConnection, status: HTTPStatus, code: str) -> Response:
    """An HTTP refusal as farmesh_ws writes it."""
    return connection.respond(status, json.dumps({"error": code, "message": f"scripted {code}"}))


@contextlib.asynccontextmanager
async def scripted_gateway() -> AsyncIterator[ScriptedGateway]:
    gateway = ScriptedGateway()
    async with serve(
        gateway.handle, "127.0.0.1", 0, process_request=gateway.process_request
    ) as srv:
        gateway.port = next(iter(srv.sockets)).getsockname()[1]
        yield gateway


@pytest.fixture
def account() -> LocalAccount:
    """A throwaway wallet key, made for this test."""
    made: LocalAccount = Account.create()
    return made


async def test_a_token_is_sent_as_bearer_in_the_handshake() -> None:
    async with scripted_gateway() as gateway:
        async with FarmeshClient.connect(gateway.url, token=KEY) as client:
            await client.open_chat()
        async with FarmeshClient.connect(gateway.url) as client:
            await client.open_chat()
    assert gateway.authorizations == [f"Bearer {KEY}", None]
    assert client.identity is None


async def test_refused_handshakes_raise_their_codes() -> None:
    async with scripted_gateway() as gateway:
        with pytest.raises(Unauthorized) as refused:
            await FarmeshClient.connect(gateway.url, token="fmk_fk_0123456789abcdef_wrong")
        assert (refused.value.code, refused.value.retryable) == ("unauthorized", False)
        assert refused.value.message == f"scripted unauthorized (HTTP 401 from {gateway.url})"
        assert "wrong" not in str(refused.value)

        gateway.refusal = (HTTPStatus.SERVICE_UNAVAILABLE, "auth_unavailable")
        with pytest.raises(AuthUnavailable) as unavailable:
            await FarmeshClient.connect(gateway.url, token=KEY)
        assert (unavailable.value.code, unavailable.value.retryable) == ("auth_unavailable", True)

        gateway.refusal = (HTTPStatus.TOO_MANY_REQUESTS, "quota_exceeded")
        with pytest.raises(QuotaExceeded) as too_many:
            await FarmeshClient.connect(gateway.url, token=KEY)
        assert too_many.value.retryable is True

        gateway.refusal = (HTTPStatus.FORBIDDEN, "origin_not_allowed")
        with pytest.raises(ConnectFailed) as forbidden:
            await FarmeshClient.connect(gateway.url)
        assert forbidden.value.message == (
            f"cannot connect to {gateway.url}: server rejected WebSocket connection: HTTP 403"
            " (origin_not_allowed)"
        )


async def test_authenticate_sends_the_auth_message() -> None:
    async with scripted_gateway() as gateway, FarmeshClient.connect(gateway.url) as client:
        with pytest.raises(Unauthorized) as refused:
            await client.authenticate("fms_" + "x" * 43)
        assert refused.value.retryable is False
        assert client.identity is None
        # The connection stays open for another try.
        identity = await client.authenticate(KEY)
        assert identity == Identity("key:fk_0123456789abcdef", "0xW")
        assert client.identity == identity
        chat = await client.open_chat()
        assert chat.session_id == "s1"


async def test_sign_in_with_ethereum(account: LocalAccount) -> None:
    async with scripted_gateway() as gateway, FarmeshClient.connect(gateway.url) as client:
        before = time.time()
        identity = await client.sign_in_with_ethereum(account, valid_for_s=600)
    assert identity == Identity(
        f"wallet:{account.address}", account.address, SESSION_TOKEN, 1796083200
    )
    assert client.identity == identity
    assert SESSION_TOKEN not in repr(identity)
    (signed,) = gateway.signed_messages
    assert gateway.nonces == set()  # the one issued nonce was used
    assert signed.address == account.address
    assert signed.domain == gateway.domain
    assert signed.uri == f"http://{gateway.domain}/"
    assert signed.statement == STATEMENT
    assert (str(signed.version), signed.chain_id) == ("1", 1)
    issued = datetime.fromisoformat(signed.issued_at).timestamp()
    expires = datetime.fromisoformat(signed.expiration_time).timestamp()
    assert before - 1 <= issued <= time.time()
    assert expires - issued == pytest.approx(600, abs=0.01)


async def test_a_refused_nonce_raises_its_code(account: LocalAccount) -> None:
    async with scripted_gateway() as gateway, FarmeshClient.connect(gateway.url) as client:
        gateway.nonce_refusal = (HTTPStatus.SERVICE_UNAVAILABLE, "auth_unavailable")
        with pytest.raises(AuthUnavailable) as unavailable:
            await client.sign_in_with_ethereum(account)
        nonce_url = f"http://{gateway.domain}/auth/nonce"
        assert unavailable.value.message == (
            f"scripted auth_unavailable (GET {nonce_url} answered HTTP 503)"
        )
        gateway.nonce_refusal = (HTTPStatus.NOT_FOUND, "not_found")
        with pytest.raises(FarmeshClientError) as missing:
            await client.sign_in_with_ethereum(account)
        assert missing.value.code == "not_found"
        assert missing.value.message == f"scripted not_found (GET {nonce_url} answered HTTP 404)"
        assert client.identity is None


async def test_each_identity_and_quota_code_has_its_exception() -> None:
    async with scripted_gateway() as gateway, FarmeshClient.connect(gateway.url) as client:
        gateway.open_error = error_frame("wallet_mismatch", False)
        with pytest.raises(WalletMismatch) as mismatch:
            await client.open_chat(user_wallet="0xSomeoneElse")
        assert mismatch.value.retryable is False

        gateway.open_error = None
        chat = await client.open_chat()
        gateway.errors = [
            error_frame("quota_exceeded", True, retry_after_s=2.5),
            error_frame("quota_exceeded", True),
            error_frame("rate_limited", True, retry_after_s=0.75),
            error_frame("insufficient_balance", False),
            error_frame("unauthorized", False),
            error_frame("busy", False),
        ]
        expected: list[tuple[type[FarmeshClientError], bool, float | None]] = [
            (QuotaExceeded, True, 2.5),
            (QuotaExceeded, True, None),
            (RateLimited, True, 0.75),
            (InsufficientBalance, False, None),
            (Unauthorized, False, None),
            (FarmeshClientError, False, None),
        ]
        for kind, retryable, retry_after_s in expected:
            with pytest.raises(FarmeshClientError) as failed:
                await chat.ask("Hello")
            assert type(failed.value) is kind
            assert failed.value.retryable is retryable
            assert failed.value.retry_after_s == retry_after_s
            assert failed.value.request_id is not None
        assert failed.value.code == "busy"


async def test_credentials_are_never_logged(
    account: LocalAccount, caplog: pytest.LogCaptureFixture
) -> None:
    """websockets logs handshake headers and frames at DEBUG: not the credentials in them."""
    caplog.set_level(logging.DEBUG, logger="websockets.client")
    caplog.set_level(logging.DEBUG, logger="farmesh_ws")
    async with scripted_gateway() as gateway:
        async with FarmeshClient.connect(gateway.url, token=KEY) as client:
            await client.open_chat()
        async with FarmeshClient.connect(gateway.url) as client:
            await client.authenticate(KEY)
        async with FarmeshClient.connect(gateway.url) as client:
            await client.sign_in_with_ethereum(account)
    logged = caplog.text
    assert "Authorization: [redacted]" in logged
    assert "TEXT [redacted: may hold a credential" in logged
    assert '"type":"open"' in logged  # other frames are logged as they are
    for secret in ("K" * 20, "S" * 20):
        assert secret not in logged
    (signed,) = gateway.signed_messages
    (signature,) = gateway.signatures
    assert signed.nonce not in logged  # the whole signed message is left out
    assert signature[2:30] not in logged
