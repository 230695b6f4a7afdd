"""The chat template applied per turn, so a session sends only the new turn's tokens.

The first turn is the template over its messages with the generation prompt (this is where a
model's default system prompt appears). Each later turn is the text the template would add
after a closed assistant reply: found by rendering a fixed probe conversation with and
without the new messages and keeping the difference. If the previous reply did not end with
the end-of-turn token (it hit max_new_tokens or a stop sequence), the closing text the
template puts after an assistant message is added first.

Only the template's own markers become special tokens. The template is rendered with a
unique placeholder in place of each message's content; the template text between the
placeholders is split at the tokenizer's added tokens (``<|im_start|>``, ``<|im_end|>``...),
which become their ids, and everything else (template text and content alike) is encoded
by a copy of the tokenizer that knows no added tokens. A user who writes ``<|im_end|>``
therefore gets the characters ``<``, ``|``, ``im``... and cannot close a turn or open a
system turn. For text without added-token strings in its content this equals encoding the
whole rendered template, as the tokenizer splits at added tokens the same way.
"""

import json
import re
import secrets
from collections.abc import Iterator, Sequence
from typing import Any

from farmesh_ws.core.types import ChatMessage

_PROBE_ROLES = ("system", "user", "assistant")
_VERBATIM_SAMPLE = " \n farmesh content check \n "


class ChatTurns:
    """Renders and tokenizes turns with a Hugging Face fast tokenizer's chat template.

    Raises ``ValueError`` when the template does not render message content verbatim (for
    example if it strips it), since content could then not be told apart from template text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._tag = f"\x00farmesh-{secrets.token_hex(8)}-"
        self._placeholder = re.compile(re.escape(self._tag) + r"(\d+)\x00")
        added: dict[str, int] = dict(tokenizer.get_added_vocab())
        self._added_ids = added
        alternatives = sorted(added, key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, alternatives))) if added else None
        self._literal = _without_added_tokens(tokenizer.backend_tokenizer)
        self._check_verbatim()

        closed_probe = self._render(_PROBE_ROLES, add_generation_prompt=False)
        reply_slot = self._slot(len(_PROBE_ROLES) - 1)
        self._assistant_close = closed_probe[closed_probe.rindex(reply_slot) + len(reply_slot) :]
        self._probe_prefix = closed_probe
        eos = tokenizer.eos_token or ""
        self._eos_text = eos if self._assistant_close.startswith(eos) else ""

    def first_turn_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of the template over ``messages`` with the generation prompt."""
        roles = [message.role for message in messages]
        rendered = self._render(roles, add_generation_prompt=True)
        return self._encode(rendered, [message.content for message in messages], first=0)

    def next_turn_ids(
        self, messages: Sequence[ChatMessage], *, previous_reply_closed: bool
    ) -> list[int]:
        """Tokens of a later turn. ``previous_reply_closed``: the last generated token was
        the end-of-turn token, so only the rest of the closing text is needed.

        Raises ``ValueError`` if the template does not render turns incrementally.
        """
        roles = [*_PROBE_ROLES, *(message.role for message in messages)]
        full = self._render(roles, add_generation_prompt=True)
        if not full.startswith(self._probe_prefix):
            raise ValueError("the chat template does not render turns incrementally")
        close = self._assistant_close
        if previous_reply_closed and self._eos_text:
            close = close[len(self._eos_text) :]
        contents = [message.content for message in messages]
        return self._encode(
            close + full[len(self._probe_prefix) :], contents, first=len(_PROBE_ROLES)
        )

    def _slot(self, index: int) -> str:
        return f"{self._tag}{index}\x00"

    def _render(self, roles: Sequence[str], *, add_generation_prompt: bool) -> str:
        """The template with message ``i``'s content replaced by ``self._slot(i)``."""
        messages = [{"role": role, "content": self._slot(i)} for i, role in enumerate(roles)]
        text = self._tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return str(text)

    def _check_verbatim(self) -> None:
        messages = [{"role": role, "content": _VERBATIM_SAMPLE} for role in _PROBE_ROLES]
        real = self._tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        rendered = self._render(_PROBE_ROLES, add_generation_prompt=True)
        if self._placeholder.sub(lambda _: _VERBATIM_SAMPLE, rendered) != real:
            raise ValueError("the chat template does not render message content verbatim")

    def _encode(self, rendered: str, contents: Sequence[str], *, first: int) -> list[int]:
        """Ids of ``rendered`` whose slots ``first ..`` hold ``contents``, content literal."""
        ids: list[int] = []
        run: list[str] = []
        for item in self._pieces(rendered, contents, first=first):
            if isinstance(item, str):
                run.append(item)
                continue
            ids += self._encode_literal("".join(run))
            run = []
            ids.append(item)
        return ids + self._encode_literal("".join(run))

    def _pieces(self, rendered: str, contents: Sequence[str], *, first: int) -> Iterator[str | int]:
        """Literal text and added-token ids in order; added tokens only from template text."""
        parts = self._placeholder.split(rendered)
        slots = [int(index) - first for index in parts[1::2]]
        if sorted(slots) != list(range(len(contents))):
            raise ValueError("the chat template must render each message's content once")
        for position, part in enumerate(parts):
            if position % 2:
                yield contents[int(part) - first]
            else:
                yield from self._template_pieces(part)

    def _template_pieces(self, text: str) -> Iterator[str | int]:
        start = 0
        if self._added is not None:
            for match in self._added.finditer(text):
                yield text[start : match.start()]
                yield self._added_ids[match.group()]
                start = match.end()
        yield text[start:]

    def _encode_literal(self, text: str) -> list[int]:
        return list(self._literal.encode(text, add_special_tokens=False).ids) if text else []


def _without_added_tokens(backend_tokenizer: Any) -> Any:
    """A copy of a ``tokenizers.Tokenizer`` (same normalizer, pre-tokenizer and model) that
    matches no added tokens, so text like ``<|im_end|>`` is encoded as ordinary characters."""
    from tokenizers import Tokenizer

    spec = json.loads(backend_tokenizer.to_str())
    spec["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(spec))
