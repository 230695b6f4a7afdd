"""Benchmark the HTTP API against the WebSocket path on the same turns, on the real local swarm.

Run: ``.venv/bin/python scripts/bench_http.py [--tokens 64] [--pairs 4] [--turns 10]``

Setup: the local swarm (2 Petals servers) and the real PetalsBackend behind one gateway in this
process (WebSocket and HTTP API, ``auth = off``, no balances). The same greedy one-shot request
of ``--tokens`` tokens (one user message) runs four ways, each on a fresh mesh session:
protocol v1 ``generate`` over WebSocket, ``POST /v1/chat/completions`` streamed (SSE, through
the official ``openai`` SDK), ``POST /v1/chat/completions`` whole (SDK), and the seed's
``POST /inference/generate`` (SSE, read with aiohttp). After one warm-up of each, the ways rotate
for ``--pairs`` rounds. tokens/s = completion tokens / (reply complete - request sent);
"decode" = tokens 2..n / (last - first token) for the streamed ways. Medians. Ratios are each way
÷ WebSocket; the issue's target: SSE ÷ WebSocket ≥ 0.97.

Then reuse of the mesh's caches (http.md §9): a ``--turns``-turn conversation through the SDK
(streamed, greedy, the whole history re-sent each turn as OpenAI clients do) on a second
gateway on the same backend with reuse off, and on the first with reuse on, turn by turn side by
side, ``--conversations`` times. Time to first token (request sent → first content chunk) per
turn, medians; the target: last turn ÷ first turn ≤ 1.2 with reuse, while without it grows.

Prints a table and, last, one ``BENCH_JSON {...}`` line.
"""

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
from bench_gateway import swarm_gateways
from websockets.asyncio.client import connect

from farmesh_ws.transport.ws import GatewayServer

PROMPT = "Write a long story about a lighthouse keeper."
TARGET = 0.97
REUSE_TARGET = 1.2
TURN = (
    "Here is one more detail of the lighthouse keeper's life: every evening he climbs the "
    "stairs, cleans the lens, writes the weather in his log and watches the ships pass. "
    "Continue the story in two sentences."
)
Run = tuple[int, float, float | None]  # completion tokens, tokens/s, decode tokens/s


def _rates(tokens: int, t0: float, arrivals: list[float]) -> Run:
    end = time.perf_counter()
    decode = None
    if len(arrivals) > 1 and arrivals[-1] > arrivals[0]:
        decode = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    return tokens, tokens / (end - t0), decode


async def ws_generate(gateway: GatewayServer, tokens: int, index: int) -> Run:
    async with connect(f"ws://127.0.0.1:{gateway.port}/ws", proxy=None) as ws:
        request = {"type": "generate", "request_id": f"b{index}", "prompt": PROMPT}
        t0, arrivals = time.perf_counter(), []
        await ws.send(json.dumps({**request, "max_tokens": tokens, "temperature": 0}))
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 120))
            if frame["type"] == "token":
                arrivals.append(time.perf_counter())
            elif frame["type"] == "done":
                return _rates(frame["usage"]["completion_tokens"], t0, arrivals)
            elif frame["type"] != "contribution":
                raise RuntimeError(f"unexpected frame {frame}")


def _client(gateway: GatewayServer) -> openai.AsyncOpenAI:
    base = f"http://127.0.0.1:{gateway.http.port}/v1"
    return openai.AsyncOpenAI(base_url=base, api_key="sk-none", max_retries=0, timeout=120)


async def sse_chat(gateway: GatewayServer, tokens: int, index: int) -> Run:
    async with _client(gateway) as client:
        t0, arrivals, usage = time.perf_counter(), [], 0
        stream = await client.chat.completions.create(
            model=gateway.settings.default_model_id,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter())
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        return _rates(usage, t0, arrivals)


async def whole_chat(gateway: GatewayServer, tokens: int, index: int) -> Run:
    async with _client(gateway) as client:
        t0 = time.perf_counter()
        answer = await client.chat.completions.create(
            model=gateway.settings.default_model_id,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=tokens,
            temperature=0,
        )
        count, rate, _ = _rates(answer.usage.completion_tokens if answer.usage else 0, t0, [])
        return count, rate, None


async def seed_sse(gateway: GatewayServer, tokens: int, index: int) -> Run:
    url = f"http://127.0.0.1:{gateway.http.port}/inference/generate"
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        t0, arrivals, count = time.perf_counter(), [], 0
        async with client.post(url, json=body) as reply:
            async for raw in reply.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "token" in event:
                    count = event["tokens_generated"]
                    if event["token"]:
                        arrivals.append(time.perf_counter())
        return _rates(count, t0, arrivals)


async def ttft_turns(gateway: GatewayServer, turns: int, tokens: int) -> list[float]:
    """One conversation of ``turns`` streamed turns; each turn's time to first token (s)."""
    history: list[dict[str, str]] = []
    times = []
    async with _client(gateway) as client:
        for _ in range(turns):
            history.append({"role": "user", "content": TURN})
            t0, first, reply = time.perf_counter(), None, []
            stream = await client.chat.completions.create(
                model=gateway.settings.default_model_id,
                messages=history,
                max_tokens=tokens,
                temperature=0,
                stream=True,
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    reply.append(chunk.choices[0].delta.content)
            times.append((first or time.perf_counter()) - t0)
            history.append({"role": "assistant", "content": "".join(reply)})
    return times


async def reuse_report(gateways: dict[str, GatewayServer], args: argparse.Namespace) -> Any:
    """Turn-by-turn TTFT with and without reuse, conversations interleaved side by side."""
    runs: dict[str, list[list[float]]] = {name: [] for name in gateways}
    for _ in range(args.conversations):
        for name, gateway in gateways.items():
            runs[name].append(await ttft_turns(gateway, args.turns, args.reuse_tokens))
    report: dict[str, Any] = {"turns": args.turns, "conversations": args.conversations}
    for name, conversations in runs.items():
        medians = [statistics.median(turn) for turn in zip(*conversations, strict=True)]
        report[name] = {
            "ttft_s": [round(t, 3) for t in medians],
            "last_to_first": round(medians[-1] / medians[0], 3),
        }
    report["target_met"] = (
        report["reuse"]["last_to_first"] <= REUSE_TARGET
        and report["no_reuse"]["last_to_first"] > REUSE_TARGET
    )
    return report


WAYS: dict[str, Callable[[GatewayServer, int, int], Awaitable[Run]]] = {
    "websocket": ws_generate,
    "openai_sse": sse_chat,
    "openai_whole": whole_chat,
    "seed_sse": seed_sse,
}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[Run]] = {way: [] for way in WAYS}
    variants = [lambda s: s, lambda s: s.with_overrides(reuse_sessions_per_principal=0)]
    async with swarm_gateways(variants, name="http") as (gateway, no_reuse):
        names = list(WAYS)
        for way in names:  # warm-up
            await WAYS[way](gateway, args.tokens, -1)
        for index in range(args.pairs):
            for way in names[index % len(names) :] + names[: index % len(names)]:
                runs[way].append(await WAYS[way](gateway, args.tokens, index))
        reuse = await reuse_report({"no_reuse": no_reuse, "reuse": gateway}, args)
    report: dict[str, Any] = {"tokens": args.tokens, "pairs": args.pairs, "ways": {}}
    base = statistics.median(r[1] for r in runs["websocket"])
    for way, rows in runs.items():
        rate = statistics.median(r[1] for r in rows)
        decodes = [r[2] for r in rows if r[2] is not None]
        report["ways"][way] = {
            "tokens_per_s": round(rate, 2),
            "decode_tokens_per_s": round(statistics.median(decodes), 2) if decodes else None,
            "ratio_to_websocket": round(rate / base, 3),
            "runs": [round(r[1], 2) for r in rows],
            "completion_tokens": [r[0] for r in rows],
        }
    report["sse_ratio"] = report["ways"]["openai_sse"]["ratio_to_websocket"]
    report["target_met"] = report["sse_ratio"] >= TARGET
    report["reuse"] = reuse
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per request")
    parser.add_argument("--pairs", type=int, default=4, help="rounds of all four ways")
    parser.add_argument("--turns", type=int, default=10, help="turns per reuse conversation")
    parser.add_argument("--conversations", type=int, default=8, help="reuse conversations")
    parser.add_argument("--reuse-tokens", type=int, default=32, help="greedy tokens per turn")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    report = asyncio.run(run(args))
    report["total_s"] = round(time.perf_counter() - started, 1)
    print(f"\n{args.tokens} greedy tokens, one user message, {args.pairs} rounds, medians")
    print(f"{'way':<14}{'tokens/s':>10}{'decode':>10}{'÷ WebSocket':>13}  runs")
    for way, row in report["ways"].items():
        decode = "-" if row["decode_tokens_per_s"] is None else f"{row['decode_tokens_per_s']}"
        print(
            f"{way:<14}{row['tokens_per_s']:>10}{decode:>10}{row['ratio_to_websocket']:>13}"
            f"  {row['runs']}"
        )
    print(f"target: OpenAI SSE ÷ WebSocket ≥ {TARGET}: {report['target_met']}")
    reuse = report["reuse"]
    print(f"\n{args.turns}-turn conversation through the SDK, time to first token (s), medians")
    print(f"{'':<10}" + "".join(f"{n:>7}" for n in range(1, args.turns + 1)) + "  last ÷ first")
    for name in ("no_reuse", "reuse"):
        row = reuse[name]
        cells = "".join(f"{t:>7.2f}" for t in row["ttft_s"])
        print(f"{name:<10}{cells}  {row['last_to_first']:>12}")
    print(
        f"target: with reuse last ÷ first ≤ {REUSE_TARGET} while without it grows: "
        f"{reuse['target_met']}"
    )
    print("BENCH_JSON " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
