"""Soak the gateway: many sessions for a long time with a steady stream of turns; does memory
stay flat, do file descriptors come back, does anything fail?

Run: ``.venv/bin/python scripts/soak.py [--sessions 1000] [--duration-s 600]
[--turns-per-s 10] [--tokens 20] [--rate 20] [--warmup-s 60] [--reconnect-share 0.05]``

The gateway runs alone in a child process (``--kind``, default ``gateway``: API keys and a
prepaid hold per turn in a SQLite ledger, as in production; ``gateway_noauth`` without) over
the synthetic mesh the other ws benchmarks use (farmesh_ws/mesh/synthetic.py: ``--tokens``
tokens a turn at ``--rate`` tokens/s), with its default settings unless
``--gateway-compression`` or ``--gateway-setting NAME=VALUE`` say otherwise
(scripts/ws_bench_support.py). This process opens
``--sessions`` connections and sessions (``open``), then for ``--duration-s`` each session
waits a random time (uniform, mean ``sessions / turns-per-s``) and sends a turn, reads it to
its ``contribution``, and again; after a turn, a share ``--reconnect-share`` of the sessions
close their connection and open a new one (so the connect / close path soaks too).

Measured (psutil, the server process): RSS every ``--sample-s``; **RSS growth** = last sample
÷ the first sample after ``--warmup-s``, minus 1; open file descriptors before the sessions,
with them open, and after every client closed (waiting at most 60 s for the server to let go);
**errors** = failed handshakes, ``error`` frames, turns without ``done`` and a contribution,
and any other exception in a client. Targets (issue 13 item 5): growth < 5 %, descriptors
back to the baseline, zero errors. Prints a table and, last, one ``BENCH_JSON {...}`` line.
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from ws_bench_support import (
    HANDSHAKES_IN_FLIGHT,
    MIB,
    ServerChild,
    add_client_options,
    add_gateway_options,
    arm_watchdog,
    close_all,
    gateway_overrides,
    open_session,
    raise_fd_limit,
    turn_frame,
)

TARGETS = {"rss_growth_pct": 5.0, "errors": 0}


class Soak:
    """The client side: sessions, counters and the server's samples."""

    def __init__(self, server: ServerChild, args: argparse.Namespace) -> None:
        self.server, self.args = server, args
        self.gate = asyncio.Semaphore(HANDSHAKES_IN_FLIGHT)
        self.turns = self.tokens = self.reconnects = 0
        self.errors: list[str] = []
        self.turn_s: list[float] = []
        self.samples: list[tuple[float, float, int]] = []  # (s since start, RSS MiB, fds)
        self.stop_at = 0.0

    def sample(self, started: float) -> None:
        rss = self.server.ps.memory_info().rss / MIB
        self.samples.append((round(time.monotonic() - started, 1), round(rss, 1), self.fds()))

    def fds(self) -> int:
        return int(self.server.ps.num_fds())

    def error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)
        else:
            self.errors[-1] = f"... {len(self.errors)} and more; last: {text}"

    async def session(self, ws: ClientConnection, rng: random.Random) -> ClientConnection:
        """Turns until the end of the soak; returns the connection it ends on."""
        mean_gap = self.args.sessions / self.args.turns_per_s
        number = 0
        while True:
            wait = rng.uniform(0, 2 * mean_gap)
            if time.monotonic() + wait >= self.stop_at:
                return ws
            await asyncio.sleep(wait)
            number += 1
            await self.turn(ws, f"s{number}")
            if rng.random() < self.args.reconnect_share:
                await ws.close()
                ws = await open_session(self.server, self.gate, self.args)
                self.reconnects += 1

    async def turn(self, ws: ClientConnection, request_id: str) -> None:
        started = time.monotonic()
        await ws.send(turn_frame(self.args.tokens, request_id))
        tokens = 0
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            kind = frame["type"]
            if kind == "token":
                tokens += 1
            elif kind == "error":
                self.error(f"error frame: {frame.get('code')}: {frame.get('message')}")
            elif kind == "contribution":
                break
            elif kind != "done":
                self.error(f"unexpected frame {kind}")
        if tokens != self.args.tokens:
            self.error(f"a turn streamed {tokens} of {self.args.tokens} tokens")
        self.turns += 1
        self.tokens += tokens
        self.turn_s.append(time.monotonic() - started)

    async def guarded(self, ws: ClientConnection, seed: int) -> ClientConnection | None:
        try:
            return await self.session(ws, random.Random(seed))
        except (ConnectionClosed, OSError, TimeoutError, RuntimeError, ValueError, KeyError) as exc:
            # counted and reported; the other sessions go on
            self.error(repr(exc))
            return None


async def sampler(soak: Soak, started: float, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        soak.sample(started)


async def wait_for_fds(soak: Soak, baseline: int, limit_s: float) -> tuple[int, float]:
    """Poll the server's descriptors until at most ``baseline`` (or ``limit_s`` passed):
    (the last count, seconds it took)."""
    started = time.monotonic()
    # another process's descriptors: nothing to wait on but the count itself
    while (count := soak.fds()) > baseline and time.monotonic() - started < limit_s:  # noqa: ASYNC110
        await asyncio.sleep(0.5)
    return count, round(time.monotonic() - started, 1)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server = ServerChild(args.kind, args)
    soak = Soak(server, args)
    sockets: list[ClientConnection] = []
    try:
        warm = await asyncio.gather(*(open_session(server, soak.gate, args) for _ in range(20)))
        await close_all(warm)
        fds_before, _ = await wait_for_fds(soak, 0, 5.0)
        rss_before = server.ps.memory_info().rss / MIB
        opened = time.monotonic()
        opens = [open_session(server, soak.gate, args) for _ in range(args.sessions)]
        sockets = await asyncio.wait_for(asyncio.gather(*opens), 600)
        open_s = time.monotonic() - opened
        fds_open = soak.fds()
        started = time.monotonic()
        soak.stop_at = started + args.duration_s
        soak.sample(started)
        sampling = asyncio.create_task(sampler(soak, started, args.sample_s))
        try:
            ends = await asyncio.gather(*(soak.guarded(ws, n) for n, ws in enumerate(sockets)))
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
        soak.sample(started)
        sockets = [ws for ws in ends if ws is not None]
        await close_all(sockets)
        sockets = []
        fds_after, fds_wait_s = await wait_for_fds(soak, fds_before, 60.0)
        alive = server.process.is_alive()
    finally:
        await close_all(sockets)
        server.close()
    after_warmup = [rss for at, rss, _ in soak.samples if at >= args.warmup_s]
    base = after_warmup[0] if after_warmup else soak.samples[-1][1]
    growth = 100 * (soak.samples[-1][1] / base - 1)
    return {
        "sessions": args.sessions,
        "duration_s": args.duration_s,
        "open_s": round(open_s, 1),
        "turns": soak.turns,
        "turns_per_s": round(soak.turns / args.duration_s, 2),
        "tokens": soak.tokens,
        "reconnects": soak.reconnects,
        "turn_s_p50": round(statistics.median(soak.turn_s), 3) if soak.turn_s else None,
        "turn_s_p99": round(sorted(soak.turn_s)[int(0.99 * (len(soak.turn_s) - 1))], 3)
        if soak.turn_s
        else None,
        "rss_before_sessions_mib": round(rss_before, 1),
        "rss_after_warmup_mib": base,
        "rss_end_mib": soak.samples[-1][1],
        "rss_max_mib": max(rss for _, rss, _ in soak.samples),
        "rss_growth_pct": round(growth, 2),
        "fds_before": fds_before,
        "fds_with_sessions": fds_open,
        "fds_after_close": fds_after,
        "fds_wait_s": fds_wait_s,
        "server_alive": alive,
        "errors": len(soak.errors),
        "first_errors": soak.errors[:5],
        "samples": soak.samples,
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"\nSetup: {report['setup']}")
    rows = [
        ("sessions, opened in", f"{report['sessions']}, {report['open_s']} s"),
        (
            "turns (per s), tokens",
            f"{report['turns']} ({report['turns_per_s']}), {report['tokens']}",
        ),
        ("reconnects", report["reconnects"]),
        ("turn time p50 / p99", f"{report['turn_s_p50']} / {report['turn_s_p99']} s"),
        (
            "RSS before sessions / after warm-up / end / max",
            f"{report['rss_before_sessions_mib']} / {report['rss_after_warmup_mib']} / "
            f"{report['rss_end_mib']} / {report['rss_max_mib']} MiB",
        ),
        (
            "RSS growth after warm-up",
            f"{report['rss_growth_pct']} % (target < {TARGETS['rss_growth_pct']} %)",
        ),
        (
            "fds before / with sessions / after close",
            f"{report['fds_before']} / {report['fds_with_sessions']} / "
            f"{report['fds_after_close']} (after {report['fds_wait_s']} s)",
        ),
        ("errors", f"{report['errors']} {report['first_errors'] or ''}"),
    ]
    for name, value in rows:
        print(f"  {name:<48} {value}")
    print(
        "  RSS MiB over time: " + ", ".join(f"{at:.0f}s {rss}" for at, rss, _ in report["samples"])
    )
    print(f"\nmet: {report['targets']}; total {report['total_s']} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--turns-per-s", type=float, default=10.0, help="over all sessions")
    parser.add_argument("--tokens", type=int, default=20, help="tokens per turn")
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s of each turn")
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling period")
    parser.add_argument("--reconnect-share", type=float, default=0.05)
    parser.add_argument("--kind", choices=("gateway", "gateway_noauth"), default="gateway")
    add_client_options(parser)
    add_gateway_options(parser)
    args = parser.parse_args()
    args.server_gc = ()
    started = time.perf_counter()
    fd_limit = raise_fd_limit()
    watchdog = arm_watchdog(args.duration_s + 1200)
    load_before = os.getloadavg()[0]
    try:
        report = asyncio.run(run(args))
    finally:
        watchdog.cancel()
    report["setup"] = (
        f"{args.kind} in a child process over the synthetic mesh, clients in this one; "
        f"{os.cpu_count()} cores; {args.tokens} tokens at {args.rate:g}/s a turn; clients "
        f"offer compression={args.compression}; gateway {gateway_overrides(args) or 'defaults'}; "
        f"fd limit {fd_limit}; load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after (1 min)"
    )
    report["targets"] = {
        "rss_growth": report["rss_growth_pct"] < TARGETS["rss_growth_pct"],
        "fds_back": report["fds_after_close"] <= report["fds_before"],
        "errors": report["errors"] == TARGETS["errors"] and report["server_alive"],
    }
    report["total_s"] = round(time.perf_counter() - started, 1)
    print_table(report)
    print("BENCH_JSON " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
