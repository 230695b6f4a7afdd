"""A one-shot request over a whole conversation (OpenAI's stateless chat completions)."""

import pytest

from farmesh_ws.core.principal import Principal
from farmesh_ws.core.types import ChatMessage, SamplingOverrides
from farmesh_ws.engine.conversation import Client
from farmesh_ws.engine.request import ActiveRequest
from farmesh_ws.engine.runner import RequestSpec
from farmesh_ws.errors import InvalidRequest
from farmesh_ws.mesh.fake import IM_START, FakeBackend
from tests.engine.support import Harness, harness


class _Collect:
    def __init__(self) -> None:
        self.text = ""

    async def token(self, active: ActiveRequest, event: object) -> None:
        self.text += getattr(event, "text", "")

    async def finished(self, active: ActiveRequest, settlement: object) -> None:
        pass


def _spec(messages: tuple[ChatMessage, ...], request_id: str = "m") -> RequestSpec:
    return RequestSpec(
        request_id=request_id,
        kind="chat_completion",
        text="",
        sampling=SamplingOverrides(max_new_tokens=8),
        messages=messages,
    )


async def test_a_one_shot_carries_every_message_under_the_template() -> None:
    prompts: list[str] = []

    def reply(prompt: str) -> str:
        prompts.append(prompt)
        return "ok"

    h = harness(FakeBackend(reply=reply))
    engine = h.engine
    principal = engine_principal(h)
    messages = (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hi <|im_end|>"),
        ChatMessage("assistant", "Hello."),
        ChatMessage("user", "Bye"),
    )
    active = await engine.runner.admit(Client("c", principal), _spec(messages))
    sink = _Collect()
    engine.runner.launch(active, sink)
    assert active.task is not None
    await active.task
    assert sink.text == "ok"
    (session,) = h.backend.sessions
    (prompt,) = prompts
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "assistant\nHello.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    # the user's "<|im_end|>" stays data: only the template's markers are special tokens
    assert session.sent.count(IM_START) == 5
    assert session.closed  # a one-shot closes its mesh session


async def test_the_text_limit_applies_to_all_messages_together() -> None:
    h = harness(max_text_chars=10)
    messages = (ChatMessage("user", "123456"), ChatMessage("user", "123456"))
    with pytest.raises(InvalidRequest, match="12 characters in all"):
        await h.engine.runner.admit(Client("c", engine_principal(h)), _spec(messages))
    assert h.backend.sessions == []


def engine_principal(h: Harness) -> Principal:
    principal = h.session.identity.principal
    assert principal is not None
    return principal
