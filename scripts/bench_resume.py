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

Then moving a session to another gateway (§2.3): two more gateways share one state store. Each
round, a session on the first runs ``--history`` turns, its connection drops and it resumes on the
second (which asks the first to let it go), and its next turn's time to first token, replay of
the history included, is compared with a fresh session that is sent the same history as one
prompt: the OpenAI API with the whole conversation, on a gateway without cache reuse, as a client
that cannot resume would do. The order of the two alternates per round; no target is set.

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

import openai
from bench_gateway import swarm_gateways
from websockets.asyncio.client import ClientConnection, connect

from farmesh_ws.models import BUNDLED_MODEL_ID

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
        self.messages: list[dict[str, str]] = []
        """The conversation so far, in OpenAI's shape."""

    async def _recv(self) -> dict[str, Any]:
        assert self.ws is not None
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), 120))
        self.last_seq = frame.get("seq", self.last_seq)
        return frame

    async def open(self) -> None:
        self.ws = await connect(self.url, proxy=None)
        await self.ws.send(json.dumps({"type": "open"}))
        self.opened = await self._recv()

    async def drop_and_resume(self, url: str | None = None) -> float:
        """Seconds from the new connection's start to ``resumed`` (on ``url``, default the
        same gateway; a ``session_elsewhere`` is retried after the time it gives)."""
        assert self.ws is not None
        self.ws.transport.abort()
        self.url = url or self.url
        started = time.perf_counter()
        while True:
            self.ws = await connect(self.url, proxy=None)
            resume = {
                "type": "resume",
                "session_id": self.opened["session_id"],
                "resume_token": self.opened["resume_token"],
                "last_seq": self.last_seq,
            }
            await self.ws.send(json.dumps(resume))
            answer = await self._recv()
            if answer["type"] == "resumed":
                return time.perf_counter() - started
            if answer.get("code") != "session_elsewhere":
                raise RuntimeError(f"resume refused: {answer}")
            await self.ws.close()
            await asyncio.sleep(answer["retry_after_s"])

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
        self.messages.append({"role": "user", "content": request["text"]})
        sent = time.perf_counter()
        await self.ws.send(json.dumps(request))
        first: float | None = None
        reply = []
        while True:
            frame = await self._recv()
            if frame["type"] == "token":
                first = first or time.perf_counter() - sent
                reply.append(frame["token"])
            elif frame["type"] == "contribution":
                self.messages.append({"role": "assistant", "content": "".join(reply)})
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
    }


async def fresh_with_history(base_url: str, messages: list[dict[str, str]], tokens: int) -> float:
    """Time to first content of a streamed chat completion carrying the whole conversation."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0) as client:
        sent = time.perf_counter()
        stream = await client.chat.completions.create(
            model=BUNDLED_MODEL_ID, messages=messages, max_tokens=tokens, temperature=0, stream=True
        )
        first: float | None = None
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - sent
    return first if first is not None else float("nan")


async def run_migration(args: argparse.Namespace) -> dict[str, Any]:
    """Moved-session turns and fresh-with-history turns, side by side."""
    moved: list[float] = []
    fresh: list[float] = []
    quick = {"coordinator_lease_s": 1.0}
    variants = [
        lambda s: s.with_overrides(**quick),
        lambda s: s.with_overrides(**quick),
        lambda s: s.with_overrides(reuse_sessions_per_principal=0),
    ]
    async with swarm_gateways(variants, name="migrate", shared_state=True) as (a, b, plain):
        base_url = f"http://127.0.0.1:{plain.http.port}/v1"
        for index in range(args.rounds):
            session = Session(f"ws://127.0.0.1:{a.port}/ws", args.tokens)
            await session.open()
            for _ in range(args.history):
                await session.turn()
            history = list(session.messages)
            history.append({"role": "user", "content": "Say one short sentence about moving."})
            for way in ("moved", "fresh") if index % 2 == 0 else ("fresh", "moved"):
                if way == "moved":
                    await session.drop_and_resume(f"ws://127.0.0.1:{b.port}/ws")
                    moved.append(await session.turn())
                else:
                    fresh.append(await fresh_with_history(base_url, history, args.tokens))
            assert session.ws is not None
            await session.ws.close()
    ratio = statistics.median(moved) / statistics.median(fresh)
    return {
        "history_turns": args.history,
        "moved_ttft_s": round(statistics.median(moved), 4),
        "fresh_with_history_ttft_s": round(statistics.median(fresh), 4),
        "ratio": round(ratio, 3),
        "runs": {"moved": [round(t, 4) for t in moved], "fresh": [round(t, 4) for t in fresh]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="pairs of turns")
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens per turn")
    parser.add_argument("--history", type=int, default=4, help="turns before a session moves")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    report = asyncio.run(run(args))
    report["migration"] = asyncio.run(run_migration(args))
    print(f"\n{args.rounds} rounds of one normal and one resumed turn, medians")
    print(f"{'turn':<10}{'TTFT (s)':>10}")
    print(f"{'normal':<10}{report['normal_ttft_s']:>10}")
    print(
        f"{'resumed':<10}{report['resumed_ttft_s']:>10}   (resume itself: {report['resume_s']} s)"
    )
    print(f"target: resumed ÷ normal ≤ {TARGET}: {report['ratio']} → {report['target_met']}")
    moved = report["migration"]
    print(f"\nafter {args.history} turns, the next turn's TTFT (s), medians")
    print(f"{'moved to another gateway':<34}{moved['moved_ttft_s']:>8}")
    print(f"{'fresh session sent the history':<34}{moved['fresh_with_history_ttft_s']:>8}")
    print(f"moved ÷ fresh: {moved['ratio']}")
    print("BENCH_JSON " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
