"""Identity on every surface (protocol.md §2.1): credentials at the handshake or in a first
``auth`` message, the modes, and wallet claims, on /ws and /api/v2/generate alike, through
real sockets over the scripted mesh."""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from farmesh_ws.auth.connection import ConnectionIdentity
from farmesh_ws.auth.credentials import Authenticator, Credential
from farmesh_ws.config import Settings
from farmesh_ws.core.principal import Principal, PrincipalKind
from farmesh_ws.engine.events import Observer, RequestEvent, RequestStarted
from farmesh_ws.engine.quotas import Quotas
from farmesh_ws.errors import Unauthorized
from farmesh_ws.ledger.keys import KeyPrincipal
from farmesh_ws.mesh.fake import FakeBackend
from farmesh_ws.transport.ws import GatewayServer
from tests.transport.support import fake_gateway

ALICE = "fmk_alice"
KEYS = {
    ALICE: KeyPrincipal(
        key_id="fk_alice", wallet="0xAb5801a7D398351b8bE11C439e05C5B3259aeC9B", name=None
    )
}
ALICE_WALLET = KEYS[ALICE].wallet


class _Contexts(Observer):
    def __init__(self) -> None:
        self.started: list[Any] = []

    def notify(self, event: RequestEvent) -> None:
        if isinstance(event, RequestStarted):
            self.started.append(event.context)


async def _recv(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return message


async def _read_until_closed(ws: ClientConnection) -> None:
    """v2 sends its error before closing; v1 just closes."""
    while True:
        await asyncio.wait_for(ws.recv(), 10)


def _headers(key: str | None) -> dict[str, str] | None:
    return None if key is None else {"Authorization": f"Bearer {key}"}


async def _gateway(mode: str, **overrides: Any) -> tuple[GatewayServer, _Contexts]:
    contexts = _Contexts()
    server = await fake_gateway(
        FakeBackend(reply="ok"), keys=KEYS, observers=[contexts], auth=mode, **overrides
    )
    return server, contexts


@pytest.fixture
async def required() -> AsyncIterator[tuple[GatewayServer, _Contexts]]:
    server, contexts = await _gateway("required", auth_timeout_s=0.5)
    yield server, contexts
    await server.shutdown()


@pytest.fixture
async def optional() -> AsyncIterator[tuple[GatewayServer, _Contexts]]:
    server, contexts = await _gateway("optional")
    yield server, contexts
    await server.shutdown()


# A request on each path: one function per surface, the same assertions for both.
async def _v1_request(
    server: GatewayServer, *, key: str | None = None, auth_message: str | None = None, **fields: Any
) -> list[dict[str, Any]]:
    """Connect to /ws, authenticate as told, open with ``fields``, run one turn; every frame."""
    frames: list[dict[str, Any]] = []
    async with connect(f"ws://127.0.0.1:{server.port}/ws", additional_headers=_headers(key)) as ws:
        if auth_message is not None:
            await ws.send(json.dumps({"type": "auth", "token": auth_message}))
            frames.append(await _recv(ws))
        await ws.send(json.dumps({"type": "open", **fields}))
        frames.append(await _recv(ws))
        if frames[-1]["type"] != "opened":
            return frames
        await ws.send(json.dumps({"type": "turn", "request_id": "1", "text": "hi"}))
        while frames[-1]["type"] != "contribution" and frames[-1]["type"] != "error":
            frames.append(await _recv(ws))
    return frames


async def _v2_request(
    server: GatewayServer, *, key: str | None = None, auth_message: str | None = None, **fields: Any
) -> list[dict[str, Any]]:
    """Connect to /api/v2/generate, authenticate as told, open, generate once; every frame."""
    frames: list[dict[str, Any]] = []
    url = f"ws://127.0.0.1:{server.port}/api/v2/generate"
    async with connect(url, additional_headers=_headers(key)) as ws:
        if auth_message is not None:
            await ws.send(json.dumps({"type": "auth", "token": auth_message}))
            frames.append(await _recv(ws))
            if frames[-1]["ok"] is not True:  # this path closes after any error
                return frames
        await ws.send(json.dumps({"type": "open_inference_session", "max_length": 64, **fields}))
        frames.append(await _recv(ws))
        if frames[-1]["ok"] is not True:
            return frames
        await ws.send(json.dumps({"type": "generate", "inputs": "hi", "max_new_tokens": 1}))
        frames.append(await _recv(ws))
    return frames


Request = Callable[..., Awaitable[list[dict[str, Any]]]]
BOTH_PATHS = pytest.mark.parametrize("request_on", [_v1_request, _v2_request], ids=["v1", "v2"])


def _served(frames: list[dict[str, Any]]) -> bool:
    """The request ran to its end on either path."""
    last = frames[-1]
    return last.get("ok") is True or last.get("type") == "contribution"


def _refused(frames: list[dict[str, Any]]) -> str:
    """The error code of a refused request on either path."""
    last = frames[-1]
    if "ok" in last:
        assert last["ok"] is False
        return str(last["traceback"].split(":", 1)[0])
    assert last["type"] == "error"
    return str(last["code"])


@BOTH_PATHS
async def test_a_key_in_the_handshake_bills_its_wallet(
    request_on: Request, required: tuple[GatewayServer, _Contexts]
) -> None:
    server, contexts = required
    assert _served(await request_on(server, key=ALICE))
    assert [(c.wallet, c.principal_id) for c in contexts.started] == [
        (ALICE_WALLET, "key:fk_alice")
    ]


@BOTH_PATHS
async def test_a_key_in_an_auth_message_bills_its_wallet(
    request_on: Request, required: tuple[GatewayServer, _Contexts]
) -> None:
    server, contexts = required
    frames = await request_on(server, auth_message=ALICE)
    answer = frames[0]
    assert answer.get("principal") == "key:fk_alice"
    assert answer.get("wallet") == ALICE_WALLET
    assert [c.wallet for c in contexts.started] == [ALICE_WALLET]


@BOTH_PATHS
async def test_a_bad_key_in_the_handshake_gets_401(
    request_on: Request, required: tuple[GatewayServer, _Contexts]
) -> None:
    server, contexts = required
    with pytest.raises(InvalidStatus) as refused:
        await request_on(server, key="fmk_mallory")
    assert refused.value.response.status_code == 401
    assert refused.value.response.headers["WWW-Authenticate"] == "Bearer"
    assert json.loads(refused.value.response.body)["error"] == "unauthorized"
    assert contexts.started == []


@BOTH_PATHS
async def test_a_bad_key_in_an_auth_message_is_unauthorized(
    request_on: Request, required: tuple[GatewayServer, _Contexts]
) -> None:
    server, contexts = required
    frames = await request_on(server, auth_message="fmk_mallory")
    assert _refused(frames[:1]) == "unauthorized"
    assert contexts.started == []


@BOTH_PATHS
async def test_required_refuses_requests_without_credentials(
    request_on: Request, required: tuple[GatewayServer, _Contexts]
) -> None:
    server, contexts = required
    frames = await request_on(server)
    assert _refused(frames) == "unauthorized"
    assert contexts.started == []


@pytest.mark.parametrize("path", ["/ws", "/api/v2/generate"])
async def test_required_closes_a_connection_that_never_authenticates(
    path: str, required: tuple[GatewayServer, _Contexts]
) -> None:
    server, _ = required
    async with connect(f"ws://127.0.0.1:{server.port}{path}") as ws:
        with pytest.raises(ConnectionClosed):
            await _read_until_closed(ws)
        assert ws.close_code == 1008


@BOTH_PATHS
async def test_naming_another_wallet_is_a_wallet_mismatch(
    request_on: Request, required: tuple[GatewayServer, _Contexts]
) -> None:
    server, contexts = required
    frames = await request_on(server, key=ALICE, user_wallet="0xvictim")
    assert _refused(frames) == "wallet_mismatch"
    assert _served(await request_on(server, key=ALICE, user_wallet=ALICE_WALLET.lower()))
    assert [c.wallet for c in contexts.started] == [ALICE_WALLET]


@BOTH_PATHS
async def test_anonymous_use_cannot_bill_a_wallet(
    request_on: Request, optional: tuple[GatewayServer, _Contexts]
) -> None:
    server, contexts = optional
    frames = await request_on(server, user_wallet=ALICE_WALLET)
    assert _refused(frames) == "wallet_mismatch"
    assert _served(await request_on(server))
    assert [(c.wallet, c.principal_id) for c in contexts.started] == [(None, "anonymous")]


async def test_auth_after_open_or_twice_is_refused(
    required: tuple[GatewayServer, _Contexts],
) -> None:
    server, _ = required
    async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
        await ws.send(json.dumps({"type": "auth", "token": ALICE}))
        assert (await _recv(ws))["type"] == "authenticated"
        await ws.send(json.dumps({"type": "auth", "token": ALICE}))
        assert (await _recv(ws))["code"] == "invalid_request"


async def test_a_revoked_key_stops_working_on_open_connections() -> None:
    keys = dict(KEYS)
    server = await fake_gateway(
        FakeBackend(reply="ok"), keys=keys, auth="required", credential_recheck_s=1e-9
    )
    try:
        async with connect(
            f"ws://127.0.0.1:{server.port}/ws", additional_headers=_headers(ALICE)
        ) as ws:
            await ws.send(json.dumps({"type": "open"}))
            assert (await _recv(ws))["type"] == "opened"
            del keys[ALICE]  # `farmesh-ws keys revoke`
            await ws.send(json.dumps({"type": "turn", "request_id": "1", "text": "hi"}))
            refused = await _recv(ws)
            assert (refused["type"], refused["code"]) == ("error", "unauthorized")
    finally:
        await server.shutdown()


async def test_an_expired_session_token_stops_working_on_open_connections() -> None:
    settings = Settings(auth="required")
    authenticator = Authenticator(settings)
    wallet = Principal(PrincipalKind.WALLET, ALICE_WALLET, ALICE_WALLET, "addr")
    quotas = Quotas(settings)
    live = ConnectionIdentity(
        authenticator,
        quotas,
        principal=wallet,
        address="127.0.0.1",
        domain="test",
        credential=Credential(wallet, "fms_live", time.time() + 60),
    )
    assert await live.current() is wallet
    expired = ConnectionIdentity(
        authenticator,
        quotas,
        principal=wallet,
        address="127.0.0.1",
        domain="test",
        credential=Credential(wallet, "fms_old", time.time() - 1),
    )
    with pytest.raises(Unauthorized, match="expired"):
        await expired.current()


async def test_the_anonymous_free_quota_binds_a_whole_chat_petals_dev_request() -> None:
    backend = FakeBackend(reply="x" * 300)
    server = await fake_gateway(backend, auth="optional", anonymous_tokens_per_day=40)
    try:
        url = f"ws://127.0.0.1:{server.port}/api/v2/generate"
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "open_inference_session", "max_length": 512}))
            assert (await _recv(ws))["ok"] is True
            request = {"type": "generate", "inputs": "hi", "max_new_tokens": 1}
            await ws.send(json.dumps({**request, "stop_sequence": "never"}))
            streamed = 0
            while (reply := await _recv(ws))["ok"]:
                streamed += reply["token_count"]
        assert reply["traceback"].startswith("quota_exceeded: ")
        prompt = len(backend.sessions[0].encode("hi"))
        assert 0 < streamed <= 40 - prompt
    finally:
        await server.shutdown()


async def test_required_answers_every_message_but_auth_and_ping_with_unauthorized(
    required: tuple[GatewayServer, _Contexts],
) -> None:
    server, _ = required
    async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
        for message in (
            {"type": "turn", "request_id": "1", "text": "hi"},
            {"type": "cancel", "request_id": "1"},
            {"type": "close"},
            {"type": "generate", "request_id": "2", "prompt": "hi"},
        ):
            await ws.send(json.dumps(message))
            assert (await _recv(ws))["code"] == "unauthorized", message
        await ws.send(json.dumps({"type": "ping", "data": "still here"}))
        assert await _recv(ws) == {"type": "pong", "data": "still here"}


@BOTH_PATHS
async def test_a_token_in_no_format_of_ours_counts_as_none_unless_required(
    request_on: Request,
    optional: tuple[GatewayServer, _Contexts],
    required: tuple[GatewayServer, _Contexts],
) -> None:
    loose, contexts = optional
    assert _served(await request_on(loose, key="sk-placeholder"))
    assert [c.principal_id for c in contexts.started] == ["anonymous"]
    strict, _ = required
    with pytest.raises(InvalidStatus) as refused:
        await request_on(strict, key="sk-placeholder")
    assert refused.value.response.status_code == 401
