"""Benchmark resuming a chat session (protocol.md §2.2) on the real local swarm.

Run: ``.venv/bin/python scripts/bench_resume.py [--rounds 6] [--tokens 16]``

Setup: the local swarm (2 Petals servers) and the real PetalsBackend behind one gateway in this
process. One chat session runs greedy turns of ``--tokens`` tokens. Each round runs two turns
side by side: a normal one on the open connection, and one sent right after the connection was
dropped (no close frame, as a network change does), a new one opened and the session resumed
on it. Time to first token is measured from the turn's send to its first token frame; for the
resumed turn the reconnect and ``resume`` come before that send and are reported apart
(``resume_s``: the new connection's handshake to ``resumed``). The order of the two alternates
per round. Medians; the target: resumed ÷ normal time to first token ≤ 1.2.

Prints a table and, last, one ``BENCH_JSON {...}`` line.
"""

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from typing import Any

from bench_gateway import swarm_gateways
from websockets.asyncio.client import ClientConnection, connect

TARGET = 1.2


class Session:
    """One chat session over a connection that can be dropped and resumed."""

    def __init__(self, url: str, tokens: int) -> None:
        self.url = url
        self.tokens = tokens
        self.ws: ClientConnection | None = None
        self.opened: dict[str, Any] = {}
        self.last_seq = 0
        self.turns = 0

    async def _recv(self) -> dict[str, Any]:
        assert self.ws is not None
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), 120))
        self.last_seq = frame.get("seq", self.last_seq)
        return frame

    async def open(self) -> None:
        self.ws = await connect(self.url, proxy=None)
        await self.ws.send(json.dumps({"type": "open"}))
        self.opened = await self._recv()

    async def drop_and_resume(self) -> float:
        """Seconds from the new connection's start to ``resumed``."""
        assert self.ws is not None
        self.ws.transport.abort()
        started = time.perf_counter()
        self.ws = await connect(self.url, proxy=None)
        resume = {
            "type": "resume",
            "session_id": self.opened["session_id"],
            "resume_token": self.opened["resume_token"],
            "last_seq": self.last_seq,
        }
        await self.ws.send(json.dumps(resume))
        answer = await self._recv()
        if answer["type"] != "resumed":
            raise RuntimeError(f"resume refused: {answer}")
        return time.perf_counter() - started

    async def turn(self) -> float:
        """A greedy turn; its time to first token (s)."""
        assert self.ws is not None
        self.turns += 1
        request = {
            "type": "turn",
            "request_id": str(self.turns),
            "temperature": 0,
            "text": f"Say one short sentence about the number {self.turns}.",
            "max_new_tokens": self.tokens,
        }
        sent = time.perf_counter()
        await self.ws.send(json.dumps(request))
        first: float | None = None
        while True:
            frame = await self._recv()
            if frame["type"] == "token" and first is None:
                first = time.perf_counter() - sent
            elif frame["type"] == "contribution":
                return first if first is not None else float("nan")
            elif frame["type"] == "error":
                raise RuntimeError(f"turn failed: {frame}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    normal: list[float] = []
    resumed: list[float] = []
    reattach: list[float] = []
    async with swarm_gateways([lambda s: s], name="resume") as (gateway,):
        session = Session(f"ws://127.0.0.1:{gateway.port}/ws", args.tokens)
        await session.open()
        await session.turn()  # warm-up
        for index in range(args.rounds):
            for way in ("normal", "resumed") if index % 2 == 0 else ("resumed", "normal"):
                if way == "resumed":
                    reattach.append(await session.drop_and_resume())
                    resumed.append(await session.turn())
                else:
                    normal.append(await session.turn())
    ratio = statistics.median(resumed) / statistics.median(normal)
    return {
        "rounds": args.rounds,
        "tokens": args.tokens,
        "normal_ttft_s": round(statistics.median(normal), 4),
        "resumed_ttft_s": round(statistics.median(resumed), 4),
        "resume_s": round(statistics.median(reattach), 4),
        "ratio": round(ratio, 3),
        "target_met": ratio <= TARGET,
        "runs": {
            "normal": [round(t, 4) for t in normal],
            "resumed": [round(t, 4) for t in resumed],
        },
        "migration": "not measured: migration across coordinators is not built yet",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="pairs of turns")
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens per turn")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    report = asyncio.run(run(args))
    print(f"\n{args.rounds} rounds of one normal and one resumed turn, medians")
    print(f"{'turn':<10}{'TTFT (s)':>10}")
    print(f"{'normal':<10}{report['normal_ttft_s']:>10}")
    print(
        f"{'resumed':<10}{report['resumed_ttft_s']:>10}   (resume itself: {report['resume_s']} s)"
    )
    print(f"target: resumed ÷ normal ≤ {TARGET}: {report['ratio']} → {report['target_met']}")
    print("BENCH_JSON " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
