"""chat.petals.dev's WebSocket API v2 (farmesh_ws/petals_v2.py) on the real gateway and mesh.

Every test talks to a real :class:`~farmesh_ws.transport.ws.GatewayServer` over the local two-server
swarm with a real ``websockets`` client on ``/api/v2/generate``: the shared ``gateway``
fixture, or a gateway of its own where a test needs other settings (an idle timeout, a small
frame limit) or the ledger wired in. Generation is greedy, so the golden transcript of
transformers applies to the ChatML prompts (``golden["conversations"]``), and the model's own
tokenizer turns the golden prompt ids back into the raw prompt text a client would send.
"""

import asyncio
import contextlib
import json
import sqlite3
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from farmesh_ws.config import Settings
from farmesh_ws.core.money import to_e8, turn_cost
from farmesh_ws.ledger.checkpoints import TurnCheckpoints
from farmesh_ws.ledger.observer import LedgerObserver
from farmesh_ws.ledger.store import Ledger
from farmesh_ws.ledger.writer import LedgerWriter
from farmesh_ws.mesh.status import MeshStatusCache
from farmesh_ws.metrics import Metrics
from farmesh_ws.models import BUNDLED_MODEL_ID
from farmesh_ws.transport.ws import PETALS_V2_PATH, GatewayServer
from tests.helpers import PRICE, PROMPT_PRICE, receive, send, start_gateway

OPEN = {"type": "open_inference_session", "model": BUNDLED_MODEL_ID, "max_length": 512}
END = "<|im_end|>"
COUNTING = "1, 2, 3, 4, 5, 6,"  # raw text, no template: the model goes on counting
JAPANESE = "<|im_start|>user\nSay hello in Japanese.<|im_end|>\n<|im_start|>assistant\n"
WAIT_S = 30.0


# Talking to the gateway


def v2_url(server: GatewayServer) -> str:
    return f"ws://127.0.0.1:{server.port}{PETALS_V2_PATH}"


async def open_session(ws: ClientConnection, **fields: Any) -> None:
    await send(ws, {**OPEN, **fields})
    assert await receive(ws) == {"ok": True}


async def generate(ws: ClientConnection, **fields: Any) -> list[dict[str, Any]]:
    """Send a generate request; collect its responses up to ``stop: true`` (or an error)."""
    await send(ws, {"type": "generate", **fields})
    responses = []
    while True:
        response = await receive(ws)
        responses.append(response)
        if not response["ok"] or response["stop"]:
            return responses


def steps(responses: list[dict[str, Any]]) -> list[tuple[str, int, bool]]:
    return [(r["outputs"], r["token_count"], r["stop"]) for r in responses]


def texts(responses: list[dict[str, Any]]) -> list[str]:
    return [response["outputs"] for response in responses]


async def expect_close(ws: ClientConnection) -> tuple[int, str]:
    """The server closes the connection next; its close code and reason."""
    with pytest.raises(ConnectionClosed) as closed:
        await receive(ws)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


class MetricsSnapshot:
    """One scrape of the gateway's ``/metrics``."""

    def __init__(self, text: str) -> None:
        self._samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def get(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(
            value
            for sample_name, sample_labels, value in self._samples
            if sample_name == name and labels.items() <= sample_labels.items()
        )


async def scrape(server: GatewayServer) -> MetricsSnapshot:
    def get() -> str:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body: bytes = response.read()
        return body.decode()

    return MetricsSnapshot(await asyncio.to_thread(get))


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` until it holds, for at most :data:`WAIT_S`."""
    deadline = time.monotonic() + WAIT_S
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


async def wait_for_metric(server: GatewayServer, value: float, name: str, **labels: str) -> None:
    async def reached() -> bool:
        return (await scrape(server)).get(name, **labels) >= value

    await wait_until(reached, f"{name}{labels} >= {value}")


async def connections_closed(server: GatewayServer) -> None:
    """Every handler has returned: its mesh session is closed (the gauge drops after that)."""

    async def none_open() -> bool:
        return (await scrape(server)).get("farmesh_connections_active") == 0

    await wait_until(none_open, "every connection handler returned")


def cost(completion_tokens: int, prompt_tokens: int) -> Decimal:
    """protocol.md §7 at the test gateways' prices."""
    return turn_cost(
        PRICE, completion_tokens, price_per_prompt_token=PROMPT_PRICE, prompt_tokens=prompt_tokens
    )


# The model's own tokenizer and the golden conversation


@pytest.fixture(scope="module")
def tokenizer(bundled_model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundled_model_path))


@pytest.fixture(scope="module")
def chat(golden: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """The golden France / Germany chat as raw prompt text, the way chat.js sends it: the
    first prompt, then only what follows the first reply (the session holds the rest)."""
    turn1, turn2 = golden["conversations"][0][:2]
    history = len(turn1["prompt_ids"]) + len(turn1["greedy_48_ids"])
    assert turn2["prompt_ids"][:history] == turn1["prompt_ids"] + turn1["greedy_48_ids"]
    return {
        "prompt1": tokenizer.decode(turn1["prompt_ids"]),
        "prompt1_tokens": len(turn1["prompt_ids"]),
        "reply1": turn1["greedy_48_text"],
        "reply1_tokens": len(turn1["greedy_48_ids"]),
        "prompt2": tokenizer.decode(turn2["prompt_ids"][history:]),
        "prompt2_tokens": len(turn2["prompt_ids"]) - history,
        "reply2": turn2["greedy_48_text"],
        "reply2_tokens": len(turn2["greedy_48_ids"]),
        "history": history,
    }


# The README's request sequences


async def test_readme_example_pipelined_with_max_length_and_sampling(
    gateway: GatewayServer, tokenizer: Any
) -> None:
    """The README's JavaScript example as written: open and generate sent back to back,
    sampling until the whole session holds max_length tokens, in one response."""
    prompt, max_length = "A cat sat on", 30
    async with connect(v2_url(gateway)) as ws:
        await send(ws, {"type": "open_inference_session", "model": OPEN["model"], "max_length": 30})
        await send(
            ws,
            {
                "type": "generate",
                "inputs": prompt,
                "max_length": max_length,
                "do_sample": 1,
                "temperature": 0.6,
                "top_p": 0.9,
            },
        )
        assert await receive(ws) == {"ok": True}
        response = await receive(ws)
    room = max_length - len(tokenizer(prompt)["input_ids"])
    assert response.keys() == {"ok", "outputs", "stop", "token_count"}
    assert (response["ok"], response["stop"]) == (True, True)
    # Sampling may end early at the end of sequence, never later than max_length.
    assert 1 <= response["token_count"] <= room
    assert isinstance(response["outputs"], str)
    assert response["outputs"]


async def test_a_chat_token_by_token_as_chat_js_does_it(
    gateway: GatewayServer, chat: dict[str, Any]
) -> None:
    """README: ``max_new_tokens: 1`` with a stop_sequence streams tokens one by one until the
    text ends with it (``stop: true`` last); the next turn continues the same session. Each
    generate request is one turn for the gateway's metrics."""
    request = {"max_new_tokens": 1, "stop_sequence": END, "do_sample": False}
    before = await scrape(gateway)
    async with connect(v2_url(gateway)) as ws:
        await open_session(ws)
        first = await generate(ws, inputs=chat["prompt1"], **request)
        second = await generate(ws, inputs=chat["prompt2"], **request)
    assert "".join(texts(first)) == chat["reply1"] == "The capital of France is Paris.<|im_end|>"
    assert "".join(texts(second)) == chat["reply2"]
    for responses, n_tokens in ((first, chat["reply1_tokens"]), (second, chat["reply2_tokens"])):
        assert [r["token_count"] for r in responses] == [1] * n_tokens
        assert [r["stop"] for r in responses] == [False] * (n_tokens - 1) + [True]
        assert all(r["ok"] is True for r in responses)
    assert texts(first)[:3] == ["The", " capital", " of"]

    await wait_for_metric(
        gateway,
        before.get("farmesh_turns_total", kind="petals_v2") + 2,
        "farmesh_turns_total",
        kind="petals_v2",
    )
    after = await scrape(gateway)

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    assert delta("farmesh_turns_started_total", kind="petals_v2") == 2
    assert delta("farmesh_turns_total", kind="petals_v2", finish_reason="stop") == 2
    assert delta("farmesh_completion_tokens_total") == chat["reply1_tokens"] + chat["reply2_tokens"]
    assert delta("farmesh_prompt_tokens_total") == chat["prompt1_tokens"] + chat["prompt2_tokens"]
    # The second turn reused the whole history but the end-of-sequence token, still pending.
    assert delta("farmesh_cached_tokens_total") == chat["history"] - 1


async def test_multi_token_steps_and_the_end_of_sequence(
    gateway: GatewayServer, chat: dict[str, Any]
) -> None:
    """A step of ``max_new_tokens`` ends early at the end of sequence, whose text is in the
    outputs; without stop_sequence one step is one response."""
    async with connect(v2_url(gateway)) as ws:
        await open_session(ws)
        first = await generate(ws, inputs=chat["prompt1"], max_new_tokens=3, stop_sequence=END)
        second = await generate(ws, inputs=chat["prompt2"], max_new_tokens=20)
    assert steps(first) == [
        ("The capital of", 3, False),
        (" France is Paris", 3, False),
        (".<|im_end|>", 2, True),
    ]
    assert second == [
        {"ok": True, "outputs": chat["reply2"], "stop": True, "token_count": chat["reply2_tokens"]}
    ]


async def test_the_stop_sequence_is_matched_only_at_the_end_of_a_step(
    gateway: GatewayServer, chat: dict[str, Any]
) -> None:
    """websocket_api.py L70 tests ``endswith`` after each step: "." inside the step
    ".<|im_end|>" does not stop, and the loop goes on past the end of sequence until the
    session is full; that step is sent, then the next one fails."""
    max_length = chat["prompt1_tokens"] + 9  # room for 10 generated tokens
    async with connect(v2_url(gateway)) as ws:
        await open_session(ws, max_length=max_length)
        responses = await generate(ws, inputs=chat["prompt1"], max_new_tokens=3, stop_sequence=".")
        code, _ = await expect_close(ws)
    *sent, error = responses
    assert steps(sent[:3]) == [
        ("The capital of", 3, False),
        (" France is Paris", 3, False),
        (".<|im_end|>", 2, False),
    ]
    assert [r["stop"] for r in sent] == [False] * len(sent)
    assert sum(r["token_count"] for r in sent) == 10
    assert error == {  # upstream's wording, which chat.js matches to offer a longer session
        "ok": False,
        "traceback": f"context_overflow: Maximum length exceeded: prefix {max_length} + current "
        f"1 tokens exceeds this session's max_length {max_length} (0 tokens left)",
    }
    assert code == 1000


async def test_max_length_and_continuing_without_inputs(
    gateway: GatewayServer, tokenizer: Any
) -> None:
    """``max_length`` counts the whole session; absent, null and empty ``inputs`` continue
    where the session stands, so split requests generate what one request does."""
    n_prompt = len(tokenizer(COUNTING)["input_ids"])
    async with connect(v2_url(gateway)) as ws:
        await send(ws, {**OPEN, "max_length": 64})
        await send(ws, {"type": "generate", "inputs": COUNTING, "max_length": n_prompt + 8})
        assert await receive(ws) == {"ok": True}
        whole = await receive(ws)
    assert whole == {"ok": True, "outputs": " 7, 8, 9", "stop": True, "token_count": 8}

    async with connect(v2_url(gateway)) as ws:
        await open_session(ws, max_length=64)
        parts = [
            *await generate(ws, inputs=COUNTING, max_new_tokens=4),
            *await generate(ws, max_new_tokens=2),
            *await generate(ws, inputs=None, max_new_tokens=1),
            *await generate(ws, inputs="", max_new_tokens=1),
        ]
        # The session now holds n_prompt + 8 tokens: max_length leaves room for 2 more ...
        (two,) = await generate(ws, max_length=n_prompt + 10)
        # ... and, as in transformers, at least one token is generated past max_length.
        (one,) = await generate(ws, max_length=5)
    assert [(r["token_count"], r["stop"]) for r in parts] == [
        (4, True),
        (2, True),
        (1, True),
        (1, True),
    ]
    assert "".join(texts(parts)) == whole["outputs"]
    assert steps([two, one]) == [(", ", 2, True), ("1", 1, True)]


async def test_extra_stop_sequences_replace_the_last_token(
    gateway: GatewayServer, chat: dict[str, Any]
) -> None:
    """An extra stop sequence ends the reply and its last token becomes stop_sequence's: the
    next turn then continues exactly as after a reply that ended with that token."""
    next_turn = "\n<|im_start|>user\nAnd of Germany?<|im_end|>\n<|im_start|>assistant\n"
    request = {"max_new_tokens": 1, "stop_sequence": END}
    async with connect(v2_url(gateway)) as ws:
        await open_session(ws)
        first = await generate(
            ws, inputs=chat["prompt1"], **request, extra_stop_sequences=["Berlin", " Paris"]
        )
        replaced = await generate(ws, inputs=next_turn, **request)
    async with connect(v2_url(gateway)) as ws:
        await open_session(ws)
        history = chat["prompt1"] + "The capital of France is" + END
        explicit = await generate(ws, inputs=history + next_turn, **request)
    assert "".join(texts(first)) == "The capital of France is Paris"
    assert [r["stop"] for r in first] == [False] * 5 + [True]
    assert texts(replaced) == texts(explicit)
    assert "".join(texts(replaced)).endswith(END)


# UTF-8


async def test_multibyte_characters_are_sent_whole(gateway: GatewayServer) -> None:
    """Each of these hiragana is two tokens: the first token's text ends in U+FFFD, so it is
    held and sent with the next one (token_count 2). A final step is sent as it is (L78 holds
    only while ``not stop``); the next request starts with the rest of that character."""
    async with connect(v2_url(gateway)) as ws:
        await open_session(ws, max_length=128)
        greeting = await generate(ws, inputs=JAPANESE, max_new_tokens=1, stop_sequence="な")
        (whole,) = await generate(ws, max_new_tokens=1)
        (half,) = await generate(ws, max_new_tokens=1)
        rest = await generate(ws, max_new_tokens=1, stop_sequence="ど")
    assert steps(greeting) == [
        ("お", 2, False),
        ("や", 2, False),
        ("く", 2, False),
        ("な", 2, True),
    ]
    assert steps([whole, half]) == [("い", 1, True), ("\ufffd", 1, True)]
    # は's second token decodes alone to U+FFFD: held together with ど's two tokens.
    ((text, token_count, stop),) = steps(rest)
    assert (token_count, stop) == (3, True)
    assert text.startswith("\ufffd")
    assert text.endswith("ど")


# Accounting


@contextlib.asynccontextmanager
async def ledger_gateway(
    backend: Any, tmp_path: Path
) -> AsyncIterator[tuple[GatewayServer, Callable[[str], Awaitable[list[sqlite3.Row]]]]]:
    """A gateway whose observers are its metrics and a real ledger (SQLite), as the
    composition root wires them; yields the server and a flush-then-query function."""
    database = tmp_path / "ledger.sqlite3"
    writer = LedgerWriter(Ledger(f"sqlite+aiosqlite:///{database}"), tmp_path / "spool")
    await writer.start()
    status = MeshStatusCache(backend.model_ids, backend.coverage, refresh_s=60)
    await status.refresh()
    server = GatewayServer(
        Settings(
            port=0, price_per_token_far=PRICE, price_per_prompt_token_far=PROMPT_PRICE, auth="off"
        ),
        backend,
        status,
        Metrics(),
        observers=[LedgerObserver(writer, TurnCheckpoints(tmp_path / "checkpoints"))],
    )
    await server.start()

    async def query(sql: str) -> list[sqlite3.Row]:
        await writer.flush()
        with contextlib.closing(sqlite3.connect(database)) as connection:
            connection.row_factory = sqlite3.Row
            return connection.execute(sql).fetchall()

    try:
        yield server, query
    finally:
        await server.shutdown()
        await writer.aclose()


async def test_one_generate_request_is_one_billed_turn(
    backend: Any, chat: dict[str, Any], tmp_path: Path
) -> None:
    """However many steps it takes, one generate request is one turn in the metrics and the
    ledger: prompt tokens are its new inputs, completion tokens all it generated, cost as in
    protocol.md §7, node shares summing to it; a refused request records nothing."""
    p1, p2 = chat["prompt1_tokens"], chat["prompt2_tokens"]
    async with ledger_gateway(backend, tmp_path) as (server, query):
        async with connect(v2_url(server)) as ws:
            await open_session(ws, user_wallet="far1wallet")
            first = await generate(ws, inputs=chat["prompt1"], max_new_tokens=3, stop_sequence=END)
            second = await generate(ws, inputs=chat["prompt2"], max_new_tokens=20)
            # Requests are served in order, so this answer comes after both turns are recorded.
            await send(ws, OPEN)
            refused = await receive(ws)
            await expect_close(ws)
        async with connect(v2_url(server)) as ws:
            await open_session(ws, max_length=p1 + 5)
            full = await generate(ws, inputs=chat["prompt1"], max_new_tokens=100)
            overflow = await generate(ws, max_new_tokens=1)
            await expect_close(ws)
        await connections_closed(server)
        metrics = await scrape(server)
        turns = await query("SELECT * FROM turns ORDER BY started_at")
        shares = await query(
            """SELECT request_id, session_id, start_block, end_block, tokens, replayed_tokens,
                   share_far_e8 FROM node_contributions ORDER BY start_block"""
        )

    assert [r["token_count"] for r in first] == [3, 3, 2]
    assert [r["token_count"] for r in second] == [chat["reply2_tokens"]]
    assert refused["traceback"].startswith("invalid_request: expected a request of type 'gene")
    assert steps(full) == [("The capital of France is Paris", 6, True)]
    # chat.petals.dev's page retries with a longer session when it reads upstream's wording
    assert overflow[0]["traceback"].startswith("context_overflow: Maximum length exceeded")

    expected = [
        # (wallet, request, prompt, completion, cached, finish, fed tokens, cost)
        ("far1wallet", "v2-1", p1, 8, 0, "stop", p1 + 7, cost(8, p1)),
        ("far1wallet", "v2-2", p2, 8, chat["history"] - 1, "stop", 1 + p2 + 7, cost(8, p2)),
        (None, "v2-1", p1, 6, 0, "length", p1 + 5, cost(6, p1)),
    ]  # the overflowing request was refused before it started: no turn recorded
    assert [
        (
            t["wallet"],
            t["request_id"],
            t["prompt_tokens"],
            t["completion_tokens"],
            t["cached_tokens"],
            t["finish_reason"],
        )
        for t in turns
    ] == [row[:6] for row in expected]
    assert {(t["kind"], t["model_id"]) for t in turns} == {("petals_v2", BUNDLED_MODEL_ID)}
    assert turns[0]["session_id"] == turns[1]["session_id"] != turns[2]["session_id"]
    assert [t["cost_far_e8"] for t in turns] == [to_e8(row[7]) for row in expected]
    assert cost(8, p1) == Decimal("0.0001") * 8 + Decimal("0.00002") * p1

    for turn, row in zip(turns, expected, strict=True):
        parts = [
            s
            for s in shares
            if (s["session_id"], s["request_id"]) == (turn["session_id"], turn["request_id"])
        ]
        if row[6] == 0:
            assert parts == []
            continue
        # Every step's work, merged per server and block span: both servers saw every token.
        assert [(s["start_block"], s["end_block"]) for s in parts] == [(0, 15), (15, 30)]
        assert [(s["tokens"], s["replayed_tokens"]) for s in parts] == [(row[6], 0)] * 2
        assert sum(s["share_far_e8"] for s in parts) == turn["cost_far_e8"]

    assert metrics.get("farmesh_turns_started_total", kind="petals_v2") == 3
    for reason, count in (("stop", 2), ("length", 1), ("error", 0)):
        assert metrics.get("farmesh_turns_total", kind="petals_v2", finish_reason=reason) == count
    assert metrics.get("farmesh_completion_tokens_total") == 22
    assert metrics.get("farmesh_errors_total", code="invalid_request") == 1
    assert metrics.get("farmesh_errors_total", code="context_overflow") == 1


async def test_a_client_leaving_mid_step_stops_it(
    backend: Any, tokenizer: Any, tmp_path: Path
) -> None:
    """The step running when the client leaves stops after its current token; the request is
    billed as cancelled, for every token generated, and the mesh session is closed."""
    n_prompt = len(tokenizer(COUNTING)["input_ids"])
    async with ledger_gateway(backend, tmp_path) as (server, query):
        async with connect(v2_url(server)) as ws:
            await open_session(ws)
            # No stop: the steps would go on until the session is full.
            await send(
                ws,
                {"type": "generate", "inputs": COUNTING, "max_new_tokens": 4, "stop_sequence": "!"},
            )
            first = await receive(ws)
        await wait_for_metric(
            server, 1, "farmesh_turns_total", kind="petals_v2", finish_reason="cancelled"
        )
        await connections_closed(server)
        (turn,) = await query("SELECT * FROM turns")
    assert (first["token_count"], first["stop"]) == (4, False)
    assert turn["finish_reason"] == "cancelled"
    assert turn["prompt_tokens"] == n_prompt
    # The first step was delivered; the second stopped before its last token.
    assert 4 <= turn["completion_tokens"] < 8
    assert turn["cost_far_e8"] == to_e8(cost(turn["completion_tokens"], n_prompt))


# Errors


def _generate(**fields: Any) -> dict[str, Any]:
    return {"type": "generate", "inputs": "hi", "max_new_tokens": 2, **fields}


ONE_TOKEN = "extra_stop_sequences require stop_sequence length to be exactly 1 token"

# (case id, requests sent first, the bad request, the expected start of "traceback")
ERROR_CASES: list[tuple[str, list[dict[str, Any]], str | dict[str, Any], str]] = [
    (
        "generate before open",
        [],
        _generate(),
        "invalid_request: expected a request of type 'open_inference_session', got 'generate'",
    ),
    ("not json", [], "{nope", "invalid_request: the frame is not valid JSON"),
    ("not an object", [], "[1]", "invalid_request: a request must be a JSON object"),
    ("no type", [], {"max_length": 64}, "invalid_request: expected a request of type"),
    ("open without max_length", [], {**OPEN, "max_length": None}, "invalid_request: max_length"),
    ("max_length above limit", [], {**OPEN, "max_length": 10**6}, "invalid_request: max_length"),
    ("max_length zero", [], {**OPEN, "max_length": 0}, "invalid_request: max_length"),
    ("max_length text", [], {**OPEN, "max_length": "64"}, "invalid_request: max_length"),
    ("unknown model", [], {**OPEN, "model": "nope"}, "model_not_found: model 'nope'"),
    ("bad wallet", [], {**OPEN, "user_wallet": "a b"}, "invalid_request: user_wallet"),
    ("second open", [OPEN], OPEN, "invalid_request: expected a request of type 'generate'"),
    ("no length", [OPEN], _generate(max_new_tokens=None), "invalid_request: set max_new"),
    ("max_new_tokens above limit", [OPEN], _generate(max_new_tokens=5000), "invalid_request"),
    ("max_new_tokens zero", [OPEN], _generate(max_new_tokens=0), "invalid_request"),
    ("max_new_tokens text", [OPEN], _generate(max_new_tokens="2"), "invalid_request"),
    (
        "max_length step above the limit",
        [OPEN],
        _generate(max_new_tokens=None, max_length=2000),
        "invalid_request: max_length 2000 leaves",
    ),
    ("temperature 0", [OPEN], _generate(do_sample=True, temperature=0), "invalid_request"),
    ("top_p above 1", [OPEN], _generate(do_sample=1, top_p=1.5), "invalid_request: top_p"),
    ("top_k negative", [OPEN], _generate(do_sample=1, top_k=-1), "invalid_request: top_k"),
    ("penalty above 2", [OPEN], _generate(repetition_penalty=3), "invalid_request: repetition"),
    ("do_sample text", [OPEN], _generate(do_sample="yes"), "invalid_request: do_sample"),
    ("inputs too long", [OPEN], _generate(inputs="a" * 16001), "invalid_request: inputs has"),
    ("inputs not text", [OPEN], _generate(inputs=[1, 2]), "invalid_request: inputs must"),
    ("first request without inputs", [OPEN], _generate(inputs=""), "invalid_request: the first"),
    (
        "extra stops alone",
        [OPEN],
        _generate(extra_stop_sequences=["x"]),
        f"invalid_request: {ONE_TOKEN}",
    ),
    (
        "extra stops, two-token stop",
        [OPEN],
        _generate(stop_sequence=END + "\n", extra_stop_sequences=["x"]),
        f"invalid_request: {ONE_TOKEN}",
    ),
    (
        "extra stops not a list",
        [OPEN],
        _generate(stop_sequence=END, extra_stop_sequences="xy"),
        "invalid_request: extra_stop_sequences must",
    ),
    ("stop too long", [OPEN], _generate(stop_sequence="x" * 65), "invalid_request: stop_seq"),
]


@pytest.mark.parametrize(
    ("frames", "bad", "expected"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
async def test_an_error_is_reported_then_the_connection_closes(
    gateway: GatewayServer,
    frames: list[dict[str, Any]],
    bad: str | dict[str, Any],
    expected: str,
) -> None:
    """``{"ok": false, "traceback": "<code>: <message>"}`` (never a Python traceback), then
    the connection closes (1000), as the original handler returns after any exception."""
    before = await scrape(gateway)
    async with connect(v2_url(gateway)) as ws:
        for frame in frames:
            await send(ws, frame)
            assert await receive(ws) == {"ok": True}
        await ws.send(bad if isinstance(bad, str) else json.dumps(bad))
        response = await receive(ws)
        code, _ = await expect_close(ws)
    assert response.keys() == {"ok", "traceback"}
    assert response["ok"] is False
    assert response["traceback"].startswith(expected), response
    assert "Traceback" not in response["traceback"]
    assert "\n" not in response["traceback"]
    assert code == 1000
    await connections_closed(gateway)
    after = await scrape(gateway)
    error_code = response["traceback"].split(":", 1)[0]
    assert after.get("farmesh_errors_total", code=error_code) == (
        before.get("farmesh_errors_total", code=error_code) + 1
    )
    # Refused before generating: no turn was started.
    assert after.get("farmesh_turns_started_total", kind="petals_v2") == before.get(
        "farmesh_turns_started_total", kind="petals_v2"
    )


async def test_lenient_fields_as_in_the_original(
    gateway: GatewayServer, chat: dict[str, Any]
) -> None:
    """A binary frame holding JSON is read, ``model`` defaults to ours, ``null`` means absent,
    unknown fields are ignored, and sampling fields are ignored in greedy mode."""
    async with connect(v2_url(gateway)) as ws:
        await ws.send(json.dumps({"type": "open_inference_session", "max_length": 64}).encode())
        assert await receive(ws) == {"ok": True}
        responses = await generate(
            ws,
            inputs=chat["prompt1"],
            max_new_tokens=2,
            max_length=None,
            stop_sequence=None,
            extra_stop_sequences=None,
            do_sample=0,
            temperature=0,
            top_k=None,
            top_p=7,
            session_id="ignored",
        )
    assert responses == [{"ok": True, "outputs": "The capital", "stop": True, "token_count": 2}]


async def test_an_idle_connection_is_closed(backend: Any) -> None:
    """No request within ``idle_timeout_s``, before or after opening: an error, then 1000."""
    server = await start_gateway(backend, idle_timeout_s=0.3)
    try:
        async with connect(v2_url(server)) as ws:
            assert await receive(ws) == {
                "ok": False,
                "traceback": "idle_timeout: no request for 0.3 s; closing the session",
            }
            assert await expect_close(ws) == (1000, "idle timeout")
        async with connect(v2_url(server)) as ws:
            await open_session(ws)
            assert (await receive(ws))["traceback"].startswith("idle_timeout: ")
            assert await expect_close(ws) == (1000, "idle timeout")
        await connections_closed(server)
        assert (await scrape(server)).get("farmesh_errors_total", code="idle_timeout") == 2
    finally:
        await server.shutdown()


async def test_an_oversized_frame_closes_with_1009(backend: Any) -> None:
    server = await start_gateway(backend, max_frame_bytes=1024)
    try:
        async with connect(v2_url(server)) as ws:
            await open_session(ws)
            await send(ws, _generate(inputs="a" * 2000))
            code, _ = await expect_close(ws)
        assert code == 1009
        await connections_closed(server)
        assert (await scrape(server)).get("farmesh_turns_started_total") == 0
    finally:
        await server.shutdown()
