"""Payout identity on the real swarm: server0 proves PAYOUT_WALLET with its identity key,
server1 proves none; frames and a real ledger (SQLite) credit them so, and server0 keeps its
peer id and wallet across a restart (same identity file)."""

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from farmesh_ws.config import Settings
from farmesh_ws.ledger.checkpoints import TurnCheckpoints
from farmesh_ws.ledger.observer import LedgerObserver
from farmesh_ws.ledger.payees import PayeeEarnings, payee_earnings
from farmesh_ws.ledger.store import Ledger
from farmesh_ws.ledger.writer import LedgerWriter
from farmesh_ws.mesh.status import MeshStatusCache
from farmesh_ws.metrics import Metrics
from farmesh_ws.models import BUNDLED_MODEL_ID
from farmesh_ws.payout.dht import fetch_statements
from farmesh_ws.payout.statement import PayoutStatement, verify_statement
from farmesh_ws.transport.ws import GatewayServer
from tests.conftest import PAYOUT_WALLET
from tests.helpers import PRICE, open_chat, run_turn, ws_url


@pytest.fixture
async def paid(backend: Any, tmp_path: Path) -> AsyncIterator[tuple[GatewayServer, LedgerWriter]]:
    """A gateway on the shared backend whose turns go to a fresh SQLite ledger."""
    writer = LedgerWriter(Ledger(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"), tmp_path / "s")
    await writer.start()
    observer = LedgerObserver(writer, TurnCheckpoints(tmp_path / "checkpoints"))
    settings = Settings(port=0, auth="off", price_per_token_far=PRICE)
    status = MeshStatusCache(backend.model_ids, backend.coverage, refresh_s=60)
    await status.refresh()
    server = GatewayServer(settings, backend, status, Metrics(), observers=[observer])
    await server.start()
    yield server, writer
    await server.shutdown()
    await writer.aclose()


async def _turn(server: GatewayServer, text: str) -> dict[str, Any]:
    async with connect(ws_url(server)) as ws:
        await open_chat(ws)
        _, _, contribution = await run_turn(ws, "1", text, max_new_tokens=8)
    return contribution


def _by_name(swarm: Any, name: str) -> Any:
    return next(node for node in swarm.servers if node.name == name and node.alive)


def _payees(found: list[PayeeEarnings]) -> dict[str, PayeeEarnings]:
    return {payee.payee: payee for payee in found}


async def test_the_bound_server_is_paid_to_its_wallet_the_other_to_its_peer_id(
    paid: tuple[GatewayServer, LedgerWriter], swarm: Any
) -> None:
    server, writer = paid
    bound, unbound = _by_name(swarm, "server0"), _by_name(swarm, "server1")
    contribution = await _turn(server, "What is the capital of France?")
    nodes = {node["peer_id"]: node for node in contribution["nodes"]}
    assert (nodes[bound.peer_id]["payout_wallet"], nodes[bound.peer_id]["payout_bound"]) == (
        PAYOUT_WALLET,
        True,
    )
    assert (nodes[unbound.peer_id]["payout_wallet"], nodes[unbound.peer_id]["payout_bound"]) == (
        None,
        False,
    )
    await writer.flush()
    payees = _payees(await payee_earnings(writer.ledger))
    assert set(payees) == {PAYOUT_WALLET, unbound.peer_id}
    assert payees[PAYOUT_WALLET].payout_bound
    assert payees[PAYOUT_WALLET].peer_ids == (bound.peer_id,)
    assert payees[PAYOUT_WALLET].earned_far == Decimal(nodes[bound.peer_id]["share_far"])
    assert not payees[unbound.peer_id].payout_bound
    assert payees[unbound.peer_id].tokens == nodes[unbound.peer_id]["tokens"]


@pytest.mark.disruptive
async def test_a_restarted_server_keeps_its_peer_id_and_keeps_earning_for_its_wallet(
    paid: tuple[GatewayServer, LedgerWriter], swarm: Any, backend: Any
) -> None:
    server, writer = paid
    before = _by_name(swarm, "server0")
    first = await _turn(server, "Name a color.")
    restarted_at = time.time()
    after = await asyncio.to_thread(swarm.restart_server, "server0")
    assert (after.peer_id, after.payout_wallet) == (before.peer_id, PAYOUT_WALLET)
    dht = await asyncio.to_thread(swarm.client_dht)
    stored = await asyncio.to_thread(fetch_statements, dht, 10.0)
    fresh = [
        s
        for s in map(PayoutStatement.from_json, stored)
        if s.peer_id == after.peer_id and s.issued_at >= int(restarted_at)
    ]
    assert fresh, "the restarted server published no new statement"
    verify_statement(fresh[0])
    await backend.refresh_routes(BUNDLED_MODEL_ID)
    second = await _turn(server, "Name a fruit.")

    await writer.flush()
    shares = [
        Decimal(node["share_far"])
        for frame in (first, second)
        for node in frame["nodes"]
        if node["peer_id"] == before.peer_id and node["payout_wallet"] == PAYOUT_WALLET
    ]
    assert len(shares) == 2
    payees = _payees(await payee_earnings(writer.ledger))
    assert payees[PAYOUT_WALLET].peer_ids == (before.peer_id,)
    assert payees[PAYOUT_WALLET].earned_far == sum(shares)
