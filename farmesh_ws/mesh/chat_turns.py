"""The chat template applied per turn, so a session sends only the new turn's tokens.

The first turn is the template over its messages with the generation prompt (this is where a
model's default system prompt appears). Each later turn is the text the template would add
after a closed assistant reply: found by rendering a fixed probe conversation with and
without the new messages and keeping the difference. If the previous reply did not end with
the end-of-turn token (it hit max_new_tokens or a stop sequence), the closing text the
template puts after an assistant message is added first.
"""

from collections.abc import Sequence
from typing import Any

from farmesh_ws.mesh.base import ChatMessage

_PROBE_REPLY = "\x00farmesh-probe-reply\x00"
_PROBE = (
    {"role": "system", "content": "\x00farmesh-probe-system\x00"},
    {"role": "user", "content": "\x00farmesh-probe-user\x00"},
    {"role": "assistant", "content": _PROBE_REPLY},
)


class ChatTurns:
    """Renders turns with a Hugging Face tokenizer's chat template."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        closed_probe = self._render(_PROBE, add_generation_prompt=False)
        self._assistant_close = closed_probe[
            closed_probe.rindex(_PROBE_REPLY) + len(_PROBE_REPLY) :
        ]
        self._probe_prefix = closed_probe
        eos = tokenizer.eos_token or ""
        self._eos_text = eos if self._assistant_close.startswith(eos) else ""

    def first_turn_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self._encode(self._render(_as_dicts(messages), add_generation_prompt=True))

    def next_turn_ids(
        self, messages: Sequence[ChatMessage], *, previous_reply_closed: bool
    ) -> list[int]:
        """Tokens of a later turn. ``previous_reply_closed``: the last generated token was
        the end-of-turn token, so only the rest of the closing text is needed."""
        full = self._render([*_PROBE, *_as_dicts(messages)], add_generation_prompt=True)
        if not full.startswith(self._probe_prefix):
            raise ValueError("the chat template does not render turns incrementally")
        close = self._assistant_close
        if previous_reply_closed and self._eos_text:
            close = close[len(self._eos_text) :]
        return self._encode(close + full[len(self._probe_prefix) :])

    def _render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool) -> str:
        text = self._tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return str(text)

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))


def _as_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": message.role, "content": message.content} for message in messages]
