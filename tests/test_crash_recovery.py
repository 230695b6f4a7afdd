"""SIGKILL mid-turn, restart: the interrupted turn is closed and billed for at most what the
client received (from the checkpoint taken at least every second)."""

import asyncio
import json
import os
import signal
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from farmesh_ws.home import farmesh_home
from tests.test_cli import Command


def _serve(home: Path, swarm: Any, tmp_path: Path) -> Command:
    return Command(
        ["serve", "--port", "0", "--bootstrap", ",".join(swarm.initial_peers)],
        tmp_path,
        FARMESH_HOME=str(home),
        PRICE_PER_TOKEN_FAR="0.0001",
        FARMESH_SHUTDOWN_GRACE_S="2",
        # the test bills a wallet it names; identity and balances have their own tests
        FARMESH_AUTH="off",
        FARMESH_BALANCES="off",
    )


def _ready_url(command: Command) -> str:
    return command.wait_for_line(r"^farmesh-ws ready: ws://", 120).split()[2]


async def _count_until_closed(ws: Any, received: int) -> int:
    """Read the frames already in flight when the server died; return the last token count."""
    while True:
        try:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
        except ConnectionClosed:
            return received
        if frame["type"] == "token":
            received = frame["tokens_generated"]


@pytest.mark.disruptive
async def test_sigkill_mid_turn_then_restart_bills_at_most_what_was_delivered(
    swarm: Any, bundled_model_path: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(farmesh_home() / "models")
    first = _serve(home, swarm, tmp_path)
    second: Command | None = None
    try:
        url = await asyncio.to_thread(_ready_url, first)
        received = 0
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "open", "user_wallet": "crash-test"}))
            session_id = json.loads(await ws.recv())["session_id"]
            await ws.send(
                json.dumps(
                    {
                        "type": "turn",
                        "request_id": "doomed",
                        "text": "Write a very long story about a lighthouse keeper.",
                        "max_new_tokens": 400,
                    }
                )
            )
            while received < 30:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
                assert frame["type"] == "token", frame
                received = frame["tokens_generated"]
            os.killpg(first.process.pid, signal.SIGKILL)
            first.process.wait()
            received = await _count_until_closed(ws, received)

        second = _serve(home, swarm, tmp_path)
        await asyncio.to_thread(_ready_url, second)
        second.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.process.wait, 60) == 0
    finally:
        for command in (first, second):
            if command is not None and command.process.poll() is None:
                os.killpg(command.process.pid, signal.SIGKILL)
                command.process.wait()
            if command is not None and command.process.stdout is not None:
                command.process.stdout.close()

    with sqlite3.connect(home / "ledger.sqlite3") as db:
        rows = db.execute(
            "SELECT finish_reason, completion_tokens, cost_far_e8, wallet FROM turns"
            " WHERE session_id = ? AND request_id = 'doomed'",
            (session_id,),
        ).fetchall()
    assert len(rows) == 1
    finish_reason, billed_tokens, cost_e8, wallet = rows[0]
    assert (finish_reason, wallet) == ("interrupted", "crash-test")
    assert 1 <= billed_tokens <= received
    assert Decimal(cost_e8) / 10**8 == Decimal("0.0001") * billed_tokens
    assert not any((home / "ledger-checkpoints").glob("*/*.json"))
