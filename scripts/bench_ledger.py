"""Benchmark: what the ledger costs the token stream, and how many turns/s its writer stores.

1. Streaming with the ledger on vs off, side by side in one run: one real local swarm and one
   Petals backend serve two gateways, one recording every turn in a fresh PostgreSQL database
   (per-token checkpoints + one transaction per turn), one with no ledger. A WebSocket client
   runs the same greedy turn (``--tokens`` new tokens, a prompt that does not stop early)
   alternately on each, ``--pairs`` times; tokens/s = tokens / (last token - first token)
   as the client sees it. Reported: median per side and the ratio on/off (target >= 0.98).
2. Writer throughput: ``--records`` turn records (2 node contributions each) submitted at
   once to a LedgerWriter on a fresh PostgreSQL database, then on SQLite; turns/s = records /
   time until all are committed.

Prints a table and, last, one ``BENCH_JSON {...}`` line. The machine is noisy (2 cores shared
by the client, the gateway and both servers); the ratio comes from interleaved runs.
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from websockets.asyncio.client import connect

from farmesh_ws.config import Settings
from farmesh_ws.core.money import to_e8
from farmesh_ws.home import farmesh_home
from farmesh_ws.ledger.checkpoints import TurnCheckpoints
from farmesh_ws.ledger.observer import LedgerObserver
from farmesh_ws.ledger.records import ContributionRecord, TurnRecord
from farmesh_ws.ledger.store import Ledger
from farmesh_ws.ledger.writer import LedgerWriter
from farmesh_ws.mesh.petals import ModelSpec, PetalsBackend, PetalsBackendConfig
from farmesh_ws.mesh.status import MeshStatusCache
from farmesh_ws.metrics import Metrics
from farmesh_ws.models import BUNDLED_MODEL_ID, dht_prefix_for
from farmesh_ws.models.bundled import prepare_bundled_model
from farmesh_ws.swarm import LocalSwarm, SwarmConfig, read_num_blocks
from farmesh_ws.transport.ws import GatewayServer

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
PROMPT = "Write a very long story about a lighthouse keeper and the sea."


async def fresh_postgres() -> tuple[str, str]:
    name = f"farmesh_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(POSTGRES_ADMIN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return name, f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


async def drop_postgres(name: str) -> None:
    admin = await asyncpg.connect(POSTGRES_ADMIN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def client_turn(url: str, tokens: int) -> float:
    """One greedy turn of exactly ``tokens`` tokens; tokens/s between first and last token."""
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "open"}))
        json.loads(await ws.recv())
        await ws.send(
            json.dumps(
                {"type": "turn", "request_id": "b", "text": PROMPT, "max_new_tokens": tokens}
            )
        )
        arrivals = []
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "token":
                arrivals.append(time.perf_counter())
            elif frame["type"] == "contribution":
                break
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])


async def streaming(args: argparse.Namespace, swarm: LocalSwarm, model: Path) -> dict[str, Any]:
    backend = await PetalsBackend.start(
        PetalsBackendConfig(
            initial_peers=tuple(swarm.initial_peers),
            models=(ModelSpec(BUNDLED_MODEL_ID, model, swarm.config.dht_prefix),),
        )
    )
    name, url = await fresh_postgres()
    scratch = Path(tempfile.mkdtemp(prefix="farmesh-bench-ledger-"))
    writer = LedgerWriter(Ledger(url), scratch / "spool")
    await writer.start()
    servers: list[GatewayServer] = []
    try:
        status = MeshStatusCache(backend.model_ids, backend.coverage, refresh_s=60)
        await status.refresh()
        settings = replace(Settings(port=0), idle_timeout_s=600)
        ledger_observer = LedgerObserver(writer, TurnCheckpoints(scratch / "checkpoints"))
        on = GatewayServer(settings, backend, status, Metrics(), observers=[ledger_observer])
        off = GatewayServer(settings, backend, status, Metrics())
        servers = [on, off]
        for server in servers:
            await server.start()
        urls = {side: f"ws://127.0.0.1:{s.port}/ws" for side, s in (("on", on), ("off", off))}
        await client_turn(urls["off"], 4)  # warm-up
        rates: dict[str, list[float]] = {"on": [], "off": []}
        for pair in range(args.pairs):
            order = ("on", "off") if pair % 2 == 0 else ("off", "on")
            for side in order:
                rates[side].append(await client_turn(urls[side], args.tokens))
        await writer.flush()
        stored = await writer.ledger.turn_count()
    finally:
        for server in servers:
            await server.shutdown()
        await writer.aclose()
        await backend.aclose()
        await drop_postgres(name)
    on_rate, off_rate = statistics.median(rates["on"]), statistics.median(rates["off"])
    return {
        "tokens_per_turn": args.tokens,
        "pairs": args.pairs,
        "ledger_on_tokens_per_s": round(on_rate, 2),
        "ledger_off_tokens_per_s": round(off_rate, 2),
        "ratio_on_over_off": round(on_rate / off_rate, 3),
        "runs_on": [round(r, 2) for r in rates["on"]],
        "runs_off": [round(r, 2) for r in rates["off"]],
        "turns_stored": stored,
    }


def synthetic_record(index: int) -> TurnRecord:
    cost = Decimal("0.0049")
    return TurnRecord(
        session_id=f"bench-{index // 10}",
        request_id=f"r{index}",
        kind="turn",
        wallet=f"wallet-{index % 50}",
        model_id=BUNDLED_MODEL_ID,
        started_at=time.time(),
        ended_at=time.time(),
        prompt_tokens=20,
        completion_tokens=49,
        cached_tokens=100,
        finish_reason="stop",
        cost_far_e8=to_e8(cost),
        ttft_ms=80.0,
        duration_ms=900.0,
        contributions=tuple(
            ContributionRecord(
                peer_id=f"peer-{part}",
                public_name=None,
                start_block=15 * part,
                end_block=15 * (part + 1),
                tokens=69,
                replayed_tokens=0,
                work=69 * 15,
                share_far_e8=to_e8(cost / 2),
            )
            for part in range(2)
        ),
    )


async def writer_throughput(url: str, records: int, scratch: Path) -> float:
    writer = LedgerWriter(Ledger(url), scratch / f"spool-{uuid.uuid4().hex[:6]}")
    await writer.start()
    started = time.perf_counter()
    for index in range(records):
        writer.submit(synthetic_record(index))
    await writer.flush()
    elapsed = time.perf_counter() - started
    assert await writer.ledger.turn_count() == records
    await writer.aclose()
    return records / elapsed


async def writers(args: argparse.Namespace) -> dict[str, float]:
    scratch = Path(tempfile.mkdtemp(prefix="farmesh-bench-writer-"))
    name, url = await fresh_postgres()
    try:
        postgres = await writer_throughput(url, args.records, scratch)
    finally:
        await drop_postgres(name)
    sqlite = await writer_throughput(
        f"sqlite+aiosqlite:///{scratch / 'ledger.sqlite3'}", args.records, scratch
    )
    return {"postgresql_turns_per_s": round(postgres, 1), "sqlite_turns_per_s": round(sqlite, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=48, help="tokens per streamed turn")
    parser.add_argument("--pairs", type=int, default=6, help="on/off turn pairs")
    parser.add_argument("--records", type=int, default=2000, help="records for the writer test")
    args = parser.parse_args()

    model = prepare_bundled_model(farmesh_home(), progress=False)
    config = SwarmConfig(
        model_path=model,
        dht_prefix=dht_prefix_for(BUNDLED_MODEL_ID),
        num_blocks=read_num_blocks(model),
        log_dir=Path(tempfile.mkdtemp(prefix="farmesh-bench-swarm-")),
    )
    with LocalSwarm(config) as swarm:
        stream = asyncio.run(streaming(args, swarm, model))
    write = asyncio.run(writers(args))

    rows = [
        ("streamed tokens/s, PostgreSQL ledger on", stream["ledger_on_tokens_per_s"]),
        ("streamed tokens/s, ledger off", stream["ledger_off_tokens_per_s"]),
        ("ratio on / off (target >= 0.98)", stream["ratio_on_over_off"]),
        ("turns stored by the ledger-on gateway", stream["turns_stored"]),
        ("writer turns/s, PostgreSQL (2 contributions each)", write["postgresql_turns_per_s"]),
        ("writer turns/s, SQLite", write["sqlite_turns_per_s"]),
    ]
    print("Ledger benchmark (noisy 2-core machine; on/off turns interleaved in one run)")
    for label, value in rows:
        print(f"  {label:<52} {value}")
    print("BENCH_JSON " + json.dumps({"streaming": stream, "writer": write}))


if __name__ == "__main__":
    main()
