"""The seed's ``POST /inference/generate`` (http.md §6) with a client nobody here wrote,
``curl -N``, over the scripted mesh: its exact SSE lines, identity, refusals, disconnects."""

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from farmesh_ws.engine.events import Observer, RequestEvent, RequestFinished, RequestStarted
from farmesh_ws.ledger.keys import KeyPrincipal
from farmesh_ws.mesh.fake import FakeBackend
from farmesh_ws.transport.ws import GatewayServer
from tests.engine.support import release
from tests.transport.support import fake_gateway

KEY = "fmk_erin"
WALLET = "0x8ba1f109551bD432803012645Ac136ddd64DBA72"
CURL = shutil.which("curl")


class _Events(Observer):
    def __init__(self) -> None:
        self.started: list[Any] = []
        self.finished: list[Any] = []
        self.settled = asyncio.Event()

    def notify(self, event: RequestEvent) -> None:
        if isinstance(event, RequestStarted):
            self.started.append(event.context)
        if isinstance(event, RequestFinished):
            self.finished.append(event)
            self.settled.set()


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[GatewayServer, FakeBackend, _Events]]:
    backend = FakeBackend(reply="abc")
    events = _Events()
    server = await fake_gateway(
        backend,
        keys={KEY: KeyPrincipal("fk_erin", WALLET, None)},
        observers=[events],
        auth="required",
        price_per_token_far=Decimal("0.0001"),
    )
    yield server, backend, events
    await server.shutdown()


async def _curl(server: GatewayServer, body: dict[str, Any], *headers: str) -> tuple[str, int]:
    """``curl -N`` as a user types it; its output and the HTTP status."""
    assert CURL, "curl is not installed: run scripts/system-deps"
    args = [CURL, "-N", "-s", "-w", "\n%{http_code}", "-X", "POST"]
    args += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
    for header in headers:
        args += ["-H", header]
    args.append(f"http://127.0.0.1:{server.http.port}/inference/generate")
    done = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=60)
    output, _, status = done.stdout.rpartition("\n")
    return output, int(status)


def _events(output: str) -> list[Any]:
    """Every ``data:`` line, and nothing but those and the blank lines between them."""
    lines = output.split("\n")
    assert all(line == "" or line.startswith("data: ") for line in lines), output
    return [json.loads(line.removeprefix("data: ")) for line in lines if line]


async def test_tokens_stream_as_the_seeds_sse_lines_then_done(
    gateway: tuple[GatewayServer, FakeBackend, _Events],
) -> None:
    server, _, events = gateway
    body = {"prompt": "Say abc", "request_id": "r1", "max_tokens": 10}
    output, status = await _curl(server, body, f"Authorization: Bearer {KEY}")
    assert status == 200
    *tokens, done = _events(output)
    assert done == {"done": True}
    assert "".join(t["token"] for t in tokens) == "abc"
    fields = {"token", "request_id", "tokens_generated", "cost_far"}
    assert [set(t) for t in tokens] == [fields] * len(tokens)
    assert [t["tokens_generated"] for t in tokens] == list(range(1, len(tokens) + 1))
    assert [Decimal(t["cost_far"]) for t in tokens] == [
        Decimal("0.0001") * n for n in range(1, len(tokens) + 1)
    ]
    assert {t["request_id"] for t in tokens} == {"r1"}
    assert [(c.wallet, c.kind) for c in events.started] == [(WALLET, "inference_generate")]


async def test_refusals_are_one_json_error_and_nothing_runs(
    gateway: tuple[GatewayServer, FakeBackend, _Events],
) -> None:
    server, backend, events = gateway
    no_key, status = await _curl(server, {"prompt": "hi"})
    assert status == 401
    assert json.loads(no_key)["error"] == "unauthorized"
    auth = f"Authorization: Bearer {KEY}"
    claim, status = await _curl(server, {"prompt": "hi", "user_wallet": "0xvictim"}, auth)
    assert (status, json.loads(claim)["error"]) == (403, "wallet_mismatch")
    bad, status = await _curl(server, {"prompt": "hi", "temprature": 1}, auth)
    assert (status, json.loads(bad)["error"]) == (400, "invalid_message")
    assert "temprature" in json.loads(bad)["message"]
    assert events.started == []
    assert backend.sessions == [] or all(s.tokens_sent == 0 for s in backend.sessions)


async def test_a_client_that_leaves_cancels_the_request_billed_as_delivered(
    gateway: tuple[GatewayServer, FakeBackend, _Events],
) -> None:
    server, backend, events = gateway
    backend.reply = "x" * 100
    backend.gate = asyncio.Semaphore(0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http.port)
    body = json.dumps({"prompt": "go", "max_tokens": 100}).encode()
    writer.write(
        b"POST /inference/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    release(backend.gate, 2)
    seen = b""
    while seen.count(b"data: ") < 2:  # two tokens reached the client
        seen += await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    await writer.wait_closed()
    release(backend.gate, 200)  # let the mesh go on: the cancel must stop it
    await asyncio.wait_for(events.settled.wait(), 10)
    (finished,) = events.finished
    assert finished.settlement.finish_reason == "cancelled"
    assert 2 <= finished.settlement.completion_tokens < 100
