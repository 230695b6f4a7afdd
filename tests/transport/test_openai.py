"""The OpenAI-compatible HTTP API (http.md) through real sockets with the official `openai`
SDK, over the scripted mesh: shapes, streaming, identity, billing and errors."""

import asyncio
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import openai
import pytest

from farmesh_ws.engine.events import Observer, RequestEvent, RequestFinished, RequestStarted
from farmesh_ws.errors import InsufficientBalance
from farmesh_ws.ledger.keys import KeyPrincipal
from farmesh_ws.mesh.fake import FAKE_MODEL_ID, FakeBackend
from farmesh_ws.transport.ws import GatewayServer
from tests.transport.support import NO_KEY, fake_gateway, openai_client

ALICE = "fmk_alice"
WALLET = "0xAb5801a7D398351b8bE11C439e05C5B3259aeC9B"
KEYS = {ALICE: KeyPrincipal(key_id="fk_alice", wallet=WALLET, name=None)}
PRICE = Decimal("0.0001")  # Settings' default price per generated token
REPLY = "Hello there."


class Events(Observer):
    def __init__(self) -> None:
        self.events: list[RequestEvent] = []
        self.started = asyncio.Event()
        self.finished = asyncio.Event()

    def notify(self, event: RequestEvent) -> None:
        self.events.append(event)
        if isinstance(event, RequestStarted):
            self.started.set()
        if isinstance(event, RequestFinished):
            self.finished.set()

    def of(self, kind: type) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]


Gateway = tuple[GatewayServer, Events]


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Any]]:
    """Start a gateway over a scripted mesh (auth required, Alice's key known)."""
    servers: list[GatewayServer] = []

    async def start(backend: FakeBackend | None = None, **overrides: Any) -> Gateway:
        events = Events()
        overrides.setdefault("auth", "required")
        server = await fake_gateway(
            backend or FakeBackend(reply=REPLY), keys=KEYS, observers=[events], **overrides
        )
        servers.append(server)
        return server, events

    yield start
    for server in servers:
        await server.shutdown()


USER = [{"role": "user", "content": "Hi"}]


async def test_a_chat_completion_in_openai_shape_billed_to_the_key(make: Any) -> None:
    server, events = await make()
    async with openai_client(server, ALICE) as client:
        reply = await client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER)
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == FAKE_MODEL_ID
    (choice,) = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLY
    assert choice.finish_reason == "stop"
    usage = reply.usage
    assert usage is not None
    assert usage.completion_tokens == len(REPLY) + 1  # the scripted end-of-turn token too
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0
    extra = (reply.model_extra or {})["farmesh"]
    assert Decimal(extra["cost_far"]) == PRICE * usage.completion_tokens
    assert sum(Decimal(node["share_far"]) for node in extra["nodes"]) == Decimal(extra["cost_far"])
    assert {node["peer_id"] for node in extra["nodes"]} == {"fake-peer-a", "fake-peer-b"}
    (started,) = events.of(RequestStarted)
    assert started.context.wallet == WALLET
    assert started.context.principal_id == "key:fk_alice"
    (finished,) = events.of(RequestFinished)
    assert finished.settlement.cost_far == Decimal(extra["cost_far"])


async def test_max_tokens_and_max_completion_tokens_end_with_length(make: Any) -> None:
    server, _ = await make()
    async with openai_client(server, ALICE) as client:
        short = await client.chat.completions.create(
            model=FAKE_MODEL_ID, messages=USER, max_tokens=3
        )
        newer = await client.chat.completions.create(
            model=FAKE_MODEL_ID, messages=USER, max_completion_tokens=4, temperature=0.5, seed=7
        )
    assert short.choices[0].message.content == REPLY[:3]
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None
    assert short.usage.completion_tokens == 3
    assert newer.choices[0].message.content == REPLY[:4]
    assert newer.choices[0].finish_reason == "length"


async def test_stop_sequences_end_the_reply_with_stop(make: Any) -> None:
    server, _ = await make()
    async with openai_client(server, ALICE) as client:
        one = await client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER, stop="o")
        listed = await client.chat.completions.create(
            model=FAKE_MODEL_ID, messages=USER, stop=["the", "xyz"]
        )
    assert one.choices[0].message.content == "Hell"
    assert one.choices[0].finish_reason == "stop"
    assert listed.choices[0].message.content == "Hello "


async def test_the_whole_conversation_is_templated_and_claims_bill_nobody_else(make: Any) -> None:
    prompts: list[str] = []

    def reply(prompt: str) -> str:
        prompts.append(prompt)
        return "ok"

    server, events = await make(FakeBackend(reply=reply))
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}]
    messages: Any = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": parts},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    async with openai_client(server, ALICE) as client:
        answer = await client.chat.completions.create(
            model=FAKE_MODEL_ID,
            messages=messages,
            user="0xSomeoneElse",
            extra_body={"user_wallet": "0xSomeoneElse", "wallet": "0xSomeoneElse"},
        )
    assert answer.choices[0].message.content == "ok"
    (prompt,) = prompts
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi you")
    assert "<|im_start|>assistant\nHello.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    (started,) = events.of(RequestStarted)
    assert started.context.wallet == WALLET


async def test_a_stream_of_chunks_with_usage_ends_with_done(make: Any) -> None:
    server, _ = await make()
    async with openai_client(server, ALICE) as client:
        stream = await client.chat.completions.create(
            model=FAKE_MODEL_ID,
            messages=USER,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        async with client.chat.completions.with_streaming_response.create(
            model=FAKE_MODEL_ID, messages=USER, stream=True
        ) as raw:
            assert raw.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in raw.iter_lines() if line]
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    finish = [reason for reason in finish if reason is not None]
    assert finish == ["stop"]
    assert all(chunk.usage is None for chunk in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == len(REPLY) + 1
    assert Decimal((last.model_extra or {})["farmesh"]["cost_far"]) == PRICE * (len(REPLY) + 1)
    # without include_usage: no usage field; the last event is OpenAI's terminator
    assert lines[-1] == "data: [DONE]"
    assert '"usage"' not in "".join(lines)
    assert all(line.startswith("data: ") for line in lines)


async def test_completions_take_the_prompt_as_raw_text(make: Any) -> None:
    prompts: list[str] = []

    def reply(prompt: str) -> str:
        prompts.append(prompt)
        return " world"

    server, _ = await make(FakeBackend(reply=reply))
    async with openai_client(server, ALICE) as client:
        whole = await client.completions.create(model=FAKE_MODEL_ID, prompt="Hello", max_tokens=6)
        stream = await client.completions.create(
            model=FAKE_MODEL_ID,
            prompt=["Hello"],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert prompts == ["Hello", "Hello"]
    assert whole.object == "text_completion"
    assert whole.id.startswith("cmpl-")
    assert whole.choices[0].text == " world"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == 5
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " world"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7


async def test_models_are_listed_and_retrieved(make: Any) -> None:
    server, _ = await make()
    async with openai_client(server, ALICE) as client:
        listed = [model.id async for model in client.models.list()]
        one = await client.models.retrieve(FAKE_MODEL_ID)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("no-such-model")
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.chat.completions.create(model="no-such-model", messages=USER)
    assert listed == [FAKE_MODEL_ID]
    assert one.object == "model"
    assert one.owned_by == "farmesh"
    assert missing.value.code == "model_not_found"
    assert unknown.value.param == "model"


async def test_no_key_or_a_bad_key_is_an_authentication_error(make: Any) -> None:
    server, events = await make()
    async with openai_client(server, "fmk_not_a_key") as client:
        with pytest.raises(openai.AuthenticationError) as bad:
            await client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER)
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    async with openai_client(server, None) as client:
        with pytest.raises(openai.AuthenticationError) as missing:
            await client.chat.completions.create(
                model=FAKE_MODEL_ID, messages=USER, extra_headers=NO_KEY
            )
    assert bad.value.status_code == 401
    assert bad.value.code == "invalid_api_key"
    assert bad.value.type == "authentication_error"
    assert "fmk_not_a_key" not in bad.value.message
    assert "API key" in missing.value.message
    assert events.of(RequestStarted) == []


async def test_optional_auth_serves_anonymous_callers(make: Any) -> None:
    """Without a header, or with a placeholder key in no format of ours (OpenAI clients must
    send some key); a malformed key of ours is still refused."""
    server, events = await make(auth="optional")
    async with openai_client(server, None) as client:
        answer = await client.chat.completions.create(
            model=FAKE_MODEL_ID, messages=USER, extra_headers=NO_KEY
        )
    async with openai_client(server, "sk-placeholder") as client:
        again = await client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER)
    async with openai_client(server, "fmk_mistyped") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER)
    assert answer.choices[0].message.content == again.choices[0].message.content == REPLY
    started = events.of(RequestStarted)
    assert [(s.context.principal_id, s.context.wallet) for s in started] == [
        ("anonymous", None)
    ] * 2


async def test_the_rate_limit_is_a_rate_limit_error_with_retry_after(make: Any) -> None:
    server, events = await make(requests_per_minute=1.0, requests_burst=1)
    async with openai_client(server, ALICE) as client:
        await client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER)
    error = limited.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert int(error.response.headers["retry-after"]) >= 1
    assert error.response.headers["x-should-retry"] == "true"
    assert len(events.of(RequestStarted)) == 1


async def test_bad_input_is_a_bad_request_naming_the_field(make: Any) -> None:
    backend = FakeBackend(reply=REPLY)
    server, events = await make(
        backend, max_length_limit=64, max_new_tokens_limit=16, default_max_new_tokens=8
    )
    async with openai_client(server, ALICE) as client:
        create = client.chat.completions.create
        with pytest.raises(openai.BadRequestError) as two:
            await create(model=FAKE_MODEL_ID, messages=USER, n=2)
        with pytest.raises(openai.BadRequestError) as hot:
            await create(model=FAKE_MODEL_ID, messages=USER, temperature=5)
        with pytest.raises(openai.BadRequestError) as typed:
            await create(model=FAKE_MODEL_ID, messages=USER, extra_body={"max_tokens": "many"})
        with pytest.raises(openai.BadRequestError) as role:
            await create(model=FAKE_MODEL_ID, messages=[{"role": "tool", "content": "x"}])
        with pytest.raises(openai.BadRequestError) as long:
            await create(model=FAKE_MODEL_ID, messages=[{"role": "user", "content": "x" * 100}])
    assert two.value.param == "n"
    assert two.value.type == "invalid_request_error"
    assert hot.value.param == "temperature"
    assert typed.value.param == "max_tokens"
    assert role.value.param == "messages.[0].role"
    assert long.value.code == "context_length_exceeded"
    assert "Maximum length exceeded" in long.value.message
    # refused: nothing started, nothing reached the mesh, nothing billed
    assert events.of(RequestStarted) == events.of(RequestFinished) == []
    assert all(session.tokens_sent == 0 for session in backend.sessions)


async def test_a_mesh_failure_is_a_503_and_mid_stream_an_error_event(make: Any) -> None:
    server, events = await make(FakeBackend(reply=REPLY, fail_after=0))
    async with openai_client(server, ALICE) as client:
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER)
    assert failed.value.status_code == 503
    assert failed.value.code == "mesh_error"
    server, events = await make(FakeBackend(reply=REPLY, fail_after=3))
    received = ""
    async with openai_client(server, ALICE) as client:
        stream = await client.chat.completions.create(
            model=FAKE_MODEL_ID, messages=USER, stream=True
        )

        async def read() -> None:
            nonlocal received
            async for chunk in stream:
                received += chunk.choices[0].delta.content or ""

        with pytest.raises(openai.APIError) as mid:
            await read()
    assert received == REPLY[:3]
    assert "mesh" in mid.value.message
    (finished,) = events.of(RequestFinished)
    assert finished.settlement.completion_tokens == 3  # billed as delivered


async def test_a_client_gone_mid_stream_cancels_the_request(make: Any) -> None:
    gate = asyncio.Semaphore(0)
    server, events = await make(FakeBackend(reply=REPLY, gate=gate))
    async with openai_client(server, ALICE) as client:
        stream = await client.chat.completions.create(
            model=FAKE_MODEL_ID, messages=USER, stream=True
        )
        received = ""
        gate.release()
        gate.release()
        async for chunk in stream:
            received += chunk.choices[0].delta.content or ""
            if len(received) == 2:
                break
        await stream.close()
        await asyncio.wait_for(events.finished.wait(), 10)
    (finished,) = events.of(RequestFinished)
    assert finished.settlement.finish_reason == "cancelled"
    assert finished.settlement.completion_tokens == 2
    assert server.engine.runner.active == set()


async def test_shutdown_lets_a_running_stream_finish_and_refuses_new_requests(make: Any) -> None:
    gate = asyncio.Semaphore(0)
    server, events = await make(FakeBackend(reply="abc", gate=gate))
    async with openai_client(server, ALICE) as client:
        stream = await client.chat.completions.create(
            model=FAKE_MODEL_ID, messages=USER, stream=True
        )
        chunks = aiter(stream)
        first = await anext(chunks)  # the role chunk: the request is running
        assert first.choices[0].delta.role == "assistant"
        stopping = asyncio.create_task(server.shutdown())
        await asyncio.sleep(0)  # one loop pass: shutdown runs up to its drain
        assert server.engine.sessions.stopping
        with pytest.raises((openai.APIConnectionError, openai.InternalServerError)):
            await client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER)
        for _ in range(4):
            gate.release()
        text = "".join([c.choices[0].delta.content or "" async for c in chunks])
        await stopping
    assert text == "abc"
    (finished,) = events.of(RequestFinished)
    assert finished.settlement.finish_reason == "stop"


async def test_a_client_gone_before_a_whole_reply_cancels_the_request(make: Any) -> None:
    gate = asyncio.Semaphore(0)
    server, events = await make(FakeBackend(reply=REPLY, gate=gate))
    async with openai_client(server, ALICE) as client:
        waiting = asyncio.create_task(
            client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER)
        )
        await asyncio.wait_for(events.started.wait(), 10)
        gate.release()
        waiting.cancel()  # closes the HTTP connection
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.wait_for(events.finished.wait(), 10)
    (finished,) = events.of(RequestFinished)
    assert finished.settlement.finish_reason == "cancelled"
    assert finished.settlement.completion_tokens <= 1


class _EmptyWallet:
    """Prepaid holds on a wallet with no balance."""

    async def take(self, *, wallet: str, hold_id: str, minimum: Decimal, maximum: Decimal) -> Any:
        raise InsufficientBalance(f"the balance does not cover {minimum} $FAR")

    async def release(self, hold_id: str) -> None:
        pass


async def test_caps_and_balances_are_the_engines_in_openai_shapes(make: Any) -> None:
    gate = asyncio.Semaphore(0)
    server, events = await make(FakeBackend(reply="ab", gate=gate), max_requests_per_principal=1)
    async with openai_client(server, ALICE) as client:
        stream = await client.chat.completions.create(
            model=FAKE_MODEL_ID, messages=USER, stream=True
        )
        with pytest.raises(openai.RateLimitError) as capped:
            await client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER)
        for _ in range(3):
            gate.release()
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "ab"
    assert capped.value.code == "quota_exceeded"
    server, events = await make(holds=_EmptyWallet(), balances="prepaid")
    async with openai_client(server, ALICE) as client:
        with pytest.raises(openai.RateLimitError) as broke:
            await client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER)
    assert broke.value.code == "insufficient_quota"
    assert broke.value.type == "insufficient_quota"
    assert broke.value.response.headers["x-should-retry"] == "false"
    assert events.of(RequestStarted) == []
