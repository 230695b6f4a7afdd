"""Test helpers: a store harness, a movable clock, polling, and a Redis server to kill."""

import asyncio
import socket
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from farmesh_ws.state import StateStore

REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass
class Harness:
    """A store under test and how to let its time pass."""

    store: StateStore
    pass_time: Callable[[float], None]
    """Memory: moves the fake clock. Redis: nothing, real time passes while the test polls."""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def eventually(condition: Callable[[], Awaitable[bool]], *, timeout_s: float = 10.0) -> None:
    """Poll until ``condition`` holds; time out (failing the test) after ``timeout_s``.

    Polling, not an event: the conditions are Redis expiries and reconnects, which no one signals.
    """
    async with asyncio.timeout(timeout_s):
        while True:
            if await condition():
                return
            await asyncio.sleep(0.01)


async def delete_keys(key_prefix: str) -> None:
    client = Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ThrowawayRedis:
    """A redis-server of the test's own (password set, nothing persisted) to kill and restart.

    Plain ``subprocess``: once hivemind is imported (other tests), uvloop's event loop policy
    is installed process-wide and cannot watch asyncio subprocesses.
    """

    def __init__(self, directory: Path, password: str) -> None:
        self.port = free_port()
        self.password = password
        self.url = f"redis://:{password}@127.0.0.1:{self.port}/0"
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self._process = subprocess.Popen(  # noqa: ASYNC220 - see the class docstring
            [
                "redis-server",
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--requirepass", self.password),
                *("--save", "", "--appendonly", "no", "--daemonize", "no"),
                *("--dir", str(self._directory)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await eventually(self._answers)

    async def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            await asyncio.to_thread(self._process.wait)

    def client(self) -> Redis:
        return Redis(port=self.port, password=self.password, retry=Retry(NoBackoff(), 0))

    async def _answers(self) -> bool:
        client = self.client()
        try:
            return bool(await client.ping())
        except (RedisError, OSError):
            return False
        finally:
            await client.aclose()
