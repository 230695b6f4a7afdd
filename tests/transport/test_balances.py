"""Prepaid balances through the gateway (protocol.md §7): 50 requests of one key at once
against a balance that pays for fewer, on a real ledger (SQLite) with real holds and the
ledger's settlement, over the scripted mesh."""

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from farmesh_ws.engine.events import Observer, RequestEvent, RequestStarted
from farmesh_ws.ledger import balances
from farmesh_ws.ledger.checkpoints import TurnCheckpoints
from farmesh_ws.ledger.holds import LedgerHolds
from farmesh_ws.ledger.keys import KeyPrincipal
from farmesh_ws.ledger.observer import LedgerObserver
from farmesh_ws.ledger.store import Ledger
from farmesh_ws.ledger.writer import LedgerWriter
from farmesh_ws.mesh.fake import FakeBackend
from tests.transport.support import fake_gateway

KEY = "fmk_dave"
WALLET = "0x8ba1f109551bd432803012645ac136ddd64dba72"
CREDIT = Decimal("0.01")  # 100 tokens at 0.0001
REQUESTS = 50
MAX_TOKENS = 5  # each may cost 0.0005: 50 of them want 0.025


class _Admitted(Observer):
    def __init__(self) -> None:
        self.count = 0

    def notify(self, event: RequestEvent) -> None:
        if isinstance(event, RequestStarted):
            self.count += 1


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[LedgerWriter]:
    writer = LedgerWriter(Ledger(f"sqlite+aiosqlite:///{tmp_path / 'l.db'}"), tmp_path / "spool")
    await writer.start()
    yield writer
    await writer.aclose()


async def test_concurrent_requests_never_overdraw_a_balance(
    writer: LedgerWriter, tmp_path: Path
) -> None:
    ledger = writer.ledger
    await balances.credit(ledger, WALLET, CREDIT)
    backend = FakeBackend(reply="abcdefghij", gate=asyncio.Semaphore(0))
    admitted = _Admitted()
    server = await fake_gateway(
        backend,
        keys={KEY: KeyPrincipal("fk_dave", WALLET, None)},
        auth="required",
        observers=[admitted, LedgerObserver(writer, TurnCheckpoints(tmp_path / "checkpoints"))],
        holds=LedgerHolds(ledger, 3600),
        price_per_token_far=Decimal("0.0001"),
        max_connections_per_principal=REQUESTS,
        max_requests_per_principal=REQUESTS,
        requests_burst=REQUESTS,
    )
    url = f"ws://127.0.0.1:{server.port}/ws"
    headers = {"Authorization": f"Bearer {KEY}"}
    sockets = [await connect(url, additional_headers=headers) for _ in range(REQUESTS)]
    refusals: list[dict[str, Any]] = []
    answered = asyncio.Event()

    async def one(index: int) -> list[dict[str, Any]]:
        ws = sockets[index]
        request = {"type": "generate", "request_id": f"g{index}", "prompt": "hi"}
        await ws.send(json.dumps({**request, "max_tokens": MAX_TOKENS}))
        frames = [json.loads(await ws.recv())]
        if frames[0]["type"] == "error":
            refusals.append(frames[0])
            if admitted.count + len(refusals) == REQUESTS:
                answered.set()
            return frames
        while frames[-1]["type"] != "done":
            frames.append(json.loads(await ws.recv()))
        return frames

    tasks = [asyncio.create_task(one(i)) for i in range(REQUESTS)]
    await asyncio.wait_for(answered.wait(), 30)  # every request admitted (hold taken) or refused
    [during] = await balances.balances(ledger, WALLET)
    assert during.held <= during.balance == CREDIT  # all holds at once never exceed the credit
    for _ in range(REQUESTS * (MAX_TOKENS + 1)):
        backend.gate.release()
    results = await asyncio.gather(*tasks)
    for ws in sockets:
        await ws.close()
    await server.shutdown()
    await writer.flush()

    assert {r["code"] for r in refusals} == {"insufficient_balance"}
    assert 20 <= admitted.count < REQUESTS  # 20 full holds fit; a few partial ones may too
    costs = [Decimal(f[-1]["usage"]["cost_far"]) for f in results if f[-1]["type"] == "done"]
    [after] = await balances.balances(ledger, WALLET)
    assert after.held == 0
    assert after.balance == CREDIT - sum(costs) >= 0
    assert sum(costs) > 0


async def test_a_chat_petals_dev_request_is_held_for_all_its_steps(
    writer: LedgerWriter, tmp_path: Path
) -> None:
    """chat.js asks for one token per step and loops until its stop sequence: the hold covers
    the whole request (what the session has room for), not the first step."""
    ledger = writer.ledger
    await balances.credit(ledger, WALLET, Decimal(1))
    server = await fake_gateway(
        FakeBackend(reply="x" * 50),  # each step of the scripted mesh gives one "x"
        keys={KEY: KeyPrincipal("fk_dave", WALLET, None)},
        auth="required",
        observers=[LedgerObserver(writer, TurnCheckpoints(tmp_path / "checkpoints"))],
        holds=LedgerHolds(ledger, 3600),
        price_per_token_far=Decimal("0.0001"),
    )
    url = f"ws://127.0.0.1:{server.port}/api/v2/generate"
    outputs = []
    async with connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        await ws.send(json.dumps({"type": "open_inference_session", "max_length": 256}))
        assert json.loads(await ws.recv()) == {"ok": True}
        request = {"type": "generate", "inputs": "Hi", "max_new_tokens": 1}
        await ws.send(json.dumps({**request, "stop_sequence": "xxxxxxxx"}))
        while True:
            reply = json.loads(await ws.recv())
            assert reply["ok"] is True, reply
            outputs.append(reply["outputs"])
            if reply["stop"]:
                break
    await server.shutdown()
    await writer.flush()
    assert "".join(outputs) == "xxxxxxxx"  # 8 steps; a hold of one step's cost stopped at 1
    spent = await ledger.database.fetch_val("SELECT SUM(cost_far_e8) FROM turns")
    [after] = await balances.balances(ledger, WALLET)
    assert (after.balance, after.held) == (Decimal(1) - Decimal(spent) / 10**8, Decimal(0))
