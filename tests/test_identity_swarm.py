"""Identity, balances and the mesh's attention cache on the real swarm, with a real ledger
(SQLite) holding the API keys and balances, wired as ``farmesh-ws serve`` wires them."""

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from farmesh_ws.auth.credentials import Authenticator
from farmesh_ws.config import Settings
from farmesh_ws.ledger import balances
from farmesh_ws.ledger.checkpoints import TurnCheckpoints
from farmesh_ws.ledger.holds import LedgerHolds
from farmesh_ws.ledger.keys import KeyPrincipal, authenticate, create_key
from farmesh_ws.ledger.observer import LedgerObserver
from farmesh_ws.ledger.store import Ledger
from farmesh_ws.ledger.writer import LedgerWriter
from farmesh_ws.mesh.status import MeshStatusCache
from farmesh_ws.metrics import Metrics
from farmesh_ws.transport.ws import GatewayServer
from tests.helpers import PRICE, PROMPT_PRICE, open_chat, receive, run_turn, send, ws_url

WALLET = "0x52908400098527886E0F7030069857D2E4169EE7"
POOR_WALLET = "0x8ba1f109551bD432803012645Ac136ddd64DBA72"


@dataclass
class Deployment:
    server: GatewayServer
    writer: LedgerWriter
    status: MeshStatusCache
    key: str
    poor_key: str

    @property
    def ledger(self) -> Ledger:
        return self.writer.ledger


@pytest.fixture
async def deployment(backend: Any, tmp_path: Path) -> AsyncIterator[Deployment]:
    writer = LedgerWriter(
        Ledger(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"), tmp_path / "spool"
    )
    await writer.start()
    _, key = await create_key(writer.ledger, WALLET, "test")
    _, poor_key = await create_key(writer.ledger, POOR_WALLET, "poor")
    await balances.credit(writer.ledger, WALLET, Decimal("1"))
    settings = Settings(
        port=0,
        auth="required",
        price_per_token_far=PRICE,
        price_per_prompt_token_far=PROMPT_PRICE,
        max_sessions_per_principal=1000,
        max_connections_per_principal=1000,
        max_reserved_tokens_per_principal=1_000_000,
    )

    async def verify(presented: str) -> KeyPrincipal | None:
        return await authenticate(writer.ledger, presented)

    status = MeshStatusCache(backend.model_ids, backend.coverage, refresh_s=60)
    await status.refresh()
    server = GatewayServer(
        settings,
        backend,
        status,
        Metrics(),
        observers=[LedgerObserver(writer, TurnCheckpoints(tmp_path / "checkpoints"))],
        authenticator=Authenticator(settings, keys=verify),
        holds=LedgerHolds(writer.ledger, settings.balance_hold_ttl_s),
    )
    await server.start()
    yield Deployment(server, writer, status, key, poor_key)
    await server.shutdown()
    await writer.aclose()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_keyed_turn_is_paid_from_the_prepaid_balance(deployment: Deployment) -> None:
    async with connect(ws_url(deployment.server), additional_headers=_auth(deployment.key)) as ws:
        await open_chat(ws)
        _, done, _ = await run_turn(ws, "1", "What is the capital of France?", max_new_tokens=8)
    await deployment.writer.flush()
    cost = Decimal(done["usage"]["cost_far"])
    assert cost > 0
    [info] = await balances.balances(deployment.ledger, WALLET)
    assert (info.balance, info.held) == (Decimal("1") - cost, Decimal(0))


async def test_an_empty_balance_is_refused_before_prefill(
    deployment: Deployment, backend: Any
) -> None:
    headers = _auth(deployment.poor_key)
    async with connect(ws_url(deployment.server), additional_headers=headers) as ws:
        opened = await open_chat(ws)
        await send(ws, {"type": "turn", "request_id": "1", "text": "Hello there"})
        refused = await receive(ws)
        await send(ws, {"type": "ping"})
        assert (await receive(ws))["type"] == "pong"  # nothing else came
    assert (refused["type"], refused["code"]) == ("error", "insufficient_balance")
    assert opened["max_length"] > 0
    await deployment.writer.flush()
    turns = await deployment.ledger.database.fetch_val("SELECT COUNT(*) FROM turns")
    assert turns == 0


async def test_sessions_past_the_mesh_attention_cache_are_refused(
    deployment: Deployment,
) -> None:
    """A session reserves its ``max_length`` of the servers' attention cache; once the swarm's
    announced ``cache_tokens_left`` is reserved, the next ``open`` is refused, not queued."""
    await deployment.status.refresh()
    model = deployment.status.get(deployment.server.settings.default_model_id)
    assert model.cache_tokens_left is not None
    assert model.cache_tokens_left >= 2048
    max_length = 2048
    fits = model.cache_tokens_left // max_length
    held = []
    url = ws_url(deployment.server)
    try:
        for _ in range(fits):
            ws = await connect(url, additional_headers=_auth(deployment.key))
            held.append(ws)
            await open_chat(ws, max_length=max_length)
        ws = await connect(url, additional_headers=_auth(deployment.key))
        held.append(ws)
        await send(ws, {"type": "open", "max_length": max_length})
        refused = await receive(ws)
        assert (refused["type"], refused["code"]) == ("error", "quota_exceeded"), json.dumps(
            refused
        )
        assert "attention cache" in refused["message"]
    finally:
        for ws in held:
            await ws.close()


async def test_the_chat_petals_dev_path_is_paid_from_the_balance_too(
    deployment: Deployment,
) -> None:
    url = ws_url(deployment.server).replace("/ws", "/api/v2/generate")
    async with connect(url, additional_headers=_auth(deployment.key)) as ws:
        await send(ws, {"type": "open_inference_session", "max_length": 128})
        assert await receive(ws) == {"ok": True}
        await send(ws, {"type": "generate", "inputs": "The sea is", "max_new_tokens": 4})
        assert (await receive(ws))["ok"] is True
    await deployment.writer.flush()
    spent = await deployment.ledger.database.fetch_val("SELECT SUM(cost_far_e8) FROM turns")
    assert spent > 0
    [info] = await balances.balances(deployment.ledger, WALLET)
    assert (info.balance, info.held) == (Decimal("1") - Decimal(spent) / 10**8, Decimal(0))
    principal = await deployment.ledger.database.fetch_val(
        "SELECT principal FROM inference_sessions"
    )
    assert principal.startswith("key:fk_")
