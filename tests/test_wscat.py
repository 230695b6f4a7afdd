"""A person's session in the real `wscat` (from npm): connect, open, two turns, cancel."""

import asyncio
import contextlib
import json
import os
import pty
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from farmesh_ws.ledger.keys import KeyPrincipal
from farmesh_ws.mesh.fake import FakeBackend
from farmesh_ws.transport.ws import GatewayServer
from tests.helpers import ws_url
from tests.transport.support import fake_gateway

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
WSCAT = Path(__file__).resolve().parents[1] / "node_modules" / ".bin" / "wscat"


class Wscat:
    """Drives wscat on a pseudo-terminal, as a person at a terminal would: waits for its
    "Connected" line, types one JSON message per line, reads the ``< {...}`` lines.

    Plain ``subprocess`` with reads in a thread: hivemind installs uvloop's event loop
    policy process-wide, and that policy cannot watch children of asyncio subprocesses.
    """

    def __init__(self, process: subprocess.Popen[bytes], terminal: int) -> None:
        self.process = process
        self.terminal = terminal
        self._buffer = b""

    async def _line(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await asyncio.wait_for(asyncio.to_thread(os.read, self.terminal, 65536), 60)
            if not chunk:
                raise AssertionError("wscat exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return _ANSI.sub("", line.decode()).replace("\r", "").strip()

    async def connected(self) -> None:
        while "Connected" not in await self._line():
            pass

    async def type(self, message: dict[str, Any]) -> None:
        os.write(self.terminal, (json.dumps(message) + "\n").encode())

    async def read(self) -> dict[str, Any]:
        """The next server message wscat prints (lines look like ``< {...}``)."""
        while True:
            text = (await self._line()).lstrip(">").strip()
            if text.startswith("<"):
                message: dict[str, Any] = json.loads(text[1:].strip())
                return message

    async def read_until(self, kind: str) -> list[dict[str, Any]]:
        messages = []
        while True:
            message = await self.read()
            messages.append(message)
            if message["type"] == kind:
                return messages


@contextlib.contextmanager
def running_wscat(url: str, *options: str) -> Iterator[Wscat]:
    executable = str(WSCAT) if WSCAT.exists() else shutil.which("wscat")
    assert executable, "wscat is not installed: run scripts/bootstrap (npm install)"
    terminal, child_side = pty.openpty()
    process = subprocess.Popen(
        [executable, "--no-color", *options, "-c", url],
        stdin=child_side,
        stdout=child_side,
        stderr=child_side,
        start_new_session=True,
    )
    os.close(child_side)
    try:
        yield Wscat(process, terminal)
    finally:
        process.kill()
        process.wait()
        os.close(terminal)


@pytest.fixture
def wscat(gateway: GatewayServer) -> Iterator[Wscat]:
    with running_wscat(ws_url(gateway)) as typing:
        yield typing


async def test_two_turn_chat_and_cancel_in_wscat(wscat: Wscat, golden: dict[str, Any]) -> None:
    turn1, turn2 = golden["conversations"][0][:2]
    await wscat.connected()
    await wscat.type({"type": "open"})
    opened = await wscat.read()
    assert opened["type"] == "opened"

    await wscat.type(
        {"type": "turn", "request_id": "1", "text": turn1["new_messages"][0]["content"]}
    )
    first = await wscat.read_until("contribution")
    text1 = "".join(m["token"] for m in first if m["type"] == "token")
    assert text1 + "<|im_end|>" == turn1["greedy_48_text"]

    await wscat.type(
        {"type": "turn", "request_id": "2", "text": turn2["new_messages"][0]["content"]}
    )
    second = await wscat.read_until("contribution")
    text2 = "".join(m["token"] for m in second if m["type"] == "token")
    assert text2 + "<|im_end|>" == turn2["greedy_48_text"]
    done2 = next(m for m in second if m["type"] == "done")
    assert done2["usage"]["cached_tokens"] > done2["usage"]["prompt_tokens"]

    await wscat.type(
        {
            "type": "turn",
            "request_id": "3",
            "text": "Write a long poem about the sea.",
            "max_new_tokens": 300,
        }
    )
    assert (await wscat.read())["type"] == "token"
    await wscat.type({"type": "cancel", "request_id": "3"})
    third = await wscat.read_until("done")
    assert third[-1]["finish_reason"] == "cancelled"
    assert (await wscat.read())["type"] == "contribution"

    await wscat.type({"type": "close"})
    assert (await wscat.read())["type"] == "closed"


KEY = "fmk_wscat"


async def test_wscat_authenticates_with_a_header_where_keys_are_required() -> None:
    """protocol.md §2.1 as README shows it: ``wscat -H "Authorization: Bearer fmk_…"``."""
    keys = {KEY: KeyPrincipal(key_id="fk_wscat", wallet="0xwscat", name=None)}
    server = await fake_gateway(FakeBackend(reply="Hi"), keys=keys, auth="required")
    try:
        with running_wscat(ws_url(server), "-H", f"Authorization: Bearer {KEY}") as keyed:
            await keyed.connected()
            await keyed.type({"type": "open"})
            assert (await keyed.read())["type"] == "opened"
            await keyed.type({"type": "turn", "request_id": "1", "text": "hello"})
            frames = await keyed.read_until("contribution")
            assert "".join(f["token"] for f in frames if f["type"] == "token") == "Hi"
        with running_wscat(ws_url(server)) as anonymous:
            await anonymous.connected()
            await anonymous.type({"type": "open"})
            refused = await anonymous.read()
            assert (refused["type"], refused["code"]) == ("error", "unauthorized")
    finally:
        await server.shutdown()
